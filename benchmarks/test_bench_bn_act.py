"""The fused BatchNorm(+add)+ReLU op (issue #2): forward and forward+backward, and the
eval-mode form, against eager PyTorch (``F.batch_norm`` + add + ReLU) and
``torch.compile`` of the same function.

GPU: the ResNet-50 activation shapes at batch 256, bf16, NHWC — 64x56x56,
256x56x56, 512x28x28, 1024x14x14, 2048x7x7. CPU: the same channel/spatial shapes at
batch 8, fp32, NHWC (plus one NCHW case).

``bytes`` is the least traffic the computation needs, in the activation dtype:
forward reads x and the residual and writes y (3 tensors); the backward reads
grad_y, x and y and writes grad_x and grad_residual (5 more); eval forward reads x
and the residual and writes y (3). An unfused implementation moves more — that is
the point — but is measured against the same figure, so ``GB/s`` reads as
"effective bandwidth". ``flops`` counts ~10 per element forward, ~12 backward.

    pytest benchmarks/test_bench_bn_act.py --benchmark-only [--benchmark-json out.json]
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastres  # noqa: E402
from fastres import functional as FF  # noqa: E402

from _bench_utils import DEVICE, DTYPE_NAMES, ON_GPU, fastres_backends, reset_compile, run_benchmark  # noqa: E402

if ON_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(256, 64, 56, 56), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
    LAYOUTS = ["NHWC"]
else:
    DTYPE = torch.float32
    SHAPES = [(8, 64, 56, 56), (8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]
    LAYOUTS = ["NHWC"]
CASES = [(s, lay) for s in SHAPES for lay in LAYOUTS] + ([] if ON_GPU else [((8, 256, 56, 56), "NCHW")])
CASE_IDS = ["x".join(map(str, s)) + "-" + lay for s, lay in CASES]
PASSES = ["fwd", "fwdbwd", "eval"]
IMPLS = ["eager", "compile"] + fastres_backends(DEVICE, include_torch=False)  # fastres[torch] *is* eager


def eager_bn_add_relu(x, rm, rv, w, b, residual, training: bool):
    return torch.relu(F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5) + residual)


def _inputs(shape, layout, requires_grad):
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    g = torch.Generator(device=DEVICE).manual_seed(0)  # made on the device: fast at batch 256

    def act():
        return torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE).contiguous(memory_format=fmt)
    x, res = act(), act()
    wt = torch.rand(c, generator=g, device=DEVICE) + 0.5  # fp32 parameters and buffers (AMP)
    bs = torch.randn(c, generator=g, device=DEVICE)
    rm = torch.zeros(c, device=DEVICE)
    rv = torch.ones(c, device=DEVICE)
    gy = act()
    for t in (x, res, wt, bs) if requires_grad else ():
        t.requires_grad_(True)
    return x, res, wt, bs, rm, rv, gy


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_bn_add_relu(benchmark, shape, layout, pass_, impl):
    training = pass_ != "eval"
    grad = pass_ == "fwdbwd"
    x, res, wt, bs, rm, rv, gy = _inputs(shape, layout, grad)

    if impl in ("eager", "compile"):
        f = eager_bn_add_relu
        if impl == "compile":
            reset_compile()
            f = torch.compile(eager_bn_add_relu, dynamic=False)

        def forward():
            return f(x, rm, rv, wt, bs, res, training)
        backend = ""
    else:
        backend = impl

        def forward():
            return FF.batch_norm_act(x, rm, rv, wt, bs, training, 0.1, 1e-5, residual=res, activation="relu")

    if grad:
        def step():
            y = forward()
            torch.autograd.grad(y, (x, res, wt, bs), gy)
    else:
        def step():
            with torch.no_grad():
                forward()

    numel = x.numel()
    item = x.element_size()
    tensors = {"fwd": 3, "fwdbwd": 8, "eval": 3}[pass_]
    flops = {"fwd": 10, "fwdbwd": 22, "eval": 4}[pass_] * numel
    benchmark.group = f"bn_add_relu {pass_} {'x'.join(map(str, shape))} {layout} {DTYPE_NAMES[DTYPE]}"
    info = dict(op="bn_add_relu", impl=impl if not backend else f"fastres[{backend}]", backend=backend,
                pass_=pass_, shape=list(shape), dtype=DTYPE_NAMES[DTYPE], layout=layout,
                bytes=tensors * numel * item, flops=flops)
    if backend:
        with fastres.use_backend(backend):
            assert fastres.backend_for(x.device) == backend
            run_benchmark(benchmark, step, info=info)
    else:
        run_benchmark(benchmark, step, info=info)
    if impl == "compile":
        reset_compile()
