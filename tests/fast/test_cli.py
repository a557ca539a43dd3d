"""The vllm-service command line, run as users run it (python -m vllm_service), on the stand-in.

Plain-text help, vLLM's option names beside vlllm's, --model from VLLM_MODEL_PATH and
--log-level; the real engine's command-line run is in tests/test_batch.py (cli_run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_service.cli import build_parser

# What rST or markdown would leave in a help text printed as it is.
MARKUP = re.compile(r"``|`|\*\*|:(class|meth|func|attr|mod):|^\.\. ", re.MULTILINE)
COMMANDS = ([], ["demo"], ["demo-model"], ["generate"])
# vLLM's name beside vlllm's: the same option.
ALIASES = (
    ("--tensor-parallel-size", "--tp"),
    ("--pipeline-parallel-size", "--pp"),
    ("--max-tokens", "--max-output-len"),
)


def vllm_service(*args: str | Path, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    """``python -m vllm_service ARGS``, with this test's environment (and ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "vllm_service", *map(str, args)],
        capture_output=True, text=True, timeout=50, env={**os.environ, **(env or {})},
    )


def standin_generate(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                     ) -> subprocess.CompletedProcess[str]:
    """The generate command on the stand-in engine over two prompts, into tmp_path/out.jsonl."""
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "one two three"}\n{"prompt": "four five six"}\n')
    return vllm_service("generate", source, "-o", tmp_path / "out.jsonl", "--engine-kind",
                        "standin", "--no-progress", *args, env=env)


def results(tmp_path: Path) -> list[str]:
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    return [json.loads(line)["results"] for line in lines]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "vllm-service")
def test_every_commands_help_is_plain_text(command: list[str]) -> None:
    process = vllm_service(*command, "--help")
    assert process.returncode == 0, process.stderr
    assert "--log-level" in process.stdout
    assert MARKUP.search(process.stdout) is None, MARKUP.search(process.stdout)


def test_generate_help_shows_both_names_of_each_option() -> None:
    process = vllm_service("generate", "--help")
    for vllms, vlllms in ALIASES:
        assert re.search(rf"{vlllms} \w+, {vllms} \w+", process.stdout), (vllms, process.stdout)
    for option in ("--max-model-len", "--gpu-memory-utilization", "--dtype",
                   "--trust-remote-code"):
        assert option in process.stdout


@pytest.mark.parametrize(("vllms", "vlllms"), ALIASES)
def test_vllms_option_names_set_the_same_value_as_vlllms(vllms: str, vlllms: str) -> None:
    base = ["generate", "in.jsonl", "-o", "out.jsonl", "--model", "m"]
    parser = build_parser()
    assert vars(parser.parse_args([*base, vllms, "3"])) == vars(
        parser.parse_args([*base, vlllms, "3"])
    )


def test_generate_runs_with_vllms_option_names(tmp_path: Path) -> None:
    process = standin_generate(tmp_path, "--model", "org/model", "--max-tokens", "2",
                               "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1")
    assert process.returncode == 0, process.stderr
    assert results(tmp_path) == ["one two", "four five"]  # the echo cut at 2 tokens


def test_model_defaults_to_vllm_model_path(tmp_path: Path) -> None:
    process = standin_generate(tmp_path, env={"VLLM_MODEL_PATH": "org/from-env"})
    assert process.returncode == 0, process.stderr
    assert "(model org/from-env, local)" in process.stderr
    assert results(tmp_path) == ["one two three", "four five six"]
    # --model wins over the variable.
    process = standin_generate(tmp_path / "again", "--model", "org/given",
                               env={"VLLM_MODEL_PATH": "org/from-env"})
    assert "(model org/given, local)" in process.stderr and "org/from-env" not in process.stderr


def test_without_vllm_model_path_model_is_required(tmp_path: Path) -> None:
    process = standin_generate(tmp_path)
    assert process.returncode == 2
    assert "--model" in process.stderr and "required" in process.stderr


def test_log_level_debug_shows_the_service_debug_lines(tmp_path: Path) -> None:
    default = standin_generate(tmp_path, "--model", "org/model")
    assert default.returncode == 0, default.stderr
    assert " INFO Started vLLM worker pid " in default.stderr
    assert " DEBUG " not in default.stderr

    debug = standin_generate(tmp_path / "again", "--model", "org/model", "--log-level", "debug")
    assert debug.returncode == 0, debug.stderr
    assert re.search(r" DEBUG vLLM worker pid \d+ loaded: \{", debug.stderr), debug.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_warning_hides_the_info_lines(tmp_path: Path, where: str) -> None:
    level = ["--log-level", "WARNING"]
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "one"}\n')
    command = ["generate", source, "-o", tmp_path / "out.jsonl", "--model", "org/model",
               "--engine-kind", "standin", "--no-progress"]
    process = vllm_service(*(level + command if where == "before" else command + level))
    assert process.returncode == 0, process.stderr
    assert "Started vLLM worker" not in process.stderr
    assert " WARNING " in process.stderr  # the stand-in's own warning still shows


def test_an_unknown_log_level_is_refused() -> None:
    process = vllm_service("--log-level", "chatty", "demo-model")
    assert process.returncode == 2
    assert "invalid choice: 'CHATTY'" in process.stderr
