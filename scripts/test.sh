#!/usr/bin/env bash
# Set everything up, then run the whole test suite against the real engine (vLLM on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 exec ./.venv/bin/python -m pytest "$@"
