#!/usr/bin/env bash
# Every check that needs a GPU, as one script for a lent GPU machine (no network there; about 11 minutes,
# step 7 about 3 of them):
#   bash scripts/fetch_gpu_wheels.sh          # beforehand, where pip can reach the registry (megatron-core, psutil)
#   bash benchmarks/gpu_check.sh [OUT_DIR]    # on the GPU machine, with .gpu_wheels carried along
# Steps (STEPS="1 2 3" runs a subset; step 0 always runs):
#   0. a GPU must be visible (else exit 2 with the reason);
#   1. install the carried wheels the image lacks (into .gpu_site, on PYTHONPATH; nothing system-wide);
#   2. build megatron_dataeff._C and _C_cuda in place for this GPU's architecture only, then a hard check:
#      _C_cuda imports and the dispatcher uses it, else the build log's tail and exit 1;
#   3. benchmarks/gpu_check.py: kernels bit-exact vs the references; masking vs the measured copy bandwidth;
#   4. the kernel tests on the device (pytest -rs: a skipped CUDA case fails the step), bench_masking and
#      bench_mlp_dropout on cuda;
#   5. benchmarks/gpu_train_check.py: bf16 training (ar, token dropout, mdm), exact resume, device vs CPU,
#      packed documents (auto: transformer-engine's THD or FlexAttention, against sdpa's dense mask);
#   6. benchmarks/bench_paper_model.py: qwen3-0.6b at seq 4096, sdpa vs unfused, with/without selective
#      recomputation: tokens/s, TFLOP/s, MFU (goal >= 45%), peak memory, largest micro-batch;
#   7. figures without goals yet, logged: packed-document masks at qwen3-0.6b's attention shape (FlexAttention
#      vs sdpa with a dense mask vs causal), the losses' time and memory at the paper's vocabulary (what
#      models/loss_choice.py decides between; with the output layer, Cut Cross-Entropy's fused linear loss where
#      installed), and the objectives' step times (block diffusion vs mdm vs AR).
# What comes back (at most 8 files, two folders deep): OUT_DIR/gpu_summary.json (every figure with its goal
# and pass/fail, every step's exit status and time), OUT_DIR/gpu_check.log (everything printed) and
# OUT_DIR/gpu_check_runs.tar.gz (step logs, figure files, run records). Run folders live under /tmp.
# Exit status: 0 when every step ran and every judged figure met its goal, 1 otherwise, 2 without a GPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu_check_out}}"
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
STEPS="${STEPS:-1 2 3 4 5 6 7}"
mkdir -p "$OUT_DIR" "$WORK"
: > "$WORK/steps.tsv"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONPATH="$PWD/.gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

step() {  # step N NAME COMMAND...: run it, its output to WORK/NAME.txt and the log, its status to steps.tsv
    local n="$1" name="$2"; shift 2
    [[ " $STEPS " == *" $n "* ]] || return 0
    echo "=== $n. $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$WORK/$name.txt"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$WORK/steps.tsv"
    echo "=== $n. $name: exit $rc in $((SECONDS - t0)) s"
}

finish() {
    tar czf "$OUT_DIR/gpu_check_runs.tar.gz" -C "$WORK" --exclude='*/checkpoints' --exclude='resume_ckpt' . \
        2>/dev/null || true
    "$PY" benchmarks/gpu_summary.py "$WORK" --out "$OUT_DIR/gpu_summary.json"
    exit $?
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no GPU visible (torch.cuda.is_available() is False, or torch is missing): nothing was checked"
    exit 2
fi
(nvidia-smi; nvcc --version; "$PY" --version) > "$WORK/machine.txt" 2>&1

install_wheels() {
    local missing=()
    for pair in megatron.core:megatron_core psutil:psutil einops:einops safetensors:safetensors \
                sentencepiece:sentencepiece tokenizers:tokenizers pytest:pytest cut_cross_entropy:cut_cross_entropy; do
        "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=(.gpu_wheels/"${pair##*:}"-*.whl)
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ -d .gpu_wheels ] || { echo "missing ${missing[*]} and no .gpu_wheels: run scripts/fetch_gpu_wheels.sh"; return 1; }
        "$PY" -m pip install -q --no-index --no-deps --target .gpu_site "${missing[@]}" || return 1
    fi
    "$PY" -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
}

build() {
    local arch
    arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
    echo "building for sm_${arch/./} only"
    TORCH_CUDA_ARCH_LIST="$arch" MEGATRON_DATAEFF_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1
    local rc=$?
    if ! "$PY" -c "
import sys
from megatron_dataeff.ops import extension
impl = extension.implementation('cuda')
print('dispatcher: cuda ->', impl, '| cpu ->', extension.implementation('cpu'))
sys.exit(0 if impl == 'cuda' else 1)"; then
        echo "megatron_dataeff._C_cuda is not in use after the build (setup.py exit $rc); build log tail:"
        tail -n 40 "$WORK/build.log"
        return 1
    fi
}

kernel_tests() {
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_masking_kernel.py tests/test_swiglu_dropout.py \
        tests/test_philox.py > "$WORK/kernel_tests.log" 2>&1
    local rc=$?
    cat "$WORK/kernel_tests.log"
    if grep -E "^SKIPPED .*(_C_cuda|GPU|cuda)" "$WORK/kernel_tests.log"; then
        echo "CUDA test cases were skipped: the device was not tested"
        return 1
    fi
    return $rc
}

step 1 install install_wheels
step 2 build build
step 3 kernels "$PY" benchmarks/gpu_check.py --json "$WORK/kernels.json"
step 4 kernel_tests kernel_tests
step 4 bench_masking "$PY" benchmarks/bench_masking.py --device cuda --shapes 8x4096,64x8192,256x32768 --json
step 4 bench_mlp_dropout "$PY" benchmarks/bench_mlp_dropout.py --device cuda --dtype bfloat16 --tokens 16384 --ffn 14336
step 5 train "$PY" benchmarks/gpu_train_check.py --out "$WORK/train_runs" --json "$WORK/train.json"
step 6 paper_model "$PY" benchmarks/bench_paper_model.py --attention-backends sdpa,local --recompute none,selective \
    --steps 3 --warmup 1 --accumulation 2 --json-out "$WORK/paper_model.json"
step 7 attention_masks "$PY" benchmarks/bench_attention_masks.py --device cuda --seq 4096 --heads 16 --groups 8 \
    --head-dim 128 --batch 4 --dtype bf16 --rounds 3
step 7 loss_choice "$PY" benchmarks/bench_loss_memory.py --device cuda --sizes 4096x151936,16384x151936 --dtype bf16
step 7 linear_loss "$PY" benchmarks/bench_loss_memory.py --device cuda --hidden 1024 --tokens 16384 --vocab 151936
step 7 objectives "$PY" benchmarks/bench_objectives.py --device cuda --rounds 3
finish
