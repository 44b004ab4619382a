#!/usr/bin/env bash
# Every check that needs a GPU, as one script for a lent GPU machine (no network there):
#   bash scripts/fetch_gpu_wheels.sh          # beforehand, where pip can reach the registry
#   bash benchmarks/gpu_check.sh [OUT_DIR]    # on the GPU machine, with .gpu_wheels carried along
# 1. installs the carried wheels that are missing (into .gpu_site, on PYTHONPATH; nothing system-wide);
# 2. builds megatron_dataeff._C and _C_cuda in place;
# 3. benchmarks/gpu_check.py: CUDA kernels vs the CPU kernels / references, bit for bit; HBM bandwidth;
# 4. the kernel tests on the device (pytest, CUDA parametrisations), bench_masking / bench_mlp_dropout on cuda;
# 5. benchmarks/gpu_train_check.py: bf16 training, run-to-run and resume differences, GPU vs CPU.
# Each step's output goes to OUT_DIR (default $OUT, else /tmp/gpu_check); the script goes on after a
# failed step and exits 1 at the end if any failed.  STEPS="1 2 3" runs a subset.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu_check}}"
STEPS="${STEPS:-1 2 3 4 5}"
mkdir -p "$OUT_DIR"
FAILED=()
step() {  # step N NAME COMMAND...: run, tee to OUT_DIR/NAME.txt, record a failure
    local n="$1" name="$2"; shift 2
    [[ " $STEPS " == *" $n "* ]] || return 0
    echo "=== $n. $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $n. $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || FAILED+=("$name")
}

install_wheels() {
    python -c "import numpy" 2>/dev/null || python -m pip install -q --no-index --no-deps --target .gpu_site .gpu_wheels/numpy-*.whl
    local missing=()
    for pair in megatron.core:megatron_core einops:einops safetensors:safetensors sentencepiece:sentencepiece \
                tokenizers:tokenizers psutil:psutil packaging:packaging pytest:pytest pluggy:pluggy iniconfig:iniconfig; do
        python -c "import ${pair%%:*}" 2>/dev/null || missing+=(.gpu_wheels/"${pair##*:}"-*.whl)
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ -d .gpu_wheels ] || { echo "missing modules and no .gpu_wheels: run scripts/fetch_gpu_wheels.sh"; return 1; }
        python -m pip install -q --no-index --no-deps --target .gpu_site "${missing[@]}"
    fi
    python -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
}
export PYTHONPATH="$PWD/.gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

(nvidia-smi; nvcc --version; python --version) > "$OUT_DIR/machine.txt" 2>&1
step 1 install install_wheels
step 2 build env MEGATRON_DATAEFF_CUDA=1 python setup.py -q build_ext --inplace
step 3 kernels python benchmarks/gpu_check.py
step 4 kernel_tests python -m pytest -q -p no:cacheprovider tests/test_masking_kernel.py tests/test_swiglu_dropout.py tests/test_philox.py
step 4 bench_masking python benchmarks/bench_masking.py --device cuda --shapes 8x4096,64x8192,256x32768 --json
step 4 bench_mlp_dropout python benchmarks/bench_mlp_dropout.py --device cuda --dtype bfloat16 --tokens 16384 --ffn 14336
step 5 train python benchmarks/gpu_train_check.py --out "$OUT_DIR/train_runs"
cp "$OUT_DIR/train_runs/gpu_train_check.json" "$OUT_DIR/" 2>/dev/null || true
rm -rf "$OUT_DIR/train_runs"/*/checkpoints "$OUT_DIR/train_runs/resume_ckpt"

if [ ${#FAILED[@]} -gt 0 ]; then echo "FAILED: ${FAILED[*]}"; exit 1; fi
echo "all GPU checks passed"
