// Host build of ops_cuda.cu against the CUDA emulation shim (tests only; see emulation.h).
#define FASTRES_CUDA_EMULATION 1
#include "ops_cuda.cu"

// Test knob of the emulation (see emulation.h): cap the element-wise kernels' grid.
TORCH_LIBRARY_FRAGMENT(fastres_cuda_emu, m) {
  m.def("set_ew_grid_cap(int x, int y) -> ()", [](int64_t x, int64_t y) {
    TORCH_CHECK(x >= 0 && y >= 0, "set_ew_grid_cap: caps must be >= 0");
    fastres_emu::g_ew_grid_cap_x = static_cast<unsigned>(x);
    fastres_emu::g_ew_grid_cap_y = static_cast<unsigned>(y);
  });
}
