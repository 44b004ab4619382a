#!/usr/bin/env bash
# Wheels that a lent GPU machine (Python 3.12, a CUDA build of torch, no network) needs to run
# benchmarks/gpu_check.sh: megatron-core and this package's pure dependencies, plus pytest.
#   bash scripts/fetch_gpu_wheels.sh                  # -> .gpu_wheels/ (git-ignored; about 30 MB)
#   PYTHON_VERSION=3.11 bash scripts/fetch_gpu_wheels.sh
# Then carry .gpu_wheels with the working tree (the device tool's `carry`); gpu_check.sh installs them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${DEST:-$ROOT/.gpu_wheels}"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DEST" "megatron-core==0.16.1" einops safetensors sentencepiece tokenizers psutil numpy packaging \
    pytest pluggy iniconfig
ls -l "$DEST" >&2
du -sh "$DEST" >&2
