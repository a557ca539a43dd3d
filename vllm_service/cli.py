"""The vllm-service command line: the demo, the demo model and batch generation.

Its help texts are plain text (no rST or markdown): they are printed as they are.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DESCRIPTION = (
    "Run vLLM through vllm-service: ask the demo model a few questions, build the demo model, "
    "or generate a completion for every line of a JSONL file."
)

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args.run(args) or 0)


def configure_logging(level: str) -> None:
    """Log to stderr: vllm_service at ``level``, other libraries at INFO or above.

    Other libraries' DEBUG lines (HTTP clients, file locks) would bury the service's own.
    """
    number = logging.getLevelName(level)
    logging.basicConfig(
        level=max(number, logging.INFO), format="%(asctime)s %(levelname)s %(message)s"
    )
    logging.getLogger("vllm_service").setLevel(number)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: ``demo``, ``demo-model`` and ``generate``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vllm-service", description=DESCRIPTION, formatter_class=_PlainHelp
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_log_level(parser, default="INFO")
    # Each command takes --log-level too, after its name; given there, it wins.
    common = argparse.ArgumentParser(add_help=False)
    _add_log_level(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", parents=[common], formatter_class=_PlainHelp,
        help="ask the built-in demo model (SmolLM2-135M-Instruct) a few questions",
    )
    demo.add_argument("questions", nargs="*", help="questions to ask (default: three examples)")
    demo.set_defaults(run=_run_demo)

    model = commands.add_parser(
        "demo-model", parents=[common], formatter_class=_PlainHelp,
        help="build the demo model folder once and print its path",
    )
    model.set_defaults(run=lambda args: print(_demo_model()) or 0)

    _add_generate_command(commands, common)
    return parser


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
        help="how much vllm-service logs to stderr, case-insensitive (default: INFO): INFO "
        "has one line per worker start, ready, idle exit, sleep and end; DEBUG adds every "
        "field of the service's status at each change",
    )


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


def _add_generate_command(commands: Any, common: argparse.ArgumentParser) -> None:
    default = _generate_defaults()
    model = os.environ.get("VLLM_MODEL_PATH") or None
    command = commands.add_parser(
        "generate", parents=[common],
        help="generate a completion for every line of a JSONL file (batch, several workers)",
        description="Run every JSON object of INPUT.jsonl through vLLM and write each one, with "
        "its result added, to OUTPUT.jsonl as it finishes. Rerunning the same command skips "
        "the items OUTPUT.jsonl already holds, so an interrupted run goes on where it stopped. "
        "Options are named after the parameters of vllm_service.generate(). With --format "
        "openai, INPUT.jsonl and OUTPUT.jsonl are OpenAI batch files instead, as vLLM's "
        "run-batch command reads and writes them (docs/openai-batch.md). Options also take "
        "vLLM's names where they have one (--tensor-parallel-size for --tp, --max-tokens for "
        "--max-output-len).",
        formatter_class=_HelpWithDefaults,
    )
    arg = command.add_argument
    arg("input", metavar="INPUT.jsonl", type=Path, help="one JSON object per line")
    arg("-o", "--output", metavar="OUTPUT.jsonl", type=Path, required=True,
        help="results, one JSON object per line; also where a rerun resumes from")
    arg("--model", "--model-id", dest="model_id", required=model is None, default=model,
        help="local model folder or Hugging Face model id (default: the environment "
        "variable VLLM_MODEL_PATH, when set)")
    arg("--format", choices=("jsonl", "openai"), default="jsonl",
        help="jsonl: any JSON objects, the result added under --result-key; openai: OpenAI "
        "batch files (custom_id, url, body), each body's own sampling fields apply and the "
        "sampling options below are the defaults for fields a body lacks; the prompts and "
        "results options other than --system do not apply (docs/openai-batch.md)")
    arg("--on-mismatch", choices=("error", "redo", "keep"), default=default["on_mismatch"],
        help="what to do with results in OUTPUT.jsonl made with other settings (model, system, "
        "sampling; with --format openai: answers of another model): stop with an error, "
        "generate them again, or keep them")
    prompts = command.add_argument_group("prompts and results")
    prompts.add_argument("--message-key", default=default["message_key"],
                         help="key holding each item's prompt (a string or a list of chat "
                         "messages)")
    prompts.add_argument("--system", default=None,
                         help="system prompt put in front of every conversation that has none")
    prompts.add_argument("--result-key", default=default["result_key"],
                         help="key the result is written under (a string, or a list when n > 1)")
    prompts.add_argument("--error-key", default=default["error_key"],
                         help="key the error of a failed item is written under")
    prompts.add_argument("--index-key", default=default["index_key"],
                         help="key each output line keeps its input line number under (from 0)")
    sampling = command.add_argument_group("sampling")
    sampling.add_argument("--n", type=int, default=default["n"], help="samples per prompt")
    sampling.add_argument("--use-sample", action="store_true",
                          help="make the n samples with SamplingParams(n=n) instead of n copies")
    # Defaults None: jsonl takes generate()'s, openai OpenAI's (docs/openai-batch.md).
    sampling.add_argument("--temperature", type=float, default=None,
                          help="sampling temperature; 0 is greedy (default: "
                          f"{default['temperature']}; with --format openai: 1, as OpenAI's)")
    sampling.add_argument("--top-p", type=float, default=default["top_p"],
                          help="nucleus sampling probability")
    sampling.add_argument("--max-output-len", "--max-tokens", type=int, default=None,
                          help="most tokens generated per sample (default: "
                          f"{default['max_output_len']}; with --format openai, as OpenAI's: 16 "
                          "for completions, up to the end of the context for chat)")
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="stop at this text (repeat for several)")
    sampling.add_argument("--seed", type=int, default=None,
                          help="random seed, for repeatable samples")
    sampling.add_argument("--sampling-args", type=_json_object, metavar="JSON", default=None,
                          help='other vllm.SamplingParams arguments, e.g. \'{"ignore_eos": true}\'')
    structured = command.add_argument_group(
        "structured outputs (at most one; docs/structured-outputs.md)")
    structured.add_argument("--json-schema", type=_json_file, metavar="FILE", default=None,
                            help="every result is JSON that follows the JSON schema in FILE")
    structured.add_argument("--regex", default=None, help="every result matches this regex")
    structured.add_argument("--choice", action="append", metavar="TEXT", default=None,
                            help="every result is one of these texts (repeat for each)")
    structured.add_argument("--grammar", type=_text_file, metavar="FILE", default=None,
                            help="every result follows the EBNF or Lark grammar in FILE")
    parsers = command.add_argument_group(
        "chat parsers, with --format openai (vllm serve's names; docs/tools.md)")
    parsers.add_argument("--tool-call-parser", dest="tool_parser", metavar="NAME", default=None,
                         help="vLLM's parser of the model's tool calls, for lines whose "
                         "tool_choice is 'auto' (the default with tools): hermes, llama3_json, ...")
    parsers.add_argument("--reasoning-parser", dest="reasoning_parser", metavar="NAME",
                         default=None, help="vLLM's reasoning parser: each answer's reasoning "
                         "goes to message.reasoning (deepseek_r1, qwen3, granite, ...)")
    workers = command.add_argument_group("workers and engine")
    workers.add_argument("--worker-num", type=int, default=default["worker_num"],
                         help="worker processes, each with its own engine on its own GPUs or "
                         "CPU cores")
    workers.add_argument("--tp", "--tensor-parallel-size", type=int, default=default["tp"],
                         help="tensor-parallel size (GPUs or core groups) per worker")
    workers.add_argument("--pp", "--pipeline-parallel-size", type=int, default=default["pp"],
                         help="pipeline-parallel size; above 1 uses Ray and needs --worker-num 1")
    workers.add_argument("--gpu-assignments", type=_gpu_assignments, metavar="0,1;2,3",
                         default=None, help="GPUs of each worker, workers separated by ';' "
                         "(numbered inside CUDA_VISIBLE_DEVICES)")
    workers.add_argument("--chunk-size", type=int, default=None,
                         help="items per chunk; workers take chunks from one queue as they "
                         "become free (default: one equal share per worker)")
    workers.add_argument("--max-model-len", type=int, default=default["max_model_len"],
                         help="longest sequence (prompt + output) in tokens")
    workers.add_argument("--gpu-memory-utilization", type=float,
                         default=default["gpu_memory_utilization"],
                         help="share of GPU memory per engine (on CPU the KV cache is sized "
                         "from free memory instead)")
    workers.add_argument("--dtype", default=default["dtype"],
                         help="model dtype: auto, float16, bfloat16, float32")
    workers.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction,
                         default=default["trust_remote_code"],
                         help="trust code shipped with the model")
    workers.add_argument("--engine-args", type=_json_object, metavar="JSON", default=None,
                         help='other vllm.LLM arguments, e.g. \'{"enforce_eager": true}\'')
    workers.add_argument("--ray-address", metavar="ADDRESS", default=None,
                         help="run the workers as actors on this Ray cluster: 'auto', "
                         "'host:port' or 'ray://host:port' (needs vllm-service[ray]; "
                         "docs/batch.md)")
    workers.add_argument("--startup-timeout", type=float, default=default["startup_timeout"],
                         help="seconds a worker may take to load the model")
    workers.add_argument("--engine-stall-seconds", type=float,
                         default=default["engine_stall_seconds"],
                         help="with work in flight, seconds without engine progress after "
                         "which a worker counts as stuck and is killed (its chunk runs again)")
    workers.add_argument("--engine-kind", choices=("vllm", "standin"),
                         default=default["engine_kind"],
                         help="for tests: standin runs a stand-in engine that loads no model "
                         "and echoes each prompt (docs/testing.md)")
    command.add_argument("--no-progress", dest="progress", action="store_false",
                         help="no progress bar")
    command.set_defaults(run=_run_generate)


class _PlainHelp(argparse.HelpFormatter):
    """Wraps help text between words only: never inside an option name or a path."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


class _HelpWithDefaults(_PlainHelp, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, (argparse._StoreTrueAction,
                                                         argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def _generate_defaults() -> dict[str, Any]:
    """The defaults of generate()'s parameters, which the command line's options share."""
    from .batch import generate

    return {name: p.default for name, p in inspect.signature(generate).parameters.items()}


def _run_generate(args: argparse.Namespace) -> int:
    from .batch import generate
    from .errors import VLLMServiceError

    try:
        data = read_jsonl(args.input)
    except ValueError as exc:
        print(f"vllm-service generate: {exc}", file=sys.stderr)
        return 2
    options = vars(args).copy()
    for name in ("command", "run", "input", "output", "format", "log_level"):
        options.pop(name)
    if args.format == "openai":
        from ._batch.openai_format import generate_openai_batch, succeeded

        problem = _openai_options(options)
        if problem is not None:
            print(f"vllm-service generate: {problem}", file=sys.stderr)
            return 2
        run = partial(generate_openai_batch, lines=data, output_path=args.output, **options)
    else:
        given = [flag for name, flag in _OPENAI_ONLY.items() if options.pop(name) is not None]
        if given:
            print(f"vllm-service generate: {', '.join(given)} need --format openai, whose lines "
                  "carry tools (docs/openai-batch.md)", file=sys.stderr)
            return 2
        for name in ("temperature", "max_output_len"):
            if options[name] is None:
                del options[name]  # generate()'s default
        run = partial(generate, data=data, output_path=args.output, **options)
    try:
        results = run()
    except (ValueError, TypeError, ImportError) as exc:
        print(f"vllm-service generate: {exc}", file=sys.stderr)
        return 2
    except VLLMServiceError as exc:
        print(f"vllm-service generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nInterrupted. Finished items are in {args.output}; run the same command again "
              "to go on.", file=sys.stderr)
        return 130
    if args.format == "openai":
        failed = sum(1 for answer in results if not succeeded(answer))
        print(f"Wrote {len(results)} answers to {args.output}"
              + (f"; {failed} failed (status_code other than 200, see their 'error')"
                 if failed else "."),
              file=sys.stderr)
    else:
        failed = sum(1 for result in results if args.error_key in result)
        print(f"Wrote {len(results)} items to {args.output}"
              + (f"; {failed} failed (see their {args.error_key!r} key)" if failed else "."),
              file=sys.stderr)
    return 1 if failed else 0


# Options of the jsonl format that have no meaning for OpenAI batch files.
_JSONL_ONLY = {
    "message_key": "--message-key", "result_key": "--result-key", "error_key": "--error-key",
    "index_key": "--index-key",
}

# Options of the openai format that the jsonl format has no use for.
_OPENAI_ONLY = {"tool_parser": "--tool-call-parser", "reasoning_parser": "--reasoning-parser"}


def _openai_options(options: dict[str, Any]) -> str | None:
    """Drop the options --format openai has no use for; why it refuses them, if it does.

    An option of the jsonl format is refused when it is given other than its default.
    """
    default = _generate_defaults()
    given = [flag for name, flag in _JSONL_ONLY.items() if options.pop(name) != default[name]]
    # n samples always come from one request with SamplingParams(n=n), as in vLLM's server.
    options.pop("use_sample")
    if given:
        return (f"{', '.join(given)} cannot be used with --format openai: its prompts are each "
                "line's body and its results OpenAI batch output lines (docs/openai-batch.md)")
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); ValueError names the bad line."""
    try:
        # "\n" only: splitlines() would also split inside strings holding U+2028, U+0085 ...
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number} is not valid JSON: {exc}") from exc
        if not isinstance(item, dict):
            raise ValueError(
                f"{path} line {number} must be a JSON object, got {type(item).__name__}"
            )
        items.append(item)
    return items


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, like '{\"key\": 1}'")
    return value


def _json_file(path: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{path} must hold a JSON object (a JSON schema)")
    return value


def _text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from exc


def _gpu_assignments(text: str) -> list[list[int]]:
    try:
        return [[int(gpu) for gpu in group.split(",")] for group in text.split(";")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            "give each worker's GPU numbers separated by ',' and workers by ';', e.g. 0,1;2,3"
        ) from exc


if __name__ == "__main__":
    sys.exit(main())
