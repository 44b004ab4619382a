#!/usr/bin/env bash
# Pretrain a autoregressive (causal, next-token loss) model,
# Qwen3-0.6B layout, in the paper's data-constrained setting (a fixed unique-token budget, many epochs).
#
#   DATA_PATH=/data/olmo_text_document bash examples/pretrain_ar.sh                   # one node
#   NNODES=16 NODE_RANK=$RANK MASTER_ADDR=node0 DATA_PATH=... bash examples/pretrain_ar.sh
#   bash examples/pretrain_ar.sh --model-preset tiny --device cpu --train-iters 100  # flags override
#
# Environment: GPUS_PER_NODE (default: all visible GPUs, 1 without GPUs), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (localhost), MASTER_PORT (6000), DATA_PATH (default: the embedded corpus),
# TOKENIZER_ARGS, UNIQUE_TOKENS (3e9), EPOCHS (120), RUN_DIR, TP, PP.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEFAULT_GPUS=$(nvidia-smi -L | wc -l)
else
    DEFAULT_GPUS=1
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-$DEFAULT_GPUS}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
RUN_DIR=${RUN_DIR:-runs/ar}

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
MODEL_ARGS=(--model-preset qwen3-0.6b --seq-length 4096 --bf16)
OBJECTIVE_ARGS=(--objective ar)
REGULARISATION_ARGS=(--weight-decay 0.1 --hidden-dropout 0.0 --attention-dropout 0.0 --mlp-dropout 0.0)
DATA_ARGS=(--unique-tokens "${UNIQUE_TOKENS:-3000000000}" --epochs "${EPOCHS:-120}" --split 99,1,0)
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS+=(--data-path $DATA_PATH); fi
read -r -a TOKENIZER <<< "${TOKENIZER_ARGS:-}"
TRAINING_ARGS=(--micro-batch-size 4 --global-batch-size 2048 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 1000
               --lr-decay-style cosine --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --seed 1234)
PARALLEL_ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
               --use-distributed-optimizer)
LOGGING_ARGS=(--log-interval 10 --eval-interval 500 --eval-iters 20 --run-dir "$RUN_DIR"
              --save "$RUN_DIR/checkpoints" --save-interval 1000 --keep-last 3)

exec torchrun "${DISTRIBUTED_ARGS[@]}" "$ROOT/pretrain_diffusion.py" \
    "${MODEL_ARGS[@]}" "${OBJECTIVE_ARGS[@]}" "${REGULARISATION_ARGS[@]}" "${DATA_ARGS[@]}" \
    ${TOKENIZER[@]+"${TOKENIZER[@]}"} "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
