"""``import vllm_service`` and a remote-mode service without what only POSIX has.

Windows has no ``fcntl``, ``resource``, ``pwd``, ``grp`` or ``termios``, no
``os.register_at_fork``, ``os.getuid``, ``os.killpg``, ``os.setsid`` and no ``signal.SIGKILL``.
A remote-mode user there imports the package and makes a service; the worker process (which
leads its own process group) is started only by the first call. This runs that much in a
Python where those names are gone, so a module-level use of any of them fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The third-party dependencies are imported first: on Windows they are their own Windows
# builds (psutil's Linux module imports resource, for one), and only our code is under test.
_WITHOUT_POSIX = """
import os, signal, sys
import dotenv, openai, psutil, pydantic, pydantic_settings, tqdm
for name in ("fcntl", "resource", "pwd", "grp", "termios"):
    sys.modules[name] = None  # makes `import name` raise ImportError
for name in ("register_at_fork", "fork", "getuid", "geteuid", "killpg", "getpgid", "setsid"):
    if hasattr(os, name):
        delattr(os, name)
for name in ("SIGKILL", "SIGCONT", "SIGSTOP", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGCHLD"):
    if hasattr(signal, name):
        delattr(signal, name)
"""

_REMOTE_SERVICE = """
import asyncio
import vllm_service
from vllm_service import AsyncVLLMInferenceService, VLLMInferenceService, VLLMSettings
from vllm_service.cli import build_parser

assert vllm_service.__file__.startswith(sys.argv[1]), vllm_service.__file__
build_parser()
settings = VLLMSettings(mode="remote", api_url="http://127.0.0.1:9/v1", model_path="m")
service = VLLMInferenceService(settings)
assert service.status().state == "stopped", service.status()
service.shutdown()

async def main():
    service = AsyncVLLMInferenceService(settings)
    await service.shutdown()

asyncio.run(main())
print("imported and made")
"""


def test_the_package_imports_and_makes_a_remote_service_without_posix_only_names() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    program = textwrap.dedent(_WITHOUT_POSIX) + textwrap.dedent(_REMOTE_SERVICE)
    done = subprocess.run(
        [sys.executable, "-c", program, str(ROOT)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported and made"
