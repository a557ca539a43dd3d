"""The documentation's code: every ```python block of README.md and docs/*.md holds up.

Every block compiles. A whole program (it imports vllm_service and is not marked
``# fragment``; tests/_doc_snippets.py, docs/testing.md) uses no name it does not define, and
one that starts a worker (a service, the batch ``generate``) does so under ``if __name__ ==
"__main__":``, without which the spawned worker fails. The stand-in example runs here;
tests/test_docs.py runs others on the real engine.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from _doc_snippets import (
    ROOT,
    WORKER_STARTERS,
    Snippet,
    has_main_guard,
    run_script,
    snippet,
    snippets,
    undefined_names,
    unguarded_worker_starts,
)

ALL = snippets()
PROGRAMS = [s for s in ALL if s.is_program]


def test_the_docs_have_whole_programs_and_fragments() -> None:
    assert len(PROGRAMS) >= 10 and any(s.is_fragment for s in ALL), [str(s) for s in ALL]
    assert snippet("README.md", "VLLMInferenceService() as service").is_program


@pytest.mark.parametrize("block", ALL, ids=str)
def test_every_block_compiles(block: Snippet) -> None:
    compile(block.code, str(block), "exec")


@pytest.mark.parametrize("block", PROGRAMS, ids=str)
def test_a_whole_program_defines_what_it_uses(block: Snippet) -> None:
    assert not undefined_names(block.code), (
        f"{block} uses names it never defines; define them, or mark the block '# fragment'"
    )


@pytest.mark.parametrize("block", PROGRAMS, ids=str)
def test_a_whole_program_starts_its_worker_under_the_main_guard(block: Snippet) -> None:
    names = {n.id for n in ast.walk(ast.parse(block.code)) if isinstance(n, ast.Name)}
    if not names & WORKER_STARTERS:
        return
    assert has_main_guard(block.code), f"{block} starts a worker: it needs the __main__ guard"
    assert not unguarded_worker_starts(block.code), (block, unguarded_worker_starts(block.code))


def test_the_rule_tells_guarded_programs_from_unguarded_ones() -> None:
    unguarded = (
        "from vllm_service import VLLMInferenceService\n"
        "with VLLMInferenceService() as s:\n    s.warmup()\n"
    )
    assert unguarded_worker_starts(unguarded) == ["line 2: VLLMInferenceService(...)"]
    in_a_function = (
        "import asyncio\nfrom vllm_service import AsyncVLLMInferenceService\n"
        "async def main():\n    async with AsyncVLLMInferenceService() as s:\n"
        "        await s.warmup()\n"
    )
    assert not unguarded_worker_starts(in_a_function)
    assert not has_main_guard(in_a_function + "asyncio.run(main())\n")
    assert has_main_guard(in_a_function + 'if __name__ == "__main__":\n    asyncio.run(main())\n')
    assert undefined_names("from vllm_service import generate\nprint(generate(model, data))") == {
        "model", "data"
    }
    assert not undefined_names("import os\ndef f(x):\n    return os.path.join(x, y)\ny = 1\nf(2)")


@pytest.mark.parametrize(
    ("name", "doc"),
    [("sampling.py", "docs/sampling.md"), ("structured_outputs.py", "docs/structured-outputs.md"),
     ("tools.py", "docs/tools.md"), ("embeddings.py", "docs/embeddings.md")],
)
def test_the_examples_the_docs_show_are_the_docs_code(name: str, doc: str) -> None:
    # tests/test_examples.py runs the examples, so the docs' blocks run too.
    code = (ROOT / "examples" / name).read_text()
    after_docstring = code[code.index('"""', 3) + 3:].lstrip("\n")
    assert snippet(doc, "if __name__").code == after_docstring


def test_the_stand_in_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "example.py"  # a file, as a user runs it: spawn imports it again
    script.write_text(snippet("docs/testing.md", 'engine_kind="standin"').code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    done = run_script(script, 60, env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path: Path) -> None:
    # The mistake a newcomer makes first: the worker, spawned, imports the script again,
    # which starts a service there; it fails before any code of ours runs in it.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from vllm_service import VLLMInferenceService, VLLMSettings\n"
        f"settings = VLLMSettings(model_path='stand-in', engine_kind='standin', "
        f"log_dir={str(tmp_path / 'logs')!r})\n"
        "with VLLMInferenceService(settings) as service:\n"
        "    print(service.generate('Hi', max_tokens=2).text)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    done = run_script(script, 60, env)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm_service.errors.WorkerStartError"), done.stderr[-3000:]
    assert 'if __name__ == "__main__":' in last and "stderr" in last, last
