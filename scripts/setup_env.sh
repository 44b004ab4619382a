#!/usr/bin/env bash
# Sets up a virtual environment with megatron_dataeff and everything it needs, then prints its path.
#   source <(bash scripts/setup_env.sh --print-activate)   or used by examples/quickstart.sh, tests/run.sh
# Environment:
#   MEGATRON_DATAEFF_VENV  where the venv lives (default: .venv in the repository)
#   TORCH_SPEC             the torch requirement (default torch==2.13.0; pinned so that a machine
#                          without a GPU never pulls an unpinned multi-GB CUDA build)
#   EXTRAS                 extras to install (default: test)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_DATAEFF_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-test}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV" >&2
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Re-install only when the package definition changed since the last successful install.
STAMP="$VENV/.megatron_dataeff_installed"
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" $(find "$ROOT/csrc" -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && python -c "import megatron_dataeff, megatron.core, torch" 2>/dev/null; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC" >&2
    python -m pip install -q "$TORCH_SPEC" >&2
fi
python -m pip install -q setuptools wheel >&2
echo "[setup] installing megatron_dataeff[$EXTRAS] (builds the csrc extension)" >&2
# No build isolation: the extension builds against the torch installed above.
python -m pip install -q --no-build-isolation -e "$ROOT[$EXTRAS]" >&2
echo "$HASH" > "$STAMP"
