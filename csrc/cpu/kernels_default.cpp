// Baseline (no ISA extension) CPU kernels: at::vec generic vectors.
#include "kernels_prelude.h"

#define CPU_CAPABILITY DEFAULT
#include <ATen/cpu/vec/vec.h>

#include "kernels_impl.h"
