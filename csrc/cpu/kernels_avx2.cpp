// AVX2 + FMA CPU kernels (selected at run time when at::get_cpu_capability()
// reports AVX2). See kernels_prelude.h for why the ISA is switched by pragma.
#include "kernels_prelude.h"

#if defined(FASTRES_CPU_MULTI_ISA)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_isa.h"
#pragma GCC pop_options
#else
FASTRES_CPU_BASELINE_ALIAS(AVX2)
#endif
