#!/usr/bin/env bash
# The paper's grid (AR; AR + token dropout 0.1/0.3/0.5/1.0; attention dropout, MLP dropout 0.1/0.3/0.5;
# weight decay 0.3/0.5; masked diffusion; plus fresh-data references for R*) at the tiny scale on
# this machine's CPU (embedded corpus, 50k unique tokens, 20 epochs), then the plots and table.
#
#   bash examples/paper_grid.sh                                  # -> runs/tiny_grid (runs/SCALE_grid), its report/
#   OUTPUT=runs/g SEEDS=1,2,3 bash examples/paper_grid.sh --methods ar,mdm,ar_td0.3
#   SCALE=demo SEEDS=1,2,3 OUTPUT=runs/demo_grid bash examples/paper_grid.sh   # plain AR overfits clearly; ~1 h
#
# Resumable: run it again after an interruption and finished runs are skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$(bash "$ROOT/scripts/setup_env.sh")/bin/activate"
OUTPUT=${OUTPUT:-runs/${SCALE:-tiny}_grid}
SEEDS=${SEEDS:-1234}

GRID_ARGS=(--scale "${SCALE:-tiny}" --seeds "$SEEDS" --output "$OUTPUT")
python "$ROOT/tools/run_grid.py" "${GRID_ARGS[@]}" "$@"
python "$ROOT/tools/plot_runs.py" "$OUTPUT" --output "$OUTPUT/report"
