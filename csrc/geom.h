// The kernels' view of a dense 4-D tensor, shared by the CPU kernels (cpu/kernels.h)
// and the CUDA kernels' host code (cuda/ops_cuda.cu). Plain data, no torch headers.
#pragma once

#include <cstdint>

namespace fastres {

// rows == true: memory is [N*H*W][C] (channels_last, or any layout with H*W == 1);
// rows == false: memory is [N][C][H*W] (NCHW).
struct Geom {
  int64_t N = 0, C = 0, HW = 0;
  bool rows = false;
  int64_t M() const { return N * HW; }  // elements per channel
};

}  // namespace fastres
