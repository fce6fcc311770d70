"""Backward of the fused convolution: fastres's Triton dgrad / wgrad kernels
(``kernels/_conv_bwd.py``) against aten's ``convolution_backward`` (cuDNN), for every
distinct ResNet-50 convolution at batch 256, bf16, NHWC — the measurements that decide,
per shape, whether ``conv2d_act``'s backward uses the Triton kernels or aten's conv
backward plus the elementwise prologue backward ("chosen by measurement").

Every case differentiates the same forward: ``a = relu(x * s + t)`` (the previous
BatchNorm folded to a per-channel scale/shift, then ReLU), ``y = conv2d(a, W, b)``.

* ``dgrad``: ``fastres-triton`` = one kernel: transposed conv + ReLU mask recomputed from
  x + grad_x = da * s + per-channel sum(da * x), sum(da) (the previous BN's backward
  reductions); ``aten`` = convolution_backward's grad_input alone (cuDNN, on the stored
  activation; no prologue work); ``aten+eager`` = the same plus the eager prologue
  backward (mask, scale, two reductions); ``aten-fallback`` = what ``conv2d_act``'s
  backward runs for this part when the table says aten
  (``conv_ops.conv2d_act_backward_aten``: the prologue recomputed from x, aten's dgrad,
  the prologue backward) -- the alternative benchmarks/conv_choice.py weighs Triton against.
* ``wgrad``: ``fastres-triton`` = grad_weight with ``a`` recomputed from x as it loads,
  plus grad_bias; ``aten`` = convolution_backward's grad_weight + grad_bias on a stored
  ``a``; ``aten+eager`` = recompute ``a`` eagerly, then the same; ``aten-fallback`` =
  ``conv2d_act_backward_aten`` for grad_weight and grad_bias.

``flops`` = 2 N P Q K (C/groups) R S per kernel (the prologue's work is not counted).
GPU only (the CPU interpreter is a correctness tool): skipped with the reason on a CPU.
"""
from __future__ import annotations

import importlib

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from _bench_utils import (CONV_BATCH as BATCH, ON_GPU, RESNET50_CONVS as SHAPES, conv_case, conv_info,  # noqa: E402
                          eager_prologue_backward, run_benchmark)

pytestmark = pytest.mark.skipif(not ON_GPU, reason="GPU benchmark: Triton's CPU interpreter is not timed")

IMPLS = ["fastres-triton", "aten", "aten+eager", "aten-fallback"]


def _kernels():
    try:
        from fastres import kernels as k
    except ImportError:  # a source checkout on PYTHONPATH
        import kernels as k
    return importlib.import_module(k.__name__ + "._conv_bwd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["dgrad", "wgrad"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_bwd(benchmark, name, op, impl):
    B = _kernels()
    d = conv_case(name)
    x, w, s, t, go, a = d.x, d.w, d.s, d.t, d.go, d.a
    stride, pad, dil = (d.stride, d.stride), (d.pad, d.pad), (1, 1)
    cbw = torch.ops.aten.convolution_backward
    k = d.k
    if impl == "aten-fallback":
        from fastres import conv_ops
        need = [True, False, False, True, True, False] if op == "dgrad" else [False, True, True, False, False, False]

        def fn():
            return conv_ops.conv2d_act_backward_aten(go, None, None, x, w, s, t, None, None, list(stride), list(pad),
                                                     list(dil), 1, True, False, need)
    elif op == "dgrad":
        if impl == "fastres-triton":
            def fn():
                return B.conv2d_act_dgrad(go, w, x, s, t, True, stride, pad, dil, 1, True)
        elif impl == "aten":
            def fn():
                return cbw(go, a, w, None, stride, pad, dil, False, [0, 0], 1, [True, False, False])
        else:
            def fn():
                da = cbw(go, a, w, None, stride, pad, dil, False, [0, 0], 1, [True, False, False])[0]
                return eager_prologue_backward(da, x, s, t)
    else:
        if impl == "fastres-triton":
            def fn():
                return B.conv2d_act_wgrad(go, x, s, t, True, w.shape, stride, pad, dil, 1, True)
        elif impl == "aten":
            def fn():
                return cbw(go, a, w, [k], stride, pad, dil, False, [0, 0], 1, [False, True, True])
        else:
            def fn():
                a2 = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(x.dtype)
                return cbw(go, a2, w, [k], stride, pad, dil, False, [0, 0], 1, [False, True, True])

    def step():
        with torch.no_grad():
            fn()

    benchmark.group = f"conv {op} {name} b{BATCH} bf16 NHWC"
    run_benchmark(benchmark, step, info=dict(
        op=f"conv_{op}", impl=impl, backend="triton" if impl == "fastres-triton" else "aten",
        shape=[BATCH, d.c, d.h, d.h, k, d.r, d.stride], dtype="bf16", layout="NHWC", bytes=None, flops=d.flops,
        # the convolution, for benchmarks/conv_choice.py (FASTRES_CONV=auto's decision table)
        conv=conv_info(name, d, op)))
