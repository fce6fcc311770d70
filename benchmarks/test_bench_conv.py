"""The fused convolution ``conv2d_act`` against cuDNN, for every distinct ResNet-50
convolution at batch 256, bf16, NHWC (issue 10), forward and forward+backward.

What each contender computes, for a conv that follows a training-mode BatchNorm + ReLU
and feeds the next one (the position of every conv inside a bottleneck):

* ``cudnn``        — (a) the convolution alone, ``F.conv2d(a, W)`` on an already
  normalised activation ``a``: the floor the fused kernel must reach while doing more;
* ``cudnn+eager``  — (b) what an unfused training step does around it: the previous
  BN's normalisation + ReLU ``a = relu(x*s + t)`` as its own pass, the conv, then the
  next BN's batch statistics ``var_mean(y)`` as another pass;
* ``fastres``      — (c) ``conv2d_act(x, W, in_scale=s, in_shift=t, in_relu=True,
  stats="moments")``: all of it in one Triton kernel (+ the tiny tile-moment merge),
  with ``FASTRES_CONV=fused``.

``fwd``: the forward only (no autograd). ``fwd+bwd``: forward, then backward with
gradients for x, W, s, t (for ``cudnn``: a and W) — conv2d_act's backward is the Triton
dgrad/wgrad kernels where kernels/_conv_bwd.py exists, else aten's. ``flops`` =
2·N·P·Q·K·(C/groups)·R·S for fwd and 3x that for fwd+bwd (the elementwise work is
not counted), so TFLOP/s compares like with like. Whole-block figures are in
benchmarks/test_bench_blocks.py (run it with FASTRES_CONV=fused).

GPU only: Triton's CPU interpreter is a correctness tool, never timed (skipped with
that reason on a CPU). The first call of each shape autotunes the forward kernel
(outside the timed rounds).
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastres  # noqa: E402
from fastres.functional import conv2d_act  # noqa: E402

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
IMPLS = ["cudnn", "cudnn+eager", "fastres"]


def _setup(name, grad):
    c, h, k, r, stride, pad = SHAPES[name]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(BATCH, c, h, h, generator=g, device=DEVICE, dtype=DTYPE).contiguous(memory_format=cl)
    w = (torch.randn(k, c, r, r, generator=g, device=DEVICE, dtype=DTYPE) * 0.05).contiguous(memory_format=cl)
    s = torch.rand(c, generator=g, device=DEVICE) + 0.5
    t = torch.randn(c, generator=g, device=DEVICE) * 0.1
    a = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(DTYPE)
    for v in (x, w, s, t, a):
        v.requires_grad_(grad)
    p = (h + 2 * pad - r) // stride + 1
    return x, w, s, t, a, stride, pad, p


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_act(benchmark, name, mode, impl):
    grad = mode == "fwd+bwd"
    x, w, s, t, a, stride, pad, p = _setup(name, grad)
    gy = torch.randn(BATCH, w.shape[0], p, p, device=DEVICE, dtype=DTYPE).contiguous(
        memory_format=torch.channels_last)

    if impl == "cudnn":
        def fwd():
            return F.conv2d(a, w, None, stride, pad)
    elif impl == "cudnn+eager":
        def fwd():
            u = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(DTYPE)
            y = F.conv2d(u, w, None, stride, pad)
            var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
            return y, mean, var
    else:
        def fwd():
            with fastres.use_conv("fused"):
                return conv2d_act(x, w, None, stride, pad, in_scale=s, in_shift=t, in_relu=True, stats="moments")

    if grad:
        def step():
            out = fwd()
            y = out[0] if isinstance(out, tuple) else out
            y.backward(gy)
    else:
        def step():
            with torch.no_grad():
                fwd()

    c, h, k, r, _, pad = SHAPES[name]
    flops = 2 * BATCH * p * p * k * c * r * r * (3 if grad else 1)
    benchmark.group = f"conv2d_act {mode} {name} b{BATCH} bf16 NHWC"
    run_benchmark(benchmark, step, info=dict(
        op=f"conv2d_act_{mode}", impl=impl, backend="triton" if impl == "fastres" else "aten",
        shape=[BATCH, c, h, h, k, r, stride], dtype="bf16", layout="NHWC", bytes=None, flops=flops,
        # the convolution, for benchmarks/conv_choice.py (FASTRES_CONV=auto's decision table)
        conv=dict(name=name, mode=mode, cin=c, cout=k, kernel=[r, r], stride=[stride, stride],
                  padding=[pad, pad], dilation=[1, 1], groups=1)))
