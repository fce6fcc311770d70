// CPU kernel interface of fastres._C (see docs/DESIGN.md for the op semantics).
//
// The kernels live in kernels_impl.h, which is compiled once per CPU capability
// (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp); ops_cpu.cpp fills
// these arguments from the tensors ../op_prep.h prepares (memory format,
// allocation, dtype of params) and picks the table matching
// at::get_cpu_capability() at run time.
//
// Everything here is plain data: raw pointers into dense tensors, int64 sizes.
#pragma once

#include <cstdint>

#include "../geom.h"

namespace fastres::cpu {

enum class DType : int { kF64 = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

// Dense 4-D tensor geometry: fastres::Geom (../geom.h).
using fastres::Geom;

// Pointers typed `acc` point to acc-dtype data (double for kF64, else float).
// Fields of both forward kernels (bn, affine).
struct FwdArgs {
  Geom g;
  DType dt;
  const void* x;
  const void* res;  // nullable, x's dtype and layout
  bool relu;
  void* y;  // x's dtype and layout
};

struct BnFwdArgs : FwdArgs {
  const void* weight;  // nullable, acc, [C]
  const void* bias;    // nullable, acc, [C]
  double eps;
  void* mean;  // acc [C]
  void* var;   // acc [C] (biased)
};

struct AffineFwdArgs : FwdArgs {
  const void* scale;  // nullable, acc [C]
  const void* shift;  // nullable, acc [C]
};

// Fields of both backward kernels (bn, affine).
struct BwdArgs {
  Geom g;
  DType dt;
  const void* gy;
  const void* x;  // bn: always read; affine: only read when gscale != nullptr
  const void* y;  // only read when relu
  bool relu;
  void* gx;  // x's dtype and layout
  void* gz;  // nullable (need_grad_z == false), x's dtype and layout
};

struct BnBwdArgs : BwdArgs {
  const void* weight;  // nullable, acc [C]
  const void* mean;    // acc [C]
  const void* var;     // acc [C]
  double eps;
  void* gw;  // acc [C]
  void* gb;  // acc [C]
};

struct AffineBwdArgs : BwdArgs {
  const void* scale;  // nullable, acc [C]
  void* gscale;       // nullable (need_param_grads == false), acc [C]
  void* gshift;       // nullable together with gscale
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
