#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv if absent, installs, runs pytest; then runs the
# DeepSpeed integration tests (marker "deepspeed") again against the OLDEST DeepSpeed setup.cfg allows,
# in .venv-deepspeed-oldest. Extra arguments go to pytest and skip that second run
# (e.g. launch_scripts/run_tests.sh -k head -x).
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED_OLDEST=0.16.0   # = setup.cfg's floor (tests/test_versions.py checks)
source launch_scripts/_bootstrap.sh
ffc_bootstrap
python -m pytest -q --durations=15 "$@"
if [ "$#" -eq 0 ]; then
  echo "ffc_parallel: the DeepSpeed integration tests against deepspeed==$DEEPSPEED_OLDEST" >&2
  ffc_bootstrap .venv-deepspeed-oldest "deepspeed==$DEEPSPEED_OLDEST"
  python -m pytest -q -m deepspeed
fi
