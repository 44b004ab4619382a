// Fused SwiGLU + dropout on the CPU: y = dropout(silu(a) * b), x = [a | b] along the last dimension,
// forward and backward.  The backward regenerates the dropout mask from the Philox stream (see
// philox.h dropout_block) instead of reading a stored one.
#include <math.h>
#include <string.h>

#include "cpu_common.h"
#include "kernels.h"

namespace mde {
namespace {

constexpr int64_t kSegment = 2048;  // columns per work item

// Storage <-> compute conversions.  bf16 and fp16 compute in float and round once, to nearest even.
struct BF16 {
  uint16_t bits;
};
MDE_INLINE float load(float v) { return v; }
MDE_INLINE double load(double v) { return v; }
MDE_INLINE float load(_Float16 v) { return static_cast<float>(v); }
MDE_INLINE float load(BF16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
MDE_INLINE void store(float& out, float v) { out = v; }
MDE_INLINE void store(double& out, double v) { out = v; }
MDE_INLINE void store(_Float16& out, float v) { out = static_cast<_Float16>(v); }
MDE_INLINE void store(BF16& out, float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  u = nan ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
  out.bits = static_cast<uint16_t>(u >> 16);
}

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

// exp in float32 (Cephes expf, about 1 ulp) written so that the loop around it vectorises (libm's expf
// does not, and -ffast-math is out: the masking kernel must not be reassociated).  Needs
// -fno-trapping-math (setup.py) for the selects and floorf to become vector instructions.
MDE_INLINE float exp_approx(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  const float xc = x > hi ? hi : (x < lo ? lo : x);
  const float n = floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  y = y * scale;
  return x > hi ? INFINITY : (x < lo ? 0.0f : y);
}
MDE_INLINE double exp_approx(double x) { return exp(x); }

// keep[k] for elements [e0, e0 + n) of the dropout stream; e0 is block-aligned, n <= 4 * kLanes.
MDE_INLINE void keep_bits(uint64_t e0, const DropoutParams& prm, uint8_t* keep) {
  PhiloxLanes s;
  const uint64_t b0 = e0 >> 2;
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t block = b0 + static_cast<uint64_t>(i);
    s.c[0][i] = static_cast<uint32_t>(block);
    s.c[1][i] = prm.call_lo;
    s.c[2][i] = prm.call_hi;
    s.c[3][i] = kStreamDropout | (static_cast<uint32_t>(block >> 32) << 8);
  }
  philox_lanes(s, prm.k0, prm.k1);
  for (int l = 0; l < kLanes; ++l) {
    for (int q = 0; q < 4; ++q) keep[4 * l + q] = (s.word(q, l) >> 8) >= prm.threshold;
  }
}

// Calls body(col_begin, col_end, keep) over the columns [c0, c1) of `row`, in pieces that each lie in
// one batch of kLanes Philox blocks; keep[k] belongs to column col_begin + k.  Without dropout keep is
// all ones and no numbers are drawn.
template <typename Body>
MDE_INLINE void for_each_piece(int64_t row, int64_t c0, int64_t c1, const DropoutParams& prm, Body body) {
  alignas(64) uint8_t keep[4 * kLanes];
  if (prm.threshold == 0) {
    memset(keep, 1, sizeof(keep));
    for (int64_t c = c0; c < c1; c += 4 * kLanes) body(c, c1 < c + 4 * kLanes ? c1 : c + 4 * kLanes, keep);
    return;
  }
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(prm.total_f) +
                        static_cast<uint64_t>(prm.col_offset);
  uint64_t e = base + static_cast<uint64_t>(c0);
  const uint64_t end = base + static_cast<uint64_t>(c1);
  while (e < end) {
    const uint64_t e0 = e & ~uint64_t(3);
    const uint64_t stop = end < e0 + 4 * kLanes ? end : e0 + 4 * kLanes;
    keep_bits(e0, prm, keep);
    body(static_cast<int64_t>(e - base), static_cast<int64_t>(stop - base), keep + (e - e0));
    e = stop;
  }
}

// One piece of n columns: y = silu(a) * b * keep * scale, keep[k] in {0, 1} (times 0 like torch's dropout,
// so an inf stays NaN rather than silently becoming 0).
template <typename T, typename C>
MDE_INLINE void fwd_piece(const T* __restrict xa, const T* __restrict xb, T* __restrict y,
                          const uint8_t* __restrict keep, int64_t n, C scale) {
  for (int64_t c = 0; c < n; ++c) {
    const C a = load(xa[c]), b = load(xb[c]);
    const C v = a / (C(1) + exp_approx(-a)) * b;
    store(y[c], v * (static_cast<C>(keep[c]) * scale));
  }
}

// d/da and d/db of the above, given dy; silu'(a) = sig (1 + a (1 - sig)) as torch's silu_backward.
template <typename T, typename C>
MDE_INLINE void bwd_piece(const T* __restrict xa, const T* __restrict xb, const T* __restrict g,
                          T* __restrict da, T* __restrict db, const uint8_t* __restrict keep, int64_t n, C scale) {
  for (int64_t c = 0; c < n; ++c) {
    const C a = load(xa[c]), b = load(xb[c]);
    const C gk = load(g[c]) * (static_cast<C>(keep[c]) * scale);
    const C sig = C(1) / (C(1) + exp_approx(-a));
    store(da[c], gk * b * (sig * (C(1) + a * (C(1) - sig))));
    store(db[c], gk * (a * sig));
  }
}

template <typename T>
MDE_INLINE void fwd_items(const T* x, T* y, int64_t f, const DropoutParams& prm, int64_t begin, int64_t end) {
  using C = typename Compute<T>::type;
  const int64_t segs = (f + kSegment - 1) / kSegment;
  const C scale = static_cast<C>(prm.scale);
  for (int64_t w = begin; w < end; ++w) {
    const int64_t row = w / segs, c0 = (w % segs) * kSegment, c1 = c0 + kSegment < f ? c0 + kSegment : f;
    const T* xa = x + row * 2 * f;
    const T* xb = xa + f;
    T* yr = y + row * f;
    for_each_piece(row, c0, c1, prm, [=](int64_t cb, int64_t ce, const uint8_t* keep) {
      fwd_piece<T, C>(xa + cb, xb + cb, yr + cb, keep, ce - cb, scale);
    });
  }
}

template <typename T>
MDE_INLINE void bwd_items(const T* x, const T* dy, T* dx, int64_t f, const DropoutParams& prm, int64_t begin,
                          int64_t end) {
  using C = typename Compute<T>::type;
  const int64_t segs = (f + kSegment - 1) / kSegment;
  const C scale = static_cast<C>(prm.scale);
  for (int64_t w = begin; w < end; ++w) {
    const int64_t row = w / segs, c0 = (w % segs) * kSegment, c1 = c0 + kSegment < f ? c0 + kSegment : f;
    const T* xa = x + row * 2 * f;
    const T* xb = xa + f;
    const T* g = dy + row * f;
    T* da = dx + row * 2 * f;
    T* db = da + f;
    for_each_piece(row, c0, c1, prm, [=](int64_t cb, int64_t ce, const uint8_t* keep) {
      bwd_piece<T, C>(xa + cb, xb + cb, g + cb, da + cb, db + cb, keep, ce - cb, scale);
    });
  }
}

MDE_CLONES void keep_items(bool* keep, int64_t f, const DropoutParams& prm, int64_t begin, int64_t end) {
  const int64_t segs = (f + kSegment - 1) / kSegment;
  for (int64_t w = begin; w < end; ++w) {
    const int64_t row = w / segs, c0 = (w % segs) * kSegment, c1 = c0 + kSegment < f ? c0 + kSegment : f;
    bool* out = keep + row * f;
    for_each_piece(row, c0, c1, prm, [&](int64_t cb, int64_t ce, const uint8_t* bits) {
      for (int64_t c = cb; c < ce; ++c) out[c] = bits[c - cb] != 0;
    });
  }
}

#define MDE_DEFINE(T, name)                                                                                \
  MDE_CLONES void fwd_##name(const T* x, T* y, int64_t f, const DropoutParams& prm, int64_t b, int64_t e) { \
    fwd_items<T>(x, y, f, prm, b, e);                                                                      \
  }                                                                                                        \
  MDE_CLONES void bwd_##name(const T* x, const T* dy, T* dx, int64_t f, const DropoutParams& prm,         \
                             int64_t b, int64_t e) {                                                       \
    bwd_items<T>(x, dy, dx, f, prm, b, e);                                                                 \
  }
MDE_DEFINE(float, f32)
MDE_DEFINE(double, f64)
MDE_DEFINE(BF16, bf16)
MDE_DEFINE(_Float16, f16)
#undef MDE_DEFINE

int64_t work_items(int64_t rows, int64_t f) { return rows * ((f + kSegment - 1) / kSegment); }

}  // namespace

void swiglu_dropout_fwd_cpu(DType dtype, const void* x, void* y, int64_t rows, int64_t f,
                            const DropoutParams& prm) {
  if (rows == 0 || f == 0) return;
  const int64_t cost = f < kSegment ? f * 8 : kSegment * 8;
  parallel_range(work_items(rows, f), cost, [&](int64_t b, int64_t e) {
    switch (dtype) {
      case kFloat32: fwd_f32(static_cast<const float*>(x), static_cast<float*>(y), f, prm, b, e); break;
      case kFloat64: fwd_f64(static_cast<const double*>(x), static_cast<double*>(y), f, prm, b, e); break;
      case kBFloat16: fwd_bf16(static_cast<const BF16*>(x), static_cast<BF16*>(y), f, prm, b, e); break;
      case kFloat16: fwd_f16(static_cast<const _Float16*>(x), static_cast<_Float16*>(y), f, prm, b, e); break;
    }
  });
}

void swiglu_dropout_bwd_cpu(DType dtype, const void* x, const void* dy, void* dx, int64_t rows, int64_t f,
                            const DropoutParams& prm) {
  if (rows == 0 || f == 0) return;
  const int64_t cost = f < kSegment ? f * 12 : kSegment * 12;
  parallel_range(work_items(rows, f), cost, [&](int64_t b, int64_t e) {
    switch (dtype) {
      case kFloat32:
        bwd_f32(static_cast<const float*>(x), static_cast<const float*>(dy), static_cast<float*>(dx), f, prm, b, e);
        break;
      case kFloat64:
        bwd_f64(static_cast<const double*>(x), static_cast<const double*>(dy), static_cast<double*>(dx), f, prm, b,
                e);
        break;
      case kBFloat16:
        bwd_bf16(static_cast<const BF16*>(x), static_cast<const BF16*>(dy), static_cast<BF16*>(dx), f, prm, b, e);
        break;
      case kFloat16:
        bwd_f16(static_cast<const _Float16*>(x), static_cast<const _Float16*>(dy), static_cast<_Float16*>(dx), f,
                prm, b, e);
        break;
    }
  });
}

void dropout_keep_cpu(bool* keep, int64_t rows, int64_t f, const DropoutParams& prm) {
  if (rows == 0 || f == 0) return;
  parallel_range(work_items(rows, f), f < kSegment ? f * 4 : kSegment * 4,
                 [&](int64_t b, int64_t e) { keep_items(keep, f, prm, b, e); });
}

}  // namespace mde
