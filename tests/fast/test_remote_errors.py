"""Remote mode's error and its dependencies, without a server (tests/test_remote.py has one)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

from vllm_service import RemoteServerError, RequestError

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_service"


def test_a_remote_server_error_keeps_its_fields_through_pickling() -> None:
    error = RemoteServerError("HTTP 401", status_code=401, url="http://127.0.0.1:8000/v1")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RemoteServerError and isinstance(copy, RequestError)
    assert (str(copy), copy.status_code, copy.url) == ("HTTP 401", 401, "http://127.0.0.1:8000/v1")
    unreachable = pickle.loads(pickle.dumps(RemoteServerError("down")))
    assert (unreachable.status_code, unreachable.url) == (None, None)


def test_no_module_of_the_package_imports_httpx() -> None:
    # openai 3 brings httpx2, not httpx: an import of httpx fails in a remote-only install.
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] == "httpx"]
    assert found == []
