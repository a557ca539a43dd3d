"""LoRA adapters on the demo model: one configured, one loaded at run time, used side by side.

    .venv/bin/pip install peft    # only to make the example's adapters
    .venv/bin/python examples/lora.py

The adapters here are random (made with peft, like the tests make theirs), so they change the
answers without making them better; use your own fine-tuned adapter folders instead.
"""

import sys
import tempfile
from pathlib import Path

from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _lora_adapter import make_adapter  # noqa: E402  (a peft adapter with random weights)

if __name__ == "__main__":
    model = demo_model_path()
    with tempfile.TemporaryDirectory(prefix="lora-example-") as folder:
        first = make_adapter(model, Path(folder) / "first", seed=0)
        second = make_adapter(model, Path(folder) / "second", seed=1)

        settings = VLLMSettings(model_path=model, max_model_len=2048,
                                lora_modules={"first": str(first)})  # or VLLM_LORA_MODULES as JSON
        with VLLMInferenceService(settings) as service:
            service.load_lora("second", second)  # at run time
            for lora in (None, "first", "second"):
                result = service.generate("The capital of France is", temperature=0,
                                          max_tokens=12, lora=lora)
                print(f"{lora or 'base':>7}: {result.text!r}")
            service.unload_lora("second")
            print(service.lora_adapters())  # ['first']
