// Token masking on the CPU: one pass over [batch, seq] that draws the Philox uniforms and writes the
// corrupted ids, the mask, the 1/p weights and the per-sample rate.  Bit-identical to
// megatron_dataeff.ops.masking.mask_tokens_reference (compile with -ffp-contract=off).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "kernels.h"

namespace mde {
namespace {

constexpr int64_t kChunk = 4 * kLanes;  // tokens per Philox batch

// Token j is masked iff to_uniform(x_j) < p, i.e. (x_j >> 8) * 2^-24 < p.  Scaling by 2^24 is exact, and
// for an integer u, u < x iff u < ceil(x): so the test is the integer compare (x_j >> 8) < ceil(p * 2^24),
// which is branch-free and vectorises (a float compare feeding a branch costs a misprediction per token
// when p is near 1/2).
inline uint32_t mask_threshold(float p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0f)); }

// Chunks [begin, end) of the flattened (row, chunk) space, kChunk tokens each.
template <typename Tok>
MDE_INLINE void mask_chunks(const Tok* tokens, const int64_t* index, int64_t seq, const uint32_t* thr,
                            const float* w, uint32_t k0, uint32_t k1, uint32_t stream, Tok mask_id,
                            int64_t chunks_per_row, int64_t begin, int64_t end, Tok* ids, bool* mask,
                            float* weight) {
  alignas(64) uint32_t u[kChunk];  // the chunk's uniforms as 24-bit integers, in token order
  for (int64_t c = begin; c < end; ++c) {
    const int64_t row = c / chunks_per_row;
    const int64_t j0 = (c % chunks_per_row) * kChunk;
    const uint64_t idx = static_cast<uint64_t>(index[row]);
    PhiloxLanes s;
    for (int i = 0; i < kLanes; ++i) {
      s.c[0][i] = static_cast<uint32_t>(j0 / 4 + i);
      s.c[1][i] = static_cast<uint32_t>(idx);
      s.c[2][i] = static_cast<uint32_t>(idx >> 32);
      s.c[3][i] = stream;
    }
    philox_lanes(s, k0, k1);
    // Token 4l+q is word q of block l.
    for (int l = 0; l < kLanes; ++l) {
      for (int q = 0; q < 4; ++q) u[4 * l + q] = s.word(q, l) >> 8;
    }
    const uint32_t tr = thr[row];
    const float wr = w[row];
    const int64_t off = row * seq + j0;
    const int64_t n = std::min<int64_t>(kChunk, seq - j0);
    const Tok* __restrict tk = tokens + off;
    Tok* __restrict out_ids = ids + off;
    bool* __restrict out_mask = mask + off;
    float* __restrict out_w = weight + off;
    if (n == kChunk) {
#pragma GCC ivdep
      for (int j = 0; j < kChunk; ++j) {
        const bool m = u[j] < tr;
        out_ids[j] = m ? mask_id : tk[j];
        out_mask[j] = m;
        out_w[j] = m ? wr : 0.0f;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const bool m = u[j] < tr;
        out_ids[j] = m ? mask_id : tk[j];
        out_mask[j] = m;
        out_w[j] = m ? wr : 0.0f;
      }
    }
  }
}

#define MDE_MASK_ARGS(Tok)                                                                              \
  const Tok *tokens, const int64_t *index, int64_t seq, const uint32_t *thr, const float *w, uint32_t k0,    \
      uint32_t k1, uint32_t stream, Tok mask_id, int64_t chunks_per_row, int64_t begin, int64_t end,   \
      Tok *ids, bool *mask, float *weight
#define MDE_MASK_CALL \
  tokens, index, seq, thr, w, k0, k1, stream, mask_id, chunks_per_row, begin, end, ids, mask, weight

MDE_CLONES void mask_chunks_i32(MDE_MASK_ARGS(int32_t)) { mask_chunks<int32_t>(MDE_MASK_CALL); }
MDE_CLONES void mask_chunks_i64(MDE_MASK_ARGS(int64_t)) { mask_chunks<int64_t>(MDE_MASK_CALL); }

void mask_chunks_any(MDE_MASK_ARGS(int32_t)) { mask_chunks_i32(MDE_MASK_CALL); }
void mask_chunks_any(MDE_MASK_ARGS(int64_t)) { mask_chunks_i64(MDE_MASK_CALL); }

template <typename Tok>
int64_t mask_tokens_impl(const Tok* tokens, const int64_t* index, int64_t batch, int64_t seq,
                         const MaskParams& prm, Tok* ids, bool* mask, float* weight, float* rate) {
  for (int64_t i = 0; i < batch; ++i) {
    if (index[i] < 0) return i;
  }
  std::vector<float> w(static_cast<size_t>(batch));
  std::vector<uint32_t> thr(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) {
    rate[i] = mask_rate(index[i], prm.k0, prm.k1, prm.stream_offset, prm.mode, prm.rate, prm.eps,
                        prm.stratify_group);
    w[i] = 1.0f / rate[i];  // only used where a token is masked, i.e. p > 0
    thr[i] = mask_threshold(rate[i]);
  }
  if (seq == 0) return -1;
  const int64_t chunks_per_row = (seq + kChunk - 1) / kChunk;
  const uint32_t stream = kStreamToken + prm.stream_offset;
  const Tok mask_id = static_cast<Tok>(prm.mask_token_id);
  const float* wp = w.data();
  const uint32_t* tp = thr.data();
  // Cost 1 per token: a thread gets >= 32k tokens (~40 us), so small batches do not wake the pool, which
  // costs more than it saves when another process holds a core.
  parallel_range(batch * chunks_per_row, kChunk, [&](int64_t begin, int64_t end) {
    mask_chunks_any(tokens, index, seq, tp, wp, prm.k0, prm.k1, stream, mask_id, chunks_per_row, begin,
                    end, ids, mask, weight);
  });
  return -1;
}

MDE_CLONES void philox_rows(const uint32_t* counters, int64_t begin, int64_t end, uint32_t k0, uint32_t k1,
                            uint32_t* out) {
  for (int64_t i = begin; i < end; ++i) {
    uint32_t c[4] = {counters[4 * i], counters[4 * i + 1], counters[4 * i + 2], counters[4 * i + 3]};
    philox4x32_10(c, k0, k1);
    for (int q = 0; q < 4; ++q) out[4 * i + q] = c[q];
  }
}

}  // namespace

void philox_cpu(const uint32_t* counters, int64_t n, uint32_t k0, uint32_t k1, uint32_t* out) {
  parallel_range(n, 64, [&](int64_t begin, int64_t end) { philox_rows(counters, begin, end, k0, k1, out); });
}

int64_t mask_tokens_cpu_i32(const int32_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                            const MaskParams& params, int32_t* ids, bool* mask, float* weight, float* rate) {
  return mask_tokens_impl(tokens, index, batch, seq, params, ids, mask, weight, rate);
}

int64_t mask_tokens_cpu_i64(const int64_t* tokens, const int64_t* index, int64_t batch, int64_t seq,
                            const MaskParams& params, int64_t* ids, bool* mask, float* weight, float* rate) {
  return mask_tokens_impl(tokens, index, batch, seq, params, ids, mask, weight, rate);
}

}  // namespace mde
