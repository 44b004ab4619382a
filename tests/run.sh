#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup_env.sh), then runs the test suite.
#   bash tests/run.sh                 # default suite (what CI runs)
#   bash tests/run.sh -k objectives   # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "${MEGATRON_DATAEFF_VENV:-$ROOT/.venv}/bin/activate"
cd "$ROOT"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests (exit 5): nothing to run for these arguments" >&2
    exit 0
fi
exit "$rc"
