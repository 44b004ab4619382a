// Helpers of the CPU kernels: a batch of Philox blocks laid out for the vectoriser, CPU multiversioning,
// and the split of a work range over OpenMP threads.
#pragma once

#include <stdint.h>

#include <algorithm>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "philox.h"

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC
// function multiversioning), so one build runs everywhere and uses the wide multiplier where present.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MDE_NO_CLONES)
#define MDE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MDE_CLONES
#endif
#define MDE_INLINE inline __attribute__((always_inline))

namespace mde {

// kLanes Philox blocks (4 * kLanes numbers) in structure-of-arrays form, c[word][lane], one 32-bit word
// per 64-bit slot: the multiply is then exactly vpmuludq (which reads the low half of each slot), with
// no unpacking, and the lane loop vectorises.  Only the low 32 bits of a slot are meaningful: read
// results through word().
constexpr int kLanes = 16;
struct PhiloxLanes {
  alignas(64) uint64_t c[4][kLanes];
  uint32_t word(int q, int lane) const { return static_cast<uint32_t>(c[q][lane]); }
};

MDE_INLINE void philox_lanes(PhiloxLanes& s, uint32_t k0, uint32_t k1) {
  // Lanes outermost, rounds innermost (fully unrolled): the lane loop is what gets vectorised.
  for (int i = 0; i < kLanes; ++i) {
    uint64_t c0 = s.c[0][i], c1 = s.c[1][i], c2 = s.c[2][i], c3 = s.c[3][i];
    uint32_t a = k0, b = k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * static_cast<uint32_t>(c0);
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * static_cast<uint32_t>(c2);
      c0 = (p1 >> 32) ^ c1 ^ a;  // high halves of c1/c3 are junk the next multiply ignores
      c1 = p1;
      c2 = (p0 >> 32) ^ c3 ^ b;
      c3 = p0;
      a += kPhiloxW0;  // the key of the next round (unused after the last)
      b += kPhiloxW1;
    }
    s.c[0][i] = c0;
    s.c[1][i] = c1;
    s.c[2][i] = c2;
    s.c[3][i] = c3;
  }
}

// Runs body(begin, end) over [0, n) split evenly across the OpenMP threads, or in this thread when the
// work (n * cost_per_item) is too small to pay for waking the pool.
template <typename Body>
void parallel_range(int64_t n, int64_t cost_per_item, Body body) {
  if (n <= 0) return;
#if defined(_OPENMP)
  const int64_t min_cost_per_thread = 1 << 15;
  int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), n * cost_per_item / min_cost_per_thread));
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      body(n * t / nt, n * (t + 1) / nt);
    }
    return;
  }
#else
  (void)cost_per_item;
#endif
  body(0, n);
}

}  // namespace mde
