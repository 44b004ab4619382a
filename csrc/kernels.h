// Raw-pointer entry points of the CPU kernels and CUDA launchers: no torch headers, so the .cu files
// compile with a bare `nvcc -c` and the .cpp kernels compile in seconds.  The torch-facing code is in
// binding.cpp (CPU, module megatron_dataeff._C) and binding_cuda.cpp (CUDA, megatron_dataeff._C_cuda).
#pragma once

#include <stdint.h>

namespace mde {

// Key and options of one mask_tokens call (ops/masking.py).
struct MaskParams {
  uint32_t k0, k1;          // Philox key = the seed's two 32-bit words
  int mode;                 // kModeMdm / kModeFixed / kModeUniform
  double rate, eps;
  int64_t stratify_group;   // G > 0: stratified t over groups of G sample indices
  uint32_t stream_offset;   // 0 for training, EVAL_STREAM_OFFSET for evaluation
  int64_t mask_token_id;
};

// Key and options of one swiglu_dropout call (ops/swiglu_dropout.py).
struct DropoutParams {
  uint32_t k0, k1;          // Philox key = the seed's two 32-bit words
  uint32_t call_lo, call_hi;  // the 64-bit call key (layer, iteration, micro-batch)
  uint32_t threshold;       // dropped iff (x >> 8) < threshold = ceil(p * 2^24); 0 = no dropout
  double scale;             // 1 / (1 - p) (0 when p == 1)
  int64_t col_offset;       // global column of local column 0 (tensor-parallel shard)
  int64_t total_f;          // global F: element index = row * total_f + col_offset + col
};

// Element types of the SwiGLU kernels.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// ---- CPU (OpenMP) ----
// counters [n, 4] -> out [n, 4]
void philox_cpu(const uint32_t* counters, int64_t n, uint32_t k0, uint32_t k1, uint32_t* out);
// tokens/ids [batch, seq], mask/weight [batch, seq], rate [batch].  Returns -1, or the position of the
// first negative sample index (then nothing is written).
int64_t mask_tokens_cpu_i32(const int32_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                            const MaskParams& params, int32_t* ids, bool* mask, float* weight, float* rate);
int64_t mask_tokens_cpu_i64(const int64_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                            const MaskParams& params, int64_t* ids, bool* mask, float* weight, float* rate);
// x [rows, 2f] -> y [rows, f]
void swiglu_dropout_fwd_cpu(DType dtype, const void* x, void* y, int64_t rows, int64_t f,
                            const DropoutParams& params);
// x [rows, 2f], dy [rows, f] -> dx [rows, 2f]
void swiglu_dropout_bwd_cpu(DType dtype, const void* x, const void* dy, void* dx, int64_t rows, int64_t f,
                            const DropoutParams& params);
// keep [rows, f]: true where the element is kept
void dropout_keep_cpu(bool* keep, int64_t rows, int64_t f, const DropoutParams& params);

// ---- CUDA launchers (csrc/*.cu), asynchronous on `stream` (a cudaStream_t).  They return nullptr, or
// the CUDA error message of the launch. ----
const char* philox_cuda(const uint32_t* counters, int64_t n, uint32_t k0, uint32_t k1, uint32_t* out,
                        void* stream);
const char* mask_tokens_cuda_i32(const int32_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                                 const MaskParams& params, int32_t* ids, bool* mask, float* weight,
                                 float* rate, void* stream);
const char* mask_tokens_cuda_i64(const int64_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                                 const MaskParams& params, int64_t* ids, bool* mask, float* weight,
                                 float* rate, void* stream);
const char* swiglu_dropout_fwd_cuda(DType dtype, const void* x, void* y, int64_t rows, int64_t f,
                                    const DropoutParams& params, void* stream);
const char* swiglu_dropout_bwd_cuda(DType dtype, const void* x, const void* dy, void* dx, int64_t rows,
                                    int64_t f, const DropoutParams& params, void* stream);
const char* dropout_keep_cuda(bool* keep, int64_t rows, int64_t f, const DropoutParams& params, void* stream);

}  // namespace mde
