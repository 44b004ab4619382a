#!/usr/bin/env bash
# The paper's grid at the paper's scale: Qwen3-0.6B layout, 3B unique tokens, 120 epochs, global
# batch 2048 x 4096, bf16, distributed optimizer; each run under torchrun on every node.
#
#   DATA_PATH=/data/olmo_text_document GPUS_PER_NODE=8 NNODES=16 NODE_RANK=$RANK MASTER_ADDR=node0 \
#       OUTPUT=/checkpoints/paper_grid bash examples/paper_grid_gpu.sh
#   bash examples/paper_grid_gpu.sh --dry-run            # print the commands only
#   bash examples/paper_grid_gpu.sh --methods ar,ar_td1.0,mdm --seeds 1,2
#
# Launch the same command on every node (runs are sequential; each node resumes/skips the same
# runs because they share OUTPUT on a shared file system).  All nodes train; node 0 alone then scores
# the checkpoints on the offline tasks and plots, while the others exit.  Environment: DATA_PATH (required for
# real runs), TOKENIZER_ARGS (e.g. "--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR"),
# GPUS_PER_NODE (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6000), TP, PP.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export GPUS_PER_NODE=${GPUS_PER_NODE:-8} NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0}
export MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-6000}
OUTPUT=${OUTPUT:-runs/paper_grid}

EXTRA=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
if [ -n "${DATA_PATH:-}" ]; then EXTRA+=(--data-path "$DATA_PATH"); fi
if [ -n "${TOKENIZER_ARGS:-}" ]; then read -r -a TOK <<< "$TOKENIZER_ARGS"; EXTRA+=("${TOK[@]}"); fi

python "$ROOT/tools/run_grid.py" --scale paper --output "$OUTPUT" --extra "${EXTRA[*]}" "$@"
if [ "$NODE_RANK" = "0" ] && [[ " $* " != *" --dry-run "* ]]; then
    python "$ROOT/tools/plot_runs.py" "$OUTPUT" --output "$OUTPUT/report"
fi
