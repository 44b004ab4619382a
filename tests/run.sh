#!/usr/bin/env bash
# The test command: sets up each environment (scripts/setup_env.sh), then runs the tests in it.  Two legs, the two
# ends of the megatron-core range pyproject.toml supports:
#   newest  .venv, Python 3.12, the newest megatron-core allowed: the default suite
#   oldest  .venv-oldest, Python 3.11, the oldest allowed: the tests of what differs across the range
#           (MEGATRON_RANGE_TESTS in tests/conftest.py)
#   bash tests/run.sh                       # both legs (what CI runs)
#   bash tests/run.sh -k objectives         # extra arguments go to pytest, on each leg
#   LEG=newest bash tests/run.sh tests/test_objectives.py   # one leg (newest or oldest)
# MEGATRON_DATAEFF_VENV / MEGATRON_DATAEFF_OLDEST_VENV move the legs' venvs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${LEG:-both}" in
    both) legs=(newest oldest) ;;
    newest | oldest) legs=("$LEG") ;;
    *) echo "LEG=$LEG: give newest, oldest or nothing (both)" >&2; exit 2 ;;
esac

setup() {  # setup LEG: make or update the leg's venv; its path on stdout
    local venv="${MEGATRON_DATAEFF_VENV:-}"
    [ "$1" = oldest ] && venv="${MEGATRON_DATAEFF_OLDEST_VENV:-}"
    MEGATRON_DATAEFF_VENV="$venv" bash scripts/setup_env.sh "--$1"
}

# With both legs, the oldest leg's set-up (mostly downloads) runs beside the newest leg's.
early=""
if [ "${#legs[@]}" -eq 2 ]; then
    early="$(mktemp -d)"
    (set +e; setup oldest > "$early/venv" 2> "$early/log"; echo $? > "$early/rc") &
fi

rc=0
for leg in "${legs[@]}"; do
    if [ "$leg" = oldest ] && [ -n "$early" ]; then
        wait
        cat "$early/log" >&2
        if [ "$(cat "$early/rc")" != 0 ]; then
            echo "the oldest leg's set-up failed (above)" >&2; exit 1
        fi
        venv="$(cat "$early/venv")"
    else
        venv="$(setup "$leg")"
    fi
    echo "== $leg leg: $("$venv/bin/python" -W ignore -c 'import sys, importlib.metadata as m; v = m.version("megatron-core"); print(f"Python {sys.version.split()[0]}, megatron-core {v}")')"
    set +e
    MEGATRON_DATAEFF_TEST_LEG="$leg" "$venv/bin/python" -m pytest -q "$@"
    leg_rc=$?
    set -e
    if [ "$leg_rc" -eq 5 ]; then  # pytest collected nothing (e.g. -k matching no test of this leg's)
        echo "pytest collected no tests (exit 5) on the $leg leg: nothing to run for these arguments" >&2
        leg_rc=0
    fi
    [ "$leg_rc" -eq 0 ] || rc=$leg_rc
done
exit "$rc"
