// Host emulation of the slice of the CUDA runtime that csrc/*.cu uses, for tests on machines without a
// GPU (tests/test_cuda_emulation.py).  Built with the host compiler and -DMDE_CUDA_EMULATION, the .cu
// files run their real kernels and launchers on the CPU: every CUDA block in turn, its threads as fibers
// that switch at __syncthreads(), so index arithmetic, tails, grid-stride loops and block synchronisation
// are exercised exactly as written.  The tests define __CUDA_ARCH__, so code under it (the device
// branches of philox.h) runs too, on the host versions of its intrinsics below.  Not emulated: warp-level
// operations, concurrency between blocks, the device's own arithmetic units.  Never part of the package.
#pragma once

#include <stdint.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };

namespace mde_emu {

// The running thread's coordinates, set by the scheduler before it resumes a fiber.
inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline cudaError_t last_error = cudaSuccess;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // uninitialised: zeroing 256 stacks per launch would dominate
  bool done = false, at_barrier = false;
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  int current = -1;
  const std::function<void()>* body = nullptr;
};
inline Scheduler sched;

inline void fiber_entry() {
  (*sched.body)();
  sched.fibers[sched.current].done = true;
  // returning resumes uc_link (the scheduler)
}

inline void syncthreads() {
  if (sched.current < 0) {
    std::fprintf(stderr, "__syncthreads() outside a kernel\n");
    std::abort();
  }
  Fiber& f = sched.fibers[sched.current];
  f.at_barrier = true;
  swapcontext(&f.ctx, &sched.main);
}

inline cudaError_t fail(const char* why) {
  std::fprintf(stderr, "CUDA emulation: %s\n", why);
  last_error = cudaErrorLaunchFailure;
  return last_error;
}

// Runs `kernel` (a closure calling the __global__ function) over the whole grid.
inline cudaError_t launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const size_t n = size_t(block.x) * block.y * block.z;
  if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return fail("invalid launch configuration");
  grid_dim = grid;
  block_dim = block;
  sched.body = &kernel;
  constexpr size_t kStack = 64 * 1024;
  sched.fibers.clear();
  sched.fibers.resize(n);
  for (auto& f : sched.fibers) f.stack.reset(new char[kStack]);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        for (size_t t = 0; t < n; ++t) {
          Fiber& f = sched.fibers[t];
          f.done = f.at_barrier = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &sched.main;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        // Round-robin until every thread finishes; a pass ends with each live thread at a barrier.
        for (;;) {
          size_t live = 0;
          for (size_t t = 0; t < n; ++t) {
            Fiber& f = sched.fibers[t];
            if (f.done) continue;
            f.at_barrier = false;
            thread_idx = {unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (block.x * block.y))};
            sched.current = int(t);
            swapcontext(&sched.main, &f.ctx);
            sched.current = -1;
            live += !f.done;
          }
          if (live == 0) break;
          size_t done = 0;
          for (auto& f : sched.fibers) done += f.done;
          if (done != 0) return fail("__syncthreads() not reached by every thread of the block");
        }
      }
  sched.fibers.clear();
  return cudaSuccess;
}

}  // namespace mde_emu

#define threadIdx (::mde_emu::thread_idx)
#define blockIdx (::mde_emu::block_idx)
#define blockDim (::mde_emu::block_dim)
#define gridDim (::mde_emu::grid_dim)

inline void __syncthreads() { ::mde_emu::syncthreads(); }

// Device intrinsics used under __CUDA_ARCH__ (the tests define it, so the device branches of philox.h run).
// Each is one correctly rounded IEEE operation on the device; the host's are too (-ffp-contract=off).
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::mde_emu::last_error;
  ::mde_emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated launch failure";
}
