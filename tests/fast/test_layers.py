"""The package's import layers, read from its source with ``ast``: nothing of it is imported.

The layers, top to bottom. A module imports modules of its own layer or lower ones only;
every import counts, also one inside a function:

    public    vllm_service (__init__), __main__, service, async_service, batch, cli, testing,
              metrics
    caller    _client/*, _batch/*: neither imports the other
    worker    _worker/* but protocol.py (main.py is the worker process's loop)
    engines   _worker/engines/*: they run in the worker process only
    protocol  _worker/protocol.py: the messages that cross the pipe
    base      _common/*, settings, types, errors, demo_model

Beside the layers:

- The engines stay in the worker process. Only ``_worker/main.py`` imports ``engines``, and
  only ``_worker/handle.py`` imports ``main``, inside the function the spawned process runs:
  the parent loads neither. No module the parent loads imports vllm or torch at import time.
- No import cycles between the package's modules.
- No module takes a ``_``-prefixed name from a module of another subpackage (the root
  package's modules count as one subpackage).

The checks are functions of the parsed imports, so the last test plants one violation of
each rule in a package of its own and sees each caught.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_service"

LAYERS = ("base", "protocol", "engines", "worker", "caller", "public")  # bottom to top
PUBLIC = {"__init__", "__main__", "service", "async_service", "batch", "cli", "testing", "metrics"}
LEAVES = {"settings", "types", "errors", "demo_model"}
# Third-party modules the parent process must not import at import time: seconds each, and
# the point of the worker process is that the parent stays without them.
HEAVY = ("vllm", "torch", "safetensors.torch")


@dataclass(frozen=True)
class Import:
    """One imported module, or one name taken from it, as written in ``importer``."""

    importer: str  # dotted module name; a package by its own name
    target: str  # the module imported, or the one ``name`` is taken from
    name: str | None  # ``from target import name``, when name is not a module itself
    line: int
    lazy: bool  # inside a function (or ``if TYPE_CHECKING``): not run at import time


@dataclass(frozen=True)
class Package:
    """A package's modules and every import written in them."""

    modules: set[str]
    packages: set[str]  # the modules that are packages (an ``__init__.py``)
    imports: list[Import]

    def internal(self) -> list[Import]:
        """The imports of the package's own modules."""
        return [i for i in self.imports if i.target in self.modules]


def read_package(folder: Path) -> Package:
    """Parse every module under ``folder``, named as dotted paths from the folder's name."""
    paths: dict[str, Path] = {}
    packages = set()
    for path in sorted(folder.rglob("*.py")):
        parts = (folder.name, *path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        paths[".".join(parts)] = path
    modules = set(paths)
    imports = []
    for module, path in paths.items():
        here = module if module in packages else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        imports += _ImportReader(module, here, modules).read(tree)
    return Package(modules, packages, imports)


class _ImportReader(ast.NodeVisitor):
    """The imports of one module, with relative ones resolved and lazy ones marked."""

    def __init__(self, module: str, package: str, modules: set[str]) -> None:
        self.module = module
        self.package = package
        self.modules = modules
        self.depth = 0  # functions (or TYPE_CHECKING blocks) around the current node
        self.found: list[Import] = []
        self.aliases: dict[str, str] = {}  # a name bound to one of the package's modules

    def read(self, tree: ast.Module) -> list[Import]:
        self.visit(tree)
        return self.found

    def _lazy(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _lazy

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") and not (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self.generic_visit(node)
            return
        self.depth += 1
        for statement in node.body:
            self.visit(statement)
        self.depth -= 1
        for statement in node.orelse:
            self.visit(statement)

    def _add(self, node: ast.stmt, target: str, name: str | None) -> None:
        self.found.append(Import(self.module, target, name, node.lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, None)
            if alias.asname and alias.name in self.modules:
                self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.modules:
                self._add(node, submodule, None)
                self.aliases[alias.asname or alias.name] = submodule
            else:
                self._add(node, base, alias.name)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # module._name through an imported module counts as importing the name
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            target = self.aliases[node.value.id]
            self.found.append(Import(self.module, target, node.attr, node.lineno, True))
        self.generic_visit(node)


# ----- the rules -----


def layer(module: str) -> str | None:
    """The layer of one of the package's modules; None for a module no rule places."""
    parts = module.split(".")[1:]
    top = parts[0] if parts else "__init__"
    if top in PUBLIC:
        return "public"
    if top in ("_client", "_batch"):
        return "caller"
    if parts == ["_worker", "protocol"]:
        return "protocol"
    if parts[:2] == ["_worker", "engines"]:
        return "engines"
    if top == "_worker":
        return "worker"
    if top == "_common" or top in LEAVES:
        return "base"
    return None


def _is_worker_side(module: str) -> bool:
    """Code that runs in the worker process only: its loop and the engines."""
    return module.endswith("._worker.main") or layer(module) == "engines"


def _where(found: Import) -> str:
    name = f" ({found.name})" if found.name else ""
    return f"{found.importer}:{found.line} imports {found.target}{name}"


def unplaced_modules(package: Package) -> list[str]:
    return sorted(module for module in package.modules if layer(module) is None)


def layer_violations(package: Package) -> list[str]:
    """Imports of a module in a higher layer than the importer's, and between _client and
    _batch."""
    problems = []
    for found in package.internal():
        mine, theirs = layer(found.importer), layer(found.target)
        if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
            problems.append(f"{_where(found)}: {mine} layer importing the {theirs} layer")
        elif mine == theirs == "caller" and _top(found.importer) != _top(found.target):
            problems.append(f"{_where(found)}: _client and _batch do not import each other")
    return problems


def _top(module: str) -> str:
    """The subpackage (or root module) a module is in: ``_batch`` for ``_batch.output``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def engine_violations(package: Package) -> list[str]:
    """Imports that would bring the worker process's code (or vLLM, torch) into the parent."""
    problems = []
    for found in package.internal():
        importer, target = found.importer, found.target
        from_outside = layer(importer) != "engines" and not importer.endswith("._worker.main")
        if layer(target) == "engines" and from_outside:
            problems.append(f"{_where(found)}: only _worker/main.py imports the engines")
        if target.endswith("._worker.main"):
            if not importer.endswith(("._worker.handle", "._worker.fork_server")):
                problems.append(
                    f"{_where(found)}: only _worker/handle.py and fork_server.py start the "
                    "worker loop"
                )
            elif not found.lazy:
                problems.append(
                    f"{_where(found)} at import time: the parent would load the worker loop "
                    "and its engines; import it in the function the spawned process runs"
                )
    for found in package.imports:
        heavy = any(found.target == m or found.target.startswith(m + ".") for m in HEAVY)
        if heavy and not found.lazy and not _is_worker_side(found.importer):
            problems.append(f"{_where(found)} at import time, in the parent process")
    return problems


def cycles(package: Package) -> list[list[str]]:
    """The import cycles between the package's modules, each as the modules around it."""
    graph: dict[str, set[str]] = {module: set() for module in package.modules}
    for found in package.internal():
        if found.target != found.importer:
            graph[found.importer].add(found.target)
    found_cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :]
            start = cycle.index(min(cycle))  # each cycle told from the same module every time
            found_cycles.append([*cycle[start:], *cycle[:start], cycle[start]])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found_cycles


def _subpackage(module: str, package: Package) -> str:
    return module if module in package.packages else module.rpartition(".")[0]


def private_name_violations(package: Package) -> list[str]:
    """``_``-prefixed names taken from a module of another subpackage."""
    return [
        f"{_where(found)}: a private name of another subpackage"
        for found in package.internal()
        if found.name and found.name.startswith("_") and not found.name.startswith("__")
        and _subpackage(found.target, package) != _subpackage(found.importer, package)
    ]


# ----- the package as it is -----


@functools.cache
def actual() -> Package:
    """This package, read once for all the tests below."""
    return read_package(PACKAGE)


def test_every_module_is_in_a_layer() -> None:
    unplaced = unplaced_modules(actual())
    assert not unplaced, f"place these in a layer (layer() above): {unplaced}"


def test_modules_import_only_their_own_layer_or_lower_ones() -> None:
    problems = layer_violations(actual())
    assert not problems, "\n".join(problems)


def test_the_engines_vllm_and_torch_stay_in_the_worker_process() -> None:
    problems = engine_violations(actual())
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    found = cycles(actual())
    assert not found, "\n".join(" -> ".join(cycle) for cycle in found)


def test_no_private_names_from_another_subpackage() -> None:
    problems = private_name_violations(actual())
    assert not problems, "\n".join(problems)


# ----- the rules catch what they are for -----

PLANTED = {
    "__init__.py": "from .service import Service\n",
    "service.py": "from ._client.calls import Call\n",
    "types.py": "",
    "_client/__init__.py": "",
    "_client/calls.py": (
        "from .. import service\n"  # up a layer, and a cycle through service
        "from .._worker.handle import _hidden\n"  # a private name of another subpackage
        "from .._worker import handle as _handle\n"
        "_handle._also_hidden()\n"  # the same, through the module
        "import torch\n"  # at import time, in the parent
    ),
    "_batch/__init__.py": "",
    "_batch/output.py": "from .._worker.engines.local import LocalEngine\n",  # not main
    "_batch/schedule.py": "from .._client import calls\n",  # the caller's other half
    "_worker/__init__.py": "",
    "_worker/handle.py": "from .main import run_worker\n",  # the loop at import time
    "_worker/main.py": "def make():\n    from .engines.local import LocalEngine\n",
    "_worker/engines/__init__.py": "",
    "_worker/engines/local.py": "import vllm\nfrom ...types import Sample\n",  # all allowed
    "_extra.py": "",  # in no layer
}


def test_each_rule_catches_a_planted_violation(tmp_path: Path) -> None:
    folder = tmp_path / "vllm_service"
    for name, text in PLANTED.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    package = read_package(folder)

    assert unplaced_modules(package) == ["vllm_service._extra"]
    assert _places(layer_violations(package)) == [
        "vllm_service._batch.schedule:1", "vllm_service._client.calls:1",
    ]
    assert _places(engine_violations(package)) == [
        "vllm_service._batch.output:1", "vllm_service._worker.handle:1",
        "vllm_service._client.calls:5",
    ]
    assert cycles(package) == [
        ["vllm_service._client.calls", "vllm_service.service", "vllm_service._client.calls"]
    ]
    assert _places(private_name_violations(package)) == [
        "vllm_service._client.calls:2", "vllm_service._client.calls:4",
    ]


def _places(problems: list[str]) -> list[str]:
    """Where each problem is: its ``module:line``."""
    return [problem.split(" ", 1)[0] for problem in problems]
