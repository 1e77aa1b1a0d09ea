#!/usr/bin/env bash
# The whole test suite: lint (ruff), then pytest, in this clone's .venv/ (built if missing).
# Extra arguments go to pytest, e.g. `make test ARGS="-k reduction"`.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
env_dir="$(bash scripts/env.sh | tail -n 1)" || { echo "environment set-up failed" >&2; exit 3; }

echo "== ruff"
"$env_dir/bin/ruff" check . && "$env_dir/bin/ruff" format --check . || { echo "lint failed" >&2; exit 1; }

echo "== pytest"
export VLLM_TARGET_DEVICE=cpu
"$env_dir/bin/python" -m pytest "$@"
rc=$?
case $rc in
  0) ;;
  1) echo "pytest: some tests failed" >&2 ;;
  5) echo "pytest: no tests were collected; treating as a failure" >&2; rc=1 ;;
  *) echo "pytest stopped with exit code $rc (interrupted, internal or usage error)" >&2 ;;
esac
exit $rc
