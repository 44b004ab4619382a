// Token masking and raw Philox on CUDA: raw-pointer launchers, no torch headers (compiles with `nvcc -c`).
// Bit-identical to megatron_dataeff.ops.masking.mask_tokens_reference: the rate arithmetic of philox.h
// uses __dmul_rn / __dadd_rn / __ddiv_rn, which nvcc never contracts into FMAs.
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "kernels.h"
#include "philox.h"

namespace mde {
namespace {

constexpr int kThreads = 256;  // one Philox block (4 tokens) per thread: 1024 tokens per CUDA block

__global__ void philox_kernel(const uint32_t* __restrict__ counters, int64_t n, uint32_t k0, uint32_t k1,
                              uint32_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t c[4] = {counters[4 * i], counters[4 * i + 1], counters[4 * i + 2], counters[4 * i + 3]};
    philox4x32_10(c, k0, k1);
    for (int q = 0; q < 4; ++q) out[4 * i + q] = c[q];
  }
}

// grid (ceil(seq / 1024), rows in grid-stride over y); thread 0 of each CUDA block draws the row's rate.
template <typename Tok>
__global__ void mask_kernel(const Tok* __restrict__ tokens, const int64_t* __restrict__ index, int64_t batch,
                            int64_t seq, MaskParams prm, Tok* __restrict__ ids, bool* __restrict__ mask,
                            float* __restrict__ weight, float* __restrict__ rate) {
  __shared__ float s_p, s_w;
  const int64_t j0 = (blockIdx.x * int64_t(kThreads) + threadIdx.x) * 4;
  for (int64_t row = blockIdx.y; row < batch; row += gridDim.y) {
    const int64_t idx = index[row];
    if (threadIdx.x == 0) {
      const float p = mask_rate(idx, prm.k0, prm.k1, prm.stream_offset, prm.mode, prm.rate, prm.eps,
                                prm.stratify_group);
      s_p = p;
      s_w = fdiv(1.0f, p);
      if (blockIdx.x == 0) rate[row] = p;
    }
    __syncthreads();
    const float p = s_p, w = s_w;
    if (j0 < seq) {
      const uint64_t uidx = static_cast<uint64_t>(idx);
      uint32_t c[4] = {static_cast<uint32_t>(j0 / 4), static_cast<uint32_t>(uidx), static_cast<uint32_t>(uidx >> 32),
                       kStreamToken + prm.stream_offset};
      philox4x32_10(c, prm.k0, prm.k1);
      const int64_t off = row * seq + j0;
      const Tok mask_id = static_cast<Tok>(prm.mask_token_id);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (j0 + q < seq) {
          const bool m = to_uniform(c[q]) < p;
          ids[off + q] = m ? mask_id : tokens[off + q];
          mask[off + q] = m;
          weight[off + q] = m ? w : 0.0f;
        }
      }
    }
    __syncthreads();  // s_p is rewritten for the next row
  }
}

const char* status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename Tok>
const char* launch_mask(const Tok* tokens, const int64_t* index, int64_t batch, int64_t seq, const MaskParams& prm,
                        Tok* ids, bool* mask, float* weight, float* rate, void* stream) {
  if (batch == 0) return nullptr;
  const int64_t per_block = 4 * kThreads;
  // Every row needs one CUDA block even when seq == 0, to write its rate.
  const unsigned gx = static_cast<unsigned>(seq > 0 ? (seq + per_block - 1) / per_block : 1);
  const unsigned gy = static_cast<unsigned>(batch < MDE_MAX_GRID_Y ? batch : MDE_MAX_GRID_Y);
  MDE_LAUNCH(mask_kernel<Tok>, dim3(gx, gy), kThreads, static_cast<cudaStream_t>(stream), tokens, index, batch,
             seq, prm, ids, mask, weight, rate);
  return status();
}

}  // namespace

const char* philox_cuda(const uint32_t* counters, int64_t n, uint32_t k0, uint32_t k1, uint32_t* out,
                        void* stream) {
  if (n == 0) return nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  MDE_LAUNCH(philox_kernel, static_cast<unsigned>(blocks < MDE_MAX_GRID_X ? blocks : MDE_MAX_GRID_X), kThreads,
             static_cast<cudaStream_t>(stream), counters, n, k0, k1, out);
  return status();
}

const char* mask_tokens_cuda_i32(const int32_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                                 const MaskParams& params, int32_t* ids, bool* mask, float* weight, float* rate,
                                 void* stream) {
  return launch_mask(tokens, index, batch, seq, params, ids, mask, weight, rate, stream);
}

const char* mask_tokens_cuda_i64(const int64_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                                 const MaskParams& params, int64_t* ids, bool* mask, float* weight, float* rate,
                                 void* stream) {
  return launch_mask(tokens, index, batch, seq, params, ids, mask, weight, rate, stream);
}

}  // namespace mde
