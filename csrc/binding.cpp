// megatron_dataeff._C: the CPU kernels for torch (pybind11 through torch.utils.cpp_extension).
// Called from megatron_dataeff/ops/{masking,swiglu_dropout}.py, which check arguments and dispatch.
#include "binding_common.h"

namespace mde {
namespace {

at::Tensor philox(const at::Tensor& counters, int64_t k0, int64_t k1) {
  TORCH_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4, "counters must be [n, 4]");
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kLong, "counters must be int64 holding uint32 values");
  TORCH_CHECK_VALUE(counters.device().is_cpu(), "counters must be on the CPU");
  auto c = counters.contiguous();
  const int64_t n = c.size(0);
  TORCH_CHECK_VALUE(n == 0 || (c.min().item<int64_t>() >= 0 && c.max().item<int64_t>() <= 0xFFFFFFFF),
                    "counters must hold uint32 values");
  auto c32 = c.to(at::kInt);  // same bits as uint32
  auto out = at::empty({n, 4}, c32.options());
  philox_cpu(reinterpret_cast<const uint32_t*>(c32.data_ptr<int32_t>()), n, word32(k0, "key0"), word32(k1, "key1"),
             reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()));
  return out.to(at::kLong).bitwise_and_(0xFFFFFFFFLL);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_tokens(
    const at::Tensor& tokens_in, const at::Tensor& index_in, int64_t k0, int64_t k1, int64_t mode, double rate,
    double eps, int64_t mask_token_id, int64_t stratify_group, int64_t stream_offset) {
  check_mask_inputs(tokens_in, index_in);
  TORCH_CHECK_VALUE(tokens_in.device().is_cpu(), "megatron_dataeff._C.mask_tokens takes CPU tensors");
  const MaskParams prm = mask_params(tokens_in, k0, k1, mode, rate, eps, mask_token_id, stratify_group,
                                     stream_offset);
  const auto tokens = tokens_in.contiguous();
  const auto index = index_in.contiguous();
  auto out = mask_outputs(tokens);
  auto& [ids, mask, weight, p] = out;
  const int64_t b = tokens.size(0), s = tokens.size(1);
  int64_t bad;
  {
    pybind11::gil_scoped_release no_gil;
    if (tokens.scalar_type() == at::kInt) {
      bad = mask_tokens_cpu_i32(tokens.data_ptr<int32_t>(), index.data_ptr<int64_t>(), b, s, prm,
                                ids.data_ptr<int32_t>(), mask.data_ptr<bool>(), weight.data_ptr<float>(),
                                p.data_ptr<float>());
    } else {
      bad = mask_tokens_cpu_i64(tokens.data_ptr<int64_t>(), index.data_ptr<int64_t>(), b, s, prm,
                                ids.data_ptr<int64_t>(), mask.data_ptr<bool>(), weight.data_ptr<float>(),
                                p.data_ptr<float>());
    }
  }
  TORCH_CHECK_VALUE(bad < 0, "stream indices must be non-negative (sample_index[", bad, "] < 0)");
  return out;
}

at::Tensor swiglu_fwd(const at::Tensor& x, int64_t k0, int64_t k1, int64_t call_lo, int64_t call_hi,
                      int64_t threshold, double scale, int64_t col_offset, int64_t total_f) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "megatron_dataeff._C takes CPU tensors");
  const int64_t f = check_swiglu_input(x);
  const DropoutParams prm = dropout_params(k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f, f);
  auto y = at::empty({x.size(0), f}, x.options());
  pybind11::gil_scoped_release no_gil;
  swiglu_dropout_fwd_cpu(dtype_of(x), x.data_ptr(), y.data_ptr(), x.size(0), f, prm);
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& x, const at::Tensor& dy, int64_t k0, int64_t k1, int64_t call_lo,
                      int64_t call_hi, int64_t threshold, double scale, int64_t col_offset, int64_t total_f) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && dy.device().is_cpu(), "megatron_dataeff._C takes CPU tensors");
  const int64_t f = check_swiglu_input(x);
  TORCH_CHECK_VALUE(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == f && dy.is_contiguous() &&
                        dy.scalar_type() == x.scalar_type(),
                    "dy must be contiguous [rows, F] of x's dtype");
  const DropoutParams prm = dropout_params(k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f, f);
  auto dx = at::empty_like(x);
  pybind11::gil_scoped_release no_gil;
  swiglu_dropout_bwd_cpu(dtype_of(x), x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.size(0), f, prm);
  return dx;
}

at::Tensor keep_mask(int64_t rows, int64_t f, int64_t k0, int64_t k1, int64_t call_lo, int64_t call_hi,
                     int64_t threshold, int64_t col_offset, int64_t total_f) {
  TORCH_CHECK_VALUE(rows >= 0 && f >= 0, "rows and F must be >= 0");
  const DropoutParams prm = dropout_params(k0, k1, call_lo, call_hi, threshold, 1.0, col_offset, total_f, f);
  auto keep = at::empty({rows, f}, at::TensorOptions().dtype(at::kBool));
  pybind11::gil_scoped_release no_gil;
  dropout_keep_cpu(keep.data_ptr<bool>(), rows, f, prm);
  return keep;
}

}  // namespace
}  // namespace mde

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_dataeff CPU kernels: Philox4x32-10, token masking, fused SwiGLU + dropout";
  m.def("philox4x32", &mde::philox, "Philox4x32-10 of counters [n, 4] (int64 holding uint32) with key (k0, k1)");
  m.def("mask_tokens", &mde::mask_tokens, "(ids, mask, weight, rate) of ops.masking.mask_tokens");
  m.def("swiglu_dropout_forward", &mde::swiglu_fwd, "dropout(silu(a) * b) of x = [a | b] [rows, 2F]");
  m.def("swiglu_dropout_backward", &mde::swiglu_bwd, "dx [rows, 2F] of swiglu_dropout_forward given dy [rows, F]");
  m.def("dropout_keep_mask", &mde::keep_mask, "bool [rows, F]: the elements swiglu_dropout keeps");
}
