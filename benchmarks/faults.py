"""The fault suite, with figures: what each fault costs a caller, on the real engine.

    python benchmarks/faults.py [--parts kill,input,sigstop,parent,retiring,soak,stall,machine]
                                [--soak-expiries 20] [--soak-kills 3] [--soak-threads 32]
                                [--stall-seconds S]

Parts (each prints a markdown table on stdout; progress goes to stderr):

kill      kill -9 of the worker, and of vLLM's engine process (VLLM::EngineCore), while the
          worker is loading, idle, and mid-generation (3 callers with long ignore_eos
          generations): when every caller had its error (and which), when the service showed
          "stopped", when the next call succeeded on a fresh worker, and what was left of the
          old worker's process group and /dev/shm files.
retiring  the same kills while the worker retires after its idle TTL (idle_ttl 2 s, stop
          timeout 120 s; caught by watching status().state == "retiring").
input     one row per kind of bad input (types, ranges, huge/empty values, unicode, objects that
          do not pickle, bad chat messages, bad settings, bad JSONL lines for the CLI, bad batch
          generate() arguments): what came back, whether the message names what is wrong, and
          whether the same worker still answers a greedy call afterwards.
sigstop   SIGSTOP of the worker with calls in flight and request_timeout_seconds=5: when each
          call failed, and how long shutdown() took with the worker still stopped.
parent    a child process builds a service, warms up, prints its worker's pid and SIGKILLs
          itself: how long until nothing of the worker's group is left, and shm files left.
soak      N threads calling short generations in bursts through idle-TTL expiries (idle_ttl 2 s,
          all threads pausing together between bursts), with a few random kill -9 of the worker
          or engine during bursts: requests sent / completed / failed (by class) / hung, and
          the parent's RSS, open fds and threads at the start and the end.
stall     SIGSTOP of vLLM's EngineCore with default settings (no request timeout): a call and
          a stream in flight, then update_weights() and unload(wait=True) on that worker; an
          idle worker, then a call; a worker loading; a batch run. When each caller had its
          error (the stall bound, 600 s by default, or the startup timeout while loading),
          what was left of the group and /dev/shm, and whether the next call succeeds.
machine   the model and a trainer's update folder in /dev/shm, then each kind of worker exit
          (files of the user's lost, engine shm and sockets left); staged tensors of a killed
          caller; a model with code of its own; a parent SIGKILLed with a forked child alive;
          a second OS user (useradd, as root only); media parts refused and allowed; batch
          reruns with other settings.

Every wait is bounded: a call that does not return in time shows as HUNG and the run goes on.
Uses only the public API plus ``group_members`` and ``shared_memory_files``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# `python benchmarks/faults.py` puts benchmarks/ first on sys.path, not the checkout: without
# this, `import vllm_service` finds whatever copy is installed (an editable install of another
# checkout, say). The checkout this file is in comes first, for this process, the workers it
# spawns (they inherit sys.path) and the child processes it runs (PYTHONPATH).
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import psutil

from vllm_service import (
    GenerationParams,
    GenerationResult,
    VLLMInferenceService,
    VLLMSettings,
    demo_model_path,
    generate,
    generate_openai_batch,
)
from vllm_service.testing import group_members, shared_memory_files

PROMPT = "The capital of France is"
STORY = "Tell me a long story about a lighthouse keeper."
GREEDY = {"temperature": 0, "max_tokens": 4}
LONG = {"max_tokens": 2000, "ignore_eos": True}
MAX_MODEL_LEN = 2048
START_BOUND = 300.0  # seconds an engine start may take before a call counts as HUNG
CALL_BOUND = 120.0  # seconds a call on a ready worker may take

T0 = time.monotonic()
LOADS: list[float] = []


def log(message: str) -> None:
    load = os.getloadavg()
    LOADS.append(load[0])
    print(f"[{time.monotonic() - T0:7.1f} s, load {load[0]:.2f}] {message}", file=sys.stderr,
          flush=True)


# ----- bounded calls -----


class Call:
    """``fn()`` in a daemon thread: its value or exception and when it ended; never joined
    without a timeout, so a call that hangs is reported, not waited for."""

    def __init__(self, fn: Callable[[], Any], name: str = "call") -> None:
        self.fn = fn
        self.name = name
        self.value: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self.thread = threading.Thread(target=self._run, name=f"faults-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported, whatever it is
            self.error = exc
        finally:
            self.ended = time.monotonic()

    def join(self, timeout: float) -> bool:
        self.thread.join(max(0.0, timeout))
        return not self.thread.is_alive()

    @property
    def hung(self) -> bool:
        return self.thread.is_alive()

    @property
    def outcome(self) -> str:
        if self.hung:
            return "HUNG"
        return "ok" if self.error is None else type(self.error).__name__


def bounded(fn: Callable[[], Any], timeout: float, name: str = "call") -> Call:
    call = Call(fn, name)
    call.join(timeout)
    return call


def join_all(calls: list[Call], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for call in calls:
        call.join(deadline - time.monotonic())


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``condition()`` held, or None when ``timeout`` passed first."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(interval)


def engine_pid(worker_pid: int | None) -> int | None:
    """The VLLM::EngineCore process in the worker's group (ps cuts names at 15 characters)."""
    if worker_pid is None:
        return None
    for pid in group_members(worker_pid):
        try:
            if pid != worker_pid and psutil.Process(pid).name().startswith("VLLM::EngineCor"):
                return pid
        except psutil.Error:
            continue
    return None


def existing(paths: set[str]) -> int:
    return sum(1 for path in paths if os.path.exists(path))


def fmt(seconds: float | None, bound: str = "HUNG") -> str:
    return bound if seconds is None else f"{seconds:.1f}"


def first_line(text: str, limit: int = 110) -> str:
    line = str(text).strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_escape(str(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def make_service(model: str, **settings: Any) -> VLLMInferenceService:
    values = {
        "model_path": model,
        "max_model_len": MAX_MODEL_LEN,
        "startup_timeout_seconds": START_BOUND - 30,
        **settings,
    }
    return VLLMInferenceService(VLLMSettings(**values))


def greedy_call(service: VLLMInferenceService, timeout: float = START_BOUND) -> Call:
    return bounded(lambda: service.generate(PROMPT, **GREEDY), timeout, "greedy")


def shut(service: VLLMInferenceService) -> None:
    call = bounded(service.shutdown, 200, "shutdown")
    if call.hung:
        log("!! shutdown() HUNG for 200 s")


# ----- 1. kill -9 in each phase -----


def kill_scenario(service: VLLMInferenceService, victim: str, phase: str) -> list[Any]:
    """Kill the worker or its engine in ``phase``; one row of the kill table."""
    log(f"kill -9 of the {victim} while {phase}")
    calls: list[Call] = []
    note = ""
    if phase == "loading":
        calls = [Call(service.warmup, "warmup")]
        calls += [Call(lambda: service.generate(PROMPT, **GREEDY), "caller") for _ in range(2)]
        wait_until(lambda: service.status().pid is not None, 30)
        pid = service.status().pid
        # Mid-load: once vLLM's engine process exists (the model is being loaded), 2 s more.
        if wait_until(lambda: engine_pid(pid) is not None, 180) is None:
            note = "no engine process appeared within 180 s; "
        time.sleep(2.0)
    elif phase == "idle":
        pid = service.status().pid
        time.sleep(1.0)
    elif phase == "mid-generation":
        pid = service.status().pid
        calls = [Call(lambda: service.generate(STORY, **LONG), "caller") for _ in range(3)]
        if wait_until(lambda: service.status().in_flight == 3, 30) is None:
            note = "the 3 calls were not all in flight; "
        time.sleep(2.0)
    elif phase == "retiring":
        pid = service.status().pid
    else:
        raise ValueError(phase)

    if phase == "retiring":
        # Everything noted while ready; then kill the moment the state turns "retiring".
        target = pid if victim == "worker" else engine_pid(pid)
        shm = shared_memory_files(pid)
        if wait_until(lambda: service.status().state == "retiring", 60, interval=0.005) is None:
            return [victim, phase, "not caught (no retiring state within 60 s)"] + ["-"] * 9
    else:
        target = pid if victim == "worker" else engine_pid(pid)
        shm = shared_memory_files(pid)
    before = service.status()
    state, error_before = before.state, before.last_error
    if target is None:
        return [victim, phase, state, "-", "-", "-", "-", "-", "-", "-", "-",
                note + "no target process"]
    try:
        os.kill(target, signal.SIGKILL)
    except ProcessLookupError:
        note += f"the {victim} was already gone; "
    killed = time.monotonic()

    join_all(calls, 120)
    classes = Counter(c.outcome for c in calls)
    errors = ", ".join(f"{n}x {name}" for name, n in sorted(classes.items())) or "(no callers)"
    errors_by = max((c.ended or 0) - killed for c in calls) if calls and not any(
        c.hung for c in calls) else None
    stopped = wait_until(lambda: service.status().state == "stopped", 120)
    stopped_at = None if stopped is None else time.monotonic() - killed
    left = len(group_members(pid))
    shm_left = existing(shm)
    leaked = sorted(Path(p).name for p in shm if os.path.exists(p))
    if leaked:
        # Reported, then removed (they are this run's), so the machine is not left dirty.
        note += f"shm left: {', '.join(leaked)}; "
        for path in shm:
            if os.path.exists(path):
                os.unlink(path)
    last_error = service.status().last_error
    following = greedy_call(service)
    next_ok = (
        following.outcome == "ok"
        and bool(following.value.text)
        and service.status().pid not in (None, pid)
    )
    next_at = following.ended - killed if next_ok and following.ended else None
    load = service.status().load_seconds
    if following.outcome != "ok":
        note += f"next call: {following.outcome} {first_line(following.error or '')}; "
    message = next((c.error for c in calls if c.error is not None), None)
    if message is not None:
        note += f"error: {first_line(str(message), 150)}"
    if last_error == error_before:
        note += "; status().last_error unchanged by this death"
    row = [
        victim, phase, state, errors,
        "-" if not calls else fmt(errors_by),
        fmt(stopped_at), fmt(next_at, "FAILED"), fmt(load, "-"),
        "yes" if next_ok else "no", left, f"{shm_left} of {len(shm)}", note.strip("; "),
    ]
    log(f"  -> {row}")
    return row


KILL_HEADERS = [
    "victim", "phase", "state at kill", "callers' errors", "all errors by (s)",
    "stopped by (s)", "next call ok by (s)", "of which new worker's load (s)", "fresh pid", "group left", "shm left", "notes",
]


def part_kill(model: str) -> str:
    rows = []
    service = make_service(model, idle_ttl_seconds=3600)
    try:
        rows.append(kill_scenario(service, "worker", "loading"))
        rows.append(kill_scenario(service, "worker", "idle"))
        rows.append(kill_scenario(service, "worker", "mid-generation"))
        rows.append(kill_scenario(service, "engine", "idle"))
        rows.append(kill_scenario(service, "engine", "mid-generation"))
    finally:
        shut(service)
    service = make_service(model, idle_ttl_seconds=3600)
    try:
        rows.append(kill_scenario(service, "engine", "loading"))
    finally:
        SHARED["input"] = service  # the bad-input matrix reuses this ready worker
    return table(KILL_HEADERS, rows)


def part_retiring(model: str) -> str:
    # A short TTL, a long stop timeout: the worker retires on its own within seconds.
    service = make_service(model, idle_ttl_seconds=2, stop_timeout_seconds=120)
    rows = []
    warm = bounded(service.warmup, START_BOUND, "warmup")
    if warm.outcome != "ok":
        return f"retiring: warmup {warm.outcome} {warm.error}"
    for victim in ("worker", "engine"):
        row = None
        for _attempt in range(3):
            if service.status().state != "ready":
                greedy_call(service)
            row = kill_scenario(service, victim, "retiring")
            if row[2] == "retiring":
                break
            log(f"  missed the retiring state ({row[2]}); again")
        rows.append(row)
    SHARED["soak"] = service
    return table(KILL_HEADERS, rows)


# ----- 2. SIGSTOP -----


def part_sigstop(model: str) -> str:
    stop_timeout = 5.0
    service = make_service(
        model, idle_ttl_seconds=3600, request_timeout_seconds=5, stop_timeout_seconds=stop_timeout
    )
    rows = []
    try:
        warm = bounded(service.warmup, START_BOUND, "warmup")
        check = greedy_call(service, CALL_BOUND)
        if warm.outcome != "ok" or check.outcome != "ok":
            return f"sigstop: warmup {warm.outcome}, first call {check.outcome}"
        pid = service.status().pid
        shm = shared_memory_files(pid)
        members = group_members(pid)
        log(f"SIGSTOP of worker {pid} with 3 calls in flight (request timeout 5 s)")
        calls = [Call(lambda: service.generate(STORY, **LONG), "caller") for _ in range(3)]
        wait_until(lambda: service.status().in_flight == 3, 30)
        time.sleep(1.0)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        join_all(calls, 60)
        rows.append(_stop_row("3 calls in flight, then SIGSTOP", calls, stopped_at))

        log("calls sent to the stopped worker: 2 short, 1 with a 1 MB prompt")
        late = [Call(lambda: service.generate(STORY, max_tokens=50), "late") for _ in range(2)]
        late.append(Call(lambda: service.generate("x " * 500_000), "big"))
        join_all(late, 60)
        rows.append(_stop_row("2 short + one 1 MB prompt sent to the stopped worker", late,
                              None))

        log("shutdown() with the worker still stopped")
        in_flight = Call(lambda: service.generate(STORY, **LONG), "during-shutdown")
        time.sleep(0.5)
        down = bounded(service.shutdown, 120, "shutdown")
        took = None if down.hung else down.ended - down.started
        join_all([in_flight], 30)
        gone = wait_until(lambda: not group_members(pid), 30)
        bound = stop_timeout + 10
        rows.append([
            "shutdown() with the worker stopped (1 call in flight)",
            f"call: {in_flight.outcome}; shutdown: {down.outcome}",
            fmt(took), f"<= {bound:.0f}",
            f"group of {len(members)}: {len(group_members(pid))} left"
            + ("" if gone is not None else " (after 30 s)") + f"; shm {existing(shm)} of {len(shm)} left",
        ])
    finally:
        shut(service)
    return table(["case", "outcome", "seconds", "bound", "notes"], rows)


def _stop_row(case: str, calls: list[Call], since: float | None) -> list[Any]:
    classes = Counter(c.outcome for c in calls)
    durations = [c.ended - c.started for c in calls if c.ended]
    seconds = (f"{min(durations):.1f}-{max(durations):.1f} after the call"
               if durations else "HUNG")
    if since is not None and durations:
        seconds += f" ({max(c.ended for c in calls if c.ended) - since:.1f} after SIGSTOP)"
    message = next((c.error for c in calls if c.error is not None), None)
    return [case, ", ".join(f"{n}x {k}" for k, n in sorted(classes.items())), seconds,
            "~5 (request timeout)", first_line(str(message or ""), 120)]


# ----- 3. parent killed -----

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm_service import VLLMInferenceService, VLLMSettings
    from vllm_service.testing import group_members, shared_memory_files

    if __name__ == "__main__":
        service = VLLMInferenceService(VLLMSettings(
            model_path=sys.argv[1], max_model_len=2048, idle_ttl_seconds=3600))
        service.warmup()
        text = service.generate("The capital of France is", temperature=0, max_tokens=4).text
        pid = service.status().pid
        import vllm_service
        print(json.dumps({"pid": pid, "members": group_members(pid), "text": text,
                          "library": vllm_service.__file__,
                          "shm": sorted(shared_memory_files(pid))}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def part_parent(model: str) -> str:
    log("parent killed with SIGKILL: a child builds a service, warms up, kills itself")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        errors = open(Path(tmp) / "child.err", "w")  # noqa: SIM115
        child = subprocess.Popen(
            [sys.executable, str(script), model], cwd=REPO, stdout=subprocess.PIPE,
            stderr=errors, text=True,
        )
        line = bounded(child.stdout.readline, START_BOUND, "read-child")
        if line.hung or not line.value:
            child.kill()
            return f"parent: the child printed nothing within {START_BOUND:.0f} s ({line.outcome})"
        info = json.loads(line.value)
        pid, shm = info["pid"], set(info["shm"])
        log(f"  the child's worker {pid} ready; its vllm_service: {info['library']}")
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            return "parent: the child did not die within 30 s of its SIGKILL"
        died = time.monotonic()
        worker_gone = wait_until(lambda: not psutil.pid_exists(pid)
                                 or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 120)
        all_gone = wait_until(lambda: not group_members(pid), 120)
        all_gone_at = None if all_gone is None else time.monotonic() - died
        left = group_members(pid)
        time.sleep(1.0)
        shm_left = existing(shm)
        leftovers = sorted(p for p in shm if os.path.exists(p))
        if left:  # ours (the child's worker group): end it so the run goes on
            os.killpg(pid, signal.SIGKILL)
        for path in leftovers:  # report, then clean, so the machine is not left dirty
            os.unlink(path)
        errors.close()
    row = [
        f"worker {pid}, group of {len(info['members'])}", fmt(worker_gone), fmt(all_gone_at),
        len(left), f"{shm_left} of {len(shm)}",
        ", ".join(Path(p).name for p in leftovers)[:200] or "-",
    ]
    log(f"  -> {row}")
    return table(
        ["case", "worker gone after (s)", "whole group gone after (s)", "processes left",
         "shm left", "shm files left"],
        [row],
    )


# ----- 4. soak -----


def resources() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) // 1024,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(fields["Threads"]),
        "py_threads": threading.active_count(),
    }


def part_soak(model: str, expiries: int, kills: int, threads: int, burst: float,
              max_minutes: float) -> str:
    service = SHARED.get("soak") or make_service(
        model, idle_ttl_seconds=2, stop_timeout_seconds=120)
    ttl = service.settings.idle_ttl_seconds
    rng = random.Random(1234)
    log(f"soak: {threads} threads, bursts until {expiries} idle-TTL expiries, {kills} kills")
    if bounded(service.warmup, START_BOUND, "warmup").outcome != "ok":
        return "soak: warmup failed"
    start = resources()
    restarts0 = service.status().restarts
    log(f"  start: {start}")

    go = threading.Event()  # set during a burst
    quit_ = threading.Event()
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    samples: dict[str, str] = {}
    current: dict[int, float] = {}  # thread index -> when its call started

    def caller(index: int) -> None:
        local = random.Random(index)
        while not quit_.is_set():
            if not go.wait(0.2):
                continue
            prompt = f"Say something about the number {local.randrange(1000)}."
            with lock:
                counts["sent"] += 1
                current[index] = time.monotonic()
            try:
                result = service.generate(prompt, max_tokens=local.randint(1, 12))
                outcome = "completed" if result.finish_reason != "error" else "error result"
                if outcome != "completed":
                    samples.setdefault(outcome, result.error or "")
            except Exception as exc:  # noqa: BLE001 - counted by class
                outcome = type(exc).__name__
                samples.setdefault(outcome, str(exc))
            with lock:
                counts[outcome] += 1
                current.pop(index, None)
            time.sleep(local.uniform(0, 0.2))

    workers = [threading.Thread(target=caller, args=(i,), name=f"soak-{i}", daemon=True)
               for i in range(threads)]
    for t in workers:
        t.start()

    def longest_call() -> float:
        with lock:
            return max((time.monotonic() - s for s in current.values()), default=0.0)

    seen_expiries = 0
    killed = 0
    bursts = 0
    kill_bursts = set(rng.sample(range(1, expiries + kills), min(kills, expiries + kills - 1)))
    deadline = time.monotonic() + max_minutes * 60
    stalled = None
    while seen_expiries < expiries and time.monotonic() < deadline:
        bursts += 1
        go.set()
        ready = wait_until(lambda: service.status().state == "ready", START_BOUND, 0.1)
        if ready is None:
            stalled = f"no ready worker within {START_BOUND:.0f} s in burst {bursts}"
            break
        if bursts in kill_bursts:
            time.sleep(rng.uniform(0.5, burst))
            pid = service.status().pid
            victim = rng.choice(["worker", "engine"])
            target = pid if victim == "worker" else engine_pid(pid)
            if target is not None:
                log(f"  burst {bursts}: kill -9 of the {victim} ({target}), "
                    f"{service.status().in_flight} in flight")
                try:
                    os.kill(target, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
                # The callers go on: the next calls start a fresh worker.
                wait_until(lambda pid=pid: service.status().pid not in (None, pid)
                           and service.status().state == "ready", START_BOUND, 0.1)
        time.sleep(burst)
        go.clear()
        # All threads pause together: wait for the calls in flight, then for the idle TTL.
        if wait_until(lambda: not current or longest_call() > CALL_BOUND + START_BOUND,
                      CALL_BOUND + START_BOUND + 5, 0.05) is None or current:
            stalled = f"calls did not return after burst {bursts}"
            break
        retired = wait_until(lambda: service.status().state in ("retiring", "stopped"),
                             ttl + 15, 0.1)
        if retired is not None:
            seen_expiries += 1
        log(f"  burst {bursts}: {dict(counts)}, expiries {seen_expiries}, "
            f"restarts {service.status().restarts - restarts0}")
    quit_.set()
    go.clear()
    join_deadline = time.monotonic() + 30
    for t in workers:
        t.join(max(0.0, join_deadline - time.monotonic()))
    hung = sum(1 for t in workers if t.is_alive())
    # The end figures with a ready worker, as at the start.
    final = greedy_call(service)
    end = resources()
    restarts = service.status().restarts - restarts0
    log(f"  end: {end}; final call {final.outcome}")
    failed = {k: v for k, v in counts.items() if k not in ("sent", "completed")}
    rows = [
        ["bursts", bursts], ["idle-TTL expiries seen", seen_expiries],
        ["kill -9 during bursts", killed], ["status().restarts", restarts],
        ["requests sent", counts["sent"]], ["completed", counts["completed"]],
    ]
    rows += [[f"failed: {k}", f"{v} ({first_line(samples.get(k, ''), 100)})"]
             for k, v in sorted(failed.items())]
    rows.append(["hung (caller threads alive 30 s after the end)", hung])
    if stalled:
        rows.append(["STALLED", stalled])
    rows.append(["final greedy call", final.outcome])
    for key, label in (("rss_mb", "parent RSS (MB)"), ("fds", "parent open fds"),
                       ("threads", "parent threads (OS)"), ("py_threads", "parent Python threads")):
        rows.append([f"{label}, start -> end", f"{start[key]} -> {end[key]}"])
    SHARED["soak"] = service
    return table(["soak", "value"], rows)


# ----- 6. a stuck engine, with default settings -----


def stop_engine(service: VLLMInferenceService) -> tuple[int, int, set[str]]:
    """SIGSTOP of vLLM's EngineCore (what a hung GPU or NCCL call looks like): (worker pid,
    engine pid, the group's /dev/shm files)."""
    pid = service.status().pid
    engine = engine_pid(pid)
    if pid is None or engine is None:
        raise RuntimeError(f"no engine process to stop (worker {pid})")
    shm = shared_memory_files(pid)
    os.kill(engine, signal.SIGSTOP)
    return pid, engine, shm


def batch_engines(known: set[int]) -> list[int]:
    """This process's descendants that are vLLM engine processes and not in ``known``."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in known and child.name().startswith("VLLM::EngineCor"):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def part_stall(model: str, stall_seconds: float | None) -> str:
    """Each phase on a service (or batch run) of its own, all at once: a stopped engine takes
    no CPU, so the waits overlap. Default settings (no request timeout, a stall bound of
    VLLM_ENGINE_STALL_SECONDS' default, a startup timeout of 900 s) unless ``stall_seconds``."""
    from vllm_service.settings import ENGINE_STALL_SECONDS

    bound = stall_seconds or ENGINE_STALL_SECONDS
    extra = {} if stall_seconds is None else {"engine_stall_seconds": stall_seconds}

    def service_of() -> VLLMInferenceService:
        return VLLMInferenceService(VLLMSettings(model_path=model, max_model_len=MAX_MODEL_LEN,
                                                 **extra))

    busy, idle, loading = service_of(), service_of(), service_of()
    startup_timeout = loading.settings.startup_timeout_seconds
    rows: list[list[Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="faults-stall-"))
    try:
        for service in (busy, idle):
            warm = bounded(service.warmup, START_BOUND, "warmup")
            if warm.outcome != "ok":
                return f"stall: warmup {warm.outcome} {warm.error}"
        known = {engine_pid(s.status().pid) for s in (busy, idle)}

        log("stall: a batch run (worker_num=1) whose engine is stopped once it answers")
        output = tmp / "batch.jsonl"
        data = [{"prompt": f"Count from {i} to {i + 20}."} for i in range(12)]
        batch = Call(lambda: generate(model, data, worker_num=1, chunk_size=3, temperature=0,
                                      max_output_len=48, max_model_len=MAX_MODEL_LEN,
                                      output_path=output, progress=False, **extra), "batch")
        lines = lambda: len(output.read_text().splitlines()) if output.exists() else 0  # noqa: E731
        batch_stopped = None
        if wait_until(lambda: lines() >= 1 and bool(batch_engines(known)), START_BOUND) is not None:
            [engine] = batch_engines(known)[:1]
            os.kill(engine, signal.SIGSTOP)
            batch_stopped = time.monotonic()

        log("stall: a call and a stream in flight; then update_weights() and "
            "unload(wait=True) on the same stuck worker")
        calls = [Call(lambda: busy.generate(STORY, **LONG), "call"),
                 Call(lambda: list(busy.stream(STORY, **LONG)), "stream")]
        wait_until(lambda: busy.status().in_flight == 2, 30)
        time.sleep(1.0)
        busy_pid, _, busy_shm = stop_engine(busy)
        busy_stopped = time.monotonic()
        time.sleep(1.0)
        calls.append(Call(lambda: busy.update_weights(model), "update_weights"))
        time.sleep(1.0)
        calls.append(Call(lambda: busy.unload(wait=True), "unload(wait=True)"))

        log("stall: an idle worker's engine stopped, then a call")
        idle_pid, _, idle_shm = stop_engine(idle)
        idle_call = Call(lambda: idle.generate(PROMPT, **GREEDY), "idle-call")
        idle_stopped = time.monotonic()

        log("stall: an engine stopped while it loads the model")
        warming = Call(loading.warmup, "warmup")
        wait_until(lambda: loading.status().pid is not None, 30)
        load_pid = loading.status().pid
        load_stopped = None
        if wait_until(lambda: engine_pid(load_pid) is not None, 180) is not None:
            time.sleep(2.0)
            os.kill(engine_pid(load_pid), signal.SIGSTOP)
            load_stopped = time.monotonic()

        wait_for = max(bound, startup_timeout) + 120
        log(f"stall: waiting (up to {wait_for:.0f} s) for every caller")
        join_all([*calls, idle_call, warming, batch], wait_for)

        def after(call: Call, since: float | None) -> str:
            return "HUNG" if call.hung or since is None else f"{call.ended - since:.1f}"

        for case, service, group, shm, entries, since, limit in (
            ("mid-generation: a call and a stream", busy, busy_pid, busy_shm, calls[:2],
             busy_stopped, bound),
            ("update_weights() on the stuck worker", busy, busy_pid, busy_shm, calls[2:3],
             busy_stopped, bound),
            ("unload(wait=True) of the stuck worker", busy, busy_pid, busy_shm, calls[3:],
             busy_stopped, bound),
            ("idle, then a call", idle, idle_pid, idle_shm, [idle_call], idle_stopped, bound),
            ("loading (warmup)", loading, load_pid, set(), [warming], load_stopped,
             startup_timeout),
        ):
            outcomes = ", ".join(f"{c.name}: {c.outcome}" for c in entries)
            message = next((c.error for c in entries if c.error is not None), "")
            gone = wait_until(lambda group=group: not group_members(group), 30)
            rows.append([case, outcomes, ", ".join(after(c, since) for c in entries),
                         f"{limit:.0f}", f"{len(group_members(group))}"
                         + ("" if gone is not None else " (after 30 s)"),
                         f"{existing(shm)} of {len(shm)}", first_line(str(message), 140)])
        results = batch.value or []
        answered = sum(1 for r in results if "error" not in r and r.get("results"))
        rows.append(["a batch run (worker_num=1, 12 items)", f"batch: {batch.outcome}, "
                     f"{answered} of {len(data)} answered", after(batch, batch_stopped),
                     f"{bound:.0f} + the rest of the run", "-", "-",
                     first_line(str(batch.error or ""), 140)])
        for service, name in ((busy, "busy"), (idle, "idle"), (loading, "loading")):
            following = greedy_call(service)
            rows.append([f"next call on the {name} service", following.outcome,
                         fmt(None if following.ended is None
                             else following.ended - following.started),
                         "-", "-", "-", first_line(str(following.error or ""), 140)])
    finally:
        for service in (busy, idle, loading):
            shut(service)
        for pid in batch_engines(set()):  # a stopped engine of ours that is still there
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    return table(["phase", "outcome", "seconds after SIGSTOP", "bound (s)", "group left",
                  "shm left", "message"], rows)


# ----- 7. the machine: the user's files, what is left behind, other users, untrusted input -----

SOCKETS = "vllm-service-sockets-"


def files_of(*folders: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``folders`` with its size and modification time (ns)."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns)
            for folder in folders for path in folder.rglob("*") if path.is_file()}


def bound_sockets(pid: int) -> set[Path]:
    """The unix socket paths the processes of worker ``pid``'s group have bound."""
    found = set()
    for member in group_members(pid):
        try:
            connections = psutil.Process(member).net_connections(kind="unix")
        except psutil.Error:
            continue
        found |= {Path(c.laddr) for c in connections if c.laddr and c.laddr.startswith("/")}
    return found


def exit_rows(model: str) -> list[list[Any]]:
    """The model and a trainer's update folder in /dev/shm, then each kind of worker exit."""
    shm_root = Path("/dev/shm")
    if not shm_root.is_dir():
        return [["/dev/shm", "skipped: no /dev/shm here", "-", "-", "-", "-"]]
    user_model = Path(tempfile.mkdtemp(prefix="faults-user-model-", dir=shm_root))
    update = Path(tempfile.mkdtemp(prefix="faults-user-update-", dir=shm_root))
    rows = []
    try:
        shutil.copytree(model, user_model, dirs_exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy(Path(model) / name, update / name)
        before = files_of(user_model, update)
        # float32: bf16 updates are refused on CPUs with native bf16; a stall bound of 10 s.
        service = make_service(str(user_model), idle_ttl_seconds=3600, dtype="float32",
                               engine_stall_seconds=10)
        try:
            for kind in ("unload() after update_weights", "idle exit", "kill -9 of the worker",
                         "kill -9 of the engine", "stuck engine (SIGSTOP, 10 s bound)"):
                log(f"machine: files in /dev/shm, {kind}")
                first = greedy_call(service)
                pid = service.status().pid
                if first.outcome != "ok" or pid is None:
                    rows.append([kind, f"first call {first.outcome}", "-", "-", "-", ""])
                    continue
                shm = shared_memory_files(pid)
                # Other engines on the machine may use the temp folder too: only this worker's
                # sockets count, which must all be in its own folder, gone after the exit.
                sockets = bound_sockets(pid)
                folders = {path.parent for path in sockets}
                outside = [p for p in sockets if not p.parent.name.startswith(SOCKETS)]
                started = time.monotonic()
                if kind.startswith("unload"):
                    service.update_weights(update, version="from-shm")
                    bounded(service.unload, 120, "unload")
                elif kind == "idle exit":
                    service.generate(PROMPT, temperature=0, max_tokens=2, keep_alive=1)
                elif kind == "kill -9 of the worker":
                    os.kill(pid, signal.SIGKILL)
                elif kind == "kill -9 of the engine":
                    os.kill(engine_pid(pid), signal.SIGKILL)
                else:
                    stop_engine(service)
                    bounded(lambda: service.generate(PROMPT, **GREEDY), 60, "stuck-call")
                stopped = wait_until(lambda pid=pid: service.status().pid != pid
                                     or service.status().state == "stopped", 120)
                wait_until(lambda pid=pid: not group_members(pid), 30)
                after = files_of(user_model, update)
                lost = [p.name for p in before if after.get(p) != before[p]]
                left = [p for p in sockets | folders if p.exists()]
                rows.append([
                    f"model and update folder in /dev/shm; {kind}",
                    "stopped" if stopped is not None else "NOT STOPPED",
                    fmt(None if stopped is None else time.monotonic() - started),
                    f"{len(lost)} of {len(before)}" + (f" ({', '.join(lost[:4])})" if lost else ""),
                    f"engine shm {existing(shm)} of {len(shm)}; sockets {len(left)} of "
                    f"{len(sockets)} ({len(outside)} outside the worker's folder); processes "
                    f"{len(group_members(pid))}",
                    ", ".join(p.name for p in left[:3]),
                ])
        finally:
            shut(service)
    finally:
        shutil.rmtree(user_model, ignore_errors=True)
        shutil.rmtree(update, ignore_errors=True)
    return rows


STAGING_CHILD = textwrap.dedent("""
    import sys, torch
    from vllm_service import VLLMInferenceService, VLLMSettings
    if __name__ == "__main__":
        service = VLLMInferenceService(VLLMSettings(model_path=sys.argv[1]))
        service.update_weights({"model.norm.weight": torch.ones(576)})
""")


def staging_row(model: str) -> list[Any]:
    log("machine: a caller killed while its update_weights tensors are staged")
    child = subprocess.Popen([sys.executable, "-c", STAGING_CHILD, model],
                             start_new_session=True, stderr=subprocess.DEVNULL)
    prefix = f"vllm-service-weights-{child.pid}-"
    places = (Path("/dev/shm"), Path(tempfile.gettempdir()))
    staged = lambda: [p for place in places for p in place.glob(prefix + "*")]  # noqa: E731
    seen = wait_until(lambda: bool(staged()) or child.poll() is not None, 120)
    left = staged()
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(30)
    if not left:
        return ["staged tensors of a killed caller", f"not caught ({seen})", "-", "-", "-", ""]
    with tempfile.TemporaryDirectory() as empty:  # the next start of this user, failing at once
        other = make_service(empty)
        bounded(other.warmup, 120, "failing-start")
        shut(other)
    remaining = [p for p in left if p.exists()]
    return ["staged tensors of a caller killed mid-update, then the next worker start",
            "removed" if not remaining else "LEFT", "-", "0 (nothing of the user's staged)",
            f"staging folders {len(remaining)} of {len(left)}", ""]


SECOND_USER = textwrap.dedent("""
    import json, sys
    from vllm_service import VLLMInferenceService, VLLMSettings
    if __name__ == "__main__":
        try:
            with VLLMInferenceService(VLLMSettings(model_path=sys.argv[1], max_model_len=1024,
                                                   dtype="float32")) as service:
                result = service.generate("The capital of France is", temperature=0,
                                          max_tokens=4)
                print(json.dumps({"text": result.text, "error": result.error}))
        except Exception as exc:
            print(json.dumps({"refused": f"{type(exc).__name__}: {exc}"}))
""")


def second_user_rows(model: str) -> list[list[Any]]:
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        return [["a second OS user", "skipped: needs root, useradd and setpriv", "-", "-", "-",
                 ""]]
    name = f"faults{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    place = Path(tempfile.mkdtemp(prefix="faults-second-user-"))
    rows = []
    try:
        uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True,
                                 text=True).stdout)
        os.chmod(place, 0o755)
        shutil.copytree(model, place / "model")
        home = place / "home"
        home.mkdir()
        os.chown(home, uid, uid)
        theirs = Path(tempfile.gettempdir()) / f"vllm-service-{uid}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG")}
        env.update(HOME=str(home))
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                   "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
                   sys.executable, "-c", SECOND_USER, str(place / "model")]

        def run_as_them() -> tuple[dict[str, Any], float]:
            started = time.monotonic()
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=START_BOUND, cwd=str(home))
            found = [line for line in done.stdout.splitlines() if line.startswith("{")]
            answer = json.loads(found[-1]) if found else {"refused": done.stderr[-300:]}
            return answer, time.monotonic() - started

        for case, planted in (("a second OS user, its log folder made first by root (0755)",
                               True), ("a second OS user, nothing planted", False)):
            log(f"machine: {case}")
            shutil.rmtree(theirs, ignore_errors=True)
            if planted:
                theirs.mkdir(mode=0o755)
            answer, took = run_as_them()
            if planted:
                outcome = ("refused, names VLLM_LOG_DIR" if "VLLM_LOG_DIR" in
                           answer.get("refused", "") else f"NOT REFUSED: {answer}")
            else:
                mode = oct(theirs.stat().st_mode & 0o777) if theirs.exists() else "-"
                owner = theirs.stat().st_uid == uid if theirs.exists() else False
                outcome = (f"answered {answer.get('text')!r}; its folder mode {mode}, "
                           f"{'its own' if owner else 'NOT ITS OWN'}"
                           if answer.get("text") else f"FAILED: {answer}")
            rows.append([case, outcome, f"{took:.1f}", "0", "-",
                         first_line(answer.get("refused", ""), 140)])
    finally:
        shutil.rmtree(place, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True)
        try:
            shutil.rmtree(Path(tempfile.gettempdir()) / f"vllm-service-{uid}", ignore_errors=True)
        except NameError:
            pass
    return rows


REMOTE_CODE = textwrap.dedent("""
    from pathlib import Path
    from transformers import LlamaConfig
    Path({marker!r}).write_text("the repository's own code ran")
    class MarkedConfig(LlamaConfig):
        model_type = "marked_llama"
""")


def remote_code_row(model: str) -> list[Any]:
    log("machine: a model that ships code of its own, default settings")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "custom-code-model"
        folder.mkdir()
        for path in Path(model).iterdir():
            (folder / path.name).symlink_to(path)
        (folder / "config.json").unlink()
        config = json.loads((Path(model) / "config.json").read_text())
        config.update(model_type="marked_llama",
                      auto_map={"AutoConfig": "configuration_marked.MarkedConfig"})
        (folder / "config.json").write_text(json.dumps(config))
        ran = Path(tmp) / "code-ran"
        (folder / "configuration_marked.py").write_text(REMOTE_CODE.format(marker=str(ran)))
        service = make_service(str(folder))
        start = bounded(service.warmup, START_BOUND, "warmup")
        shut(service)
        return ["a model with code of its own (auto_map), default settings", start.outcome,
                fmt(None if start.ended is None else start.ended - start.started),
                "0", "code ran" if ran.exists() else "its code never ran",
                first_line(str(start.error or ""), 140)]


def media_rows(model: str) -> list[list[Any]]:
    import http.server

    class SlowImage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            time.sleep(8)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"\x89PNG\r\n\x1a\n not really a picture")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    picture = [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                            {"type": "image_url", "image_url": {"url": url}}]}]
    france = [{"role": "user", "content": "What is the capital of France?"}]
    rows = []
    try:
        log("machine: media refused by default, then allowed from one host")
        default = make_service(model)
        refused = bounded(lambda: default.chat(picture), 30, "media-default")
        rows.append(["a chat with an image_url part (127.0.0.1), default settings",
                     refused.outcome, fmt(refused.ended - refused.started), "0",
                     f"worker started: {default.status().pid is not None}",
                     first_line(str(refused.error or refused.value), 140)])
        shut(default)
        allowed = make_service(model, allowed_media_domains=["127.0.0.1"])
        bounded(allowed.warmup, START_BOUND, "warmup")
        slow = Call(lambda: allowed.chat(picture, max_tokens=4), "slow-media")
        time.sleep(1.0)
        text = bounded(lambda: allowed.chat(france, temperature=0, max_tokens=4), 60, "text")
        slow.join(60)
        rows.append(["media allowed from 127.0.0.1: an image taking 8 s, a text chat meanwhile",
                     f"text: {text.outcome} in {fmt(text.ended - text.started)} s; image "
                     f"request: {slow.outcome}", fmt(text.ended - text.started), "0", "-",
                     first_line(str(getattr(slow.value, "error", None) or slow.error or ""),
                                140)])
        shut(allowed)
    finally:
        server.shutdown()
    return rows


FORKING_PARENT = textwrap.dedent("""
    import json, os, signal, sys, time
    from vllm_service import VLLMInferenceService, VLLMSettings
    if __name__ == "__main__":
        service = VLLMInferenceService(VLLMSettings(model_path=sys.argv[1], max_model_len=1024,
                                                    idle_ttl_seconds=3600))
        service.warmup()
        print(json.dumps({"pid": service.status().pid}), flush=True)
        if os.fork() == 0:  # a child of the app (gunicorn, multiprocessing with fork) lives on
            time.sleep(120)
            os._exit(0)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def fork_row(model: str) -> list[Any]:
    log("machine: the parent forks a child that lives on, then is SIGKILLed")
    child = subprocess.Popen([sys.executable, "-c", FORKING_PARENT, model],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    line = bounded(child.stdout.readline, START_BOUND, "read-child")
    if line.hung or not line.value:
        os.killpg(child.pid, signal.SIGKILL)
        return ["parent SIGKILLed with a forked child alive", "no worker pid printed", "-", "-",
                "-", ""]
    pid = json.loads(line.value)["pid"]
    child.wait(60)
    died = time.monotonic()
    gone = wait_until(lambda: not group_members(pid), 120)
    left = len(group_members(pid))
    if left:
        os.killpg(pid, signal.SIGKILL)
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the forked child, still asleep
    except ProcessLookupError:
        pass
    return ["parent SIGKILLed while a child it forked lives on", "worker and engine ended"
            if gone is not None else "WORKER LIVES ON", fmt(None if gone is None
                                                             else time.monotonic() - died),
            "0", f"processes of the worker's group {left}", ""]


def resume_rows(model: str) -> list[list[Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log("machine: reruns of batch runs with other settings")
        data = [{"prompt": f"What is {i} + {i}?"} for i in range(4)]
        output = Path(tmp) / "out.jsonl"
        generate(model, data, output_path=output, temperature=0, max_output_len=8,
                 max_model_len=1024, progress=False)
        lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]}}
                 for i in range(4)]
        answers = Path(tmp) / "answers.jsonl"
        generate_openai_batch(model, lines, answers, max_output_len=8, temperature=0,
                         progress=False)
        before = output.read_bytes(), answers.read_bytes()
        for case, rerun in (
            ("JSONL rerun with another temperature",
             lambda: generate(model, data, output_path=output, temperature=0.5,
                              max_output_len=8, max_model_len=1024, progress=False)),
            ("JSONL rerun with another system prompt",
             lambda: generate(model, data, output_path=output, temperature=0, system="Be brief.",
                              max_output_len=8, max_model_len=1024, progress=False)),
            ("OpenAI batch rerun with another --max-output-len",
             lambda: generate_openai_batch(model, lines, answers, max_output_len=16, temperature=0,
                                      progress=False)),
            ("OpenAI batch rerun with another --system",
             lambda: generate_openai_batch(model, lines, answers, max_output_len=8, temperature=0,
                                      system="Be brief.", progress=False)),
        ):
            call = bounded(rerun, START_BOUND, "rerun")
            same = (output.read_bytes(), answers.read_bytes()) == before
            rows.append([case, call.outcome, fmt(call.ended - call.started),
                         "0" if same else "OUTPUT CHANGED", "-",
                         first_line(str(call.error or "old answers kept silently"), 140)])
    return rows


def part_machine(model: str) -> str:
    rows = exit_rows(model)
    for part in (staging_row, remote_code_row, fork_row):
        rows.append(part(model))
    rows += second_user_rows(model) + media_rows(model) + resume_rows(model)
    return table(["case", "outcome", "seconds", "user files lost", "left behind", "notes"],
                 rows)


# ----- 5. bad input -----


class Unpicklable(str):
    """A str that carries a lock: passes the type check, cannot cross the pipe."""

    def __new__(cls, text: str) -> Unpicklable:  # noqa: PYI034
        self = super().__new__(cls, text)
        self.lock = threading.Lock()
        return self


def with_env(name: str, value: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return run


def cli_run(lines: list[str], extra: list[str] | None = None,
            model: str | None = None) -> Callable[[], Any]:
    def run() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "in.jsonl"
            source.write_text("\n".join(lines) + "\n", encoding="utf-8")
            args = [sys.executable, "-m", "vllm_service.cli", "generate", str(source),
                    "-o", str(Path(tmp) / "out.jsonl"), "--no-progress"]
            if model is not None:
                args += ["--model", model]
            process = subprocess.run(args + (extra or []), cwd=REPO, capture_output=True,
                                     text=True, timeout=120, check=False)
            tail = [l for l in process.stderr.splitlines() if l.strip()]
            return f"exit {process.returncode}: " + (tail[-1] if tail else "")
    return run


def bad_inputs(s: VLLMInferenceService, model: str) -> list[tuple[str, Callable[[], Any], list[str]]]:
    """(kind, call, words the message must contain); an empty list: valid input."""
    g = s.generate
    lock_msg = [{"role": "user", "content": "hi", "name": threading.Lock()}]
    return [
        # prompt types and values
        ("prompt: int", lambda: g(123), ["prompt"]),
        ("prompt: None", lambda: g(None), ["prompt"]),
        ("prompt: bytes", lambda: g(b"hello"), ["prompt"]),
        ("prompt: empty string", lambda: g("", **GREEDY), ["prompt"]),
        ("prompt: 200k tokens (beyond max_model_len)", lambda: g("hello " * 200_000, **GREEDY),
         ["prompt", "context length"]),
        ("prompt: lone surrogate \\ud800", lambda: g("abc \ud800 def", **GREEDY), ["surrogate"]),
        ("chat: lone surrogate in content",
         lambda: s.chat([{"role": "user", "content": "hi \udc80"}], **GREEDY), ["surrogate"]),
        ("prompt: RTL text and RLO mark", lambda: g("\u202eمرحبا بالعالم שלום", **GREEDY), []),
        ("prompt: emoji, ZWJ sequences", lambda: g("👩‍👩‍👧 🇫🇷 👋🏽 is", **GREEDY), []),
        ("prompt: NUL characters", lambda: g("a\x00b\x00 is", **GREEDY), []),
        ("prompt: str subclass holding a lock (unpicklable)",
         lambda: g(Unpicklable("hello"), **GREEDY), ["cannot be sent"]),
        # sampling values
        ("temperature: -1", lambda: g("hi", temperature=-1), ["temperature"]),
        ("temperature: NaN", lambda: g("hi", temperature=float("nan")), ["temperature"]),
        ("temperature: 'hot'", lambda: g("hi", temperature="hot"), ["temperature"]),
        ("top_p: 0", lambda: g("hi", top_p=0), ["top_p"]),
        ("top_k: 2**40", lambda: g("hi", top_k=2**40), ["top_k"]),
        ("max_tokens: 0", lambda: g("hi", max_tokens=0), ["max_tokens"]),
        ("max_tokens: 2**40", lambda: g("hi", max_tokens=2**40), ["max_tokens"]),
        ("max_tokens: 1.5", lambda: g("hi", max_tokens=1.5), ["max_tokens"]),
        ("max_tokens: 5000 (beyond max_model_len 2048)",
         lambda: g("hi", temperature=0, max_tokens=5000), ["max_tokens"]),
        ("stop: 10,000 stop strings", lambda: g("hi", stop=[f"s{i}" for i in range(10_000)],
                                                **GREEDY), []),
        ("seed: 2**64", lambda: g("hi", seed=2**64), ["seed"]),
        ("seed: -5", lambda: g("hi", seed=-5), ["seed"]),
        ("repetition_penalty: inf", lambda: g("hi", repetition_penalty=float("inf")),
         ["repetition_penalty"]),
        ("presence_penalty: 3", lambda: g("hi", presence_penalty=3), ["presence_penalty"]),
        ("stop: [''] (empty stop string)", lambda: g("hi", stop=[""]), ["stop"]),
        ("stop: 123", lambda: g("hi", stop=123), ["stop"]),
        ("ignore_eos: 'maybe'", lambda: g("hi", ignore_eos="maybe"), ["ignore_eos"]),
        ("unknown keyword temprature=0", lambda: g("hi", temprature=0), ["temprature"]),
        ("params=42", lambda: g("hi", params=42), ["params"]),
        ("params dict with unknown key", lambda: g("hi", params={"temprature": 0}),
         ["temprature"]),
        ("params: GenerationParams(max_tokens=-1)",
         lambda: g("hi", params=GenerationParams(max_tokens=-1)), ["max_tokens"]),
        # chat messages
        ("chat: message without role", lambda: s.chat([{"content": "hi"}]), ["role"]),
        ("chat: role None", lambda: s.chat([{"role": None, "content": "hi"}]), ["role"]),
        ("chat: role 5", lambda: s.chat([{"role": 5, "content": "hi"}]), ["role"]),
        ("chat: unknown role 'wizard'", lambda: s.chat([{"role": "wizard", "content": "hi"}],
                                                       **GREEDY), []),
        ("chat: list content with a bare string part",
         lambda: s.chat([{"role": "user", "content": ["just text"]}]), ["type"]),
        ("chat: list content with an image part (text-only model)",
         lambda: s.chat([{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], **GREEDY),
         ["image"]),
        ("chat: content is a lock", lambda: s.chat([{"role": "user", "content": threading.Lock()}]),
         ["content"]),
        ("chat: a lock inside a message", lambda: s.chat(lock_msg), ["cannot be sent"]),
        ("chat: empty conversation []", lambda: s.chat([]), ["conversation"]),
        ("chat: conversation is a str", lambda: s.chat("hi"), ["conversation"]),
        # batch calls
        ("generate_batch: a str instead of a list", lambda: s.generate_batch("hi"), ["list"]),
        ("generate_batch: [] (empty)", lambda: s.generate_batch([]), []),
        ("generate_batch: one int among str", lambda: s.generate_batch(["hi", 5]), ["prompt"]),
        ("generate_batch: one empty prompt among good ones",
         lambda: s.generate_batch(["The sky is", "", "Paris is"], **GREEDY), ["prompt"]),
        # settings
        ("settings: idle_ttl_seconds=-1",
         lambda: VLLMSettings(model_path=model, idle_ttl_seconds=-1), ["idle_ttl_seconds"]),
        ("settings: dtype='float8'", lambda: VLLMSettings(model_path=model, dtype="float8"),
         ["dtype"]),
        ("settings: max_model_len=0", lambda: VLLMSettings(model_path=model, max_model_len=0),
         ["max_model_len"]),
        ("settings: request_timeout_seconds=0",
         lambda: VLLMSettings(model_path=model, request_timeout_seconds=0),
         ["request_timeout_seconds"]),
        ("settings: mode='cloud'", lambda: VLLMSettings(model_path=model, mode="cloud"), ["mode"]),
        ("settings: mode='remote' without api_url",
         lambda: VLLMSettings(model_path="m", mode="remote"), ["api_url"]),
        ("settings: model folder that does not exist",
         lambda: VLLMSettings(model_path="./no/such/model"), ["model_path"]),
        ("env: VLLM_ENGINE_ARGS='{bad json'",
         with_env("VLLM_ENGINE_ARGS", "{bad json", lambda: VLLMSettings(model_path=model)),
         ["VLLM_ENGINE_ARGS"]),
        ("env: VLLM_ENGINE_ARGS='[1, 2]' (not an object)",
         with_env("VLLM_ENGINE_ARGS", "[1, 2]", lambda: VLLMSettings(model_path=model)),
         ["engine_args"]),
        ("env: VLLM_IDLE_TTL_SECONDS='soon'",
         with_env("VLLM_IDLE_TTL_SECONDS", "soon", lambda: VLLMSettings(model_path=model)),
         ["idle_ttl_seconds"]),
        # the CLI
        ("CLI: invalid JSON line", cli_run(['{"prompt": "hi"}', '{"prompt": '], model=model),
         ["line 2"]),
        ("CLI: a JSON array line", cli_run(['{"prompt": "hi"}', '["hi"]'], model=model),
         ["line 2"]),
        ("CLI: no --model", cli_run(['{"prompt": "hi"}']), ["--model"]),
        ("CLI: --engine-args not JSON", cli_run(['{"prompt": "hi"}'], ["--engine-args", "{x"],
                                                model=model), ["--engine-args"]),
        # the batch generate()
        ("generate(): data is a str", lambda: generate(model, "hi", progress=False), ["data"]),
        ("generate(): data[1] is a list", lambda: generate(model, [{"prompt": "a"}, ["b"]],
                                                           progress=False), ["data[1]"]),
        ("generate(): worker_num=0", lambda: generate(model, [{"prompt": "a"}], worker_num=0,
                                                      progress=False), ["worker_num"]),
        ("generate(): n=0", lambda: generate(model, [{"prompt": "a"}], n=0, progress=False),
         ["n must"]),
        ("generate(): temperature=-1", lambda: generate(model, [{"prompt": "a"}], temperature=-1,
                                                        progress=False), ["temperature"]),
        ("generate(): result_key == message_key",
         lambda: generate(model, [{"prompt": "a"}], result_key="prompt", progress=False),
         ["result_key"]),
        ("generate(): item without the prompt key (error per item)",
         lambda: generate(model, [{"text": "a"}, {"prompt": 5}], progress=False), ["'prompt'"]),
    ]


def describe(value: Any) -> tuple[str, str]:
    """(what came back, the text to look for names in)."""
    if isinstance(value, GenerationResult):
        if value.finish_reason == "error":
            return f"error result: {first_line(value.error or '')}", value.error or ""
        return f"text ({value.completion_tokens} tokens, {value.finish_reason})", ""
    if isinstance(value, list) and value and all(isinstance(v, GenerationResult) for v in value):
        parts = [describe(v) for v in value]
        return "; ".join(p[0] for p in parts), " ".join(p[1] for p in parts)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        errors = [str(v.get("error")) for v in value if v.get("error")]
        return (f"{len(value)} items, {len(errors)} with an error: {first_line(errors[0]) if errors else ''}",
                " ".join(errors))
    if isinstance(value, str) and value.startswith("exit "):
        return value, value
    return f"accepted: {first_line(repr(value), 60)}", ""


def part_input(model: str) -> str:
    service = SHARED.pop("input", None) or make_service(model, idle_ttl_seconds=3600)
    rows = []
    try:
        if bounded(service.warmup, START_BOUND, "warmup").outcome != "ok":
            return "input: warmup failed"
        pid = service.status().pid
        log(f"bad-input matrix on worker {pid}")
        for kind, fn, needles in bad_inputs(service, model):
            call = bounded(fn, 150, "input")
            if call.hung:
                outcome, text = "HUNG", ""
            elif call.error is not None:
                text = str(call.error)
                outcome = f"{type(call.error).__name__}: {first_line(text)}"
                lines = [l.strip() for l in text.splitlines() if l.strip()]
                if type(call.error).__name__ == "ValidationError" and len(lines) >= 3:
                    outcome = (f"ValidationError: {lines[1]}: "
                               f"{first_line(lines[2].split(' [type=')[0])}")
                if first_line(text).rstrip(":") == "Invalid vllm-service settings":
                    outcome += " / " + first_line(text.split("\n", 1)[1])
            else:
                outcome, text = describe(call.value)
            if needles:
                named = "yes" if all(n.lower() in text.lower() for n in needles) else (
                    f"NO ({', '.join(needles)})")
            else:
                named = "n/a (valid)"
            after = greedy_call(service, CALL_BOUND)
            status = service.status()
            alive = (after.outcome == "ok" and bool(after.value.text) and status.pid == pid
                     and status.in_flight == 0)
            answers = "yes" if alive else (
                f"NO ({after.outcome}, pid {status.pid}, in flight {status.in_flight})")
            rows.append([len(rows) + 1, kind, outcome, named, answers])
            log(f"  {kind}: {outcome[:90]} | named {named} | worker answers {answers}")
    finally:
        shut(service)
    return table(["#", "kind", "what happened", "names what is wrong", "same worker answers"],
                 rows)


# ----- main -----

SHARED: dict[str, VLLMInferenceService] = {}
PARTS = ["kill", "input", "sigstop", "parent", "retiring", "soak", "stall", "machine"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, run in this order: {','.join(PARTS)}")
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--soak-expiries", type=int, default=20)
    parser.add_argument("--soak-kills", type=int, default=3)
    parser.add_argument("--soak-threads", type=int, default=32)
    parser.add_argument("--soak-burst-seconds", type=float, default=3.0)
    parser.add_argument("--soak-max-minutes", type=float, default=22.0)
    parser.add_argument("--stall-seconds", type=float, default=None,
                        help="the stall part's engine_stall_seconds (default: the library's)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    model = args.model or str(demo_model_path())
    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        if l.startswith("Model name")), "?")
    started = datetime.datetime.now(datetime.timezone.utc)
    import vllm_service

    library = Path(vllm_service.__file__).resolve().parent
    if library.parent != REPO:
        parser.error(f"vllm_service was imported from {library}, not from {REPO}")
    log(f"parts {parts}; model {model}; cpu {cpu}; {os.cpu_count()} cores; library {library}")
    outputs = []
    for part in sorted(parts, key=PARTS.index):
        began = time.monotonic()
        try:
            if part == "stall":
                text = part_stall(model, args.stall_seconds)
            elif part == "soak":
                text = part_soak(model, args.soak_expiries, args.soak_kills, args.soak_threads,
                                 args.soak_burst_seconds, args.soak_max_minutes)
            else:
                text = globals()[f"part_{part}"](model)
        except Exception as exc:  # noqa: BLE001 - a broken part must not hide the others
            import traceback

            traceback.print_exc()
            text = f"{part}: FAILED with {type(exc).__name__}: {exc}"
        took = time.monotonic() - began
        log(f"part {part} took {took:.0f} s")
        outputs.append(f"### {part} ({took:.0f} s)\n\n{text}\n")
        print(outputs[-1], flush=True)
    for service in SHARED.values():
        shut(service)
    total = time.monotonic() - T0
    load = os.getloadavg()
    print(f"Run: {started:%Y-%m-%d %H:%M} UTC, {total / 60:.1f} min; CPU: {cpu}, "
          f"{os.cpu_count()} cores; load average (1 min) min {min(LOADS):.2f} / "
          f"max {max(LOADS):.2f}, at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
