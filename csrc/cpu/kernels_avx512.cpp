// AVX512 (F, BW, VL, DQ) CPU kernels (selected at run time when
// at::get_cpu_capability() reports AVX512, i.e. the same feature set torch
// requires). See kernels_prelude.h for why the ISA is switched by pragma.
#include "kernels_prelude.h"

#if defined(FASTRES_CPU_MULTI_ISA)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// sleef.h declares its vector functions only when the ISA macros are set;
// `#pragma GCC target` does not set them, so do it for that header only.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
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
#pragma GCC pop_options

#else  // no multi-ISA build: alias to the baseline kernels

namespace fastres::cpu::AVX512 {
const Kernels& kernels() { return DEFAULT::kernels(); }
}  // namespace fastres::cpu::AVX512

#endif
