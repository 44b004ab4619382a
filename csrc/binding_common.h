// Argument checks and parameter packing shared by binding.cpp (CPU) and binding_cuda.cpp (CUDA).  The
// Python wrappers (megatron_dataeff/ops) check arguments first; these checks keep a direct call safe.
#pragma once

#include <torch/extension.h>

#include <limits>
#include <tuple>

#include "kernels.h"
#include "philox.h"

namespace mde {

inline uint32_t word32(int64_t v, const char* name) {
  TORCH_CHECK_VALUE(v >= 0 && v <= int64_t(0xFFFFFFFF), name, " must be a 32-bit word, got ", v);
  return static_cast<uint32_t>(v);
}

inline MaskParams mask_params(const at::Tensor& tokens, int64_t k0, int64_t k1, int64_t mode, double rate,
                              double eps, int64_t mask_token_id, int64_t stratify_group, int64_t stream_offset) {
  TORCH_CHECK_VALUE(mode == kModeMdm || mode == kModeFixed || mode == kModeUniform, "unknown mode ", mode);
  TORCH_CHECK_VALUE(rate >= 0.0 && rate <= 1.0, "rate must be in [0, 1], got ", rate);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < 1.0, "eps must be in [0, 1), got ", eps);
  TORCH_CHECK_VALUE(mode != kModeMdm || eps < rate, "mdm rates lie in [eps, rate): eps ", eps, " must be below rate ",
                    rate);
  TORCH_CHECK_VALUE(stratify_group >= 0, "stratify_group must be >= 0");
  TORCH_CHECK_VALUE(stream_offset >= 0 && stream_offset <= int64_t(0xFFFFFFFF) - kStreamRate,
                    "stream_offset out of range: ", stream_offset);
  const int64_t max_id = tokens.scalar_type() == at::kInt ? std::numeric_limits<int32_t>::max()
                                                          : std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(mask_token_id >= 0 && mask_token_id <= max_id, "mask_token_id ", mask_token_id,
                    " does not fit the token dtype");
  MaskParams p;
  p.k0 = word32(k0, "key0");
  p.k1 = word32(k1, "key1");
  p.mode = static_cast<int>(mode);
  p.rate = rate;
  p.eps = eps;
  p.stratify_group = stratify_group;
  p.stream_offset = static_cast<uint32_t>(stream_offset);
  p.mask_token_id = mask_token_id;
  return p;
}

inline void check_mask_inputs(const at::Tensor& tokens, const at::Tensor& index) {
  TORCH_CHECK_VALUE(tokens.dim() == 2, "tokens must be [batch, seq]");
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kInt || tokens.scalar_type() == at::kLong,
                   "tokens must be int32 or int64, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == tokens.size(0), "sample_index must be [batch]");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "sample_index must be int64");
  TORCH_CHECK_VALUE(index.device() == tokens.device(), "sample_index must be on the device of tokens");
}

// (ids, mask, weight, rate) outputs of a mask_tokens call.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_outputs(const at::Tensor& tokens) {
  const auto b = tokens.size(0), s = tokens.size(1);
  auto opts = tokens.options();
  return {at::empty({b, s}, opts), at::empty({b, s}, opts.dtype(at::kBool)),
          at::empty({b, s}, opts.dtype(at::kFloat)), at::empty({b}, opts.dtype(at::kFloat))};
}

inline DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: TORCH_CHECK_TYPE(false, "swiglu_dropout supports float32/float64/bfloat16/float16, got ", x.scalar_type());
  }
  return kFloat32;
}

inline DropoutParams dropout_params(int64_t k0, int64_t k1, int64_t call_lo, int64_t call_hi, int64_t threshold,
                                    double scale, int64_t col_offset, int64_t total_f, int64_t f) {
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= (int64_t(1) << 24), "threshold must be in [0, 2^24]");
  TORCH_CHECK_VALUE(col_offset >= 0 && total_f >= col_offset + f, "need 0 <= col_offset and col_offset + F <= total_F");
  DropoutParams p;
  p.k0 = word32(k0, "key0");
  p.k1 = word32(k1, "key1");
  p.call_lo = word32(call_lo, "call_key lo");
  p.call_hi = word32(call_hi, "call_key hi");
  p.threshold = static_cast<uint32_t>(threshold);
  p.scale = scale;
  p.col_offset = col_offset;
  p.total_f = total_f;
  return p;
}

// x [rows, 2F] contiguous floating -> F
inline int64_t check_swiglu_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [rows, 2F]");
  TORCH_CHECK_VALUE(x.is_contiguous(), "x must be contiguous");
  dtype_of(x);
  return x.size(1) / 2;
}

}  // namespace mde
