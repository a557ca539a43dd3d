#!/usr/bin/env bash
# Set everything up, then ask the built-in demo model a few questions through the service.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 exec ./.venv/bin/vllm-service demo "$@"
