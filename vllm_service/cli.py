"""The ``vllm-service`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="vllm-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="ask the built-in demo model (SmolLM2-135M-Instruct) a few questions"
    )
    demo.add_argument("questions", nargs="*", help="questions to ask (default: three examples)")
    demo.set_defaults(run=_run_demo)

    model = commands.add_parser(
        "demo-model", help="build the demo model folder once and print its path"
    )
    model.set_defaults(run=lambda args: print(_demo_model()) or 0)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return int(args.run(args) or 0)


def _demo_model() -> str:
    from .demo_model import demo_model_path

    return str(demo_model_path())


def _run_demo(args: argparse.Namespace) -> int:
    from . import GenerationParams, VLLMInferenceService, VLLMSettings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = VLLMSettings(model_path=_demo_model(), idle_ttl_seconds=60)
    questions = args.questions or DEMO_QUESTIONS
    greedy = GenerationParams(temperature=0, max_tokens=96)
    with VLLMInferenceService(settings) as service:
        started = time.perf_counter()
        service.warmup()
        print(f"\nModel loaded in {time.perf_counter() - started:.1f} s.\n")
        started = time.perf_counter()
        conversations = [[{"role": "user", "content": q}] for q in questions]
        results = service.chat_batch(conversations, greedy)
        elapsed = time.perf_counter() - started
        for question, result in zip(questions, results):
            print(f"Q: {question}\nA: {result.text.strip()}\n")
        tokens = sum(r.completion_tokens for r in results)
        print(f"{len(results)} answers, {tokens} tokens in {elapsed:.2f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
