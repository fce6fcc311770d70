// CPU kernel interface of fastres._C (see docs/DESIGN.md for the op semantics).
//
// The kernels live in kernels_impl.h, which is compiled once per CPU capability
// (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp); ops_cpu.cpp does
// the tensor glue (memory format, allocation, dtype of params) and picks the
// table matching at::get_cpu_capability() at run time.
//
// Everything here is plain data: raw pointers into dense tensors, int64 sizes.
#pragma once

#include <cstdint>

namespace fastres::cpu {

enum class DType : int { kF64 = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

// Dense 4-D tensor geometry. rows == true: memory is [N*H*W][C] (channels_last,
// or any layout with H*W == 1); rows == false: memory is [N][C][H*W] (NCHW).
struct Geom {
  int64_t N = 0, C = 0, HW = 0;
  bool rows = false;
  int64_t M() const { return N * HW; }  // elements per channel
};

// Pointers typed `acc` point to acc-dtype data (double for kF64, else float).
struct BnFwdArgs {
  Geom g;
  DType dt;
  const void* x;
  const void* res;     // nullable, x's dtype and layout
  const void* weight;  // nullable, acc, [C]
  const void* bias;    // nullable, acc, [C]
  double eps;
  bool relu;
  void* y;     // x's dtype and layout
  void* mean;  // acc [C]
  void* var;   // acc [C] (biased)
};

struct AffineFwdArgs {
  Geom g;
  DType dt;
  const void* x;
  const void* res;    // nullable
  const void* scale;  // nullable, acc [C]
  const void* shift;  // nullable, acc [C]
  bool relu;
  void* y;
};

struct BnBwdArgs {
  Geom g;
  DType dt;
  const void* gy;
  const void* x;
  const void* y;       // only read when relu
  const void* weight;  // nullable, acc [C]
  const void* mean;    // acc [C]
  const void* var;     // acc [C]
  double eps;
  bool relu;
  void* gx;  // x's dtype and layout
  void* gw;  // acc [C]
  void* gb;  // acc [C]
  void* gz;  // nullable (need_grad_z == false), x's dtype and layout
};

struct AffineBwdArgs {
  Geom g;
  DType dt;
  const void* gy;
  const void* x;      // only read when gscale != nullptr
  const void* y;      // only read when relu
  const void* scale;  // nullable, acc [C]
  bool relu;
  void* gx;
  void* gz;      // nullable
  void* gscale;  // nullable (need_param_grads == false), acc [C]
  void* gshift;  // nullable together with gscale
};

struct Kernels {
  void (*bn_fwd)(const BnFwdArgs&);
  void (*affine_fwd)(const AffineFwdArgs&);
  void (*bn_bwd)(const BnBwdArgs&);
  void (*affine_bwd)(const AffineBwdArgs&);
  const char* isa;
};

namespace DEFAULT { const Kernels& kernels(); }
#if defined(__x86_64__) || defined(_M_X64)
#define FASTRES_CPU_X86 1
namespace AVX2 { const Kernels& kernels(); }
namespace AVX512 { const Kernels& kernels(); }
#endif

}  // namespace fastres::cpu
