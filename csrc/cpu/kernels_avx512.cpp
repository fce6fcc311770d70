// AVX512 (F, BW, VL, DQ) CPU kernels (selected at run time when
// at::get_cpu_capability() reports AVX512, i.e. the same feature set torch
// requires). See kernels_prelude.h for why the ISA is switched by pragma.
#include "kernels_prelude.h"

#if defined(FASTRES_CPU_MULTI_ISA)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_isa.h"
#pragma GCC pop_options
#else
FASTRES_CPU_BASELINE_ALIAS(AVX512)
#endif
