// The common body of the capability TUs (kernels_avx2.cpp, kernels_avx512.cpp),
// included after kernels_prelude.h, `#pragma GCC target(...)` and the
// CPU_CAPABILITY / CPU_CAPABILITY_<X> macros (see kernels_prelude.h).
//
// sleef.h declares its vector functions only when the ISA macros are set;
// `#pragma GCC target` does not set them, so do it for that header only.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#if defined(CPU_CAPABILITY_AVX512)
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __AVX512F__
#undef __AVX512BW__
#undef __AVX512VL__
#undef __AVX512DQ__
#include <ATen/cpu/vec/vec.h>

#include "kernels_impl.h"
