"""Residual blocks: torchvision's block vs the same block of the fastres model (same
state_dict), training (forward + backward) and inference.

Blocks are taken from the models (``resnet50().layer1[0]`` …), so they are exactly
the blocks the networks run:
* ``bottleneck-proj``: resnet50 ``layer1.0`` (64 -> 256, projection shortcut), 56x56 input
* ``bottleneck-s2``:   resnet50 ``layer2.0`` (stride 2, projection), 56x56 input
* ``bottleneck-id``:   resnet50 ``layer3.1`` (identity shortcut), 14x14 input
* ``basic-id``:        resnet18 ``layer1.0`` (identity shortcut), 56x56 input

GPU: batch 256 bf16 (autocast) NHWC; CPU: batch 8 fp32 NHWC. ``flops`` are counted
with ``torch.utils.flop_counter`` (convolutions), x3 for training.
"""
from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import fastres  # noqa: E402

from _bench_utils import (DEVICE, ON_GPU, cudnn_refusals_since, fastres_backends, run_benchmark,  # noqa: E402
                          same_weights_model)

BATCH = 256 if ON_GPU else 8
DTYPE = "bf16" if ON_GPU else "fp32"
BLOCKS = {
    "bottleneck-proj": ("resnet50", "layer1.0", (64, 56, 56)),
    "bottleneck-s2": ("resnet50", "layer2.0", (256, 56, 56)),
    "bottleneck-id": ("resnet50", "layer3.1", (1024, 14, 14)),
    "basic-id": ("resnet18", "layer1.0", (64, 56, 56)),
}
IMPLS = ["torchvision"] + fastres_backends(DEVICE, include_torch=True)


def _block(arch, path, impl):
    m = same_weights_model(arch, impl == "torchvision")
    return m.get_submodule(path).to(DEVICE, memory_format=torch.channels_last)


def _autocast():
    if DTYPE == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def _flops(block, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad(), _autocast():
        block(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_block(benchmark, block, mode, impl):
    arch, path, (c, h, w) = BLOCKS[block]
    backend = "" if impl == "torchvision" else impl
    ctx = fastres.use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        net = _block(arch, path, impl)
        x = torch.randn(BATCH, c, h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
        # counted on torchvision's block (the same convolutions): a fastres custom op counts as 0 FLOPs
        flops = _flops(_block(arch, path, "torchvision").eval(), x[:1]) * BATCH
        net.train(mode == "train")
        if mode == "train":
            x.requires_grad_(True)
            params = [p for p in net.parameters()]

            def step():
                with _autocast():
                    y = net(x)
                torch.autograd.grad(y, [x] + params, torch.ones_like(y))
        else:
            def step():
                with torch.inference_mode(), _autocast():
                    net(x)
        benchmark.group = f"block {block} {mode} b{BATCH} {DTYPE}"
        from fastres import conv_backend, cudnn
        path_now = conv_backend.conv_for(x.device) if backend else "aten"
        refused_before = set(cudnn._no_engine)
        run_benchmark(benchmark, step, calls=1 if not ON_GPU else 5, info=dict(
            block=block, arch=arch, path=path, impl=impl if not backend else f"fastres[{backend}]",
            backend=backend, mode=mode, shape=[BATCH, c, h, w], dtype=DTYPE, layout="NHWC", bytes=None,
            flops=flops * (3 if mode == "train" else 1), conv_path=path_now))
        if path_now == "cudnn":  # which of the block's cuDNN graphs fell back to aten (FASTRES_CONV=cudnn, part 12)
            benchmark.extra_info["cudnn_refused"] = cudnn_refusals_since(refused_before)
