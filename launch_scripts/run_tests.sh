#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv if absent, installs, runs pytest.
# Extra arguments go to pytest (e.g. launch_scripts/run_tests.sh -k head -x).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch_scripts/_bootstrap.sh
ffc_bootstrap
exec python -m pytest -q "$@"
