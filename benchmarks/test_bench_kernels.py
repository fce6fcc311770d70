"""The four fused ops one by one, called raw through ``fastres.ops.family(backend)``
(no validation, no autograd): what each backend's kernel costs, next to the aten
reference family (``torch``).

Ops and the least traffic each needs (activation-dtype tensors of the shape):
``bn_act_train`` reads x, residual, writes y (3); ``bn_act_train_backward`` reads
grad_y, x, y, writes grad_x, grad_z (5); ``affine_act`` reads x, residual, writes y
(3); ``affine_act_backward`` reads grad_y, y, writes grad_x, grad_z (4; x only for
parameter gradients, not requested here).

GPU: 256x256x56x56 and 256x1024x14x14 bf16 NHWC; CPU: 8x256x56x56 fp32 NHWC and NCHW.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from fastres import ops  # noqa: E402

from _bench_utils import DEVICE, DTYPE_NAMES, ON_GPU, fastres_backends, run_benchmark  # noqa: E402

if ON_GPU:
    DTYPE = torch.bfloat16
    CASES = [((256, 256, 56, 56), "NHWC"), ((256, 1024, 14, 14), "NHWC")]
else:
    DTYPE = torch.float32
    CASES = [((8, 256, 56, 56), "NHWC"), ((8, 256, 56, 56), "NCHW")]
CASE_IDS = ["x".join(map(str, s)) + "-" + lay for s, lay in CASES]
OPS = ["bn_act_train", "bn_act_train_backward", "affine_act", "affine_act_backward"]
TENSORS = {"bn_act_train": 3, "bn_act_train_backward": 5, "affine_act": 3, "affine_act_backward": 4}
FLOPS = {"bn_act_train": 10, "bn_act_train_backward": 12, "affine_act": 4, "affine_act_backward": 2}


@pytest.mark.parametrize("backend", fastres_backends(DEVICE, include_torch=True))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_kernel(benchmark, shape, layout, op, backend):
    fam = ops.family(backend)
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def act():
        return torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE).contiguous(memory_format=fmt)
    x, res, gy = act(), act(), act()
    wt = torch.rand(c, generator=g, device=DEVICE) + 0.5
    bs = torch.randn(c, generator=g, device=DEVICE)
    eps = 1e-5
    with torch.no_grad():
        y, mean, var = fam.bn_act_train(x, wt, bs, res, eps, True)
        scale = wt * torch.rsqrt(var + eps)
        shift = bs - mean * scale
        ya = fam.affine_act(x, scale, shift, res, True)

    calls = {
        "bn_act_train": lambda: fam.bn_act_train(x, wt, bs, res, eps, True),
        "bn_act_train_backward": lambda: fam.bn_act_train_backward(gy, x, y, wt, mean, var, eps, True, True),
        "affine_act": lambda: fam.affine_act(x, scale, shift, res, True),
        "affine_act_backward": lambda: fam.affine_act_backward(gy, x, ya, scale, True, True, False),
    }
    fn = calls[op]

    def step():
        with torch.no_grad():
            fn()

    numel = x.numel()
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {layout} {DTYPE_NAMES[DTYPE]}"
    run_benchmark(benchmark, step, info=dict(
        op=op, impl=f"fastres[{backend}]" if backend != "torch" else "aten reference", backend=backend,
        shape=list(shape), dtype=DTYPE_NAMES[DTYPE], layout=layout,
        bytes=TENSORS[op] * numel * x.element_size(), flops=FLOPS[op] * numel))
