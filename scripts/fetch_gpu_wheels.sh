#!/usr/bin/env bash
# Wheels that a lent GPU machine needs to run benchmarks/gpu_check.sh: only what its image lacks. The image
# (Python 3.12, torch 2.11 + CUDA 13.0) has pytest, numpy, einops, tokenizers, sentencepiece, safetensors,
# transformers and ninja; it lacks megatron-core and psutil (which megatron-core's checkpointing imports), and
# cut-cross-entropy (the fused linear loss; pure Python over triton, which the image's torch brings).
#   bash scripts/fetch_gpu_wheels.sh                  # -> .gpu_wheels/ (git-ignored; about 3 MB)
#   EXTRA="einops pytest" bash scripts/fetch_gpu_wheels.sh   # for an image with less in it
#   PYTHON_VERSION=3.11 bash scripts/fetch_gpu_wheels.sh
# Then carry .gpu_wheels with the working tree (the device tool's `carry`); gpu_check.sh installs them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${DEST:-$ROOT/.gpu_wheels}"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DEST" "megatron-core==0.16.1" psutil "cut-cross-entropy==25.1.1" ${EXTRA:-}
ls -l "$DEST" >&2
du -sh "$DEST" >&2
