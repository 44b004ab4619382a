#!/usr/bin/env bash
# Quickstart: set up the environment, then train a small masked-diffusion model on the embedded
# corpus (Python stdlib docstrings) for 4 epochs of 400k unique tokens. A few minutes on a laptop CPU.
#   bash examples/quickstart.sh                      # defaults below
#   bash examples/quickstart.sh --objective ar       # any pretrain_diffusion.py flag overrides them
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "${MEGATRON_DATAEFF_VENV:-$ROOT/.venv}/bin/activate"
cd "$ROOT"

MODEL_ARGS=(--model-preset tiny --seq-length 128)
OBJECTIVE_ARGS=(--objective mdm --mdm-eps 1e-3)
DATA_ARGS=(--unique-tokens 400000 --epochs 4 --split 98,2,0)
TRAIN_ARGS=(--micro-batch-size 16 --global-batch-size 16 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 50
            --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 --seed 1234)
LOG_ARGS=(--log-interval 50 --eval-interval 200 --eval-iters 8 --run-dir runs/quickstart)

python pretrain_diffusion.py "${MODEL_ARGS[@]}" "${OBJECTIVE_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${LOG_ARGS[@]}" "$@"
echo "metrics: runs/quickstart/metrics.jsonl   tensorboard: tensorboard --logdir runs/quickstart/tensorboard"
