"""The real worker process around a stand-in engine, for what this CPU machine cannot run.

vLLM's sleep mode exists only on GPUs, and a weight update that fails part-way cannot be
caused on purpose. Tests put :func:`run_worker` in place of the worker's
entry point (``vllm_service._worker.handle.run_worker``); the spawned worker then runs the
real loop with :class:`StandInEngine`, which answers every request with "ok" and writes each
call it gets, one JSON line each, to the file named by ``STANDIN_CALLS``.
"""

from __future__ import annotations

import json
import os
from multiprocessing.connection import Connection
from typing import Any

from vllm_service._engines.contract import WeightsBroken, WeightsRejected
from vllm_service._worker import main as _worker_process
from vllm_service._worker.protocol import Finished, Request, WorkerConfig
from vllm_service.types import Sample


class StandInEngine:
    def __init__(self, config: WorkerConfig) -> None:
        self.info: dict[str, Any] = {"mode": "local", "model": config.model, "choices": []}
        self.steps = 0
        self._unfinished: list[int] = []
        self._record("init", engine_args=config.engine_args)

    def add(self, request: Request) -> None:
        self._record("add", request_id=request.request_id)
        self._unfinished.append(request.request_id)

    def abort(self, request_ids: list[int]) -> None:
        self._unfinished = [i for i in self._unfinished if i not in request_ids]

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def step(self) -> list[Finished]:
        done, self._unfinished = self._unfinished, []
        return [Finished(i, 1, [Sample("ok", [1], "stop", 1)]) for i in done]

    def sleep(self) -> None:
        self._record("sleep")

    def wake_up(self) -> None:
        self._record("wake_up")

    def update_weights(self, files: list[str], folder: str | None) -> None:
        """Records the call; a folder named "rejected" or "broken" fails that way."""
        self._record("update_weights", files=files)
        name = os.path.basename(folder or "")
        if name == "rejected":
            raise WeightsRejected("model.layers.0.mlp.up_proj.weight does not fit")
        if name == "broken":
            raise WeightsBroken("the file went away half-way")

    def close(self) -> None:
        self._record("close")

    @staticmethod
    def _record(call: str, **details: Any) -> None:
        with open(os.environ["STANDIN_CALLS"], "a") as calls:
            calls.write(json.dumps({"call": call, **details}) + "\n")


def run_worker(conn: Connection, config: WorkerConfig) -> None:
    _worker_process.make_engine = StandInEngine  # type: ignore[assignment]
    _worker_process.run_worker(conn, config)


def calls(path: str) -> list[dict[str, Any]]:
    with open(path) as lines:
        return [json.loads(line) for line in lines]
