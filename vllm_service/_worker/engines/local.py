"""The worker's local engine: a ``vllm.LLM`` driven request by request (continuous batching).

Requests are added to vLLM's engine as they arrive and the engine is stepped while any is
unfinished, so a request that arrives while others run joins the running batch at once.
Every request asks vLLM for delta outputs, so the worker sees each request's first token
(its timings); vLLM's own merge puts the deltas together for the final result. A streamed
request's new text goes to the parent at once.
Only the worker process imports this module (it imports vLLM and torch).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..._common.engine_args import (
    WEIGHT_LOADER,
    adapt_engine_args,
    adapt_engine_environment,
    check_vllm_version,
)
from ..._common.lora import ZERO_ADAPTER_NAME, write_zero_adapter
from ..._common.machine import cpu_weight_update_problem
from ..._common.media import fetched, needs_fetching
from ...types import MAX_INT32, Sample, TokenLogprobs, TopLogprob
from ..protocol import Delta, Finished, Request, WorkerConfig
from .chat_parsing import ChatParsing, ParsedChat
from .contract import RequestClock

logger = logging.getLogger(__name__)

# How long step() waits for the engine's next output before the worker loop reads its pipe.
_STEP_POLL_SECONDS = 0.005


class LocalEngine:
    """A ``vllm.LLM`` with an add / step / abort interface keyed by the service's request ids."""

    def __init__(self, config: WorkerConfig) -> None:
        check_vllm_version()
        from vllm import LLM
        from vllm.platforms import current_platform

        environment, choices = adapt_engine_environment(current_platform.is_cpu())
        os.environ.update(environment)  # vLLM reads its variables when it builds the engine
        engine_args, arg_choices = adapt_engine_args(config.engine_args)
        choices += arg_choices
        for choice in choices:
            logger.warning("vllm-service: %s", choice)
        # Tool calls and reasoning, parsed out of chats' answers as vLLM's server does; an
        # unknown parser's name fails the start before the model loads.
        self._chat_parsing = ChatParsing(config.tool_parser, config.reasoning_parser)
        try:
            self._llm = LLM(**engine_args)
        except Exception as exc:
            if "trust_remote_code" in str(exc) and not engine_args.get("trust_remote_code"):
                raise RuntimeError(
                    f"{engine_args['model']} ships code of its own, which vllm-service does not "
                    "run unless told to: set VLLM_TRUST_REMOTE_CODE=true (trust_remote_code=True "
                    "in VLLMSettings or batch generate(), --trust-remote-code on the command "
                    "line) if you trust that repository; its code then runs with this "
                    f"process's rights. vLLM said: {exc}"
                ) from exc
            raise
        self._engine = self._llm.llm_engine
        self.info: dict[str, Any] = {
            "mode": "local",
            "model": engine_args["model"],
            "max_model_len": self._llm.model_config.max_model_len,
            "dtype": str(self._llm.model_config.dtype).removeprefix("torch."),
            "runner": self._llm.model_config.runner_type,
            "choices": choices,
        }
        self.steps = 0  # engine steps whose output arrived (the Engine protocol's progress)
        self.clock = RequestClock()
        # Per request in flight: how many top alternatives it asked for (generated, prompt).
        self._alternatives: dict[int, tuple[int | None, int | None]] = {}
        # Per request in flight: its output so far, the deltas merged (None before the first).
        self._so_far: dict[int, Any] = {}
        self._streamed: set[int] = set()  # the requests whose deltas go to the parent
        self._chat_parsing.use(self._llm)
        self._parsing: dict[int, ParsedChat] = {}  # per chat request in flight that needs it
        self._base_lora, self._base_lora_folder = self._base_model_adapter(engine_args, choices)
        # Chat requests whose media are being fetched (off the worker loop), by request id.
        self._media_domains = config.allowed_media_domains
        self._fetching: dict[int, tuple[Request, Future[Any]]] = {}
        self._fetcher: ThreadPoolExecutor | None = None

    def _base_model_adapter(self, engine_args: dict[str, Any], choices: list[str]) -> tuple[Any, str | None]:
        """The all-zero adapter requests without one get on CPU while LoRA is on (see _common/lora.py)."""
        from vllm.platforms import current_platform

        if not engine_args.get("enable_lora") or not current_platform.is_cpu():
            return None, None
        from vllm.lora.request import LoRARequest

        folder = tempfile.mkdtemp(prefix="vllm-service-base-lora-")
        if write_zero_adapter(engine_args["model"], Path(folder)) is None:
            shutil.rmtree(folder, ignore_errors=True)
            choices.append(
                "CPU backend with LoRA: found no attention weight to build the base model's "
                "stand-in adapter from; requests without an adapter may get another request's "
                "adapter when they share a batch (a vLLM 0.32 CPU bug)"
            )
            return None, None
        request = LoRARequest(ZERO_ADAPTER_NAME, MAX_INT32, folder)
        # Not pinned: a pinned adapter holds a batch slot vLLM's scheduler does not count,
        # and a batch of as many other adapters as slots then fails in the engine.
        self._engine.add_lora(request)
        choices.append(
            "CPU backend with LoRA: requests without an adapter run with an all-zero adapter, "
            "as vLLM 0.32's CPU kernels give them another request's adapter otherwise"
        )
        return request, folder

    def add(self, request: Request) -> None:
        """Queue one request; raises (for that request alone) when vLLM rejects it.

        A chat whose media parts name http(s) URLs is fetched in a thread first (a slow host
        would stall every other request inside vLLM's add), then added in ``step``.
        """
        if (
            request.is_chat and self._media_domains is not None
            and needs_fetching(request.prompt)
        ):
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(4, thread_name_prefix="vllm-service-media")
            future = self._fetcher.submit(fetched, request.prompt, self._media_domains)
            self._fetching[request.request_id] = (request, future)
            return
        self._add_now(request)

    def _add_fetched(self) -> list[Finished]:
        """Hand vLLM the chats whose media have arrived; those that failed finish here."""
        failed: list[Finished] = []
        for request_id, (request, future) in list(self._fetching.items()):
            if not future.done():
                continue
            del self._fetching[request_id]
            try:
                self._add_now(dataclasses.replace(request, prompt=future.result()))
            except Exception as exc:
                failed.append(Finished(request_id, error=f"{type(exc).__name__}: {exc}"))
        return failed

    def _add_now(self, request: Request) -> None:
        from vllm import PoolingParams
        from vllm.sampling_params import RequestOutputKind

        if request.pooling is not None:  # an embedding: one output, when it is done
            params: Any = PoolingParams(**request.pooling)
        else:
            params = sampling_params(request.sampling)
            params.output_kind = RequestOutputKind.DELTA
        # vLLM 0.32 truncates at tokenization, not in SamplingParams.
        truncate = request.sampling.get("truncate_prompt_tokens")
        tokenization = None if truncate is None else {"truncate_prompt_tokens": truncate}
        # The same rendering LLM.generate / LLM.chat use (chat template, special tokens),
        # one prompt at a time so that a bad prompt fails alone.
        parsing = self._chat_parsing.prepare(request, params)  # may constrain params
        if request.is_chat:
            engine_input = self._llm._preprocess_chat_one(
                request.prompt, tokenization_kwargs=tokenization,  # type: ignore[arg-type]
                tools=request.tools.get("tools"), **request.chat,
            )
        elif request.is_token_ids:
            engine_input = self._llm._preprocess_cmpl_one(
                {"prompt_token_ids": request.prompt}, tokenization  # type: ignore[arg-type]
            )
        else:
            engine_input = self._llm._preprocess_cmpl_one(request.prompt, tokenization)  # type: ignore[arg-type]
        lora = self._base_lora
        if request.lora is not None:
            lora = self._loaded_adapter(request.lora.name, request.lora.lora_id, request.lora.path)
        try:
            self._engine.add_request(
                str(request.request_id), engine_input, params, lora_request=lora
            )
        except BaseException:
            # vLLM registers a request before it sends it to its engine process; one that fails
            # on the way (a value it cannot encode) would stay unfinished for ever.
            self._engine.abort_request([str(request.request_id)])
            raise
        self._alternatives[request.request_id] = (
            request.sampling.get("logprobs"),
            request.sampling.get("prompt_logprobs"),
        )
        self._so_far[request.request_id] = None
        if parsing is not None:
            self._parsing[request.request_id] = parsing
        if request.stream:
            self._streamed.add(request.request_id)

    def _loaded_adapter(self, name: str, lora_id: int, path: str | None) -> Any:
        """The adapter as vLLM takes it, loaded into the engine now if it is not there.

        vLLM loads a new adapter on the first request that names it, and an adapter that
        fails to load there ends the engine for good; loaded beforehand, it fails alone.
        """
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, lora_id, path)
        if lora_id not in self._engine.list_loras():
            try:
                self._engine.add_lora(request)
            except Exception as exc:
                raise ValueError(f"LoRA adapter {name!r} ({path}) cannot be loaded: {exc}") from None
        return request

    def abort(self, request_ids: list[int]) -> None:
        self._engine.abort_request([str(i) for i in request_ids])
        for request_id in request_ids:
            self._fetching.pop(request_id, None)
            self._alternatives.pop(request_id, None)
            self._so_far.pop(request_id, None)
            self._streamed.discard(request_id)
            self._parsing.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._fetching) or self._engine.has_unfinished_requests()

    def step(self) -> list[Delta | Finished]:
        """Take one engine step's output; return the streamed requests' new output and what
        finished. Returns nothing after a short wait when the engine has not finished a step,
        so that the worker loop hands a new request to the engine at once.
        """
        messages: list[Delta | Finished] = []
        if self._fetching:
            # A fetch under way is progress for the stall watch: it ends within its own
            # timeout (FETCH_TIMEOUT_SECONDS), whatever the engine does.
            self.steps += 1
            messages.extend(self._add_fetched())
        if not self._output_ready(_STEP_POLL_SECONDS):
            return messages
        self.steps += 1
        for output in self._engine.step():
            request_id = int(output.request_id)
            if not isinstance(output.outputs, list):  # a pooling request's: its vector
                self._alternatives.pop(request_id, None)
                if self._so_far.pop(request_id, False) is not False:  # else aborted
                    self.clock.first_token(request_id)
                    messages.append(pooled(request_id, output))
                continue
            top, prompt_top = self._alternatives.get(request_id, (None, None))
            if any(c.token_ids for c in output.outputs):
                self.clock.first_token(request_id)
            if request_id in self._streamed:
                messages.extend(self._deltas(request_id, output))
            if request_id in self._so_far:  # else aborted; the parent ignores what it still sends
                so_far = self._so_far[request_id]
                if so_far is not None:
                    so_far.add(output, aggregate=True)
                    output = so_far
                self._so_far[request_id] = output
            if not output.finished:
                continue
            self._alternatives.pop(request_id, None)
            self._so_far.pop(request_id, None)
            streamed = request_id in self._streamed
            self._streamed.discard(request_id)
            prompt_ids = list(output.prompt_token_ids or ())
            samples = [to_sample(c, top) for c in sorted(output.outputs, key=lambda c: c.index)]
            parsing = self._parsing.pop(request_id, None)
            if parsing is not None and streamed:
                samples = [parsing.streamed_sample(i, sample) for i, sample in enumerate(samples)]
            elif parsing is not None:
                samples = [parsing.sample(sample, prompt_ids) for sample in samples]
            messages.append(
                Finished(
                    request_id=request_id,
                    prompt_tokens=len(prompt_ids),
                    samples=samples,
                    prompt_token_ids=prompt_ids,
                    prompt_logprobs=(
                        None
                        if output.prompt_logprobs is None
                        else to_logprobs(prompt_ids, output.prompt_logprobs, prompt_top)
                    ),
                )
            )
        return messages

    def _deltas(self, request_id: int, output: Any) -> list[Delta]:
        """A streamed request's new output of one step, as a Delta per sample that grew.

        A parsed chat's every step goes through its parser (the finishing one too, which
        flushes it); what the finishing step adds reaches the parent in the Finished alone.
        """
        parsing = self._parsing.get(request_id)
        deltas = []
        for c in output.outputs:
            token_ids = list(c.token_ids)
            if parsing is None:
                delta = Delta(request_id, c.index, c.text, token_ids)
            else:
                # The parser reads the prompt's ids once, as the server's (the first output has them).
                prompt_ids = None if output.prompt_token_ids is None else list(output.prompt_token_ids)
                content, reasoning, calls = parsing.delta(
                    c.index, c.text, token_ids, prompt_ids, finished=c.finish_reason is not None
                )
                delta = Delta(request_id, c.index, content, token_ids, reasoning, calls)
            if not output.finished and (c.text or token_ids):
                deltas.append(delta)
        return deltas

    def _output_ready(self, timeout: float) -> bool:
        """Whether vLLM's engine process has sent a step's output, waiting up to ``timeout``.

        vLLM's engine process steps on its own; ``LLMEngine.step()`` blocks until the next
        output arrives. A request that reaches the worker while it blocks there would wait
        for that step's end before it is added, and then miss the step the engine starts
        meanwhile: about 1.5 steps later than vLLM's own async server adds it (hundreds of
        ms at 16 running requests here). So wait on the client's output queue instead (the
        same queue ``step()`` reads), briefly; an engine client without one is stepped as is.
        """
        outputs = getattr(self._engine.engine_core, "outputs_queue", None)
        if not isinstance(outputs, queue.Queue):
            return True
        with outputs.not_empty:  # Queue.qsize() would take this lock again: use _qsize()
            if not outputs._qsize():  # type: ignore[attr-defined]
                outputs.not_empty.wait(timeout)
            return bool(outputs._qsize())  # type: ignore[attr-defined]

    def sleep(self) -> None:
        self._llm.sleep(level=1)

    def wake_up(self) -> None:
        self._llm.wake_up()

    def update_weights(self, files: list[str], folder: str | None) -> None:
        """Load new weights in place through vLLM's worker extension (``weight_loader.py``)."""
        from vllm.platforms import current_platform

        from .contract import WeightsBroken, WeightsRejected

        if current_platform.is_cpu():
            problem = cpu_weight_update_problem(self.info["dtype"])
            if problem is not None:
                raise WeightsRejected(problem)
        extension = self._llm.llm_engine.vllm_config.parallel_config.worker_extension_cls
        if extension != WEIGHT_LOADER:
            raise WeightsRejected(
                f"VLLM_ENGINE_ARGS sets worker_extension_cls={extension!r}, which replaces "
                f"{WEIGHT_LOADER}, the class that loads the weights; remove it to update weights"
            )
        answers = self._llm.collective_rpc("vllm_service_load_weights", args=(files, folder))
        kind, message = weights_outcome(answers)
        if kind == "broken":
            raise WeightsBroken(message)
        if kind == "rejected":
            raise WeightsRejected(message)
        self._llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop vLLM's engine processes; the ``LLM`` object alone never lets them go."""
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
        self._engine.engine_core.shutdown()
        if self._base_lora_folder is not None:
            shutil.rmtree(self._base_lora_folder, ignore_errors=True)


def weights_outcome(answers: list[Any]) -> tuple[str, str]:
    """What the ranks' answers to a weight update add up to: ("loaded" | "rejected" |
    "broken", message). With tensor parallelism each rank loads its shard: the update is
    rejected (old weights everywhere) only if every rank rejected it; ranks that disagree
    leave a mix of old and new weights, which counts as broken."""
    problems = [answer for answer in answers if answer]
    if not problems:
        return "loaded", ""
    if len(problems) == len(answers) and all(kind == "rejected" for kind, _ in problems):
        return "rejected", problems[0][1]
    broken = next((message for kind, message in problems if kind == "broken"), None)
    if broken is not None:
        return "broken", broken
    return "broken", (
        f"{len(problems)} of {len(answers)} tensor-parallel ranks rejected the update "
        f"({problems[0][1]}) while the others loaded it: the engine holds a mix"
    )


def pooled(request_id: int, output: Any) -> Finished:
    """A pooling request's ``PoolingRequestOutput`` as plain data: its vector."""
    prompt_ids = list(output.prompt_token_ids or ())
    return Finished(
        request_id=request_id, prompt_tokens=len(prompt_ids), prompt_token_ids=prompt_ids,
        embedding=output.outputs.data.float().flatten().tolist(),
    )


def sampling_params(sampling: dict[str, Any]) -> Any:
    """A ``vllm.SamplingParams`` from the plain keywords a request carries."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    keywords = dict(sampling)
    keywords.pop("truncate_prompt_tokens", None)
    constraint = keywords.pop("structured_outputs", None)
    if constraint is not None:
        keywords["structured_outputs"] = StructuredOutputsParams(**constraint)
    return SamplingParams(**keywords)


def to_sample(output: Any, top: int | None) -> Sample:
    """A ``vllm.CompletionOutput`` as plain data."""
    token_ids = list(output.token_ids)
    reason = output.finish_reason
    return Sample(
        text=output.text,
        token_ids=token_ids,
        finish_reason="length" if reason == "length" else ("error" if reason == "abort" else "stop"),
        completion_tokens=len(token_ids),
        stop_reason=output.stop_reason,
        cumulative_logprob=output.cumulative_logprob if output.logprobs is not None else None,
        logprobs=None if output.logprobs is None else to_logprobs(token_ids, output.logprobs, top),
    )


def to_logprobs(
    token_ids: list[int], positions: Any, top: int | None
) -> list[TokenLogprobs | None]:
    """vLLM's logprobs (per position a dict of token id -> ``Logprob``) as plain data.

    vLLM adds the chosen token to a position's top ``top`` alternatives when it is not one
    of them; it is left out of :attr:`TokenLogprobs.top` then.
    """
    result: list[TokenLogprobs | None] = []
    for token_id, position in zip(token_ids, positions):
        if position is None:  # the first prompt token has none
            result.append(None)
            continue
        chosen = position.get(token_id)
        alternatives = sorted(position.items(), key=lambda item: item[1].rank or 0)
        if top is not None and top >= 0 and len(alternatives) > top:
            alternatives = [a for a in alternatives if a[0] != token_id]
        result.append(
            TokenLogprobs(
                token_id=token_id,
                token=chosen.decoded_token if chosen is not None else None,
                logprob=chosen.logprob if chosen is not None else float("nan"),
                rank=chosen.rank if chosen is not None else None,
                top=[TopLogprob(i, lp.decoded_token, lp.logprob, lp.rank) for i, lp in alternatives],
            )
        )
    return result
