"""The ```python blocks of README.md and docs/*.md, and the rule that tells whole programs.

A block is a **whole program** when it imports ``vllm_service`` and its first line is not a
comment starting ``# fragment``; every other block is a fragment (docs/testing.md, "Code in
the docs"). :func:`run_script` runs one (or an example) as a user would. Imports neither
vLLM nor torch: the fast layer reads these too.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import signal
import subprocess
import symtable
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What starts a worker process (spawned), so a script must call it under the __main__ guard.
WORKER_STARTERS = frozenset(
    {"VLLMInferenceService", "AsyncVLLMInferenceService", "generate", "generate_openai_batch"}
)
# An opening fence, indented as in a list item, up to the closing fence of the same indent.
_BLOCK = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```", re.M | re.S)


@dataclass(frozen=True)
class Snippet:
    """One ```python block: where it is and its code (dedented)."""

    path: str  # relative to the repository, e.g. "docs/streaming.md"
    line: int  # of the opening fence
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def is_fragment(self) -> bool:
        return self.code.lstrip().startswith("# fragment")

    @property
    def is_program(self) -> bool:
        """A whole program: it imports vllm_service and is not marked ``# fragment``."""
        modules = set()
        for node in ast.walk(ast.parse(self.code)):
            if isinstance(node, ast.ImportFrom):
                modules.add(node.module or "")
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
        return not self.is_fragment and any(m.split(".")[0] == "vllm_service" for m in modules)


def snippets() -> list[Snippet]:
    """Every ```python block of README.md and docs/*.md, in file and line order."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            found.append(Snippet(
                str(path.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1,
                textwrap.dedent(match["code"]),
            ))
    return found


def snippet(path: str, containing: str) -> Snippet:
    """The one block of ``path`` whose code contains ``containing``."""
    chosen = [s for s in snippets() if s.path == path and containing in s.code]
    assert len(chosen) == 1, f"{len(chosen)} blocks of {path} contain {containing!r}"
    return chosen[0]


def undefined_names(code: str) -> set[str]:
    """Global names the code reads but never binds (nor imports), builtins aside."""
    table = symtable.symtable(code, "<snippet>", "exec")
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    bound |= {child.get_name() for child in table.get_children()}  # functions and classes
    read: set[str] = set()
    tables = [table]
    while tables:
        current = tables.pop()
        tables.extend(current.get_children())
        read |= {
            s.get_name() for s in current.get_symbols()
            if s.is_referenced() and (current is table or s.is_global())
        }
    return read - bound - set(dir(builtins))


def unguarded_worker_starts(code: str) -> list[str]:
    """Calls of :data:`WORKER_STARTERS` that run at import, outside ``if __name__ ==
    "__main__":`` and outside function bodies (a spawned worker imports the script again)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_guard(node):
            return
        if isinstance(node, ast.Call) and _called_name(node) in WORKER_STARTERS:
            found.append(f"line {node.lineno}: {_called_name(node)}(...)")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(code))
    return found


def has_main_guard(code: str) -> bool:
    return any(_is_guard(node) for node in ast.parse(code).body)


def _is_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``."""
    return (
        isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
        and len(node.test.comparators) == 1
        and isinstance(node.test.comparators[0], ast.Constant)
        and node.test.comparators[0].value == "__main__"
    )


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if (
        isinstance(func, ast.Attribute)  # vllm_service.generate(...)
        and isinstance(func.value, ast.Name) and func.value.id == "vllm_service"
    ):
        return func.attr
    return None


def run_script(
    script: Path, timeout: float, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with this Python as a user would, in a session of its own.

    Past ``timeout`` it gets Ctrl-C (its ``with`` blocks shut its services down), then a
    minute later SIGKILL to its process group, and the run fails.
    """
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=cwd, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        raise AssertionError(f"{script} ran past {timeout:g} s; stderr:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
