"""The fused convolution ``conv2d_act`` against cuDNN, for every distinct ResNet-50
convolution at batch 256, bf16, NHWC (issue 10), forward and forward+backward.

What each contender computes, for a conv that follows a training-mode BatchNorm + ReLU
and feeds the next one (the position of every conv inside a bottleneck):

* ``cudnn``        — (a) the convolution alone, ``F.conv2d(a, W)`` on an already
  normalised activation ``a``: the floor the fused kernel must reach while doing more;
* ``cudnn+eager``  — (b) what an unfused training step does around it: the previous
  BN's normalisation + ReLU ``a = relu(x*s + t)`` as its own pass, the conv, then the
  next BN's batch statistics ``var_mean(y)`` as another pass;
* ``cudnn+fastres`` — what a fastres block runs where the conv is not fused (the
  strongest alternative, the one ``FASTRES_CONV=auto`` weighs the fused conv against,
  benchmarks/conv_choice.py): the conv on the normalised activation, then the next
  BN's statistics, normalisation and ReLU in fastres's fused BN op (``batch_norm_act``,
  training mode, the device's default backend) — the pass that produces the next conv's
  input, as the fused conv's prologue does;
* ``fastres``      — (c) ``conv2d_act(x, W, in_scale=s, in_shift=t, in_relu=True,
  stats="moments")``: all of it in one Triton kernel (+ the tiny tile-moment merge),
  with ``FASTRES_CONV=fused`` (skipped with the reason where it would fall back to aten).

``fwd``: the forward only (no autograd). ``fwd+bwd``: forward, then the gradients
(``torch.autograd.grad``: nothing accumulates) of every input — x, W, s, t (``cudnn``:
a and W; ``cudnn+fastres``: a, W and the BN's weight and bias) — ``fastres`` under
``FASTRES_CONV=fused FASTRES_CONV_BWD=triton``: the Triton dgrad/wgrad kernels. ``flops`` =
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

from fastres.functional import batch_norm_act  # noqa: E402

from _bench_utils import (CONV_BATCH as BATCH, ON_GPU, RESNET50_CONVS as SHAPES, conv_case, conv_info,  # noqa: E402
                          require_fused_conv, run_benchmark)

pytestmark = pytest.mark.skipif(not ON_GPU, reason="GPU benchmark: Triton's CPU interpreter is not timed")

IMPLS = ["cudnn", "cudnn+eager", "cudnn+fastres", "fastres"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_act(benchmark, name, mode, impl, monkeypatch):
    grad = mode == "fwd+bwd"
    d = conv_case(name)
    x, w, s, t, a, gy, stride, pad = d.x, d.w, d.s, d.t, d.a, d.go, d.stride, d.pad
    k = d.k
    gamma = torch.rand(k, device=x.device) + 0.5
    beta = torch.randn(k, device=x.device) * 0.1
    rm, rv = torch.zeros(k, device=x.device), torch.ones(k, device=x.device)
    leaves = {"cudnn": [a, w], "cudnn+eager": [x, w, s, t], "cudnn+fastres": [a, w, gamma, beta],
              "fastres": [x, w, s, t]}[impl]
    for v in leaves:
        v.requires_grad_(grad)
    dtype = x.dtype

    if impl == "cudnn":
        def fwd():
            return F.conv2d(a, w, None, stride, pad)
    elif impl == "cudnn+eager":
        def fwd():
            u = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(dtype)
            y = F.conv2d(u, w, None, stride, pad)
            var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
            return y, mean, var
    elif impl == "cudnn+fastres":
        def fwd():
            y = F.conv2d(a, w, None, stride, pad)
            return batch_norm_act(y, rm, rv, gamma, beta, training=True, momentum=0.1, eps=1e-5,
                                  activation="relu")
    else:
        require_fused_conv()
        monkeypatch.setenv("FASTRES_CONV", "fused")
        monkeypatch.setenv("FASTRES_CONV_BWD", "triton")

        def fwd():
            return conv2d_act(x, w, None, stride, pad, in_scale=s, in_shift=t, in_relu=True, stats="moments")

    if grad:
        def step():
            out = fwd()
            y = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(y, leaves, gy)
    else:
        def step():
            with torch.no_grad():
                fwd()

    benchmark.group = f"conv2d_act {mode} {name} b{BATCH} bf16 NHWC"
    run_benchmark(benchmark, step, info=dict(
        op=f"conv2d_act_{mode}", impl=impl,
        backend={"fastres": "triton", "cudnn+fastres": "aten+" + fastres.backend_for(x.device)}.get(impl, "aten"),
        shape=[BATCH, d.c, d.h, d.h, d.k, d.r, stride], dtype="bf16", layout="NHWC", bytes=None,
        flops=d.flops * (3 if grad else 1),
        # the convolution, for benchmarks/conv_choice.py (FASTRES_CONV=auto's decision table)
        conv=conv_info(name, d, mode)))
