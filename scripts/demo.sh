#!/usr/bin/env bash
# Set everything up, then ask the built-in demo model a few questions through the service.
# Arguments go to `vllm-service demo`: your own questions, or --log-level DEBUG (every field of
# the service's status at each change of the worker's state) or WARNING (no progress lines).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 exec ./.venv/bin/vllm-service demo "$@"
