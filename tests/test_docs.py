"""The documentation's whole programs run as written, on the real engine with the demo model.

Each runs as a script of its own (a file, as a user runs it), with the settings a user would
put in the environment: the demo model, a 2048-token context, 32 new tokens unless the code
says otherwise, the suite's small KV cache (tests/conftest.py). The rule that tells whole
programs, and the checks every block gets without an engine: tests/fast/test_docs.py. The
examples the docs show (sampling, structured outputs) run in tests/test_examples.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from _doc_snippets import run_script, snippet

from vllm_service import demo_model_path

# One engine start (40-60 s here) and a few short answers each.
SNIPPET_TIMEOUT_SECONDS = 300


def run_snippet(path: str, containing: str, tmp_path: Path) -> str:
    """Run the block of ``path`` that contains ``containing``; its stdout."""
    script = tmp_path / "snippet.py"
    script.write_text(snippet(path, containing).code)
    env = {
        **os.environ,
        "VLLM_MODEL_PATH": str(demo_model_path()),
        "VLLM_MAX_MODEL_LEN": "2048",
        "VLLM_DEFAULT_MAX_TOKENS": "32",
    }
    done = run_script(script, SNIPPET_TIMEOUT_SECONDS, env, cwd=tmp_path)
    assert done.returncode == 0, f"{path}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_readme_quick_start_runs(tmp_path: Path) -> None:
    out = run_snippet("README.md", "VLLMInferenceService() as service", tmp_path)
    # result.text (which may hold newlines), its token counts and finish reason; the chat's
    # greedy reply
    assert re.search(r" [1-9][0-9]* [1-8] (stop|length)\n", out), out
    # The chat's reply is the last line; what it says is the model's knowledge, not the code's.
    assert out.rstrip().splitlines()[-1].strip(), out


@pytest.mark.parametrize("containing", ["service.chat_stream", "AsyncVLLMInferenceService"])
def test_the_streaming_examples_run(containing: str, tmp_path: Path) -> None:
    out = run_snippet("docs/streaming.md", containing, tmp_path)
    assert out.strip(), "no text streamed"
    if containing == "service.chat_stream":  # the last chunk's result, after the story
        assert re.fullmatch(r"(stop|length) ([1-9]|[1-5][0-9]|6[0-4])", out.splitlines()[-1]), out
