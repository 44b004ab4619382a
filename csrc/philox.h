// Philox4x32-10 and the per-sample mask rate, shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// The stream contract is defined in megatron_dataeff/ops/philox.py (layout) and
// megatron_dataeff/ops/masking.py (rates); this header must reproduce them bit for bit:
//   key     = (seed lo, seed hi)
//   counter = (block, index lo, index hi, stream); element j is lane j % 4 of block j / 4
//   uniform = (x >> 8) * 2^-24, exact in float32
// Every double operation of the rate is a separately rounded IEEE operation: on the device through
// __dmul_rn / __dadd_rn / __ddiv_rn (nvcc would otherwise contract a*b+c into an FMA), on the host
// by compiling with -ffp-contract=off.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MDE_HD __host__ __device__ __forceinline__
#else
#define MDE_HD inline
#endif

namespace mde {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// What a stream is used for (ops/philox.py STREAM_*).
constexpr uint32_t kStreamToken = 0;
constexpr uint32_t kStreamRate = 1;
constexpr uint32_t kStreamDropout = 3;

// Masking modes (ops/masking.py MODES, in that order).
constexpr int kModeMdm = 0;
constexpr int kModeFixed = 1;
constexpr int kModeUniform = 2;

MDE_HD void mulhilo(uint32_t m, uint32_t x, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(m, x);
  lo = m * x;
#else
  const uint64_t p = static_cast<uint64_t>(m) * x;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// In place: c <- Philox4x32-10(c, (k0, k1)).
MDE_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kPhiloxM0, c[0], hi0, lo0);
    mulhilo(kPhiloxM1, c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0;
    const uint32_t n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// uint32 -> float32 uniform in [0, 1): (x >> 8) * 2^-24, exact.
MDE_HD float to_uniform(uint32_t x) {
  return static_cast<float>(x >> 8) * 5.9604644775390625e-08f;
}

// Correctly rounded double arithmetic that the compiler may not fuse.
MDE_HD double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
MDE_HD double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MDE_HD double ddiv(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
MDE_HD float d2f(double a) {
#if defined(__CUDA_ARCH__)
  return __double2float_rn(a);
#else
  return static_cast<float>(a);
#endif
}
MDE_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The masking probability p of sample `index` (ops/masking.py sample_rates), float32.
MDE_HD float mask_rate(int64_t index, uint32_t k0, uint32_t k1, uint32_t stream_offset, int mode,
                       double rate, double eps, int64_t stratify_group) {
  if (mode == kModeFixed) return d2f(rate);
  const uint64_t uindex = static_cast<uint64_t>(index);
  uint32_t c[4] = {0u, static_cast<uint32_t>(uindex), static_cast<uint32_t>(uindex >> 32),
                   kStreamRate + stream_offset};
  philox4x32_10(c, k0, k1);
  double t = static_cast<double>(to_uniform(c[0]));
  if (stratify_group > 0) {
    const double stratum = static_cast<double>(index % stratify_group);
    t = static_cast<double>(d2f(ddiv(dadd(stratum, t), static_cast<double>(stratify_group))));
  }
  // mdm: p in [eps, rate) (rate = 1 unless a clipped schedule asks less)
  const double p = mode == kModeMdm ? dadd(dmul(dadd(rate, -eps), t), eps) : dmul(rate, t);
  return d2f(p);
}

// Dropout (ops/swiglu_dropout.py): element e = row * total_F + col_offset + col of a call keyed by
// call_key is lane e % 4 of counter (block lo, call_key lo, call_key hi, kStreamDropout | (block hi) << 8),
// block = e / 4.  It is dropped iff its uniform < p, i.e. (x >> 8) < threshold = ceil(p * 2^24).
MDE_HD void dropout_block(uint64_t block, uint32_t key_lo, uint32_t key_hi, uint32_t k0, uint32_t k1,
                          uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(block);
  out[1] = key_lo;
  out[2] = key_hi;
  out[3] = kStreamDropout | (static_cast<uint32_t>(block >> 32) << 8);
  philox4x32_10(out, k0, k1);
}

}  // namespace mde
