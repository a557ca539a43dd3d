"""Batch workers on a Ray cluster: one actor per worker, each holding one engine.

    driver (generate)                            a node of the cluster
    -----------------                            ---------------------
    RayWorkers: one placement group,
      a bundle of tp*pp GPUs (or CPU cores)
      per worker, spread over the nodes
    an actor per bundle (max_restarts)   ---->   EngineActor: tells the driver its machine;
    its config: local mode's placement            starts our worker process (WorkerHandle)
      rules, per machine                          with that config, pinned as locally
    run(chunk): a streaming call         ---->   yields each Finished as it ends
                                         <----
    the actor or its node died: WorkerDiedError, the chunk goes back to the queue; the slot's
    next worker is the same actor, restarted by Ray in its bundle (on another node if the
    bundle moved)

Only imported when ``ray_address`` is given: without Ray installed, the import says what to
install. The cluster's nodes need this package (and vLLM) installed, as the driver has it.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import as_completed
from typing import Any

from .._worker.handle import WorkerHandle, WorkerUnavailable, remaining
from .._worker.keep_alive import KeepAlive
from .._worker.protocol import Finished, Request, WorkerConfig
from ..errors import ServiceShutdownError, VLLMServiceError, WorkerDiedError, WorkerStartError
from .local_pool import EngineSpec, Host, describe, placed_worker_configs
from .placement import forwarded_environment
from .schedule import WorkerGone

try:
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "ray_address (--ray-address) needs Ray, which is not installed: "
        "pip install 'vllm-service[ray]' (on the driver and on every node of the cluster)"
    ) from exc

logger = logging.getLogger("vllm_service")

# Workers are stopped explicitly at the end of a run; this only guards against leaks.
_IDLE_TTL_SECONDS = 24 * 3600.0
# The actor runs one chunk at a time, plus stop() and wait_exited() beside it.
_ACTOR_THREADS = 3


class EngineActor:
    """One batch worker on a Ray node: our worker process with one engine, as locally."""

    def __init__(self) -> None:
        self.handle: WorkerHandle | None = None
        self.lock = threading.Lock()

    def machine(self) -> tuple[str, str, Host]:
        """(node id, node IP address, this machine) as this actor sees them."""
        context = ray.get_runtime_context()
        return context.get_node_id(), ray.util.get_node_ip_address(), Host.this_machine()

    def start(self, config: WorkerConfig, startup_timeout: float) -> dict[str, Any]:
        """Start the engine (a fresh one if one ran before); its info once it is ready."""
        with self.lock:
            if self.handle is not None:
                self.handle.stop(ServiceShutdownError("a new engine replaces this one"))
            self.handle = WorkerHandle(
                config, keep_alive=KeepAlive(_IDLE_TTL_SECONDS), startup_timeout=startup_timeout
            )
            handle = self.handle
        return handle.startup.result()

    def run(self, requests: list[Request]) -> Iterator[Finished]:
        """Send every request to the engine; yield each result as it comes (a streaming call)."""
        if self.handle is None:
            raise WorkerUnavailable
        for future in as_completed(self.handle.submit(requests)):
            yield future.result()

    def stop(self, reason: str) -> None:
        """End the engine; a run in progress raises ``ServiceShutdownError``."""
        with self.lock:
            if self.handle is not None:
                self.handle.stop(ServiceShutdownError(reason))

    def wait_exited(self, timeout: float) -> None:
        """After the engine died: wait until its processes are gone."""
        if self.handle is not None:
            self.handle.wait_exited(timeout)


class RayWorkers:
    """The worker pool on a Ray cluster: slot ``k`` is the actor in bundle ``k``.

    Connects to the cluster (unless this process already is) and reserves every worker's
    resources at once, in a placement group; ``close`` gives them back.
    """

    def __init__(
        self, spec: EngineSpec, worker_num: int, address: str, startup_timeout: float
    ) -> None:
        self.spec = spec
        self.size = worker_num
        self.startup_timeout = startup_timeout
        self.lock = threading.Lock()
        self.connected_here = not ray.is_initialized()
        if self.connected_here:
            _check_reachable(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except Exception as exc:  # Ray raises ConnectionError, ValueError, ... here
                raise VLLMServiceError(
                    f"Cannot connect to the Ray cluster at {address!r}: {_first_line(exc)}. "
                    "Check that it runs (`ray status` on a node) and the address: 'auto' on a "
                    "node of the cluster, 'host:port' of its head (6379 by default), or "
                    "'ray://host:10001' through Ray Client."
                ) from exc
        self.group = None
        self.actors: list[Any] = []
        try:
            self._reserve(address, worker_num)
            self.machines = dict(enumerate(
                _get([actor.machine.remote() for actor in self.actors], startup_timeout)
            ))
        except BaseException:
            self.close()
            raise

    def _reserve(self, address: str, worker_num: int) -> None:
        ranks = self.spec.tp * self.spec.pp
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) > 0:
            # The CPU is for the actor's own process; vLLM's GPU ranks run under it.
            bundle = {"GPU": float(ranks), "CPU": 1.0}
        else:
            bundle = {"CPU": float(ranks)}
        # SPREAD: each worker on another node while there are nodes free, so a node's death
        # costs as few workers as it can.
        self.group = placement_group([bundle] * worker_num, strategy="SPREAD")
        try:
            ray.get(self.group.ready(), timeout=min(self.startup_timeout, 120.0))
        except ray.exceptions.GetTimeoutError:
            raise VLLMServiceError(
                f"The Ray cluster at {address} cannot give worker_num={worker_num} workers "
                f"{_describe(bundle)} each (tp={self.spec.tp} x pp={self.spec.pp}); it has "
                f"{_describe(resources)} in all, some of which may be in use. Lower "
                "worker_num, or add nodes."
            ) from None
        environment, self.secrets = forwarded_environment()
        actor_class = ray.remote(EngineActor)
        self.actors = [
            actor_class.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_restarts=-1,  # the scheduler decides when a slot gives up, then kills it
                max_concurrency=_ACTOR_THREADS,
                runtime_env={"env_vars": environment},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=slot
                ),
            ).remote()
            for slot in range(worker_num)
        ]

    def worker(self, slot: int) -> RayWorker:
        return RayWorker(self, slot)

    def config_for(self, slot: int, deadline: float) -> WorkerConfig:
        """Slot ``slot``'s worker config: local mode's placement rules on the actor's machine.

        Workers on one machine (by IP address: Ray nodes started side by side on one machine
        share its cores) split its cores and memory as local workers would; on GPUs each
        actor has its own, from Ray. Asked anew for a restarted actor, which may have moved.
        """
        node, address, host = _call(self.actors[slot].machine, deadline)
        with self.lock:
            self.machines[slot] = (node, address, host)
            neighbours = sorted(s for s, (_, a, _) in self.machines.items() if a == address)
        if host.gpus:
            config = placed_worker_configs(self.spec, 1, host)[0]
        else:
            config = placed_worker_configs(self.spec, len(neighbours), host)[neighbours.index(slot)]
        logger.info(
            "batch worker %d: Ray actor on node %s (%s), %s", slot, node[:12], address,
            describe(config),
        )
        if self.secrets:
            config = dataclasses.replace(config, environment={**config.environment, **self.secrets})
        return config

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
        if self.connected_here and ray.is_initialized():
            ray.shutdown()


class RayWorker:
    """One start of a slot's actor's engine, as a batch worker."""

    def __init__(self, pool: RayWorkers, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.actor = pool.actors[slot]
        self.stopped = False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.pool.startup_timeout
        try:
            config = self.pool.config_for(self.slot, deadline)
            _call(self.actor.start, deadline, config, self.pool.startup_timeout)
        except RayTaskError as exc:
            raise WorkerStartError(f"batch worker {self.slot} (Ray): {exc.cause}") from None
        except (RayActorError, TimeoutError) as exc:
            raise WorkerStartError(
                f"batch worker {self.slot}'s Ray actor did not start its engine: {exc}"
            ) from None

    def run(self, requests: list[Request]) -> Iterator[Finished]:
        if self.stopped:
            raise WorkerGone
        results = self.actor.run.options(num_returns="streaming").remote(requests)
        try:
            for result in results:
                yield ray.get(result)
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, WorkerUnavailable):
                raise WorkerGone from None
            if isinstance(cause, (WorkerDiedError, ServiceShutdownError)):
                raise type(cause)(f"batch worker {self.slot} (Ray): {cause}") from None
            raise
        except RayActorError as exc:
            if self.stopped:
                raise ServiceShutdownError("the batch run was stopped") from None
            node = self.pool.machines.get(self.slot, ("?", "?"))[1]
            raise WorkerDiedError(
                f"batch worker {self.slot}'s Ray actor (on {node}) died or its node went away: "
                f"{_first_line(exc)}"
            ) from None

    def stop(self, reason: str) -> None:
        """End the engine, then the actor for good (the slot is over)."""
        self.stopped = True
        try:
            ray.get(self.actor.stop.remote(reason), timeout=30)
        except Exception:  # dead already, or stuck: the kill below ends it either way
            pass
        ray.kill(self.actor, no_restart=True)

    def wait_exited(self, timeout: float) -> None:
        try:
            ray.get(self.actor.wait_exited.remote(timeout), timeout=timeout + 5)
        except Exception:  # the actor itself died: its engine ends with it
            pass


def _check_reachable(address: str) -> None:
    """``VLLMServiceError`` at once when nothing listens at a ``host:port`` address.

    ``ray.init`` retries such an address for minutes before it gives up.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray's own error explains
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise VLLMServiceError(
            f"Cannot connect to the Ray cluster at {address!r}: nothing answers at {host}:{port} "
            f"({exc}). Check that it runs (`ray status` on a node) and the address: 'auto' on a "
            "node of the cluster, 'host:port' of its head (6379 by default), or "
            "'ray://host:10001' through Ray Client."
        ) from None


def _call(method: Any, deadline: float, *args: Any) -> Any:
    """``ray.get(method.remote(*args))``, waiting out an actor that Ray is restarting.

    Only for calls that may run twice (the actor's ``machine`` and ``start``).
    """
    warned = False
    while True:
        try:
            return _get(method.remote(*args), remaining(deadline))
        except ActorUnavailableError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError("the actor stayed unavailable (restarting?)") from None
            if not warned:
                logger.warning("a Ray actor is unavailable, waiting for Ray to restart it: %s",
                               _first_line(exc))
                warned = True
            time.sleep(0.5)


def _get(refs: Any, timeout: float | None) -> Any:
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"no answer from the Ray actor within {timeout:.0f} s") from None


def _describe(resources: dict[str, float]) -> str:
    shown = {name: amount for name, amount in resources.items() if name in ("CPU", "GPU")}
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(shown.items())) or "nothing"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n")[0]
