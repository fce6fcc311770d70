"""cuDNN fused-convolution graphs (issue 11, ``csrc/cudnn/conv_graph.cpp``) against
aten's unfused convolution + eager elementwise ops, on every distinct ResNet-50
convolution at batch 256, bf16 and fp16, NHWC (per-layer figures; the per-block ones are
``benchmarks/test_bench_blocks.py`` run with ``FASTRES_CONV=cudnn``, run_gpu.sh's part 12).

* ``infer``: ``relu(conv(x) + bias)`` — ``fastres-cudnn`` = one cuDNN graph
  (``fastres::cudnn_conv_bias_act``); ``aten`` = ``F.conv2d`` with its bias (cuDNN)
  then ``relu_``.
* ``train-fwd``: ``y = conv(relu(x*s + t))`` plus per-channel sum / sum of squares of y
  — ``fastres-cudnn`` = one graph (``fastres::cudnn_conv_act_stats``); ``aten`` = the
  eager prologue, ``F.conv2d``, then ``sum`` and ``square().sum()`` in fp32.
* ``dgrad``: grad_x, Σdv·x, Σdv of that forward — ``fastres-cudnn`` =
  ``fastres.cudnn.prologue_conv_backward`` (the dgrad + dReLU + dBN-weight graph, then
  grad_x = dv·s by the fused elementwise kernel); ``aten`` = ``convolution_backward`` on
  the stored activation + the eager prologue backward.
* ``wgrad``: grad_weight — ``fastres-cudnn`` = the scale-shift-ReLU wgrad graph (the
  prologue recomputed as x is loaded); ``aten`` = the eager prologue recomputed, then
  ``convolution_backward``.

Where the graph does not apply or cuDNN finds no engine for it on this GPU the
``fastres-cudnn`` case is skipped with that reason (the library falls back to aten
there). GPU only: skipped with the reason on a CPU.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _bench_utils import (CONV_BATCH as BATCH, DTYPE_NAMES, ON_GPU, RESNET50_CONVS as SHAPES,  # noqa: E402
                          conv_case, conv_info, cudnn_refusals_since, eager_prologue_backward, run_benchmark)

pytestmark = pytest.mark.skipif(not ON_GPU, reason="GPU benchmark: the cuDNN graphs run on CUDA devices only")

IMPLS = ["fastres-cudnn", "aten"]
DTYPES = [torch.bfloat16, torch.float16]


def _check_graph(cudnn, d, op, dil):
    """Skip the fastres-cudnn case (with the reason) where its graph does not apply."""
    if op in ("dgrad", "wgrad"):
        pat, why = cudnn.choose_backward(op, d.x, d.w, d.s, d.t, True, [d.stride] * 2, [d.pad] * 2, dil, 1)
    else:
        pat, why = cudnn.choose(d.x, d.w, d.b if op == "infer" else None, d.s if op != "infer" else None,
                                d.t if op != "infer" else None, None, [d.stride] * 2, [d.pad] * 2, dil, 1,
                                op != "infer", op == "infer", op != "infer")
    if pat is None:
        pytest.skip(f"no cuDNN graph for this case: {why}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("op", ["infer", "train-fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_cudnn_conv(benchmark, name, op, dtype, impl):
    from fastres import cudnn
    d = conv_case(name, dtype)
    x, w, s, t, b, a, go = d.x, d.w, d.s, d.t, d.b, d.a, d.go
    stride, pad, dil = [d.stride] * 2, [d.pad] * 2, [1, 1]
    ops = torch.ops.fastres
    cbw = torch.ops.aten.convolution_backward
    if impl == "fastres-cudnn":
        _check_graph(cudnn, d, op, dil)
        if op == "infer":
            def fn():
                return ops.cudnn_conv_bias_act(x, w, b, None, stride, pad, dil, 1, True)
        elif op == "train-fwd":
            def fn():
                return ops.cudnn_conv_act_stats(x, w, s, t, stride, pad, dil, 1, True)
        else:
            need = (True, False, True, True) if op == "dgrad" else (False, True, False, False)

            def fn():
                return cudnn.prologue_conv_backward(go, x, w, s, t, True, stride, pad, dil, 1, need)
    elif op == "infer":
        def fn():
            return F.conv2d(x, w, b.to(dtype), stride, pad).relu_()
    elif op == "train-fwd":
        def fn():
            u = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(dtype)
            y = F.conv2d(u, w, None, stride, pad)
            yf = y.float()
            return y, yf.sum((0, 2, 3)), yf.square().sum((0, 2, 3))
    elif op == "dgrad":
        def fn():
            da = cbw(go, a, w, None, stride, pad, dil, False, [0, 0], 1, [True, False, False])[0]
            return eager_prologue_backward(da, x, s, t)
    else:
        def fn():
            u = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(dtype)
            return cbw(go, u, w, None, stride, pad, dil, False, [0, 0], 1, [False, True, False])

    def step():
        with torch.no_grad():
            fn()

    # the first call builds the plans. The raw graph ops (infer, train-fwd) raise cuDNN's
    # refusal; the backward helper falls back to aten and remembers the refused graph
    # (fastres.cudnn._no_engine grows): either way the case would not time a graph
    refused_before = dict(cudnn._no_engine)
    try:
        step()
    except RuntimeError as e:
        if impl == "fastres-cudnn" and cudnn.NO_ENGINE in str(e):
            pytest.skip(f"cuDNN has no engine for this graph here: {str(e).splitlines()[0]}")
        raise
    new = cudnn_refusals_since(refused_before)
    if impl == "fastres-cudnn" and new:
        pytest.skip(f"cuDNN has no engine for this graph here (the aten fallback would be timed): {new[0]}")
    dt = DTYPE_NAMES[dtype]
    benchmark.group = f"cudnn conv {op} {name} b{BATCH} {dt} NHWC"
    run_benchmark(benchmark, step, info=dict(
        op=f"conv_{op}", impl=impl, backend="cudnn-graph" if impl == "fastres-cudnn" else "aten",
        shape=[BATCH, d.c, d.h, d.h, d.k, d.r, d.stride], dtype=dt, layout="NHWC", bytes=None, flops=d.flops,
        conv=conv_info(name, d, op)))
