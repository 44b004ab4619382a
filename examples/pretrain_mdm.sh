#!/usr/bin/env bash
# Pretrain a masked-diffusion model (bidirectional, 1/t-weighted loss on masked tokens)
# in the paper's data-constrained setting: Qwen3-0.6B layout, 3B unique tokens, 120 epochs, bf16.
#
#   DATA_PATH=/data/olmo_text_document bash examples/pretrain_mdm.sh                   # one node
#   NNODES=16 NODE_RANK=$RANK MASTER_ADDR=node0 DATA_PATH=... bash examples/pretrain_mdm.sh
#   bash examples/pretrain_mdm.sh --model-preset tiny --device cpu --no-bf16 --train-iters 100
#
# Flags after the script override its defaults; environment variables: see examples/_pretrain_common.sh.
# Checkpoints go to $RUN_DIR/checkpoints and a relaunch resumes from the latest one.
set -euo pipefail
# shellcheck source=examples/_pretrain_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_pretrain_common.sh"
RUN_NAME=mdm
OBJECTIVE_ARGS=(--objective mdm --mdm-eps 1e-3)
launch "$@"
