#!/usr/bin/env bash
# Quickstart: set up the environment, then show the finding on the embedded corpus (Python stdlib docstrings,
# byte tokenizer). One small model (2 layers, hidden 192, 0.96M parameters) is trained three times on the same
# 20k unique tokens for 30 epochs: as plain AR, as AR with token dropout (30% of the input tokens replaced by
# random tokens, clean next-token targets) and as masked diffusion: `tools/run_grid.py --scale quickstart`
# (megatron_dataeff/experiments/grid.py), about 3 minutes of training on a 2-core CPU. Plain AR overfits: its
# validation loss bottoms out near epoch 11 and then climbs; token dropout's keeps falling. The script ends with
# the validation curves in one PNG, a table (best and final validation loss, rise after the best) and a sample
# from the run with the lowest validation loss (its final checkpoint: only the last one is saved).
#   bash examples/quickstart.sh                                      # the defaults
#   RUN_DIR=/tmp/qs bash examples/quickstart.sh                      # where the runs and the report go
#   bash examples/quickstart.sh --methods ar,ar_td0.3,ar_td0.3_random --seeds 1,2   # any tools/run_grid.py flag
#   bash examples/quickstart.sh --extra "--attention-backend local"  # pretrain_diffusion.py flags for every run
#   PROMPT="Return a" bash examples/quickstart.sh                   # the sample's prompt
#   bash examples/quickstart.sh --threads 1     # when another job holds a core: OpenMP threads sharing one wait on
#                                               # each other (measured: 1 thread 4.3 min, 2 threads over 30 min)
# Set the grid directory with RUN_DIR, not --output. A run that finished is not trained again (run_grid.py
# resumes), so a second call only re-plots and samples: give changed --extra / --epochs flags a new RUN_DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$(bash "$ROOT/scripts/setup_env.sh")/bin/activate"
cd "$ROOT"
export PYTHONWARNINGS=ignore  # megatron-core's notes about optional accelerators

RUN_DIR="${RUN_DIR:-runs/quickstart}"
PROMPT="${PROMPT:-Return the}"
GRID_ARGS=(--scale quickstart --seeds 1234)  # the scale scores no offline tasks and keeps the last checkpoint
SAMPLE_ARGS=(--max-new-tokens 120 --temperature 0.5 --top-k 20 --seed 1 --block-length 1)  # block: diffusion only

python tools/run_grid.py "${GRID_ARGS[@]}" --output "$RUN_DIR" "$@"
echo
python tools/plot_runs.py "$RUN_DIR" --prefix quickstart_
BEST="$(python -c 'import sys; from megatron_dataeff.experiments.report import best_run, find_runs
print(best_run(find_runs(sys.argv[1:])).path)' "$RUN_DIR")"
echo
echo "sample from $(basename "$BEST") (lowest validation loss; its final checkpoint), after \"$PROMPT\":"
{ printf '%s' "$PROMPT"; python tools/generate.py --load "$BEST/checkpoints" --prompt "$PROMPT" "${SAMPLE_ARGS[@]}"; } |
    fold -s -w 100 | sed "s/^/    /"
echo
echo "validation curves: $RUN_DIR/report/quickstart_val_loss.png   table: $RUN_DIR/report/quickstart_summary.md"
echo "runs (metrics.jsonl, train.log, checkpoints/): $RUN_DIR/<method>_s<seed>/"
