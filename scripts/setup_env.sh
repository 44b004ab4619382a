#!/usr/bin/env bash
# Sets up a virtual environment with megatron_dataeff and everything it needs, then prints its path (stdout).
#   . "$(bash scripts/setup_env.sh)/bin/activate"            # .venv: Python 3.12, the newest megatron-core allowed
#   . "$(bash scripts/setup_env.sh --oldest)/bin/activate"   # .venv-oldest: Python 3.11, the oldest allowed
# Used by tests/run.sh (both: CI's two legs), examples/quickstart.sh and examples/paper_grid.sh (the first).
# The supported megatron-core range is written once, in pyproject.toml's dependencies ("megatron-core>=A,<B"):
# the default venv gets the newest release in it, --oldest gets A exactly.  megatron-core >= 0.17 needs
# Python >= 3.12; the oldest leg runs on 3.11, where PyPI's megatron-core stops at 0.16.
# Environment:
#   MEGATRON_DATAEFF_VENV  where the venv lives (default: .venv, or .venv-oldest with --oldest)
#   PYTHON                 the interpreter to make it with (default: python3.12, or python3.11 with --oldest,
#                          found on PATH or under pyenv)
#   TORCH_SPEC             the torch requirement (default torch==2.13.0; pinned so that a machine without a GPU
#                          never pulls an unpinned build; on Python 3.12 PyPI's torch 2.13.0 is its CUDA build,
#                          about 4.5 GB with its CUDA libraries, which runs on CPUs too)
#   EXTRAS                 extras to install (default: test)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LEG=newest
case "${1:-}" in
    --oldest) LEG=oldest ;;
    --newest | "") ;;
    *) echo "usage: bash scripts/setup_env.sh [--newest | --oldest]" >&2; exit 2 ;;
esac
RANGE="$(sed -n 's/^ *"megatron-core\([^";]*\)".*/\1/p' "$ROOT/pyproject.toml")"  # e.g. >=0.16.1,<0.20
OLDEST="$(sed -n 's/.*>=\([0-9.]*\).*/\1/p' <<< "$RANGE")"
if [ -z "$RANGE" ] || [ -z "$OLDEST" ]; then
    echo "[setup] error: no \"megatron-core>=A,<B\" dependency found in pyproject.toml" >&2; exit 1
fi
if [ "$LEG" = oldest ]; then
    PY_VERSION=3.11 VENV="${MEGATRON_DATAEFF_VENV:-$ROOT/.venv-oldest}" MCORE="megatron-core==$OLDEST"
else
    PY_VERSION=3.12 VENV="${MEGATRON_DATAEFF_VENV:-$ROOT/.venv}" MCORE="megatron-core$RANGE"
fi
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-test}"

py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

find_python() {  # an interpreter of Python $PY_VERSION: python3.X on PATH (a pyenv shim may not run), or pyenv's
    local root candidate
    root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
    for candidate in "python$PY_VERSION" python3 $(ls -d "$root/versions/$PY_VERSION".*/bin/python"$PY_VERSION" \
                                                   2>/dev/null | sort -rV); do
        if [ "$(py_version "$candidate")" = "$PY_VERSION" ]; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON" PY_VERSION="$(py_version "$PYTHON")"
    [ -n "$PY_VERSION" ] || { echo "[setup] error: PYTHON=$PYTHON does not run" >&2; exit 1; }
elif ! PY="$(find_python)"; then
    why="megatron-core >= 0.17 needs Python >= 3.12"
    [ "$LEG" = oldest ] && why="the oldest leg tests megatron-core $OLDEST on Python 3.11"
    echo "[setup] error: no Python $PY_VERSION found ($why): looked for python$PY_VERSION on PATH and under" \
         "pyenv. Install it (\`pyenv install $PY_VERSION\`, or your distribution's python$PY_VERSION with its" \
         "venv module), or point PYTHON=/path/to/python at another 3.10+ interpreter" >&2
    exit 1
fi

STAMP="$VENV/.megatron_dataeff_installed"
# A venv of another Python (a .venv made before the default moved to 3.12) is not removed here: a process may be
# running from it.
if [ -x "$VENV/bin/python" ] && [ "$(py_version "$VENV/bin/python")" != "$PY_VERSION" ]; then
    echo "[setup] error: $VENV has Python $(py_version "$VENV/bin/python"), not $PY_VERSION: remove it" \
         "(rm -rf $VENV) and run this again, or set MEGATRON_DATAEFF_VENV to another directory" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV (Python $PY_VERSION, $PY)" >&2
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Re-install only when the package definition changed since the last successful install.
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" $(find "$ROOT/csrc" -type f 2>/dev/null | sort) 2>/dev/null \
        | sha256sum | cut -c1-16)-$EXTRAS-$MCORE-$TORCH_SPEC-cuda${MEGATRON_DATAEFF_CUDA:-auto}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && python -c "import megatron_dataeff, megatron.core, torch" 2>/dev/null; then
    echo "$VENV"
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC" >&2
    python -m pip install -q "$TORCH_SPEC" >&2
fi
python -m pip install -q setuptools wheel >&2
echo "[setup] installing megatron_dataeff[$EXTRAS] with $MCORE (builds the csrc extension)" >&2
# No build isolation: the extension builds against the torch installed above.  -U picks the newest release of
# the range for the default venv, also in one made before the range was raised.
python -m pip install -q -U --upgrade-strategy only-if-needed --no-build-isolation -e "$ROOT[$EXTRAS]" "$MCORE" >&2
echo "[setup] $(python -W ignore -c 'import sys, importlib.metadata as m, torch; v = m.version("megatron-core"); print(f"Python {sys.version.split()[0]}, megatron-core {v}, torch {torch.__version__}")')" >&2
echo "$HASH" > "$STAMP"
echo "$VENV"
