// Host emulation of the small CUDA subset used by ops_cuda.cu — for TESTS ONLY.
//
// Compiling ops_cuda.cu with -DFASTRES_CUDA_EMULATION (see emulation_main.cpp)
// turns its kernels into plain C++ functions run by this shim: every block of a
// launch runs in turn, each CUDA thread of the block is a std::thread, and
// __syncthreads / __shfl_down_sync are std::barrier phases. It follows the
// CUDA semantics the kernels rely on (block-shared memory, barrier, a warp is
// 32 consecutive linear thread ids, shfl_down returns the caller's own value
// when lane + delta >= 32, threads may return early). The emulated ops are
// registered as torch.ops.fastres_cuda_emu.* (CPU tensors), so the kernels'
// index math, partitions, reductions and the tensor glue can be checked
// against fastres._reference on a machine without a GPU. Slow; small shapes.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

using std::isfinite;  // device code calls the global isfinite()

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time: a static is block-shared memory

namespace fastres_emu {

inline thread_local dim3 tl_thread_idx;
inline thread_local dim3 tl_block_idx;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
inline std::barrier<>* g_barrier = nullptr;
inline std::vector<unsigned char> g_slots;  // shuffle exchange, 8 bytes per thread

// Test knob (torch.ops.fastres_cuda_emu.set_ew_grid_cap, emulation_main.cpp): caps the
// grid of the grid-stride element-wise kernels (ew_*), so that small tensors walk the
// later iterations of their loops. A real launch reaches them only past 65535 blocks of
// rows / planes or 65536 blocks of one plane's elements, far too many to emulate; a
// grid-stride kernel must be correct for any grid. 0: no cap (the plan's grid).
inline unsigned g_ew_grid_cap_x = 0;
inline unsigned g_ew_grid_cap_y = 0;

inline int linear_tid() {
  return static_cast<int>(tl_thread_idx.x +
                          g_block_dim.x * (tl_thread_idx.y + g_block_dim.y * tl_thread_idx.z));
}

template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, Args... args) {
  if (std::strncmp(name, "ew_", 3) == 0) {
    if (g_ew_grid_cap_x && grid.x > g_ew_grid_cap_x) grid.x = g_ew_grid_cap_x;
    if (g_ew_grid_cap_y && grid.y > g_ew_grid_cap_y) grid.y = g_ew_grid_cap_y;
  }
  const int nt = static_cast<int>(block.x * block.y * block.z);
  g_grid_dim = grid;
  g_block_dim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(nt);
        g_barrier = &bar;
        g_slots.assign(static_cast<size_t>(nt) * 8, 0);
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (int t = 0; t < nt; ++t) {
          threads.emplace_back([&, t] {
            tl_thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            tl_block_idx = dim3(bx, by, bz);
            kernel(args...);
            bar.arrive_and_drop();  // a finished thread leaves the barrier (early returns)
          });
        }
        for (auto& th : threads) th.join();
        g_barrier = nullptr;
      }
}

}  // namespace fastres_emu

#define threadIdx (fastres_emu::tl_thread_idx)
#define blockIdx (fastres_emu::tl_block_idx)
#define blockDim (fastres_emu::g_block_dim)
#define gridDim (fastres_emu::g_grid_dim)

inline void __syncthreads() { fastres_emu::g_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T v, int delta) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  const int tid = fastres_emu::linear_tid();
  const int lane = tid & 31;
  std::memcpy(&fastres_emu::g_slots[static_cast<size_t>(tid) * 8], &v, sizeof(T));
  fastres_emu::g_barrier->arrive_and_wait();
  T r = v;
  if (lane + delta < 32) std::memcpy(&r, &fastres_emu::g_slots[static_cast<size_t>(tid + delta) * 8], sizeof(T));
  fastres_emu::g_barrier->arrive_and_wait();
  return r;
}

#define FASTRES_LAUNCH(kernel, grid, block, stream, ...) \
  fastres_emu::launch(#kernel, kernel, grid, block, __VA_ARGS__)
#define FASTRES_CURRENT_STREAM() (static_cast<cudaStream_t>(nullptr))
#define FASTRES_DEVICE_GUARD(x) (void)0
#define FASTRES_CHECK_DEVICE(x, op) \
  TORCH_CHECK((x).device().is_cpu(), "fastres_cuda_emu::", op, ": expected a CPU tensor")
