"""Token ids, logprobs, n samples and a prompt given as token ids, on the demo model.

    .venv/bin/python examples/sampling.py
"""

from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path

if __name__ == "__main__":
    settings = VLLMSettings(model_path=demo_model_path(), max_model_len=2048)
    with VLLMInferenceService(settings) as service:
        result = service.generate("The capital of France is", temperature=0, max_tokens=8,
                                  logprobs=3)
        print(repr(result.text), result.token_ids, result.finish_reason)
        for position in result.logprobs:
            print(f"{position.token!r:>12} {position.logprob:7.3f}  top: "
                  + ", ".join(f"{t.token!r} {t.logprob:.2f}" for t in position.top))

        again = service.generate(result.prompt_token_ids, temperature=0, max_tokens=8)
        assert again.token_ids == result.token_ids  # the same prompt, given as token ids

        story = service.generate("Once upon a time", n=3, temperature=1.0, seed=1, max_tokens=12,
                                 logprobs=0)
        best = max(story.samples, key=lambda sample: sample.cumulative_logprob)
        print("most likely of 3 samples:", repr(best.text))
