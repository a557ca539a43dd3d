"""Batch generation: :func:`generate` runs a dataset through several pinned vLLM workers.

    generate(data)
      items: prompt built and checked per item     (a bad one gets its error now)
      items already in output_path are skipped     (resume, same settings only)
      the rest cut into chunks, in one queue
         |
         v
    one thread per worker slot ---------------- WorkerHandle (spawned worker, own engine,
      start the worker, then repeatedly:           pinned to its GPUs or CPU cores)
      take a chunk, submit all its requests  -->   continuous batching
      as each request finishes:              <--   Finished
        item complete -> result, JSONL line, progress bar
      worker died -> unfinished items back in the queue in halves, new worker
                     (an item alone under MAX_ATTEMPTS deaths gets an error)
         |
         v
    results in input order (input dicts copied, never changed)

The output file (locking, fsync, format, settings fingerprint) is in ``_batch_output``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from tqdm import tqdm

from . import _placement
from ._batch_output import RUN_KEY, OutputFile, run_fingerprint
from ._protocol import ChatMessages, Finished, Request, WorkerConfig
from ._worker_handle import KeepAlive, WorkerHandle, WorkerUnavailable
from .errors import ServiceShutdownError, VLLMServiceError, WorkerDiedError, WorkerStartError
from .settings import looks_like_local_path
from .types import GenerationParams

logger = logging.getLogger("vllm_service")

# An item whose worker died this many times while it was the only item in flight gets an
# error instead of another try.
MAX_ATTEMPTS = 3
# A worker slot replaces its dead workers until it has more than this many strikes: a death
# under several items (the cause is unknown) or an item that failed from deaths alone is a
# strike, and an item any worker completes clears every slot's strikes.
MAX_RESTARTS = 2
# Workers are stopped explicitly at the end of a run; this only guards against leaks.
_IDLE_TTL_SECONDS = 24 * 3600.0


def generate(
    model_id: str,
    data: Sequence[dict[str, Any]],
    message_key: str = "prompt",
    system: str | None = None,
    result_key: str = "results",
    n: int = 1,
    use_sample: bool = False,
    temperature: float = 0.7,
    max_output_len: int = 1024,
    worker_num: int = 1,
    tp: int = 1,
    pp: int = 1,
    gpu_assignments: Sequence[Sequence[int]] | None = None,
    chunk_size: int | None = None,
    max_model_len: int = 4096,
    gpu_memory_utilization: float = 0.90,
    dtype: str = "auto",
    trust_remote_code: bool = True,
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
    on_mismatch: Literal["error", "redo", "keep"] = "error",
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
    item that kills its worker ``MAX_ATTEMPTS`` times alone gets an error. A worker that
    cannot start ends its slot; the others go on.

    Beyond the engine arguments named here: ``top_p``, ``stop``, ``seed`` (sample ``k`` of a
    duplicated prompt uses ``seed + k``), ``sampling_args`` (any other ``SamplingParams``
    keyword, e.g. ``{"ignore_eos": True}``) and ``engine_args`` (any other ``vllm.LLM``
    keyword). At most one structured-output constraint holds for every item: ``json_schema``
    (a JSON-schema dict or a pydantic model class), ``regex``, ``choice`` or ``grammar``
    (docs/structured-outputs.md); the result is the constrained text. ``pp > 1`` uses vLLM's Ray executor and needs ``worker_num == 1``.

    ``output_path``: each finished item is appended to this JSONL file at once, with its
    position in ``data`` under ``index_key`` and a fingerprint of the settings that produced
    it (model, system, n, use_sample and the sampling) under ``"_run"``; a rerun with the same
    file skips the items it holds with results, and a finished run leaves the file in input
    order. Results made with other settings (or by a version without fingerprints) make the
    rerun raise ``ValueError``, unless ``on_mismatch`` is ``"redo"`` (generate them again) or
    ``"keep"`` (use them anyway). Only one run at a time may use a file: another raises
    ``VLLMServiceError`` at once. Raises ``ValueError`` for impossible arguments and
    placements before any worker starts.
    """
    _check_arguments(n, worker_num, tp, pp, chunk_size, max_output_len, temperature)
    keys = (message_key, result_key, error_key, index_key, RUN_KEY)
    if len(set(keys)) != len(keys):
        raise ValueError(
            "message_key, result_key, error_key and index_key must be four different keys, "
            f"none of them {RUN_KEY!r} (the output file's fingerprint key); got {keys[:4]}"
        )
    if on_mismatch not in ("error", "redo", "keep"):
        raise ValueError(f"on_mismatch must be 'error', 'redo' or 'keep', got {on_mismatch!r}")
    problem = _lone_surrogate(system)
    if problem is not None:
        raise ValueError(f"system holds {problem}")
    configs = _worker_configs(
        model_id, worker_num, tp, pp, gpu_assignments, max_model_len,
        gpu_memory_utilization, dtype, trust_remote_code, engine_args or {},
    )
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
        fingerprint = run_fingerprint(_model_name(model_id), system, n, use_sample, sampling)
        output = OutputFile(Path(output_path), index_key, fingerprint)

    run = _Run(
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
    return run.execute(configs, chunk_size, progress, startup_timeout)


def _check_arguments(
    n: int,
    worker_num: int,
    tp: int,
    pp: int,
    chunk_size: int | None,
    max_output_len: int,
    temperature: float,
) -> None:
    for name, value in (("n", n), ("worker_num", worker_num), ("tp", tp), ("pp", pp),
                        ("max_output_len", max_output_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or at least 1, got {chunk_size!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or more, got {temperature!r}")
    if pp > 1 and worker_num != 1:
        raise ValueError(f"pp={pp} (pipeline parallelism) needs worker_num=1, got {worker_num}")


def _worker_configs(
    model_id: str,
    worker_num: int,
    tp: int,
    pp: int,
    gpu_assignments: Sequence[Sequence[int]] | None,
    max_model_len: int,
    gpu_memory_utilization: float,
    dtype: str,
    trust_remote_code: bool,
    extra_engine_args: dict[str, Any],
) -> list[WorkerConfig]:
    """One worker's configuration per worker: shared engine arguments, its own placement."""
    model = _model_name(model_id)
    gpus = _placement.visible_gpus()
    if gpus:
        placements = _placement.gpu_placements(worker_num, tp, pp, gpu_assignments, gpus)
    else:
        if gpu_assignments is not None:
            raise ValueError("gpu_assignments was given, but no GPU is visible")
        placements = _placement.cpu_placements(worker_num, tp, pp, _placement.physical_cores())
    base_args: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "pipeline_parallel_size": pp,
        "gpu_memory_utilization": gpu_memory_utilization,
        "trust_remote_code": trust_remote_code,
    }
    if pp > 1:
        base_args["distributed_executor_backend"] = "ray"
    if not gpus and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # On CPU, gpu_memory_utilization is a share of all memory, for each worker; an
        # explicit KV cache size per worker makes the defaults fit.
        base_args["kv_cache_memory_bytes"] = _placement.cpu_kv_cache_bytes_per_worker(worker_num)
    configs = []
    for placement in placements:
        args = {**base_args, "tensor_parallel_size": placement.tensor_parallel_size}
        args.update(extra_engine_args)
        configs.append(
            WorkerConfig(mode="local", model=model, engine_args=args,
                         environment=placement.environment)
        )
        logger.info("batch worker %d: %s", len(configs) - 1, placement.description)
    return configs


def _model_name(model_id: str) -> str:
    """A Hugging Face model id as it is, a local model folder as an absolute path."""
    if looks_like_local_path(model_id):
        return str(Path(model_id).expanduser().resolve())
    return model_id


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
    problem = _lone_surrogate(messages)
    if problem is not None:
        raise _BadItem(f"the prompt under {message_key!r} holds {problem}")
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _lone_surrogate(value: Any) -> str | None:
    """Describes the first lone surrogate in the strings of ``value``, or None if it has none.

    ``json.loads`` turns ``"\\ud83d"`` into such a string; it is not valid Unicode, so the
    tokenizer and UTF-8 cannot take it.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"a lone surrogate ({value[exc.start]!r} at position {exc.start} of "
                f"{_shorten(value)}), which is not valid Unicode text; fix it in the input"
            )
        return None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        for part in value:
            problem = _lone_surrogate(part)
            if problem is not None:
                return problem
    return None


def _shorten(text: str, limit: int = 40) -> str:
    """``repr`` of the start of ``text`` (escapes surrogates, so it is safe to write)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass
class _Pending:
    """An item in progress: its samples as they arrive."""

    conversation: ChatMessages
    texts: list[str | None] = field(default_factory=list)
    error: str | None = None
    waiting: int = 0
    attempts: int = 0


@dataclass
class _Run:
    """One call of :func:`generate`: the items, the queue of chunks, and the results.

    Every field below ``on_mismatch`` changes under ``changed`` (a lock with a condition), from
    the worker slots' threads; so does the output file.
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
    on_mismatch: str

    changed: threading.Condition = field(default_factory=threading.Condition)
    results: list[dict[str, Any] | None] = field(default_factory=list)
    pending: dict[int, _Pending] = field(default_factory=dict)
    queue: deque[list[int]] = field(default_factory=deque)
    chunks_out: int = 0
    handles: dict[int, WorkerHandle] = field(default_factory=dict)
    completed: int = 0  # items a worker generated (with a result or the engine's error)
    slots_left: int = 0
    fatal: BaseException | None = None
    tokens: int = 0
    first_ready: float | None = None
    bar: Any = None
    request_ids: itertools.count = field(default_factory=itertools.count)

    def execute(
        self,
        configs: list[WorkerConfig],
        chunk_size: int | None,
        progress: bool,
        startup_timeout: float,
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
            done = self._resume(self.output)
        try:
            self.bar = tqdm(
                total=len(self.data), initial=len(done), unit="item", desc="generate",
                disable=not progress, dynamic_ncols=True,
            )
            try:
                todo = self._prepare(done)
                size = chunk_size or max(1, math.ceil(len(todo) / len(configs)))
                self.queue.extend(todo[i : i + size] for i in range(0, len(todo), size))
                if self.queue:
                    self._run_workers(configs, startup_timeout)
            finally:
                self.bar.close()
        finally:
            if self.output is not None:
                self.output.close(rewrite=all(r is not None for r in self.results))
        if self.fatal is not None:
            raise self.fatal
        failed = sum(1 for r in self.results if r is not None and self.error_key in r)
        if failed:
            logger.warning(
                "%d of %d items failed; their errors are under %r",
                failed, len(self.results), self.error_key,
            )
        return self.results  # type: ignore[return-value]

    def _resume(self, output: OutputFile) -> dict[int, dict[str, Any]]:
        """Lock and read the output file; return {index: line} of the items to reuse."""
        for key in (self.index_key, RUN_KEY):
            if any(key in item for item in self.data):
                logger.warning(
                    "some items of data have a %r key of their own; in %s it holds the output "
                    "file's value instead (the returned items keep theirs)", key, output.path,
                )
        records = output.load(self.data, self.message_key)
        finished = {
            index: record for index, record in records.items()
            if record.get(self.error_key) is None and record.get(self.result_key) is not None
        }
        other = sorted(i for i, record in finished.items() if record.get(RUN_KEY) != output.run)
        if other and self.on_mismatch == "error":
            output.close(rewrite=False)
            unmarked = sum(1 for i in other if RUN_KEY not in finished[i])
            raise ValueError(
                f"output_path {output.path} holds results of {len(other)} items made with other "
                f"settings than this call's (items {_some(other)}): the fingerprint under "
                f"{RUN_KEY!r} of what made them (model, system, n, use_sample, temperature, "
                f"top_p, seed, stop, max_output_len, sampling_args) is not this call's "
                f"{output.run!r}"
                + (f"; {unmarked} have none, as an older vllm-service wrote them"
                   if unmarked else "")
                + ". Pass on_mismatch='redo' (--on-mismatch redo) to generate them again with "
                "these settings, on_mismatch='keep' to use them as they are, or use another "
                "output_path."
            )
        if self.on_mismatch == "redo":
            for index in other:
                del finished[index]
        return {index: record for index, record in finished.items() if self._is_done(record)}

    def _is_done(self, record: dict[str, Any]) -> bool:
        """True for a finished record of an earlier run whose result has this run's shape."""
        result = record.get(self.result_key)
        if self.n == 1:
            return isinstance(result, str)
        return isinstance(result, list) and len(result) == self.n

    def _prepare(self, done: dict[int, dict[str, Any]]) -> list[int]:
        """Fill in the results of earlier runs and of bad items; return the items to run."""
        todo = []
        for index, item in enumerate(self.data):
            if index in done:
                self.results[index] = self._result(index, done[index][self.result_key], None)
                continue
            try:
                conversation = build_conversation(item, self.message_key, self.system)
            except _BadItem as exc:
                self._finish(index, None, str(exc))
                continue
            self.pending[index] = _Pending(conversation)
            todo.append(index)
        return todo

    # ----- the workers -----

    def _run_workers(self, configs: list[WorkerConfig], startup_timeout: float) -> None:
        self.slots_left = len(configs)
        threads = [
            threading.Thread(
                target=self._serve_slot, args=(slot, config, startup_timeout),
                name=f"vllm-service-batch-{slot}", daemon=True,
            )
            for slot, config in enumerate(configs)
        ]
        for thread in threads:
            thread.start()
        try:
            with self.changed:
                while self.slots_left:
                    # A timeout keeps the wait interruptible by Ctrl-C, and bounds how long
                    # an appended line waits for its fsync.
                    self.changed.wait(1.0)
                    if self.output is not None:
                        self.output.sync_if_due()
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            for thread in threads:
                thread.join(60)

    def _serve_slot(self, slot: int, config: WorkerConfig, startup_timeout: float) -> None:
        """One worker slot: start a worker, feed it chunks, replace it if it dies.

        The slot ends when no work is left, when its worker cannot start, or when it has more
        than ``MAX_RESTARTS`` strikes (see there): its workers keep dying for no item's sake.
        """
        handle: WorkerHandle | None = None
        strikes = 0
        completed_before = 0
        start_error: WorkerStartError | None = None
        try:
            while True:
                if handle is None:
                    if not self._work_left():
                        return
                    if strikes > MAX_RESTARTS:
                        logger.error(
                            "batch worker %d: its workers died %d times under several items or "
                            "failed items alone, with no item completed meanwhile; giving up "
                            "on it", slot, strikes,
                        )
                        return
                    handle = WorkerHandle(
                        config, keep_alive=KeepAlive(_IDLE_TTL_SECONDS), startup_timeout=startup_timeout
                    )
                    with self.changed:
                        self.handles[slot] = handle
                        if self.fatal is not None:
                            return
                    try:
                        handle.wait_ready()
                    except WorkerStartError as exc:
                        logger.error("batch worker %d could not start; the others go on: %s",
                                     slot, exc)
                        start_error = exc
                        return
                    with self.changed:
                        self.first_ready = self.first_ready or time.monotonic()
                chunk = self._take_chunk()
                if chunk is None:
                    return
                new_strikes = self._run_chunk(handle, chunk)
                with self.changed:
                    if self.completed != completed_before:
                        completed_before = self.completed
                        strikes = 0
                if new_strikes is not None:
                    strikes += new_strikes
                    # Let the dead worker's engine give its memory back before the next starts.
                    handle.wait_exited(60)
                    handle = None
        except BaseException as exc:
            self._abort(exc)
        finally:
            if handle is not None:
                handle.stop(ServiceShutdownError("the batch run is over"))
            with self.changed:
                self.slots_left -= 1
                if not self.slots_left and self.queue and self.fatal is None:
                    self.fatal = start_error or VLLMServiceError(
                        "Every batch worker gave up (its workers kept dying with no item "
                        f"completed) or could not start; {sum(map(len, self.queue))} items are "
                        "left (their worker logs are named in the log). With output_path, a "
                        "rerun goes on from here."
                    )
                self.changed.notify_all()

    def _work_left(self) -> bool:
        with self.changed:
            return self.fatal is None and bool(self.queue or self.chunks_out)

    def _take_chunk(self) -> list[int] | None:
        """The next chunk, waiting while chunks in flight may still come back; None at the end."""
        with self.changed:
            while True:
                if self.fatal is not None:
                    return None
                if self.queue:
                    self.chunks_out += 1
                    return self.queue.popleft()
                if not self.chunks_out:
                    return None
                self.changed.wait()

    def _run_chunk(self, handle: WorkerHandle, chunk: list[int]) -> int | None:
        """Run one chunk on a worker; None if it survived, else the strikes its death brings.

        The unfinished items of a worker that died are back in the queue.
        """
        requests: list[Request] = []
        owners: list[tuple[int, int]] = []  # (item index, sample number) of each request
        with self.changed:
            for index in chunk:
                pending = self.pending[index]
                pending.texts = [None] * self.n
                pending.error = None
                if self.use_sample:
                    samples = [(0, {**self.sampling, "n": self.n})]
                else:
                    samples = [(k, self._one_sample(k)) for k in range(self.n)]
                pending.waiting = len(samples)
                for k, sampling in samples:
                    requests.append(Request(next(self.request_ids), pending.conversation, sampling))
                    owners.append((index, k))
        try:
            futures = handle.submit(requests)
        except WorkerUnavailable:
            return self._give_back(chunk, None)
        owner_of = dict(zip(futures, owners))
        unfinished = set(chunk)
        try:
            for future in as_completed(futures):
                finished = future.result()
                index, k = owner_of[future]
                with self.changed:
                    if self._record(index, k, finished):
                        unfinished.discard(index)
        except WorkerDiedError as exc:
            logger.warning("%s; %d items go back to the queue", exc, len(unfinished))
            return self._give_back(sorted(unfinished), exc)
        except ServiceShutdownError:
            return 0  # the run is being stopped
        with self.changed:
            self.chunks_out -= 1
            self.changed.notify_all()
        return None

    def _one_sample(self, k: int) -> dict[str, Any]:
        """Sampling for copy ``k`` of a duplicated prompt: a seed of its own, or all copies match."""
        sampling = {**self.sampling, "n": 1}
        if "seed" in sampling:
            sampling["seed"] += k
        return sampling

    def _record(self, index: int, k: int, finished: Finished) -> bool:
        """Note one finished request; True when its item is complete. Called under the lock."""
        pending = self.pending[index]
        if finished.error is not None or not finished.samples:
            pending.error = pending.error or finished.error or "the engine returned no output"
        elif self.use_sample:
            pending.texts = [sample.text for sample in finished.samples]
        else:
            pending.texts[k] = finished.samples[0].text
        self.tokens += sum(sample.completion_tokens for sample in finished.samples)
        pending.waiting -= 1
        if pending.waiting:
            return False
        del self.pending[index]
        self.completed += 1
        self._finish(index, pending.texts, pending.error)
        return True

    def _give_back(self, indices: list[int], died: WorkerDiedError | None) -> int:
        """Put a chunk's unfinished items back in the queue after its worker died; its strikes.

        Any one of several items in flight may have killed the worker, so they go back, to the
        end of the queue, as two halves: repeated deaths narrow down to the item that causes
        them, while the others still run in batches. A death counts against an item only when
        it was alone in flight; such an item is tried again first, and after ``MAX_ATTEMPTS``
        deaths gets an error. ``died`` is None when the worker was gone before the chunk
        reached it: then the chunk goes back as it was.
        """
        with self.changed:
            self.chunks_out -= 1
            strikes = 1
            if died is None:
                self.queue.appendleft(indices)
            elif len(indices) > 1:
                half = (len(indices) + 1) // 2
                self.queue.extend([indices[:half], indices[half:]])
            elif indices:
                index = indices[0]
                pending = self.pending[index]
                pending.attempts += 1
                if pending.attempts >= MAX_ATTEMPTS:
                    del self.pending[index]
                    self._finish(
                        index, None,
                        f"the worker died {pending.attempts} times while generating this item "
                        f"(last: {died})",
                    )
                else:
                    self.queue.appendleft(indices)
                    strikes = 0
            self.changed.notify_all()
            return strikes

    def _result(self, index: int, value: Any, error: str | None) -> dict[str, Any]:
        """A copy of item ``index`` with its result; ``error_key`` only if it failed."""
        result = dict(self.data[index])
        result[self.result_key] = value
        if error is None:
            result.pop(self.error_key, None)
        else:
            result[self.error_key] = error
        return result

    def _finish(self, index: int, texts: list[str | None] | None, error: str | None) -> None:
        """Store an item's result, append it to the output file, move the progress bar."""
        if error is None and texts is not None:
            result = self._result(index, texts[0] if self.n == 1 else list(texts), None)
        else:
            result = self._result(index, None, error)
        self.results[index] = result
        if self.output is not None:
            self.output.append(index, result)
        if self.first_ready is not None:
            rate = self.tokens / max(time.monotonic() - self.first_ready, 1e-9)
            self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self.bar.update(1)

    def _abort(self, exc: BaseException) -> None:
        """Stop the run: remember why, and stop every worker (their futures fail at once)."""
        with self.changed:
            if self.fatal is None:
                self.fatal = exc
            handles = list(self.handles.values())
            self.changed.notify_all()
        for handle in handles:
            handle.stop(ServiceShutdownError(f"the batch run was stopped: {exc!r}"))


def _some(indices: list[int], shown: int = 10) -> str:
    """The first few of many item indices, for a message."""
    text = ", ".join(map(str, indices[:shown]))
    return text + (f" and {len(indices) - shown} more" if len(indices) > shown else "")
