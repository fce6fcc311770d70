"""Compile the fused conv kernel (kernels/_conv.py) for real GPUs without one.

    python tools/aot_compile_conv.py [--arch 90 --arch 80] [--quick]

Runs Triton's whole pipeline (frontend, TTGIR passes, LLVM, ptxas) for sm_90 and sm_80
with the specialisations the JIT applies to a channels_last launch (unit channel
strides, 16-byte-aligned pointers and 16-divisible strides), and checks what the
interpreter cannot: that the kernel compiles, that Hopper gets wgmma and Ampere
mma.sync tensor-core instructions for 16-bit inputs, and that the loads are
pipelined (cp.async, a multi-stage shared-memory ring). Exit status 1 on any failure.
Must run with TRITON_INTERPRET unset (it is cleared here).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels._conv import _conv_fwd_kernel as KERNEL  # noqa: E402

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}
UNIT = {"sxc", "swc", "src", "syc"}  # channels_last: the channel stride is 1
DIV16 = {"sxn", "sxh", "sxw", "swk", "swh", "sww", "srn", "srh", "srw", "syn", "syh", "syw", "K", "CG", "KG"}

FULL = dict(KH=3, KW=3, CHECK_HW=True, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, IN_RELU=True, HAS_RES=True,
            RELU=True, STATS=True, HAS_PRO=True, DOT=True, DOT_UPCAST=False, IEEE=False, RNE_BF16=False)
GEMM = dict(FULL, KH=1, KW=1, CHECK_HW=False, HAS_SCALE=False, HAS_SHIFT=False, IN_RELU=False, HAS_PRO=False,
            HAS_RES=False)
# (dtype, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), flags, quick)
CASES = [
    ("bf16", (128, 128, 64, 8, 3), FULL, True),
    ("fp16", (128, 256, 64, 8, 3), GEMM, False),
    ("bf16", (128, 128, 64, 8, 3), dict(FULL, KH=1, KW=1, CHECK_HW=False), False),
    ("bf16", (64, 64, 16, 4, 3), dict(FULL, KH=7, KW=7), False),
    ("fp32", (64, 64, 32, 4, 3), dict(FULL, IEEE=True), False),
    ("fp64", (32, 32, 8, 4, 2), dict(FULL, DOT=False), True),
]


def compile_case(dtype: str, arch: int, cfg, flags):
    names = list(KERNEL.arg_names)
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    const = dict(flags, BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_K=cfg[2], GROUP_M=8)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = acc if n in ("pmean_ptr", "pm2_ptr", "scale_ptr", "shift_ptr") else PTR[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in UNIT:
            sig[n] = "constexpr"
            const[n] = 1
        else:
            sig[n] = "i32"
            if n in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=KERNEL, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg[3], num_stages=cfg[4]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="SM version(s), default 90 and 80")
    ap.add_argument("--quick", action="store_true", help="only the cases marked quick")
    a = ap.parse_args(argv)
    archs = a.arch or [90, 80]
    failures = 0
    for arch in archs:
        for dtype, cfg, flags, quick in CASES:
            if a.quick and not quick:
                continue
            what = f"sm_{arch} {dtype} tile {cfg[0]}x{cfg[1]}x{cfg[2]} w{cfg[3]} s{cfg[4]} {flags['KH']}x{flags['KW']}"
            try:
                ck = compile_case(dtype, arch, cfg, flags)
            except Exception as e:  # noqa: BLE001 - report every failure
                print(f"FAIL {what}: {type(e).__name__}: {str(e)[:2000]}")
                failures += 1
                continue
            ptx = ck.asm["ptx"]
            problems = []
            if dtype in ("bf16", "fp16"):
                mma = "wgmma" if arch >= 90 else "mma.sync"
                if mma not in ptx:
                    problems.append(f"no {mma} instruction")
                if cfg[4] > 1 and "cp.async" not in ptx:
                    problems.append("loads not pipelined (no cp.async)")
            status = "FAIL" if problems else "ok  "
            failures += bool(problems)
            print(f"{status} {what}: shared memory {ck.metadata.shared} B" + (f"; {', '.join(problems)}"
                                                                           if problems else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
