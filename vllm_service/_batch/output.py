"""The output files of batch runs: JSONL files a rerun resumes from.

:class:`ResumableFile` is what both formats share: lines are appended as items finish, a
rerun reads them back, a finished run rewrites the file in input order, and a lock file next
to it (``out.jsonl.lock``) keeps two runs from writing it at once. What a line holds and how
it is matched to its input item is the format's:

- :class:`OutputFile`, for :func:`vllm_service.generate`: the item, its result, its position
  in the data under the index key and the fingerprint of the settings that produced it under
  ``RUN_KEY``.
- OpenAI batch output lines, matched by ``custom_id`` (``openai_format.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import VLLMServiceError

logger = logging.getLogger("vllm_service")

# The key each line keeps the fingerprint of the settings that produced it under.
RUN_KEY = "_run"
# Appended lines reach the OS at once (a crashed process loses none of them), but are
# fsynced at most this often: a crashed machine then loses at most the last second's items,
# which a rerun generates again, and thousands of short items a second do not each wait for
# the disk. ``sync_if_due`` (also called by the run's main thread about once a second) bounds
# how long a line waits for its fsync when no further line comes.
_SYNC_INTERVAL_SECONDS = 1.0


def run_fingerprint(
    model: str, system: str | None, n: int, use_sample: bool, sampling: dict[str, Any]
) -> str:
    """A short hash of the settings that decide an item's result, kept under ``RUN_KEY``.

    Engine settings (memory, placement, ``max_model_len``, ``dtype``, ``engine_args``) are left
    out: a rerun may change them, after running out of memory for instance, and keep what is
    done. A change of ``dtype`` can change answers slightly; that is accepted. The weights are
    in (``weights_identity``): a checkpoint overwritten in place makes other answers.
    """
    sampling = dict(sampling)
    for key in ("temperature", "top_p"):
        if key in sampling:
            sampling[key] = float(sampling[key])  # 0 (Python) and 0.0 (command line) match
    return fingerprint({
        "model": model, "weights": weights_identity(model), "system": system, "n": n,
        "use_sample": use_sample, "sampling": sampling,
    })


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of ``settings`` (JSON-like; other values count by their ``str``)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


# The files of a model folder whose change changes the answers: config, tokenizer, weights.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf", ".pt", ".model", ".jinja")


def weights_identity(model: str) -> list[Any]:
    """What identifies the weights ``model`` names: for a local folder the name, size and
    modification time of each config, tokenizer and weight file; for a Hugging Face id the
    cached revision (empty when none is cached)."""
    folder = Path(model)
    if folder.is_dir():
        found = []
        for path in sorted(folder.iterdir()):
            if path.suffix in _MODEL_FILE_SUFFIXES and path.is_file():
                info = path.stat()
                found.append([path.name, info.st_size, info.st_mtime_ns])
        return found
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        ref = Path(HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs" / "main"
        return [ref.read_text().strip()]
    except (ImportError, OSError):
        return []


class ResumableFile:
    """A JSONL file each finished item's line is appended to, read back to resume a run.

    ``open`` takes the lock and must come first; ``close`` releases it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.records: dict[int, dict[str, Any]] = {}
        self._file: Any = None
        self._lock_fd: int | None = None
        self._synced_at = 0.0
        self._unsynced = False

    def open(self, index_of: Callable[[Any, int], int]) -> dict[int, dict[str, Any]]:
        """Lock the file, read an earlier run's lines, open it for appending.

        ``index_of(line, line_number)`` gives the input item a decoded line belongs to, or
        raises ``ValueError`` saying why it belongs to none. Returns ``{index: line}`` (the
        last line of each item). Raises ``VLLMServiceError`` if another run holds the lock.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            text = self.path.read_bytes() if self.path.exists() else b""
            self._read(text, index_of)
            self._file = self.path.open("ab")
            if text and not text.endswith(b"\n"):
                self._file.write(b"\n")  # after a line cut short, start a fresh one
            if not text:
                _fsync_directory(self.path.parent)  # the new file's name survives a crash
        except BaseException:
            self.close(rewrite=False)
            raise
        return dict(self.records)

    def _read(self, text: bytes, index_of: Callable[[Any, int], int]) -> None:
        # Split on b"\n" only: str.splitlines() would also split inside a JSON string holding
        # U+2028, U+0085 and the like, which ensure_ascii=False writes as they are.
        lines = [(n, raw) for n, raw in enumerate(text.split(b"\n"), 1) if raw.strip()]
        for position, (number, raw) in enumerate(lines):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if position == len(lines) - 1:  # a run cut short while writing its last line
                    logger.warning(
                        "%s line %d is not JSON (cut short?); ignoring it", self.path, number
                    )
                    continue
                # Not a file of this tool's: the finished run's rewrite would wipe it.
                raise ValueError(
                    f"output_path {self.path} line {number} is not JSON, so the file is not "
                    "one this tool wrote (a run rewrites its output file at the end, which would "
                    "lose what it holds); give another output_path, or delete the file to start "
                    "over"
                ) from None
            self.records[index_of(record, number)] = record

    def write(self, index: int, record: dict[str, Any]) -> None:
        """Append item ``index``'s line as it is; it replaces any earlier line of the item."""
        self._file.write(_encode(record, f"data[{index}]", self.path))
        self._file.flush()
        self.records[index] = record
        self._unsynced = True
        self.sync_if_due()

    def sync_if_due(self) -> None:
        """fsync the lines appended since the last fsync, if that was long enough ago."""
        if time.monotonic() - self._synced_at >= _SYNC_INTERVAL_SECONDS:
            self.sync()

    def sync(self) -> None:
        """fsync the lines appended since the last fsync."""
        if self._file is not None and self._unsynced:
            os.fsync(self._file.fileno())
            self._synced_at = time.monotonic()
            self._unsynced = False

    def close(self, rewrite: bool) -> None:
        """Close the file and release the lock; with ``rewrite``, leave it in input order."""
        try:
            if self._file is not None:
                self.sync()
                self._file.close()
                self._file = None
                if rewrite:
                    self._rewrite()
        finally:
            self._unlock()

    def _rewrite(self) -> None:
        """Replace the file by one line per item in input order, never leaving it half written."""
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            with partial.open("wb") as file:
                for index in sorted(self.records):
                    file.write(_encode(self.records[index], f"data[{index}]", self.path))
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, self.path)
        except BaseException:
            # A full disk, say: the appended file stays as it was, complete, for a rerun.
            partial.unlink(missing_ok=True)
            raise
        _fsync_directory(self.path.parent)

    def _lock(self) -> None:
        # flock belongs to the open file: the kernel drops it when the process ends however it
        # ends, so a crashed run leaves no lock behind that blocks the next one.
        import fcntl  # POSIX only: here, so that importing the package works on Windows

        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise VLLMServiceError(
                    f"output_path {self.path} is in use by another run: it holds the lock "
                    f"{self.lock_path}. Wait for that run to end (a rerun then resumes from the "
                    "file), or give this run another output_path."
                ) from None
            # The run before may have deleted the lock file between our open and flock: then
            # we hold a lock on a file nobody else sees, so take the new one instead.
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        # Deleted while still held, so no other run can lock this file after we let go.
        self.lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None


class OutputFile(ResumableFile):
    """The output file of :func:`vllm_service.generate`: items with results, fingerprinted.

    ``load`` (or ``resume``) takes the lock and must come first; ``close`` releases it.
    """

    def __init__(self, path: Path, index_key: str, run: str) -> None:
        super().__init__(path)
        self.index_key = index_key
        self.run = run

    def load(
        self, data: Sequence[dict[str, Any]], message_key: str
    ) -> dict[int, dict[str, Any]]:
        """Lock the file, read an earlier run's lines, open it for appending.

        Returns ``{index: line}`` (the last line of each item). Raises ``VLLMServiceError`` if
        another run holds the lock, ``ValueError`` if a line belongs to other data.
        """

        def index_of(record: Any, number: int) -> int:
            index = record.get(self.index_key) if isinstance(record, dict) else None
            if (
                not isinstance(index, int)
                or not 0 <= index < len(data)
                # an item whose prompt JSON cannot hold has an error line without it
                or record.get(message_key, data[index].get(message_key))
                != data[index].get(message_key)
            ):
                raise ValueError(
                    f"output_path {self.path} line {number} does not belong to this data (its "
                    f"{self.index_key!r} does not name an item with the same {message_key!r}); "
                    "use another output_path, or delete the file to start over"
                )
            return index

        return self.open(index_of)

    def resume(
        self,
        data: Sequence[dict[str, Any]],
        message_key: str,
        result_key: str,
        error_key: str,
        on_mismatch: str,
        is_done: Callable[[dict[str, Any]], bool],
    ) -> dict[int, dict[str, Any]]:
        """Lock and read the file; return ``{index: line}`` of the items a rerun reuses.

        Those are the lines with a result and no error for which ``is_done`` holds, made with
        this run's settings (or any, with ``on_mismatch="keep"``). Results of other settings
        raise ``ValueError`` with ``on_mismatch="error"``.
        """
        for key in (self.index_key, RUN_KEY):
            if any(key in item for item in data):
                logger.warning(
                    "some items of data have a %r key of their own; in %s it holds the output "
                    "file's value instead (the returned items keep theirs)", key, self.path,
                )
        records = self.load(data, message_key)
        finished = {
            index: record for index, record in records.items()
            if record.get(error_key) is None and record.get(result_key) is not None
        }
        other = sorted(i for i, record in finished.items() if record.get(RUN_KEY) != self.run)
        if other and on_mismatch == "error":
            self.close(rewrite=False)
            unmarked = sum(1 for i in other if RUN_KEY not in finished[i])
            raise ValueError(
                f"output_path {self.path} holds results of {len(other)} items made with other "
                f"settings than this call's (items {_some(other)}): the fingerprint under "
                f"{RUN_KEY!r} of what made them (model and its weights files, system, n, "
                "use_sample, temperature, top_p, seed, stop, max_output_len, sampling_args) is "
                "not this call's "
                f"{self.run!r}"
                + (f"; {unmarked} have none, as an older vllm-service wrote them"
                   if unmarked else "")
                + ". Pass on_mismatch='redo' (--on-mismatch redo) to generate them again with "
                "these settings, on_mismatch='keep' to use them as they are, or use another "
                "output_path."
            )
        if on_mismatch == "redo":
            for index in other:
                del finished[index]
        return {index: record for index, record in finished.items() if is_done(record)}

    def append(self, index: int, result: dict[str, Any]) -> None:
        """Write one finished item's line (with its index and the run's fingerprint).

        Raises ``TypeError`` naming the item if a value of it cannot be written as JSON.
        """
        self.write(index, {**result, self.index_key: index, RUN_KEY: self.run})


def writable_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``record`` that JSON can hold (for the error line of an item that has
    others)."""
    kept = {}
    for key, value in record.items():
        try:
            json.dumps({key: value}, ensure_ascii=False)
        except (TypeError, ValueError):
            continue
        kept[key] = value
    return kept


def _encode(record: dict[str, Any], name: str, path: Path) -> bytes:
    """One JSONL line as UTF-8; non-ASCII text stays readable where it can."""
    try:
        line = json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be written to {path} as JSON: {exc}") from exc
    try:
        return (line + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate ("\ud83d", which json.loads accepts) has no UTF-8 form; escaped
        # as JSON writes it by default, it reads back as the same string.
        return (json.dumps(record) + "\n").encode("ascii")


def _fsync_directory(directory: Path) -> None:
    """Make a file's creation or replacement in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _some(indices: list[int], shown: int = 10) -> str:
    """The first few of many item indices, for a message."""
    text = ", ".join(map(str, indices[:shown]))
    return text + (f" and {len(indices) - shown} more" if len(indices) > shown else "")
