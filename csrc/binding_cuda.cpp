// megatron_dataeff._C_cuda: the CUDA launchers of csrc/*.cu for torch.  No CUDA headers here: the caller
// passes the raw cudaStream_t (torch.cuda.current_stream().cuda_stream) and has set the current device,
// so this file compiles against any torch build.
#include "binding_common.h"

namespace mde {
namespace {

void check(const char* err, const char* what) { TORCH_CHECK(err == nullptr, what, ": CUDA error: ", err); }

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

at::Tensor philox(const at::Tensor& counters, int64_t k0, int64_t k1, int64_t stream) {
  TORCH_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4, "counters must be [n, 4]");
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kLong, "counters must be int64 holding uint32 values");
  TORCH_CHECK_VALUE(counters.is_cuda(), "counters must be on a CUDA device");
  auto c32 = counters.contiguous().to(at::kInt);  // same bits as uint32 for values < 2^32
  auto out = at::empty_like(c32);
  check(philox_cuda(reinterpret_cast<const uint32_t*>(c32.data_ptr<int32_t>()), c32.size(0), word32(k0, "key0"),
                    word32(k1, "key1"), reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), as_stream(stream)),
        "philox4x32");
  return out.to(at::kLong).bitwise_and_(0xFFFFFFFFLL);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_tokens(
    const at::Tensor& tokens_in, const at::Tensor& index_in, int64_t k0, int64_t k1, int64_t mode, double rate,
    double eps, int64_t mask_token_id, int64_t stratify_group, int64_t stream_offset, int64_t stream) {
  check_mask_inputs(tokens_in, index_in);
  TORCH_CHECK_VALUE(tokens_in.is_cuda(), "megatron_dataeff._C_cuda.mask_tokens takes CUDA tensors");
  const MaskParams prm = mask_params(tokens_in, k0, k1, mode, rate, eps, mask_token_id, stratify_group,
                                     stream_offset);
  const auto tokens = tokens_in.contiguous();
  const auto index = index_in.contiguous();
  auto out = mask_outputs(tokens);
  auto& [ids, mask, weight, p] = out;
  const int64_t b = tokens.size(0), s = tokens.size(1);
  const char* err;
  if (tokens.scalar_type() == at::kInt) {
    err = mask_tokens_cuda_i32(tokens.data_ptr<int32_t>(), index.data_ptr<int64_t>(), b, s, prm,
                               ids.data_ptr<int32_t>(), mask.data_ptr<bool>(), weight.data_ptr<float>(),
                               p.data_ptr<float>(), as_stream(stream));
  } else {
    err = mask_tokens_cuda_i64(tokens.data_ptr<int64_t>(), index.data_ptr<int64_t>(), b, s, prm,
                               ids.data_ptr<int64_t>(), mask.data_ptr<bool>(), weight.data_ptr<float>(),
                               p.data_ptr<float>(), as_stream(stream));
  }
  check(err, "mask_tokens");
  return out;
}

at::Tensor swiglu_fwd(const at::Tensor& x, int64_t k0, int64_t k1, int64_t call_lo, int64_t call_hi,
                      int64_t threshold, double scale, int64_t col_offset, int64_t total_f, int64_t stream) {
  TORCH_CHECK_VALUE(x.is_cuda(), "megatron_dataeff._C_cuda takes CUDA tensors");
  const int64_t f = check_swiglu_input(x);
  const DropoutParams prm = dropout_params(k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f, f);
  auto y = at::empty({x.size(0), f}, x.options());
  check(swiglu_dropout_fwd_cuda(dtype_of(x), x.data_ptr(), y.data_ptr(), x.size(0), f, prm, as_stream(stream)),
        "swiglu_dropout_forward");
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& x, const at::Tensor& dy, int64_t k0, int64_t k1, int64_t call_lo,
                      int64_t call_hi, int64_t threshold, double scale, int64_t col_offset, int64_t total_f,
                      int64_t stream) {
  TORCH_CHECK_VALUE(x.is_cuda() && dy.device() == x.device(), "x and dy must be on one CUDA device");
  const int64_t f = check_swiglu_input(x);
  TORCH_CHECK_VALUE(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == f && dy.is_contiguous() &&
                        dy.scalar_type() == x.scalar_type(),
                    "dy must be contiguous [rows, F] of x's dtype");
  const DropoutParams prm = dropout_params(k0, k1, call_lo, call_hi, threshold, scale, col_offset, total_f, f);
  auto dx = at::empty_like(x);
  check(swiglu_dropout_bwd_cuda(dtype_of(x), x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.size(0), f, prm,
                                as_stream(stream)),
        "swiglu_dropout_backward");
  return dx;
}

at::Tensor keep_mask(int64_t rows, int64_t f, int64_t k0, int64_t k1, int64_t call_lo, int64_t call_hi,
                     int64_t threshold, int64_t col_offset, int64_t total_f, int64_t stream) {
  TORCH_CHECK_VALUE(rows >= 0 && f >= 0, "rows and F must be >= 0");
  const DropoutParams prm = dropout_params(k0, k1, call_lo, call_hi, threshold, 1.0, col_offset, total_f, f);
  // The caller made the target device current (torch.cuda.device), so "cuda" is that device.
  auto keep = at::empty({rows, f}, at::TensorOptions().dtype(at::kBool).device(at::kCUDA));
  check(dropout_keep_cuda(keep.data_ptr<bool>(), rows, f, prm, as_stream(stream)), "dropout_keep_mask");
  return keep;
}

}  // namespace
}  // namespace mde

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_dataeff CUDA kernels: Philox4x32-10, token masking, fused SwiGLU + dropout";
  m.def("philox4x32", &mde::philox, "Philox4x32-10 of counters [n, 4] (int64 holding uint32), key (k0, k1), stream");
  m.def("mask_tokens", &mde::mask_tokens, "(ids, mask, weight, rate) of ops.masking.mask_tokens");
  m.def("swiglu_dropout_forward", &mde::swiglu_fwd, "dropout(silu(a) * b) of x = [a | b] [rows, 2F]");
  m.def("swiglu_dropout_backward", &mde::swiglu_bwd, "dx [rows, 2F] of swiglu_dropout_forward given dy [rows, F]");
  m.def("dropout_keep_mask", &mde::keep_mask, "bool [rows, F]: the elements swiglu_dropout keeps");
}
