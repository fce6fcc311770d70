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
  backward (mask, scale, two reductions).
* ``wgrad``: ``fastres-triton`` = grad_weight with ``a`` recomputed from x as it loads,
  plus grad_bias; ``aten`` = convolution_backward's grad_weight + grad_bias on a stored
  ``a``; ``aten+eager`` = recompute ``a`` eagerly, then the same.

``flops`` = 2 N P Q K (C/groups) R S per kernel (the prologue's work is not counted).
GPU only (the CPU interpreter is a correctness tool): skipped with the reason on a CPU.
"""
from __future__ import annotations

import importlib

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from _bench_utils import DEVICE, ON_GPU, run_benchmark  # noqa: E402

pytestmark = pytest.mark.skipif(not ON_GPU, reason="GPU benchmark: Triton's CPU interpreter is not timed")

BATCH = 256
DTYPE = torch.bfloat16
# name: (C_in, H_in, K_out, R, stride, padding) -- every distinct ResNet-50 convolution
SHAPES = {
    "stem-7x7s2": (3, 224, 64, 7, 2, 3),
    "l1-1x1-64-64": (64, 56, 64, 1, 1, 0),
    "l1-3x3-64": (64, 56, 64, 3, 1, 1),
    "l1-1x1-64-256": (64, 56, 256, 1, 1, 0),
    "l1-1x1-256-64": (256, 56, 64, 1, 1, 0),
    "l2-1x1-256-128": (256, 56, 128, 1, 1, 0),
    "l2-3x3s2-128": (128, 56, 128, 3, 2, 1),
    "l2-ds-1x1s2-256-512": (256, 56, 512, 1, 2, 0),
    "l2-1x1-128-512": (128, 28, 512, 1, 1, 0),
    "l2-1x1-512-128": (512, 28, 128, 1, 1, 0),
    "l2-3x3-128": (128, 28, 128, 3, 1, 1),
    "l3-1x1-512-256": (512, 28, 256, 1, 1, 0),
    "l3-3x3s2-256": (256, 28, 256, 3, 2, 1),
    "l3-ds-1x1s2-512-1024": (512, 28, 1024, 1, 2, 0),
    "l3-1x1-256-1024": (256, 14, 1024, 1, 1, 0),
    "l3-1x1-1024-256": (1024, 14, 256, 1, 1, 0),
    "l3-3x3-256": (256, 14, 256, 3, 1, 1),
    "l4-1x1-1024-512": (1024, 14, 512, 1, 1, 0),
    "l4-3x3s2-512": (512, 14, 512, 3, 2, 1),
    "l4-ds-1x1s2-1024-2048": (1024, 14, 2048, 1, 2, 0),
    "l4-1x1-512-2048": (512, 7, 2048, 1, 1, 0),
    "l4-1x1-2048-512": (2048, 7, 512, 1, 1, 0),
    "l4-3x3-512": (512, 7, 512, 3, 1, 1),
}
IMPLS = ["fastres-triton", "aten", "aten+eager"]


def _kernels():
    try:
        from fastres import kernels as k
    except ImportError:  # a source checkout on PYTHONPATH
        import kernels as k
    return importlib.import_module(k.__name__ + "._conv_bwd")


def _setup(name):
    c, h, k, r, stride, pad = SHAPES[name]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(BATCH, c, h, h, generator=g, device=DEVICE, dtype=DTYPE).contiguous(memory_format=cl)
    w = (torch.randn(k, c, r, r, generator=g, device=DEVICE, dtype=DTYPE) * 0.05).contiguous(memory_format=cl)
    s = torch.rand(c, generator=g, device=DEVICE) + 0.5
    t = torch.randn(c, generator=g, device=DEVICE) * 0.1
    p = (h + 2 * pad - r) // stride + 1
    go = torch.randn(BATCH, k, p, p, generator=g, device=DEVICE, dtype=DTYPE).contiguous(memory_format=cl)
    a = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(DTYPE)
    return x, w, s, t, go, a, (stride, stride), (pad, pad), p


def _eager_prologue_bwd(da, x, s, t):
    z = x.float() * s[None, :, None, None] + t[None, :, None, None]
    d = torch.where(z > 0, da.float(), 0.0)
    return (d * s[None, :, None, None]).to(x.dtype), (d * x.float()).sum((0, 2, 3)), d.sum((0, 2, 3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["dgrad", "wgrad"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_bwd(benchmark, name, op, impl):
    B = _kernels()
    x, w, s, t, go, a, stride, pad, p = _setup(name)
    dil = (1, 1)
    cbw = torch.ops.aten.convolution_backward
    k = w.shape[0]
    if op == "dgrad":
        if impl == "fastres-triton":
            def fn():
                return B.conv2d_act_dgrad(go, w, x, s, t, True, stride, pad, dil, 1, True)
        elif impl == "aten":
            def fn():
                return cbw(go, a, w, None, stride, pad, dil, False, [0, 0], 1, [True, False, False])
        else:
            def fn():
                da = cbw(go, a, w, None, stride, pad, dil, False, [0, 0], 1, [True, False, False])[0]
                return _eager_prologue_bwd(da, x, s, t)
    else:
        if impl == "fastres-triton":
            def fn():
                return B.conv2d_act_wgrad(go, x, s, t, True, w.shape, stride, pad, dil, 1, True)
        elif impl == "aten":
            def fn():
                return cbw(go, a, w, [k], stride, pad, dil, False, [0, 0], 1, [False, True, True])
        else:
            def fn():
                a2 = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(DTYPE)
                return cbw(go, a2, w, [k], stride, pad, dil, False, [0, 0], 1, [False, True, True])

    def step():
        with torch.no_grad():
            fn()

    c, h, _, r, _, _ = SHAPES[name]
    flops = 2 * BATCH * p * p * k * c * r * r
    benchmark.group = f"conv {op} {name} b{BATCH} bf16 NHWC"
    run_benchmark(benchmark, step, info=dict(
        op=f"conv_{op}", impl=impl, backend="triton" if impl == "fastres-triton" else "aten",
        shape=[BATCH, c, h, h, k, r, stride[0]], dtype="bf16", layout="NHWC", bytes=None, flops=flops,
        # the convolution, for benchmarks/conv_choice.py (FASTRES_CONV=auto's decision table)
        conv=dict(name=name, mode=op, cin=c, cout=k, kernel=[r, r], stride=list(stride), padding=list(pad),
                  dilation=list(dil), groups=1)))
