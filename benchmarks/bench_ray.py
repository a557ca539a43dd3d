"""Benchmark of generate() on a Ray cluster against the same run on local workers.

Same data in every run: PROMPTS chat prompts, each answered with exactly MAX_TOKENS tokens
(ignore_eos). Two kinds of run, end to end (engine starts included), alternated ROUNDS times:

  local    generate(worker_num=2): two worker processes, each pinned to one core
  ray      generate(worker_num=2, ray_address=...): two actors on a Ray cluster of two nodes
           on this machine (Ray's own ray.cluster_utils.Cluster, one CPU each, started once
           before the runs, as a cluster would already be running), on loopback only

The ratio, ray / local in tokens per second end to end, is the cost of going through Ray on
one machine (connecting, the placement group, actors, results through Ray's object store).
Goal: 0.9 or better.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ray.py [--prompts 256] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

# Before ray is imported: the cluster's nodes take 127.0.0.1 as their address, not the
# machine's network address (docs/batch.md, "A cluster on one machine, on loopback only").
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from bench_batch import MAX_MODEL_LEN, TEMPERATURE, conversations  # the same data and settings


def run(model: str, count: int, max_tokens: int, ray_address: str | None) -> float:
    """One generate() run end to end; its output tokens per second."""
    from vllm_service import generate

    started = time.perf_counter()
    results = generate(
        model, [{"prompt": c} for c in conversations(count)], temperature=TEMPERATURE,
        max_output_len=max_tokens, worker_num=2, max_model_len=MAX_MODEL_LEN,
        sampling_args={"ignore_eos": True}, engine_args={"enforce_eager": True},
        ray_address=ray_address, progress=False,
    )
    seconds = time.perf_counter() - started
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} items failed, first: {failed[0]}")
    return count * max_tokens / seconds  # ignore_eos: every answer has max_tokens tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ray.cluster_utils import Cluster

    from vllm_service.demo_model import demo_model_path

    model = args.model or str(demo_model_path())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    rates: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        for round_number in range(1, args.rounds + 1):
            for kind, address in (("local", None), ("ray", cluster.address)):
                rate = run(model, args.prompts, args.max_tokens, address)
                rates[kind].append(rate)
                print(f"round {round_number} {kind:5}: {rate:6.1f} tok/s end to end", flush=True)
    finally:
        cluster.shutdown()
    local, ray = statistics.median(rates["local"]), statistics.median(rates["ray"])
    print(f"\n{args.prompts} prompts x {args.max_tokens} tokens, median of {args.rounds}:")
    print(f"local worker_num=2: {local:.1f} tok/s; Ray, 2 actors: {ray:.1f} tok/s")
    print(f"ratio ray / local: {ray / local:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
