// Common includes of the per-capability kernel TUs (kernels_*.cpp).
//
// Everything that is not vector code is included here, BEFORE the capability
// TUs switch the target ISA with `#pragma GCC target`, so that inline functions
// of c10 / ATen / the standard library are compiled for the baseline ISA in
// every TU (no AVX code can leak into a COMDAT symbol shared with baseline
// code). Only <ATen/cpu/vec/vec.h> (whose code lives in the per-capability
// namespace at::vec::<CAPABILITY>) and kernels_impl.h (fastres::cpu::<CAPABILITY>)
// are compiled under the capability's target.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>
#include <c10/util/Unroll.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/bit_cast.h>
#include <ATen/native/Math.h>
#include <ATen/cpu/vec/intrinsics.h>

#include "kernels.h"

// The per-capability TUs are only built with GCC-compatible compilers that
// accept `#pragma GCC target` (GCC). Others build the DEFAULT kernels only.
#if defined(FASTRES_CPU_X86) && defined(__GNUC__) && !defined(__clang__)
#define FASTRES_CPU_MULTI_ISA 1
#endif

// No multi-ISA build: a capability's kernel table is the baseline one.
#define FASTRES_CPU_BASELINE_ALIAS(ISA) \
  namespace fastres::cpu::ISA {         \
  const Kernels& kernels() { return DEFAULT::kernels(); } \
  }
