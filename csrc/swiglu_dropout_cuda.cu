// Fused SwiGLU + dropout on CUDA (forward, backward that regenerates the mask, keep mask): raw-pointer
// launchers, no torch headers.  One thread per Philox block of the global element space (4 elements).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "kernels.h"
#include "philox.h"

namespace mde {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Io {
  using C = float;
  static __device__ float load(T v) { return static_cast<float>(v); }
  static __device__ T store(float v) { return static_cast<T>(v); }
};
template <> struct Io<double> {
  using C = double;
  static __device__ double load(double v) { return v; }
  static __device__ double store(double v) { return v; }
};
template <> struct Io<__half> {
  using C = float;
  static __device__ float load(__half v) { return __half2float(v); }
  static __device__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Io<__nv_bfloat16> {
  using C = float;
  static __device__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float exp_c(float x) { return expf(x); }
__device__ __forceinline__ double exp_c(double x) { return exp(x); }

// Thread t of row `row` owns global block (base >> 2) + t; calls body(col, keep) for its columns.
template <typename Body>
__device__ __forceinline__ void for_my_columns(int64_t row, int64_t f, const DropoutParams& prm, int64_t t,
                                               Body body) {
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(prm.total_f) +
                        static_cast<uint64_t>(prm.col_offset);
  const uint64_t block = (base >> 2) + static_cast<uint64_t>(t);
  uint32_t x[4] = {0u, 0u, 0u, 0u};
  if (prm.threshold != 0) dropout_block(block, prm.call_lo, prm.call_hi, prm.k0, prm.k1, x);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t col = static_cast<int64_t>(block * 4 + q - base);
    if (block * 4 + q >= base && col < f) body(col, (x[q] >> 8) >= prm.threshold);
  }
}

template <typename T>
__global__ void fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t f,
                           int64_t blocks_per_row, DropoutParams prm) {
  using C = typename Io<T>::C;
  const C scale = static_cast<C>(prm.scale);
  const int64_t n = rows * blocks_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / blocks_per_row;
    const T* xa = x + row * 2 * f;
    const T* xb = xa + f;
    T* yr = y + row * f;
    for_my_columns(row, f, prm, i % blocks_per_row, [&](int64_t c, bool keep) {
      const C a = Io<T>::load(xa[c]), b = Io<T>::load(xb[c]);
      const C v = a / (C(1) + exp_c(-a)) * b;
      yr[c] = Io<T>::store(v * (keep ? scale : C(0)));
    });
  }
}

template <typename T>
__global__ void bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t rows,
                           int64_t f, int64_t blocks_per_row, DropoutParams prm) {
  using C = typename Io<T>::C;
  const C scale = static_cast<C>(prm.scale);
  const int64_t n = rows * blocks_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / blocks_per_row;
    const T* xa = x + row * 2 * f;
    const T* xb = xa + f;
    const T* g = dy + row * f;
    T* da = dx + row * 2 * f;
    T* db = da + f;
    for_my_columns(row, f, prm, i % blocks_per_row, [&](int64_t c, bool keep) {
      const C a = Io<T>::load(xa[c]), b = Io<T>::load(xb[c]);
      const C gk = Io<T>::load(g[c]) * (keep ? scale : C(0));
      const C sig = C(1) / (C(1) + exp_c(-a));
      da[c] = Io<T>::store(gk * b * (sig * (C(1) + a * (C(1) - sig))));
      db[c] = Io<T>::store(gk * (a * sig));
    });
  }
}

__global__ void keep_kernel(bool* __restrict__ keep, int64_t rows, int64_t f, int64_t blocks_per_row,
                            DropoutParams prm) {
  const int64_t n = rows * blocks_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / blocks_per_row;
    bool* out = keep + row * f;
    for_my_columns(row, f, prm, i % blocks_per_row, [&](int64_t c, bool k) { out[c] = k; });
  }
}

// A row of F columns starting anywhere in a block spans at most F / 4 + 2 blocks.
int64_t blocks_per_row(int64_t f) { return f / 4 + 2; }

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < MDE_MAX_GRID_X ? blocks : MDE_MAX_GRID_X);
}

const char* status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
void launch_fwd(const void* x, void* y, int64_t rows, int64_t f, const DropoutParams& prm, cudaStream_t s) {
  const int64_t bpr = blocks_per_row(f);
  MDE_LAUNCH(fwd_kernel<T>, grid_for(rows * bpr), kThreads, s, static_cast<const T*>(x), static_cast<T*>(y), rows,
             f, bpr, prm);
}

template <typename T>
void launch_bwd(const void* x, const void* dy, void* dx, int64_t rows, int64_t f, const DropoutParams& prm,
                cudaStream_t s) {
  const int64_t bpr = blocks_per_row(f);
  MDE_LAUNCH(bwd_kernel<T>, grid_for(rows * bpr), kThreads, s, static_cast<const T*>(x), static_cast<const T*>(dy),
             static_cast<T*>(dx), rows, f, bpr, prm);
}

}  // namespace

const char* swiglu_dropout_fwd_cuda(DType dtype, const void* x, void* y, int64_t rows, int64_t f,
                                    const DropoutParams& params, void* stream) {
  if (rows == 0 || f == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch_fwd<float>(x, y, rows, f, params, s); break;
    case kFloat64: launch_fwd<double>(x, y, rows, f, params, s); break;
    case kBFloat16: launch_fwd<__nv_bfloat16>(x, y, rows, f, params, s); break;
    case kFloat16: launch_fwd<__half>(x, y, rows, f, params, s); break;
  }
  return status();
}

const char* swiglu_dropout_bwd_cuda(DType dtype, const void* x, const void* dy, void* dx, int64_t rows, int64_t f,
                                    const DropoutParams& params, void* stream) {
  if (rows == 0 || f == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch_bwd<float>(x, dy, dx, rows, f, params, s); break;
    case kFloat64: launch_bwd<double>(x, dy, dx, rows, f, params, s); break;
    case kBFloat16: launch_bwd<__nv_bfloat16>(x, dy, dx, rows, f, params, s); break;
    case kFloat16: launch_bwd<__half>(x, dy, dx, rows, f, params, s); break;
  }
  return status();
}

const char* dropout_keep_cuda(bool* keep, int64_t rows, int64_t f, const DropoutParams& params, void* stream) {
  if (rows == 0 || f == 0) return nullptr;
  const int64_t bpr = blocks_per_row(f);
  MDE_LAUNCH(keep_kernel, grid_for(rows * bpr), kThreads, static_cast<cudaStream_t>(stream), keep, rows, f, bpr,
             params);
  return status();
}

}  // namespace mde
