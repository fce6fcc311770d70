// Host build of ops_cuda.cu against the CUDA emulation shim (tests only; see emulation.h).
#define FASTRES_CUDA_EMULATION 1
#include "ops_cuda.cu"
