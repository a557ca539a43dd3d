"""vLLM used directly, in a process of its own: what the engine itself answers.

Tests compare the service's output with this, for the same prompt and sampling settings, so
they check what the project does (routing, rendering, sampling) rather than what a 135M model
knows, which differs between processors (see the notes on CPUs without native bf16).
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

from vllm_service.testing import cpu_dtype


def engine_dtype() -> str:
    """The dtype the service's engines run in here: ``VLLM_DTYPE`` if set, else the CPU rule.

    Tests that compare with a reference run it in the same dtype, so that on a CPU with
    native bf16 (where the rule keeps the model's bf16) both sides share the numerics.
    ``VLLM_DTYPE=bfloat16`` reproduces such a run on an AVX2-only CPU (slowly: emulated).
    """
    return os.environ.get("VLLM_DTYPE") or cpu_dtype()

# The service's documented sampling defaults (VLLM_DEFAULT_*), for calls that leave them out.
SERVICE_DEFAULTS = {
    "temperature": 0.7,
    "top_p": 0.95,
    "top_k": -1,
    "max_tokens": 2048,
    "repetition_penalty": 1.0,
}


class ReferenceEngine:
    """A plain ``vllm.LLM`` answering one prompt at a time through ``LLM.generate`` / ``LLM.chat``."""

    def __init__(self, model: str, max_model_len: int = 2048, dtype: str | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        # The same dtype as the service on this processor, in eager mode like the service.
        self.dtype = dtype or engine_dtype()
        args = {
            "model": model,
            "max_model_len": max_model_len,
            "enforce_eager": True,
            "dtype": self.dtype,
            "trust_remote_code": False,
        }
        self._process = context.Process(target=_serve, args=(child, args), name="reference-llm")
        self._process.start()
        child.close()
        # Ready is awaited at the first question, so the engine loads while the caller goes on
        # (starting another engine, say): each start is mostly one core importing vLLM.
        self._ready = False
        self._cache: dict[str, str] = {}

    def generate(self, prompt: str, **sampling: Any) -> str:
        """What vLLM answers to ``prompt``, with the service's defaults under ``sampling``."""
        return self._ask("generate", prompt, sampling)

    def chat(
        self, messages: list[dict[str, Any]], chat_options: dict[str, Any] | None = None,
        **sampling: Any,
    ) -> str:
        """What ``LLM.chat`` answers to one conversation, with the service's defaults;
        ``chat_options`` are ``LLM.chat``'s own keywords (chat_template_kwargs, ...)."""
        return self._ask("chat", messages, {**sampling, **_options(chat_options)})

    def outputs(self, prompts: list[str], **sampling: Any) -> list[dict[str, Any]]:
        """:meth:`output` for several prompts in one ``LLM.generate`` call: one batch.

        In bf16 a request's answer can depend on the batch it shares; a caller that sends
        the same prompts to the service in one call compares like with like.
        """
        return self._ask("generate_many", prompts, sampling, full=True)

    def output(self, kind: str, prompt: Any, **sampling: Any) -> dict[str, Any]:
        """Everything vLLM returns for one prompt (``kind`` "generate" or "chat"), as plain data.

        ``{"prompt_token_ids", "prompt_logprobs", "samples": [{"text", "token_ids",
        "finish_reason", "stop_reason", "cumulative_logprob", "logprobs"}]}``, where a
        logprobs entry is ``{token_id: (logprob, rank, decoded)}`` per position. A
        ``structured_outputs`` dict and ``truncate_prompt_tokens`` are taken as the service
        takes them.
        """
        return self._ask(kind, prompt, sampling, full=True)

    def chat_output(
        self, messages: list[dict[str, Any]], chat_options: dict[str, Any], **sampling: Any
    ) -> dict[str, Any]:
        """:meth:`output` of ``LLM.chat`` with its own keywords ``chat_options``."""
        return self._ask("chat", messages, {**sampling, **_options(chat_options)}, full=True)

    def _ask(self, kind: str, prompt: Any, sampling: dict[str, Any], full: bool = False) -> Any:
        sampling = {**SERVICE_DEFAULTS, **sampling}
        key = repr((kind, prompt, sorted(sampling.items()), full))
        if key not in self._cache:
            self._wait_ready()
            self._conn.send((kind, prompt, sampling, full))
            self._cache[key] = self._conn.recv()
        return self._cache[key]

    def _wait_ready(self) -> None:
        if not self._ready:
            if self._conn.recv() != "ready":
                raise RuntimeError("the reference engine failed to start")
            self._ready = True

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()


# Where LLM.chat's own keywords travel to the engine's process, beside the sampling.
_CHAT_OPTIONS = "_chat_options"


def _options(chat_options: dict[str, Any] | None) -> dict[str, Any]:
    return {_CHAT_OPTIONS: chat_options} if chat_options else {}


def _serve(conn: Any, args: dict[str, Any]) -> None:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    # A session of its own, as the service's workers have: with the kernel's autogroups, the CPU
    # this engine burns while loading would otherwise be charged to the test process's session,
    # which the scheduler then held back for up to minutes while another engine generated
    # (docs/reliability.md, "What looked wrong", item 10).
    os.setsid()
    # The engine core in this process, as the service's workers run it on CPU: same answers,
    # and it starts in a third of the time (vLLM's own process re-imports torch and vLLM).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = LLM(**args)
    conn.send("ready")
    try:
        while (message := conn.recv()) is not None:
            kind, prompt, sampling, full = message
            sampling = dict(sampling)
            truncate = sampling.pop("truncate_prompt_tokens", None)
            tokenization = None if truncate is None else {"truncate_prompt_tokens": truncate}
            if "structured_outputs" in sampling:
                sampling["structured_outputs"] = StructuredOutputsParams(
                    **sampling["structured_outputs"]
                )
            chat_options = sampling.pop(_CHAT_OPTIONS, {})
            params = SamplingParams(**sampling)
            if kind == "chat":
                outputs = llm.chat(
                    [prompt], params, use_tqdm=False, tokenization_kwargs=tokenization,
                    **chat_options,
                )
            elif kind == "generate_many":
                outputs = llm.generate(prompt, params, use_tqdm=False)
                conn.send([_plain(output) for output in outputs])
                continue
            else:
                if isinstance(prompt, list):
                    prompt = {"prompt_token_ids": prompt}
                outputs = llm.generate(
                    [prompt], params, use_tqdm=False, tokenization_kwargs=tokenization
                )
            conn.send(_plain(outputs[0]) if full else outputs[0].outputs[0].text)
    except EOFError:
        pass
    finally:
        llm.llm_engine.engine_core.shutdown()  # vLLM's engine process outlives us otherwise
        os._exit(0)


def _plain(output: Any) -> dict[str, Any]:
    """A ``vllm.RequestOutput`` as plain data (see ``ReferenceEngine.output``)."""

    def positions(entries: Any) -> Any:
        if entries is None:
            return None
        return [
            None if entry is None
            else {i: (lp.logprob, lp.rank, lp.decoded_token) for i, lp in entry.items()}
            for entry in entries
        ]

    return {
        "prompt_token_ids": list(output.prompt_token_ids),
        "prompt_logprobs": positions(output.prompt_logprobs),
        "samples": [
            {
                "text": c.text,
                "token_ids": list(c.token_ids),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "cumulative_logprob": c.cumulative_logprob,
                "logprobs": positions(c.logprobs),
            }
            for c in output.outputs
        ],
    }
