// C entry points to the emulated CUDA launchers (see cuda_runtime.h here), for ctypes in
// tests/test_cuda_emulation.py.  Each returns 0, or 1 after printing the launch error.
#include <cstdio>

#include "../kernels.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace {
int check(const char* err) {
  if (err == nullptr) return 0;
  std::fprintf(stderr, "emulated launch failed: %s\n", err);
  return 1;
}
mde::MaskParams mask_params(uint32_t k0, uint32_t k1, int mode, double rate, double eps, int64_t stratify_group,
                            uint32_t stream_offset, int64_t mask_token_id) {
  return mde::MaskParams{k0, k1, mode, rate, eps, stratify_group, stream_offset, mask_token_id};
}
mde::DropoutParams dropout_params(uint32_t k0, uint32_t k1, uint32_t call_lo, uint32_t call_hi, uint32_t threshold,
                                  double scale, int64_t col_offset, int64_t total_f) {
  return mde::DropoutParams{k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f};
}
}  // namespace

extern "C" {

int emu_philox(const uint32_t* counters, int64_t n, uint32_t k0, uint32_t k1, uint32_t* out) {
  return check(mde::philox_cuda(counters, n, k0, k1, out, nullptr));
}

int emu_mask_tokens(int tok_bits, const void* tokens, const int64_t* index, int64_t batch, int64_t seq, uint32_t k0,
                    uint32_t k1, int mode, double rate, double eps, int64_t stratify_group, uint32_t stream_offset,
                    int64_t mask_token_id, void* ids, bool* mask, float* weight, float* rates) {
  const mde::MaskParams p = mask_params(k0, k1, mode, rate, eps, stratify_group, stream_offset, mask_token_id);
  if (tok_bits == 32)
    return check(mde::mask_tokens_cuda_i32(static_cast<const int32_t*>(tokens), index, batch, seq, p,
                                           static_cast<int32_t*>(ids), mask, weight, rates, nullptr));
  return check(mde::mask_tokens_cuda_i64(static_cast<const int64_t*>(tokens), index, batch, seq, p,
                                         static_cast<int64_t*>(ids), mask, weight, rates, nullptr));
}

int emu_swiglu_fwd(int dtype, const void* x, void* y, int64_t rows, int64_t f, uint32_t k0, uint32_t k1,
                   uint32_t call_lo, uint32_t call_hi, uint32_t threshold, double scale, int64_t col_offset,
                   int64_t total_f) {
  const mde::DropoutParams p = dropout_params(k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f);
  return check(mde::swiglu_dropout_fwd_cuda(static_cast<mde::DType>(dtype), x, y, rows, f, p, nullptr));
}

int emu_swiglu_bwd(int dtype, const void* x, const void* dy, void* dx, int64_t rows, int64_t f, uint32_t k0,
                   uint32_t k1, uint32_t call_lo, uint32_t call_hi, uint32_t threshold, double scale,
                   int64_t col_offset, int64_t total_f) {
  const mde::DropoutParams p = dropout_params(k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f);
  return check(mde::swiglu_dropout_bwd_cuda(static_cast<mde::DType>(dtype), x, dy, dx, rows, f, p, nullptr));
}

int emu_dropout_keep(bool* keep, int64_t rows, int64_t f, uint32_t k0, uint32_t k1, uint32_t call_lo,
                     uint32_t call_hi, uint32_t threshold, double scale, int64_t col_offset, int64_t total_f) {
  const mde::DropoutParams p = dropout_params(k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f);
  return check(mde::dropout_keep_cuda(keep, rows, f, p, nullptr));
}

// The emulated conversions, checked against torch's: float32 -> binary16 / bfloat16 bits.
void emu_float_to_half(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(x[i]).bits;
}
void emu_float_to_bfloat16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(x[i]).bits;
}
void emu_half_to_float(const uint16_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{x[i]});
}

}  // extern "C"
