"""cuDNN fused-convolution graphs (issue 11, ``csrc/cudnn/conv_graph.cpp``) against
aten's unfused convolution + eager elementwise ops, on every distinct ResNet-50
convolution at batch 256, bf16, NHWC.

* ``infer``: ``relu(conv(x) + bias)`` — ``fastres-cudnn`` = one cuDNN graph
  (``fastres::cudnn_conv_bias_act``); ``aten`` = ``F.conv2d`` with its bias (cuDNN)
  then ``relu_``.
* ``train-fwd``: ``y = conv(relu(x*s + t))`` plus per-channel sum / sum of squares of y
  — ``fastres-cudnn`` = one graph (``fastres::cudnn_conv_act_stats``); ``aten`` = the
  eager prologue, ``F.conv2d``, then ``sum`` and ``square().sum()`` in fp32.

Where cuDNN finds no engine for a graph on this GPU the case is skipped with that
reason (the library falls back to aten there). GPU only: skipped with the reason on a CPU.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _bench_utils import DEVICE, ON_GPU, run_benchmark  # noqa: E402
from test_bench_conv_bwd import SHAPES  # noqa: E402  (every distinct ResNet-50 conv)

pytestmark = pytest.mark.skipif(not ON_GPU, reason="GPU benchmark: the cuDNN graphs run on CUDA devices only")

BATCH = 256
DTYPE = torch.bfloat16
IMPLS = ["fastres-cudnn", "aten"]


def _setup(name):
    c, h, k, r, stride, pad = SHAPES[name]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(BATCH, c, h, h, generator=g, device=DEVICE, dtype=DTYPE).contiguous(memory_format=cl)
    w = (torch.randn(k, c, r, r, generator=g, device=DEVICE, dtype=DTYPE) * 0.05).contiguous(memory_format=cl)
    s = (torch.rand(c, generator=g, device=DEVICE) + 0.5).to(DTYPE)
    t = (torch.randn(c, generator=g, device=DEVICE) * 0.1).to(DTYPE)
    b = (torch.randn(k, generator=g, device=DEVICE) * 0.1).to(DTYPE)
    p = (h + 2 * pad - r) // stride + 1
    return x, w, s, t, b, [stride, stride], [pad, pad], p


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["infer", "train-fwd"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_cudnn_conv(benchmark, name, op, impl):
    from fastres import cudnn
    ok, why = cudnn.available("cuda")
    if impl == "fastres-cudnn" and not ok:
        pytest.skip(f"cuDNN graphs unavailable: {why}")
    x, w, s, t, b, stride, pad, p = _setup(name)
    dil = [1, 1]
    ops = torch.ops.fastres
    if op == "infer":
        if impl == "fastres-cudnn":
            def fn():
                return ops.cudnn_conv_bias_act(x, w, b, None, stride, pad, dil, 1, True)
        else:
            def fn():
                return F.conv2d(x, w, b, stride, pad).relu_()
    else:
        if impl == "fastres-cudnn":
            def fn():
                return ops.cudnn_conv_act_stats(x, w, s, t, stride, pad, dil, 1, True)
        else:
            def fn():
                a = torch.relu(x.float() * s.float()[None, :, None, None] + t.float()[None, :, None, None]).to(DTYPE)
                y = F.conv2d(a, w, None, stride, pad)
                yf = y.float()
                return y, yf.sum((0, 2, 3)), yf.square().sum((0, 2, 3))

    try:
        with torch.no_grad():
            fn()
    except RuntimeError as e:
        if cudnn.NO_ENGINE in str(e):
            pytest.skip(f"cuDNN has no engine for this graph here: {e}")
        raise

    def step():
        with torch.no_grad():
            fn()

    c, h, k, r, _, _ = SHAPES[name]
    flops = 2 * BATCH * p * p * k * c * r * r
    benchmark.group = f"cudnn conv {op} {name} b{BATCH} bf16 NHWC"
    run_benchmark(benchmark, step, info=dict(
        op=f"conv_{op}", impl=impl, backend="cudnn-graph" if impl == "fastres-cudnn" else "aten",
        shape=[BATCH, c, h, h, k, r, stride[0]], dtype="bf16", layout="NHWC", bytes=None, flops=flops))
