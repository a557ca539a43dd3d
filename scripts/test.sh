#!/usr/bin/env bash
# Set everything up, then run the test suite: first the fast layer (tests/fast: the service
# on its stand-in engine, no vLLM, about a minute), and only if it passes the rest against the
# real engine (vLLM on CPU). The arguments go to both pytest runs (-v, -x, -k EXPR, ...);
# arguments that name test files or folders run just those, in one pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
pytest=(./.venv/bin/python -m pytest)

for arg in "$@"; do
  if [[ -e "${arg%%::*}" ]]; then  # a path, or path::test
    exec "${pytest[@]}" "$@"
  fi
done

# pytest's exit code 5: no test was selected (a -k EXPR that matches only one layer's).
fast=0
"${pytest[@]}" "$@" tests/fast || fast=$?
if [[ $fast -ne 0 && $fast -ne 5 ]]; then
  echo "scripts/test.sh: the fast layer (tests/fast) failed; the engine tests were not run" >&2
  exit "$fast"
fi
rest=0
"${pytest[@]}" "$@" --ignore=tests/fast || rest=$?
if [[ $rest -eq 5 && $fast -eq 0 ]]; then
  exit 0
fi
exit "$rest"
