#!/usr/bin/env bash
# Pretrain an AR model with token dropout (default: the paper's diffusion-style masked input,
# r ~ U(0, 1) per sequence; TOKEN_DROPOUT_RATE / TOKEN_DROPOUT_SCHEDULE=fixed for the ratio sweep)
# in the paper's data-constrained setting: Qwen3-0.6B layout, 3B unique tokens, 120 epochs, bf16.
#
#   DATA_PATH=/data/olmo_text_document bash examples/pretrain_token_dropout.sh                   # one node
#   NNODES=16 NODE_RANK=$RANK MASTER_ADDR=node0 DATA_PATH=... bash examples/pretrain_token_dropout.sh
#   bash examples/pretrain_token_dropout.sh --model-preset tiny --device cpu --no-bf16 --train-iters 100
#
# Flags after the script override its defaults; environment variables: see examples/_pretrain_common.sh.
# Checkpoints go to $RUN_DIR/checkpoints and a relaunch resumes from the latest one.
set -euo pipefail
# shellcheck source=examples/_pretrain_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_pretrain_common.sh"
RUN_NAME=token_dropout
OBJECTIVE_ARGS=(--objective ar --token-dropout-rate "${TOKEN_DROPOUT_RATE:-1.0}"
                --token-dropout-schedule "${TOKEN_DROPOUT_SCHEDULE:-uniform}")
launch "$@"
