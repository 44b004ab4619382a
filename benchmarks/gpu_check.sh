#!/usr/bin/env bash
# Builds the CUDA extension in place and runs benchmarks/gpu_check.py (CUDA vs CPU bit-exactness, throughput).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MEGATRON_DATAEFF_CUDA=1 python setup.py -q build_ext --inplace
python benchmarks/gpu_check.py "$@"
