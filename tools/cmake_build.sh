#!/usr/bin/env bash
# Build csrc/ as a shared library against libtorch with CMake, then smoke-test it.
#
#   tools/cmake_build.sh                      # CPU kernels (+ CUDA kernels when nvcc is found)
#   FASTRES_WITH_CUDA=OFF tools/cmake_build.sh  # CPU kernels only
#   TORCH_CUDA_ARCH_LIST="9.0" tools/cmake_build.sh
#
# Env: PYTHON (default: .venv/bin/python, else python3), BUILD_DIR (default:
# cmake-build), JOBS (default: 2), FASTRES_WITH_CUDA (ON/OFF, default: auto).
# Extra arguments are passed to the cmake configure step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
BUILD="${BUILD_DIR:-$ROOT/cmake-build}"
JOBS="${JOBS:-2}"
PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# Explicit ON/OFF, or drop a cached value so CMakeLists.txt auto-detects nvcc again.
CUDA_ARG=("-UFASTRES_WITH_CUDA")
if [ -n "${FASTRES_WITH_CUDA:-}" ]; then
  CUDA_ARG=("-DFASTRES_WITH_CUDA=${FASTRES_WITH_CUDA}")
fi

set -x
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release "${CUDA_ARG[@]}" "$@"
cmake --build "$BUILD" -j"$JOBS"
set +x

LIB="$BUILD/libfastres_ops.so"
"$PY" - "$LIB" <<'PYEOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
info = torch.ops.fastres._build_info()
for name in ("bn_act_train", "bn_act_train_backward", "affine_act", "affine_act_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastres::{name}", "CPU"), name
if "cuda=1" in info.split(";"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastres::bn_act_train", "CUDA")
x = torch.randn(2, 3, 4, 5)
y, m, v = torch.ops.fastres.bn_act_train(x, None, None, None, 1e-5, True)
torch.testing.assert_close(m, x.mean(dim=(0, 2, 3)))
print(f"fastres cmake build OK: {sys.argv[1]}: {info}")
PYEOF
