"""Batch generation: :func:`generate` runs a dataset through several pinned vLLM workers.

    generate(data)
      items: prompt built and checked per item     (a bad one gets its error now)
      items already in output_path are skipped     (_batch/output.py: resume, same settings only)
      the rest become jobs: one request per sample
         |
         v
    Scheduler (_batch/schedule.py): chunk queue, retries, one thread per worker slot
         |                           workers: local processes (_batch/local_pool.py) or
         v                                    Ray actors (_batch/ray_pool.py)
    each finished item: result, JSONL line, progress bar
         |
         v
    results in input order (input dicts copied, never changed)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ._batch.arguments import batch_engine_spec, check_arguments, worker_pool
from ._batch.output import RUN_KEY, OutputFile, run_fingerprint, writable_fields
from ._batch.placement import chunk_sequences
from ._batch.schedule import Job, Outcome, Progress, WorkerPool, run_jobs
from ._common.inputs import lone_surrogate
from ._common.media import media_problem
from .settings import ENGINE_STALL_SECONDS, resolved_model
from .types import ChatMessages, GenerationParams

logger = logging.getLogger("vllm_service")


def generate(
    # vlllm 0.2.2's positional order, so that a positional vlllm call means the same here
    model_id: str,
    data: Sequence[dict[str, Any]],
    system: str | None = None,
    message_key: str = "prompt",
    tp: int = 1,
    pp: int = 1,
    n: int = 1,
    worker_num: int = 1,
    temperature: float = 0.7,
    use_sample: bool = False,
    result_key: str = "results",
    max_model_len: int = 4096,
    max_output_len: int = 1024,
    chunk_size: int | None = None,
    gpu_assignments: Sequence[Sequence[int]] | None = None,
    trust_remote_code: bool = False,
    gpu_memory_utilization: float = 0.90,
    dtype: str = "auto",
    *,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    sampling_args: dict[str, Any] | None = None,
    json_schema: dict[str, Any] | type[BaseModel] | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
    engine_args: dict[str, Any] | None = None,
    output_path: str | os.PathLike[str] | None = None,
    error_key: str = "error",
    index_key: str = "_index",
    progress: bool = True,
    startup_timeout: float = 900.0,
    engine_stall_seconds: float = ENGINE_STALL_SECONDS,
    on_mismatch: Literal["error", "redo", "keep"] = "error",
    ray_address: str | None = None,
    engine_kind: Literal["vllm", "standin"] = "vllm",
) -> list[dict[str, Any]]:
    """Generate a completion for every item of ``data`` with vLLM; results in input order.

    Each item's prompt is ``item[message_key]``: a string (sent as one user message) or a
    chat conversation (a list of ``{"role": ..., "content": ...}``). ``system`` is put in
    front as a system message unless the conversation has one. Every returned dict is a copy
    of its input item with ``result_key`` set: a string when ``n == 1``, a list of ``n``
    strings otherwise. An item that fails (missing key, wrong type, empty, text that is not
    valid Unicode, longer than the context) gets ``result_key: None`` and its error under
    ``error_key``; the others go on. ``error_key`` is in a returned dict exactly when its item
    failed (an input's own value under it is dropped).

    ``n`` samples come from ``n`` copies of the prompt (``use_sample=False``) or from one
    request with ``SamplingParams(n=n)`` (``use_sample=True``).

    Workers: ``worker_num`` spawned processes, each with its own engine. On GPUs each gets
    ``tp * pp`` GPUs (or its entry of ``gpu_assignments``, indices inside the parent's
    CUDA_VISIBLE_DEVICES); without GPUs each gets its own CPU cores and a share of memory for
    its KV cache. Without ``chunk_size`` each worker takes an equal share of the items; with
    it, workers take chunks of that many items from one queue as they become free. A worker
    that dies has its unfinished items retried in ever smaller chunks, down to one item, and an
    item that kills its worker 3 times alone (``vllm_service.testing.BATCH_MAX_ATTEMPTS``)
    gets an error. A worker that cannot start ends its slot; the others go on. A worker whose
    engine makes no progress for ``engine_stall_seconds`` while it has work (a hung GPU or NCCL
    call, a stopped process) is killed and counts as dead (``VLLM_ENGINE_STALL_SECONDS`` of the
    service; docs/reliability.md).

    ``ray_address`` (``"auto"``, ``"host:port"`` or ``"ray://host:port"``): the workers are
    actors on that Ray cluster instead, one engine each, spread over its nodes; each reserves
    ``tp * pp`` GPUs (or CPU cores on a CPU cluster), and workers that share a machine split
    its cores and memory as local workers do. An actor or node that dies has its chunk retried
    as above, and Ray restarts the actor. Needs ``pip install 'vllm-service[ray]'`` here and
    on the nodes; without ``ray_address`` nothing of Ray is imported. See docs/batch.md.

    Beyond the engine arguments named here: ``top_p``, ``stop``, ``seed`` (sample ``k`` of a
    duplicated prompt uses ``seed + k``), ``sampling_args`` (any other ``SamplingParams``
    keyword, e.g. ``{"ignore_eos": True}``) and ``engine_args`` (any other ``vllm.LLM``
    keyword). At most one structured-output constraint holds for every item: ``json_schema``
    (a JSON-schema dict or a pydantic model class), ``regex``, ``choice`` or ``grammar``
    (docs/structured-outputs.md); the result is the constrained text. ``pp > 1`` uses vLLM's
    Ray executor and needs ``worker_num == 1``.

    ``output_path``: each finished item is appended to this JSONL file at once, with its
    position in ``data`` under ``index_key`` and a fingerprint of the settings that produced
    it (model, system, n, use_sample and the sampling) under ``"_run"``; a rerun with the same
    file skips the items it holds with results, and a finished run leaves the file in input
    order. Results made with other settings (or by a version without fingerprints) make the
    rerun raise ``ValueError``, unless ``on_mismatch`` is ``"redo"`` (generate them again) or
    ``"keep"`` (use them anyway). Only one run at a time may use a file: another raises
    ``VLLMServiceError`` at once. Raises ``ValueError`` for impossible arguments and
    placements before any worker starts.

    ``engine_kind="standin"`` runs every worker on the stand-in engine instead of vLLM, for
    tests: it loads no model and echoes each prompt (``VLLM_ENGINE_KIND``, docs/testing.md).
    """
    check_arguments(n, worker_num, tp, pp, chunk_size, max_output_len, temperature)
    keys = (message_key, result_key, error_key, index_key, RUN_KEY)
    if len(set(keys)) != len(keys):
        raise ValueError(
            "message_key, result_key, error_key and index_key must be four different keys, "
            f"none of them {RUN_KEY!r} (the output file's fingerprint key); got {keys[:4]}"
        )
    if on_mismatch not in ("error", "redo", "keep"):
        raise ValueError(f"on_mismatch must be 'error', 'redo' or 'keep', got {on_mismatch!r}")
    problem = lone_surrogate(system)
    if problem is not None:
        raise ValueError(f"system holds {problem}; fix it in the input")
    spec = batch_engine_spec(
        model_id, tp, pp, max_model_len, gpu_memory_utilization, dtype, trust_remote_code,
        engine_args or {}, engine_stall_seconds, engine_kind,
        # Other data than a list is refused when the run starts (TypeError).
        chunk_sequences(len(data), n, worker_num, chunk_size) if isinstance(data, Sequence)
        else None,
    )
    make_pool = worker_pool(spec, worker_num, gpu_assignments, ray_address, startup_timeout)
    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_output_len,
        "stop": stop,
        "seed": seed,
        **(sampling_args or {}),
    }
    constraint = GenerationParams(
        json_schema=json_schema, regex=regex, choice=choice, grammar=grammar
    ).structured_output()
    if constraint is not None:
        sampling["structured_outputs"] = constraint
    sampling = {key: value for key, value in sampling.items() if value is not None}
    output = None
    if output_path is not None:
        fingerprint = run_fingerprint(resolved_model(model_id), system, n, use_sample, sampling)
        output = OutputFile(Path(output_path), index_key, fingerprint)

    run = _BatchRun(
        data=data,
        message_key=message_key,
        system=system,
        result_key=result_key,
        error_key=error_key,
        index_key=index_key,
        n=n,
        use_sample=use_sample,
        sampling=sampling,
        output=output,
        on_mismatch=on_mismatch,
    )
    return run.execute(make_pool, chunk_size, progress)


class _BadItem(Exception):
    """An item whose prompt cannot be sent; the message goes under error_key."""


def build_conversation(item: dict[str, Any], message_key: str, system: str | None) -> ChatMessages:
    """The chat messages for one item; raises ``_BadItem`` with the reason it has none."""
    if message_key not in item:
        raise _BadItem(f"the item has no {message_key!r} key (message_key)")
    value = item[message_key]
    if isinstance(value, str):
        if not value.strip():
            raise _BadItem(f"the prompt under {message_key!r} is empty")
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        if not value:
            raise _BadItem(f"the conversation under {message_key!r} is empty")
        for position, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise _BadItem(
                    f"message {position} under {message_key!r} must be a dict with 'role' and "
                    f"'content', got {message!r}"
                )
        messages = list(value)
    else:
        raise _BadItem(
            f"{message_key!r} must be a string or a list of chat messages, "
            f"got {type(value).__name__}"
        )
    problem = lone_surrogate(messages)
    if problem is not None:
        raise _BadItem(f"the prompt under {message_key!r} holds {problem}; fix it in the input")
    media = media_problem(messages, None)
    if media is not None:
        raise _BadItem(f"{media.split('. Set ')[0]} (batch runs take text only)")
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


@dataclass
class _BatchRun:
    """One call of :func:`generate`: the items, their results, the output file, the progress bar.

    Results arrive from the scheduler's threads, one call of ``_job_done`` at a time.
    """

    data: Sequence[dict[str, Any]]
    message_key: str
    system: str | None
    result_key: str
    error_key: str
    index_key: str
    n: int
    use_sample: bool
    sampling: dict[str, Any]
    output: OutputFile | None
    on_mismatch: Literal["error", "redo", "keep"]

    results: list[dict[str, Any] | None] = field(default_factory=list)
    progress: Progress = field(init=False)

    def execute(
        self, make_pool: Callable[[], WorkerPool], chunk_size: int | None, progress: bool
    ) -> list[dict[str, Any]]:
        """Check the data, resume from the output file, run what is left; results in order."""
        if isinstance(self.data, (str, bytes)) or not isinstance(self.data, Sequence):
            raise TypeError(f"data must be a list of dicts, got {type(self.data).__name__}")
        for index, item in enumerate(self.data):
            if not isinstance(item, dict):
                raise TypeError(f"data[{index}] must be a dict, got {type(item).__name__}")
        self.results = [None] * len(self.data)
        done = {}
        if self.output is not None:
            done = self.output.resume(
                self.data, self.message_key, self.result_key, self.error_key, self.on_mismatch,
                self._is_done,
            )
        try:
            self.progress = Progress(len(self.data), len(done), "item", progress)
            try:
                jobs = self._prepare(done)
                if done:
                    logger.info(
                        "%s already holds %d of the %d items; %d to run",
                        self.output.path, len(done), len(self.data), len(jobs),  # type: ignore[union-attr]
                    )
                run_jobs(jobs, make_pool, chunk_size, self._job_done, self.progress, self._tick)
            finally:
                self.progress.close()
        finally:
            if self.output is not None:
                self.output.close(rewrite=all(r is not None for r in self.results))
        failed = sum(1 for r in self.results if r is not None and self.error_key in r)
        if failed:
            logger.warning(
                "%d of %d items failed; their errors are under %r",
                failed, len(self.results), self.error_key,
            )
        return self.results  # type: ignore[return-value]

    def _is_done(self, record: dict[str, Any]) -> bool:
        """True for a finished record of an earlier run whose result has this run's shape."""
        result = record.get(self.result_key)
        if self.n == 1:
            return isinstance(result, str)
        return isinstance(result, list) and len(result) == self.n

    def _prepare(self, done: dict[int, dict[str, Any]]) -> dict[int, Job]:
        """Fill in the results of earlier runs and of bad items; return the jobs to run."""
        jobs = {}
        for index, item in enumerate(self.data):
            if index in done:
                self.results[index] = self._result(index, done[index][self.result_key], None)
                continue
            try:
                conversation = build_conversation(item, self.message_key, self.system)
            except _BadItem as exc:
                self._finish(index, None, str(exc))
                continue
            if self.use_sample:
                requests = [(conversation, {**self.sampling, "n": self.n}, {})]
            else:
                requests = [(conversation, self._one_sample(k), {}) for k in range(self.n)]
            jobs[index] = Job(requests)
        return jobs

    def _one_sample(self, k: int) -> dict[str, Any]:
        """Sampling for copy ``k`` of a duplicated prompt: a seed of its own, or all copies match."""
        sampling = {**self.sampling, "n": 1}
        if "seed" in sampling:
            sampling["seed"] += k
        return sampling

    def _job_done(self, index: int, outcome: Outcome) -> None:
        """An item's requests are all finished (or it failed): its texts or its error."""
        if isinstance(outcome, str):
            self._finish(index, None, outcome)
            return
        self.progress.tokens += sum(s.completion_tokens for f in outcome for s in f.samples)
        error = next((f.error or "the engine returned no output" for f in outcome
                      if f.error is not None or not f.samples), None)
        if error is not None:
            self._finish(index, None, error)
        elif self.use_sample:
            self._finish(index, [sample.text for sample in outcome[0].samples], None)
        else:
            self._finish(index, [finished.samples[0].text for finished in outcome], None)

    def _result(self, index: int, value: Any, error: str | None) -> dict[str, Any]:
        """A copy of item ``index`` with its result; ``error_key`` only if it failed."""
        result = dict(self.data[index])
        result[self.result_key] = value
        if error is None:
            result.pop(self.error_key, None)
        else:
            result[self.error_key] = error
        return result

    def _finish(self, index: int, texts: list[str] | None, error: str | None) -> None:
        """Store an item's result, append it to the output file, move the progress bar."""
        if error is None and texts is not None:
            result = self._result(index, texts[0] if self.n == 1 else list(texts), None)
        else:
            result = self._result(index, None, error)
        if self.output is not None:
            try:
                self.output.append(index, result)
            except TypeError as exc:  # a value of the item's that JSON cannot hold
                result = self._result(index, None, str(exc))
                self.output.append(index, writable_fields(result))
        self.results[index] = result
        self.progress.advance()

    def _tick(self) -> None:
        # Bounds how long an appended line waits for its fsync when no further line comes.
        if self.output is not None:
            self.output.sync_if_due()


