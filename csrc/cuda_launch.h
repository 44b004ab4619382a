// MDE_LAUNCH(kernel, grid, block, stream, args...): a kernel launch, written once for both builds.  With
// nvcc it is kernel<<<grid, block, 0, stream>>>(args...); with -DMDE_CUDA_EMULATION (tests on machines
// without a GPU, see emulation/cuda_runtime.h) the same kernel runs on the CPU.
#pragma once

#if defined(MDE_CUDA_EMULATION)
#define MDE_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::mde_emu::launch(grid, block, [&] { kernel(__VA_ARGS__); }))
#else
#define MDE_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

// Grid-size caps of the launchers: past them the kernels grid-stride.  The emulation tests build with
// tiny caps so that the grid-stride paths (and the __syncthreads between rows) run.
#ifndef MDE_MAX_GRID_X
#define MDE_MAX_GRID_X (int64_t(1) << 20)
#endif
#ifndef MDE_MAX_GRID_Y
#define MDE_MAX_GRID_Y int64_t(65535)
#endif
