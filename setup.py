"""Build of fastres: the Python package, `fastres.kernels` (from ./kernels) and the
C++/CUDA extension `fastres._C`.

    pip install --no-build-isolation -e .

Supported: Python 3.10-3.12, torch 2.11 through 2.14 (with the Triton each ships).
The Makefile installs the pinned torch 2.14.1 for reproducible results; CI also builds
and tests against torch 2.11 / Python 3.12 (`make test-gpustack`).

Environment:
    FASTRES_SKIP_CUDA=1     build the CPU kernels only, even when nvcc is found
    FASTRES_SKIP_CUDNN=1    leave the cuDNN fused-conv graphs out (csrc/cudnn/)
    CUDNN_INCLUDE_DIR / CUDNN_LIB_DIR   cuDNN headers / library (default: the toolkit,
                            then site-packages/nvidia/cudnn of the nvidia-cudnn wheel)
    TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0"), e.g. "9.0" or "8.0;9.0+PTX"
    CUDA_HOME / CUDA_PATH   CUDA toolkit root (default: found from nvcc, see below)
    MAX_JOBS                parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
TORCH_REQUIREMENT = "torch>=2.11,<2.15"  # tested: 2.11.0 (CI's gpustack leg) and 2.14.1 (main leg)


def _log(msg: str) -> None:
    print(f"fastres: {msg}", flush=True)


def _is_cuda_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home() -> str | None:
    """The real toolkit root. torch guesses dirname(dirname(which nvcc)), which is
    wrong when nvcc is a wrapper or a symlink outside the toolkit (/usr/local/bin/nvcc
    -> /usr/local): prefer CUDA_HOME/CUDA_PATH, then the resolved nvcc, then
    /usr/local/cuda, and only accept a folder that has bin/nvcc and include/."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A shell wrapper (`exec /path/to/cuda/bin/nvcc "$@"`): read the target.
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if _is_cuda_root(c):
            return os.path.realpath(c)
    return None


def _nvidia_include_dirs(cuda_home: str) -> list[str]:
    """torch's CUDA headers include cusparse.h / cublas*.h / cusolver*.h; with the
    pip CUDA runtime they live in site-packages/nvidia/*/include, not in the
    toolkit. Return the folders that provide the headers the toolkit lacks."""
    wanted = ["cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h", "cufft.h", "curand.h"]
    missing = [h for h in wanted if not os.path.isfile(os.path.join(cuda_home, "include", h))]
    if not missing:
        return []
    roots = []
    for p in sys.path:
        d = os.path.join(p, "nvidia")
        if p and os.path.isdir(d) and d not in roots:
            roots.append(d)
    dirs: list[str] = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if any(os.path.isfile(os.path.join(inc, h)) for h in missing) and inc not in dirs:
                dirs.append(inc)
    return dirs


def _find_cudnn(cuda_home: str) -> tuple[str | None, str | None, str, str]:
    """(include dir, lib dir, library file name, why not) of the installed cuDNN 9:
    CUDNN_INCLUDE_DIR/CUDNN_LIB_DIR, else the toolkit, else the nvidia-cudnn wheel in
    site-packages/nvidia/cudnn (the one torch loads). The graph API (cudnn_graph.h of
    cuDNN 9, or cudnn_backend.h of cuDNN 8) is required."""
    incs = [os.environ.get("CUDNN_INCLUDE_DIR"), os.path.join(cuda_home, "include")]
    for p in sys.path:
        if p:
            incs.append(os.path.join(p, "nvidia", "cudnn", "include"))
    for inc in incs:
        if not inc or not os.path.isfile(os.path.join(inc, "cudnn.h")):
            continue
        if not os.path.isfile(os.path.join(inc, "cudnn_graph.h")):
            return None, None, "", f"{inc}/cudnn.h is not cuDNN 9 (no cudnn_graph.h)"
        libdirs = [os.environ.get("CUDNN_LIB_DIR"), os.path.join(os.path.dirname(inc), "lib"),
                   os.path.join(os.path.dirname(inc), "lib64"), os.path.join(cuda_home, "lib64"),
                   "/usr/lib/x86_64-linux-gnu"]
        for d in libdirs:
            if not d:
                continue
            if os.path.isfile(os.path.join(d, "libcudnn.so")):
                return inc, d, "libcudnn.so", ""
            libs = sorted(glob.glob(os.path.join(d, "libcudnn.so.[0-9]*")), key=len)
            if libs:
                return inc, d, os.path.basename(libs[0]), ""
        return None, None, "", f"found {inc}/cudnn.h but no libcudnn.so* next to it (set CUDNN_LIB_DIR)"
    return None, None, "", "cudnn.h not found (install nvidia-cudnn-cu13 or set CUDNN_INCLUDE_DIR)"


def _arch_names(arch_list: str) -> list[str]:
    names = []
    for a in arch_list.replace(" ", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        ptx = a.endswith("+PTX")
        v = a.replace("+PTX", "")
        if "." in v:
            major, minor = v.split(".", 1)
            names.append(f"sm_{major}{minor}" + ("+PTX" if ptx else ""))
        else:
            names.append(a)
    return names


# --- decide what to build (before importing torch.utils.cpp_extension, which
#     reads CUDA_HOME at import time) --------------------------------------------
import torch  # noqa: E402

skip_cuda = os.environ.get("FASTRES_SKIP_CUDA", "0").lower() in ("1", "true", "yes", "on")
cuda_home = None if skip_cuda else _find_cuda_home()
with_cuda = False
why_not = ""
if skip_cuda:
    why_not = "FASTRES_SKIP_CUDA=1"
elif torch.version.cuda is None:
    why_not = "this torch has no CUDA support"
elif cuda_home is None:
    why_not = "nvcc / the CUDA toolkit was not found (set CUDA_HOME)"
else:
    with_cuda = True
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if with_cuda:
    cpp_extension.CUDA_HOME = cuda_home  # in case cpp_extension was imported earlier

csrc = os.path.join("csrc")
cpp_sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
cu_sources = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))

cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wno-psabi", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", f"-DFASTRES_VERSION={VERSION}"]
nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", f"-DFASTRES_VERSION={VERSION}"]
link_flags = ["-fopenmp"]
include_dirs = [os.path.join(ROOT, "csrc")]

if with_cuda:
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = _arch_names(arch_list)
    arch_macro = ",".join(a.replace("+PTX", "_ptx") for a in archs)
    cxx_flags += ["-DFASTRES_WITH_CUDA", f"-DFASTRES_CUDA_ARCHS={arch_macro}"]
    nvcc_flags += ["-DFASTRES_WITH_CUDA"]  # (nvcc would split a -D value at its commas)
    # -isystem: searched after the toolkit's own -I include dir, so the toolkit's
    # headers win and only the missing library headers come from the pip packages.
    for d in _nvidia_include_dirs(cuda_home):
        cxx_flags += ["-isystem", d]
        nvcc_flags += ["-isystem", d]
    # cuDNN fused-conv graphs (csrc/cudnn/*.cpp, host compiler only): built where the
    # cuDNN headers are found; otherwise left out with a message, never a failed build.
    cudnn_sources: list[str] = []
    if os.environ.get("FASTRES_SKIP_CUDNN", "0").lower() in ("1", "true", "yes", "on"):
        _log("cuDNN fused-conv graphs left out (FASTRES_SKIP_CUDNN=1)")
    else:
        cudnn_inc, cudnn_lib, cudnn_file, cudnn_why = _find_cudnn(cuda_home)
        if cudnn_inc is None:
            _log(f"cuDNN fused-conv graphs left out: {cudnn_why}")
        else:
            cudnn_sources = sorted(glob.glob(os.path.join(csrc, "cudnn", "*.cpp")))
            # host-compiler flags only: no .cu file includes cuDNN (keeps nvcc objects reusable)
            cxx_flags += ["-DFASTRES_WITH_CUDNN", "-isystem", cudnn_inc]
            lib_flag = "-lcudnn" if cudnn_file == "libcudnn.so" else f"-l:{cudnn_file}"
            link_flags += [f"-L{cudnn_lib}", lib_flag, f"-Wl,-rpath,{cudnn_lib}"]
            _log(f"cuDNN fused-conv graphs: {cudnn_inc} ({cudnn_lib}/{cudnn_file})")
    ext = CUDAExtension(
        "fastres._C",
        sources=cpp_sources + cu_sources + cudnn_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
    _log(f"building _C with CPU kernels + CUDA kernels for {', '.join(archs)} "
         f"(CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={arch_list})")
else:
    ext = CppExtension(
        "fastres._C",
        sources=cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    _log(f"building _C with CPU kernels only: CUDA kernels not built ({why_not})")

packages = find_packages(include=["fastres", "fastres.*"])
if "fastres.kernels" not in packages:
    packages.append("fastres.kernels")

setup(
    name="fastres",
    version=VERSION,
    description="Fused BatchNorm(+residual add)+ReLU ops for ResNets (Triton, C++/CUDA)",
    python_requires=">=3.10,<3.13",
    install_requires=[TORCH_REQUIREMENT],
    extras_require={"paper": ["scikit-learn", "matplotlib", "tqdm"]},  # python -m fastres paper (issue 14)
    packages=packages,
    package_dir={"fastres.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())},
    zip_safe=False,
)
