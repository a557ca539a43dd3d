"""Batch generation: :func:`generate` runs a dataset through several pinned vLLM workers.

    generate(data)
      items: prompt built and checked per item     (a bad one gets its error now)
      items already in output_path are skipped     (resume)
      the rest cut into chunks, in one queue
         |
         v
    one thread per worker slot ---------------- WorkerHandle (spawned worker, own engine,
      start the worker, then repeatedly:           pinned to its GPUs or CPU cores)
      take a chunk, submit all its requests  -->   continuous batching
      as each request finishes:              <--   Finished
        item complete -> result, JSONL line, progress bar
      worker died -> unfinished items back in the queue (bounded attempts), new worker
         |
         v
    results in input order (input dicts copied, never changed)
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import _placement
from ._protocol import ChatMessages, Finished, Request, WorkerConfig
from ._worker_handle import WorkerHandle, WorkerUnavailable
from .errors import ServiceShutdownError, VLLMServiceError, WorkerDiedError
from .settings import looks_like_local_path

logger = logging.getLogger("vllm_service")

# An item whose worker died under it this many times gets an error instead of another try.
MAX_ATTEMPTS = 3
# A worker slot starts a new worker this many times after its worker died, then gives up.
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
    engine_args: dict[str, Any] | None = None,
    output_path: str | os.PathLike[str] | None = None,
    error_key: str = "error",
    index_key: str = "_index",
    progress: bool = True,
    startup_timeout: float = 900.0,
) -> list[dict[str, Any]]:
    """Generate a completion for every item of ``data`` with vLLM; results in input order.

    Each item's prompt is ``item[message_key]``: a string (sent as one user message) or a
    chat conversation (a list of ``{"role": ..., "content": ...}``). ``system`` is put in
    front as a system message unless the conversation has one. Every returned dict is a copy
    of its input item with ``result_key`` added: a string when ``n == 1``, a list of ``n``
    strings otherwise. An item that fails (missing key, wrong type, empty, longer than the
    context) gets ``result_key: None`` and its error under ``error_key``; the others go on.

    ``n`` samples come from ``n`` copies of the prompt (``use_sample=False``) or from one
    request with ``SamplingParams(n=n)`` (``use_sample=True``).

    Workers: ``worker_num`` spawned processes, each with its own engine. On GPUs each gets
    ``tp * pp`` GPUs (or its entry of ``gpu_assignments``, indices inside the parent's
    CUDA_VISIBLE_DEVICES); without GPUs each gets its own CPU cores and a share of memory for
    its KV cache. Without ``chunk_size`` each worker takes an equal share of the items; with
    it, workers take chunks of that many items from one queue as they become free. A worker
    that dies has its unfinished items retried elsewhere (at most ``MAX_ATTEMPTS`` times).

    Beyond the engine arguments named here: ``top_p``, ``stop``, ``seed`` (sample ``k`` of a
    duplicated prompt uses ``seed + k``), ``sampling_args`` (any other ``SamplingParams``
    keyword, e.g. ``{"ignore_eos": True}``) and ``engine_args`` (any other ``vllm.LLM``
    keyword). ``pp > 1`` uses vLLM's Ray executor and needs ``worker_num == 1``.

    ``output_path``: each finished item is appended to this JSONL file at once, with its
    position in ``data`` under ``index_key``; a rerun with the same file skips the items it
    holds with results, and a finished run leaves the file in input order. Raises
    ``ValueError`` for impossible arguments and placements before any worker starts.
    """
    _check_arguments(n, worker_num, tp, pp, chunk_size, max_output_len, temperature)
    if result_key in (message_key, error_key) or error_key == message_key:
        raise ValueError("message_key, result_key and error_key must be three different keys")
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
    sampling = {key: value for key, value in sampling.items() if value is not None}

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
        output=_OutputFile(Path(output_path), index_key) if output_path is not None else None,
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
    model = model_id
    if looks_like_local_path(model):
        model = str(Path(model).expanduser().resolve())
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
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


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

    Every field below ``output`` changes under ``changed`` (a lock with a condition), from the
    worker slots' threads.
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
    output: _OutputFile | None

    changed: threading.Condition = field(default_factory=threading.Condition)
    results: list[dict[str, Any] | None] = field(default_factory=list)
    pending: dict[int, _Pending] = field(default_factory=dict)
    queue: deque[list[int]] = field(default_factory=deque)
    chunks_out: int = 0
    handles: dict[int, WorkerHandle] = field(default_factory=dict)
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
            done = self.output.load(self.data, self.message_key, self._is_done)
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

    def _is_done(self, record: dict[str, Any]) -> bool:
        """True for a record of an earlier run that holds a result of this run's shape."""
        result = record.get(self.result_key)
        if record.get(self.error_key) is not None or result is None:
            return False
        if self.n == 1:
            return isinstance(result, str)
        return isinstance(result, list) and len(result) == self.n

    def _prepare(self, done: dict[int, dict[str, Any]]) -> list[int]:
        """Fill in the results of earlier runs and of bad items; return the items to run."""
        todo = []
        for index, item in enumerate(self.data):
            if index in done:
                self.results[index] = {**item, self.result_key: done[index][self.result_key]}
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
                    # A timeout keeps the wait interruptible by Ctrl-C.
                    self.changed.wait(1.0)
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            for thread in threads:
                thread.join(60)

    def _serve_slot(self, slot: int, config: WorkerConfig, startup_timeout: float) -> None:
        """One worker slot: start a worker, feed it chunks, replace it if it dies."""
        handle: WorkerHandle | None = None
        starts = 0
        try:
            while True:
                if handle is None:
                    if not self._work_left():
                        return
                    if starts > MAX_RESTARTS:
                        logger.error("batch worker %d died %d times; giving up on it", slot, starts)
                        return
                    starts += 1
                    handle = WorkerHandle(
                        config, idle_ttl=_IDLE_TTL_SECONDS, startup_timeout=startup_timeout
                    )
                    with self.changed:
                        self.handles[slot] = handle
                        if self.fatal is not None:
                            return
                    handle.wait_ready()
                    with self.changed:
                        self.first_ready = self.first_ready or time.monotonic()
                chunk = self._take_chunk()
                if chunk is None:
                    return
                if not self._run_chunk(handle, chunk):
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
                    self.fatal = VLLMServiceError(
                        f"Every batch worker died more than {MAX_RESTARTS} times; "
                        f"{sum(map(len, self.queue))} items are left (their worker logs are "
                        "named in the log). With output_path, a rerun goes on from here."
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

    def _run_chunk(self, handle: WorkerHandle, chunk: list[int]) -> bool:
        """Run one chunk on a worker; False if the worker died (its items are back in the queue)."""
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
            self._give_back(chunk, None)
            return False
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
            self._give_back(sorted(unfinished), exc)
            return False
        except ServiceShutdownError:
            return False  # the run is being stopped
        with self.changed:
            self.chunks_out -= 1
            self.changed.notify_all()
        return True

    def _one_sample(self, k: int) -> dict[str, Any]:
        """Sampling for copy ``k`` of a duplicated prompt: a seed of its own, or all copies match."""
        sampling = {**self.sampling, "n": 1}
        if "seed" in sampling:
            sampling["seed"] += k
        return sampling

    def _record(self, index: int, k: int, finished: Finished) -> bool:
        """Note one finished request; True when its item is complete. Called under the lock."""
        pending = self.pending[index]
        if finished.error is not None or not finished.completions:
            pending.error = pending.error or finished.error or "the engine returned no output"
        elif self.use_sample:
            pending.texts = [c.text for c in finished.completions]
        else:
            pending.texts[k] = finished.completions[0].text
        self.tokens += sum(c.token_count for c in finished.completions)
        pending.waiting -= 1
        if pending.waiting:
            return False
        del self.pending[index]
        self._finish(index, pending.texts, pending.error)
        return True

    def _give_back(self, indices: list[int], died: WorkerDiedError | None) -> None:
        """Put a dead worker's unfinished items back in the queue, or fail them after MAX_ATTEMPTS."""
        with self.changed:
            self.chunks_out -= 1
            retry = []
            for index in indices:
                pending = self.pending[index]
                if died is not None:
                    pending.attempts += 1
                if pending.attempts >= MAX_ATTEMPTS:
                    del self.pending[index]
                    self._finish(
                        index, None,
                        f"the worker died {pending.attempts} times while generating this item "
                        f"(last: {died})",
                    )
                else:
                    retry.append(index)
            if retry:
                self.queue.appendleft(retry)
            self.changed.notify_all()

    def _finish(self, index: int, texts: list[str | None] | None, error: str | None) -> None:
        """Store an item's result, append it to the output file, move the progress bar."""
        result = dict(self.data[index])
        if error is None and texts is not None:
            result[self.result_key] = texts[0] if self.n == 1 else list(texts)
        else:
            result[self.result_key] = None
            result[self.error_key] = error
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


class _OutputFile:
    """The JSONL file each finished item is appended to, read back to resume a run."""

    def __init__(self, path: Path, index_key: str) -> None:
        self.path = path
        self.index_key = index_key
        self.records: dict[int, dict[str, Any]] = {}
        self._file: Any = None

    def load(
        self,
        data: Sequence[dict[str, Any]],
        message_key: str,
        is_done: Callable[[dict[str, Any]], bool],
    ) -> dict[int, dict[str, Any]]:
        """Read an earlier run's lines; return {index: line} of the items it finished.

        Opens the file for appending. Raises ``ValueError`` if a line belongs to other data.
        """
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not JSON (cut short?); ignoring it", self.path, number)
                continue
            index = record.get(self.index_key) if isinstance(record, dict) else None
            if (
                not isinstance(index, int)
                or not 0 <= index < len(data)
                or record.get(message_key) != data[index].get(message_key)
            ):
                raise ValueError(
                    f"output_path {self.path} line {number} does not belong to this data (its "
                    f"{self.index_key!r} does not name an item with the same {message_key!r}); "
                    "use another output_path, or delete the file to start over"
                )
            self.records[index] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            self._file.write("\n")  # after a line cut short, start a fresh one
        return {index: record for index, record in self.records.items() if is_done(record)}

    def append(self, index: int, result: dict[str, Any]) -> None:
        record = {**result, self.index_key: index}
        try:
            line = json.dumps(record, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"data[{index}] cannot be written to {self.path} as JSON: {exc}") from exc
        self._file.write(line + "\n")
        self._file.flush()
        self.records[index] = record

    def close(self, rewrite: bool) -> None:
        """Close the file; with ``rewrite``, leave it in input order with one line per item."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if rewrite:
            partial = self.path.with_name(self.path.name + ".partial")
            with partial.open("w", encoding="utf-8") as file:
                for index in sorted(self.records):
                    file.write(json.dumps(self.records[index], ensure_ascii=False) + "\n")
            os.replace(partial, self.path)
