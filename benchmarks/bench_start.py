"""Start-up, as whole fresh processes: vLLM's own against the service's, and after an idle exit.

    python benchmarks/bench_start.py [--rounds 2] [--model PATH] [--idle-ttl 3] [--spare]
                                     [--save FILE]

Each round runs these as separate processes, one at a time, each timed in this process from
just before it is started (``time.perf_counter`` around the subprocess; the child prints
``time.time()`` stamps as JSON lines, which place its phases on the same clock):

(a) ``import vllm``;
(b) ``vllm.LLM(...)`` plus one token, with the arguments and vLLM variables the service's
    worker would build with (its default settings: dtype rule, eager, max_model_len, KV cache
    size, on CPU the engine core in the process), once as they are, once with a 1 GiB KV
    cache, and once with vLLM's default of an engine process of its own;
(c) a service with default settings: ``warmup()`` plus one token;
(d) the same with a small ``idle_ttl_seconds``: warm-up and one token, then, once ``status()``
    says the worker left on its idle exit, the time to the next answer. The spare (on by
    default) started beside the first worker and forks the next. With ``--spare``, the next
    call also waits until the spare has imported (``status().spare_pid``; it has, unless
    the idle exit came within its imports), and the spare's resident memory is printed.

Prints each figure's min and median over the rounds, the ratios issue 26 sets goals for (c/b,
d/c), each process's peak resident memory (the process and all its children, sampled), and
the start's phases from the worker's log in (d), which runs with ``VLLM_LOGGING_LEVEL=DEBUG``
((c) runs without, as a user would). Run it alone on the machine: every run starts an engine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
SAMPLE_SECONDS = 0.2
RUN_TIMEOUT_SECONDS = 600
SAME_KV = "b LLM, service's KV"
ONE_GIB = "b LLM, 1 GiB KV"
VLLM_PROCESS = "b LLM, engine process"  # vLLM's default: its engine core in a process of its own
COLD = "c service"
IDLE_EXIT = "d service, idle exit"


def stamp(name: str, **values: Any) -> None:
    """A phase stamp for the parent: one JSON line on stdout."""
    print(json.dumps({"stamp": name, "t": time.time(), **values}), flush=True)


# ----- the children (each a fresh process) -----


def child_import() -> None:
    import vllm  # noqa: F401

    stamp("imported")


def service_engine_args(model: str) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments a service with default settings builds its engine with."""
    from vllm_service import VLLMSettings
    from vllm_service.testing import adapt_engine_args, worker_config

    args, _ = adapt_engine_args(worker_config(VLLMSettings(model_path=model)).engine_args)
    args.pop("worker_extension_cls", None)  # the service's update_weights hook, not vLLM's
    return args


def child_llm(model: str, kv_bytes: int | None, as_the_worker: bool = True) -> None:
    """``LLM(...)`` plus one token; ``as_the_worker``: with the vLLM variables the worker
    sets too (on CPU the engine core in this process), else vLLM's own default for them."""
    import vllm
    from vllm.platforms import current_platform

    from vllm_service.testing import adapt_engine_environment

    stamp("imported")
    if as_the_worker:
        os.environ.update(adapt_engine_environment(current_platform.is_cpu())[0])
    args = service_engine_args(model)
    if kv_bytes:
        args["kv_cache_memory_bytes"] = kv_bytes
    llm = vllm.LLM(**args)
    stamp("built", kv_cache_bytes=args["kv_cache_memory_bytes"],
          max_model_len=args["max_model_len"], dtype=args["dtype"])
    llm.generate(["Hello"], vllm.SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    stamp("answered")
    llm.llm_engine.engine_core.shutdown()  # else vLLM's engine process outlives this one
    sys.stdout.flush()
    os._exit(0)


def child_service(model: str, idle_ttl: float | None, wait_for_spare: bool = False) -> None:
    from vllm_service import VLLMInferenceService, VLLMSettings

    log_dir = tempfile.mkdtemp(prefix="bench-start-logs-")
    values: dict[str, Any] = {"model_path": model, "log_dir": log_dir}
    if idle_ttl is not None:
        values["idle_ttl_seconds"] = idle_ttl
    service = VLLMInferenceService(VLLMSettings(**values))
    stamp("made")
    service.warmup()
    stamp("ready")
    service.generate("Hello", temperature=0, max_tokens=1)
    stamp("answered")
    for line in worker_log_phases(log_dir):
        print(json.dumps(line), flush=True)
    if idle_ttl is not None:
        deadline = time.monotonic() + idle_ttl + 120
        while service.status().state != "stopped":
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not leave on its idle exit")
            time.sleep(0.1)
        stamp("idle_exited")
        if wait_for_spare:
            while (spare := service.status().spare_pid) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("no spare after the idle exit")
                time.sleep(0.1)
            import psutil

            stamp("spare_ready", spare_rss=psutil.Process(spare).memory_info().rss)
        service.generate("Hello", temperature=0, max_tokens=1)
        stamp("answered_again")
        for line in worker_log_phases(log_dir):  # the new worker's (the first one's log is gone)
            print(json.dumps({**line, "restart": True}), flush=True)
    service.shutdown()
    shutil.rmtree(log_dir, ignore_errors=True)


_WORKER_LINE = re.compile(r"^(\S+ \S+),(\d{3}) (\S+) (\w+) (.*)$")  # the worker's own logging
_VLLM_LINE = re.compile(r"^(?:\((\S+) pid=\d+\) )?\w+ (\d\d-\d\d \d\d:\d\d:\d\d) \[[^]]+\] (.*)$")
_VLLM_PHASES = ("took", "KV cache", "concurrency")
_LONGEST_GAPS = 6


def worker_log_phases(log_dir: str) -> list[dict[str, Any]]:
    """The start phases in the worker's log: its own DEBUG lines, vLLM's lines that report a
    duration or the KV cache, and the longest silences between any two stamped lines, with
    the lines around them (vLLM stamps only whole seconds)."""
    found: list[dict[str, Any]] = []
    stamped: list[tuple[float, str]] = []
    year = time.strftime("%Y")
    for log in sorted(Path(log_dir).glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if match := _WORKER_LINE.match(line):
                day, millis, name, level, what = match.groups()
                t = time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
                stamped.append((t, f"{name}: {what}"))
                if level == "DEBUG" and what.startswith("start phase: "):
                    found.append({"worker": what.removeprefix("start phase: "), "t": t})
            elif match := _VLLM_LINE.match(line):
                process, day, what = match.groups()
                t = time.mktime(time.strptime(f"{year}-{day}", "%Y-%m-%d %H:%M:%S"))
                stamped.append((t, f"{process or 'worker'}: {what}"))
                if any(k in what for k in _VLLM_PHASES):
                    found.append({"vllm": what, "process": process or "worker"})
    gaps = sorted(zip(stamped, stamped[1:]), key=lambda pair: pair[0][0] - pair[1][0])
    for (t0, before), (t1, after) in sorted(gaps[:_LONGEST_GAPS]):
        found.append({"gap": round(t1 - t0, 1), "before": before[:160], "after": after[:160]})
    return found


# ----- the parent -----


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(code: str, env: dict[str, str]) -> dict[str, Any]:
    """One child process: its stamps (seconds from its start), lines, whole time, peak memory."""
    started_wall, started = time.time(), time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                             text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(child.pid))
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = child.communicate(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        done.set()
        child.kill()
        child.wait()
    total = time.perf_counter() - started
    sampler.join()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0:
        raise RuntimeError(f"{code!r} exited with {child.returncode}")
    stamps = {line["stamp"]: line["t"] - started_wall for line in lines if "stamp" in line}
    return {"stamps": stamps, "lines": lines, "total": total, "peak_rss": peak,
            "started_wall": started_wall}


def children(model: str, idle_ttl: float, spare: bool = False) -> dict[str, str]:
    """Each figure's child, as the code ``python -c`` runs."""
    folder = str(Path(__file__).resolve().parent)
    head = f"import sys; sys.path.insert(0, {folder!r}); import bench_start as b; "
    return {
        "a import vllm": head + "b.child_import()",
        SAME_KV: head + f"b.child_llm({model!r}, None)",
        ONE_GIB: head + f"b.child_llm({model!r}, {GiB})",
        VLLM_PROCESS: head + f"b.child_llm({model!r}, None, as_the_worker=False)",
        COLD: head + f"b.child_service({model!r}, None)",
        IDLE_EXIT: head + f"b.child_service({model!r}, {idle_ttl}, {spare})",
    }


def stats(values: list[float]) -> str:
    return f"{min(values):7.2f} {statistics.median(values):7.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--idle-ttl", type=float, default=3.0)
    parser.add_argument("--spare", action="store_true", help="(d): the next call waits for "
                        "the spare worker's imports, and is timed from then")
    parser.add_argument("--only", help="run only the figures whose names start with these "
                        "letters (--only d: the idle exit, with the start's phases)")
    parser.add_argument("--save", help="also write the raw figures to this JSON file")
    parser.add_argument("--report", help="only print the report of a --save file")
    options = parser.parse_args()
    if options.report:
        saved = json.loads(Path(options.report).read_text())
        report(saved, len(next(iter(saved.values()))))
        return
    from vllm_service import demo_model_path

    model = options.model or str(demo_model_path())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the service's own sizing, as a user gets it
    debug_env = {**env, "VLLM_LOGGING_LEVEL": "DEBUG"}
    chosen = {name: code for name, code in children(model, options.idle_ttl, options.spare).items()
              if not options.only or name[0] in options.only}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for round_number in range(options.rounds):
        for name, code in chosen.items():
            result = run(code, debug_env if name.startswith("d") else env)
            runs[name].append(result)
            print(f"round {round_number + 1} {name}: {result['total']:.1f} s, "
                  f"{result['peak_rss'] / GiB:.2f} GiB", flush=True)
    if options.save:
        Path(options.save).write_text(json.dumps(runs))
    report(runs, options.rounds)


def first_answer(result: dict[str, Any]) -> float:
    stamps = result["stamps"]
    return stamps.get("answered", stamps.get("imported", result["total"]))


def report(runs: dict[str, list[dict[str, Any]]], rounds: int) -> None:
    print(f"\n{rounds} rounds; seconds from process start (min, median); peak RSS of the "
          "process tree (GiB, median)")
    print(f"{'':28} {'first answer':>15} {'process':>15} {'peak RSS':>9}")
    for name, results in runs.items():
        firsts = [first_answer(r) for r in results]
        totals = [r["total"] for r in results]
        rss = statistics.median(r["peak_rss"] for r in results) / GiB
        print(f"{name:28} {stats(firsts)} {stats(totals)} {rss:9.2f}")
    idle = runs.get(IDLE_EXIT, [])
    again = [
        r["stamps"]["answered_again"] - r["stamps"].get("spare_ready", r["stamps"]["idle_exited"])
        for r in idle
    ]
    if again:
        print(f"{'d next answer after idle exit':28} {stats(again)}")
    spares = [line["spare_rss"] for r in idle for line in r["lines"] if "spare_rss" in line]
    if spares:
        ready = [r["stamps"]["spare_ready"] - r["stamps"]["idle_exited"] for r in idle]
        print(f"{'d the spare, waiting':28} resident {statistics.median(spares) / GiB:.2f} GiB "
              f"(median), ready {stats(ready)} s after the idle exit")
    sizes = [line for r in runs.get(SAME_KV, []) for line in r["lines"] if "kv_cache_bytes" in line]
    if sizes:
        print(f"(b) and the service: KV cache {sizes[0]['kv_cache_bytes'] / GiB:.2f} GiB, "
              f"max_model_len {sizes[0]['max_model_len']}, dtype {sizes[0]['dtype']}")
    if all(name in runs for name in (SAME_KV, ONE_GIB, COLD, IDLE_EXIT)):
        print("\nratios (medians):")
        cold = median(first_answer, runs[COLD])
        print(f"  c / b (service's KV):  {cold / median(first_answer, runs[SAME_KV]):.2f}"
              "   goal <= 1.0")
        print(f"  c / b (1 GiB KV):      {cold / median(first_answer, runs[ONE_GIB]):.2f}")
        if VLLM_PROCESS in runs:
            print(f"  c / b (vLLM's engine process): "
                  f"{cold / median(first_answer, runs[VLLM_PROCESS]):.2f}")
        print(f"  d / c:                 {statistics.median(again) / cold:.2f}   goal <= 0.5")
        memory = median(peak_rss, runs[COLD]) / median(peak_rss, runs[SAME_KV])
        print(f"  memory c / b (service's KV): {memory:.2f}   goal <= 1.0")
    if idle:
        print("\nphases of (d)'s cold start, as (c)'s but with VLLM_LOGGING_LEVEL=DEBUG, "
              "seconds from process start (median over rounds):")
        phase_table(idle)


def peak_rss(result: dict[str, Any]) -> float:
    return result["peak_rss"]


def median(figure: Any, results: list[dict[str, Any]]) -> float:
    return statistics.median(figure(r) for r in results)


def phase_table(results: list[dict[str, Any]]) -> None:
    """A start's phases: the parent's stamps, the worker's DEBUG lines, vLLM's own durations."""
    rows: dict[str, list[float]] = {}
    for result in results:
        for name, t in result["stamps"].items():
            rows.setdefault(f"parent: {name}", []).append(t)
        for line in result["lines"]:
            if "worker" in line and not line.get("restart"):
                rows.setdefault(f"worker: {re.sub(r'[0-9.]+ s', 'N s', line['worker'])}",
                                []).append(line["t"] - result["started_wall"])
    for name, values in sorted(rows.items(), key=lambda item: statistics.median(item[1])):
        print(f"  {statistics.median(values):7.2f}  {name}")
    print("  the worker's own durations and vLLM's lines (last round; after the idle exit marked):")
    for line in results[-1]["lines"]:
        mark = "restart " if line.get("restart") else ""
        if "worker" in line:
            print(f"    {mark}worker: {line['worker']}")
        elif "vllm" in line:
            print(f"    {mark}{line['process']}: {line['vllm'][:150]}")
        elif "gap" in line:
            print(f"    {mark}{line['gap']:5.1f} s silent between\n"
                  f"        {line['before']}\n        {line['after']}")


if __name__ == "__main__":
    main()
