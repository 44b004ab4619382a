# Shared by examples/pretrain_{ar,token_dropout,mdm}.sh: the paper's setting (Qwen3-0.6B layout, a fixed
# unique-token budget, many epochs) launched with torchrun. Sourced, not run; the caller sets
# OBJECTIVE_ARGS and RUN_NAME, then calls `launch "$@"`.
#
# Environment: GPUS_PER_NODE (default: all visible GPUs, 1 without GPUs), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (localhost), MASTER_PORT (6000), DATA_PATH (default: the embedded corpus),
# TOKENIZER_ARGS, UNIQUE_TOKENS (3e9), EPOCHS (120), RUN_DIR (runs/$RUN_NAME), TP, PP, MICRO_BATCH (4),
# RECOMPUTE (none | selective | full). On GPUs gradient reduction and parameter gathering overlap the
# backward / forward pass; with TP > 1 sequence parallelism is on. `python tools/estimate_memory.py` with
# the same flags says whether a micro-batch fits before a job is queued.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

launch() {
    local default_gpus=1 have_gpus=0
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        default_gpus=$(nvidia-smi -L | wc -l)
        have_gpus=1
    fi
    local run_dir=${RUN_DIR:-runs/$RUN_NAME}
    local DISTRIBUTED_ARGS=(--nproc_per_node "${GPUS_PER_NODE:-$default_gpus}" --nnodes "${NNODES:-1}"
                            --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-localhost}"
                            --master_port "${MASTER_PORT:-6000}")
    local MODEL_ARGS=(--model-preset qwen3-0.6b --seq-length 4096 --bf16)
    local REGULARISATION_ARGS=(--weight-decay 0.1 --hidden-dropout 0.0 --attention-dropout 0.0 --mlp-dropout 0.0)
    local DATA_ARGS=(--unique-tokens "${UNIQUE_TOKENS:-3000000000}" --epochs "${EPOCHS:-120}" --split 99,1,0)
    if [ -n "${DATA_PATH:-}" ]; then
        # shellcheck disable=SC2206
        DATA_ARGS+=(--data-path $DATA_PATH)
    fi
    local TOKENIZER=()
    read -r -a TOKENIZER <<< "${TOKENIZER_ARGS:-}"
    local TRAINING_ARGS=(--micro-batch-size "${MICRO_BATCH:-4}" --global-batch-size 2048 --lr 3e-4 --min-lr 3e-5
                         --lr-warmup-iters 1000 --lr-decay-style cosine --clip-grad 1.0 --adam-beta1 0.9
                         --adam-beta2 0.95 --seed 1234)
    local PARALLEL_ARGS=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
                         --use-distributed-optimizer)
    [ "${TP:-1}" -gt 1 ] && PARALLEL_ARGS+=(--sequence-parallel)
    [ "$have_gpus" = 1 ] && PARALLEL_ARGS+=(--overlap-grad-reduce --overlap-param-gather)
    local COMPUTE_ARGS=(--attention-backend auto)
    case "${RECOMPUTE:-none}" in
        none) ;;
        selective) COMPUTE_ARGS+=(--recompute-granularity selective) ;;
        full) COMPUTE_ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
        *) echo "RECOMPUTE must be none, selective or full, got ${RECOMPUTE}" >&2; return 2 ;;
    esac
    local LOGGING_ARGS=(--log-interval 10 --eval-interval 500 --eval-iters 20 --run-dir "$run_dir"
                        --save "$run_dir/checkpoints" --load "$run_dir/checkpoints" --save-interval 1000
                        --keep-last 3)
    exec torchrun "${DISTRIBUTED_ARGS[@]}" "$ROOT/pretrain_diffusion.py" \
        "${MODEL_ARGS[@]}" "${OBJECTIVE_ARGS[@]}" "${REGULARISATION_ARGS[@]}" "${DATA_ARGS[@]}" \
        ${TOKENIZER[@]+"${TOKENIZER[@]}"} "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${COMPUTE_ARGS[@]}" \
        "${LOGGING_ARGS[@]}" "$@"
}
