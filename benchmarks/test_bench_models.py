"""Whole networks: torchvision (eager, and under ``torch.compile`` on a GPU) vs the
fastres model with each backend, same state_dict and inputs; a training step
(forward + backward + SGD with momentum) and inference.

GPU: resnet50, batch 256, 224x224, bf16 autocast, channels_last (``torch.compile`` of
torchvision included). CPU: resnet18 and resnet50, batch 8, 128x128, fp32,
channels_last (no ``torch.compile``: on the CPU it takes minutes per model — the
``python -m fastres bench`` CLI measures it). ``flops``: forward convolution / fc
FLOPs counted on the meta device, x3 for training; ``images`` gives ``img/s``.
"""
from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import fastres  # noqa: E402
from fastres.bench import forward_gflop_per_image  # noqa: E402

from _bench_utils import (DEVICE, ON_GPU, fastres_backends, reset_compile, run_benchmark,  # noqa: E402
                          same_weights_model)

if ON_GPU:
    MODELS, BATCH, SIZE, DTYPE = ["resnet50"], 256, 224, "bf16"
else:
    MODELS, BATCH, SIZE, DTYPE = ["resnet18", "resnet50"], 8, 128, "fp32"
COMPILE = [pytest.param("torchvision+compile", id="torchvision+compile",
                        marks=() if ON_GPU else (pytest.mark.skip(
                            reason="torch.compile of a whole model on the CPU takes minutes; "
                                   "python -m fastres bench measures it"),))]
IMPLS = ["torchvision"] + COMPILE + fastres_backends(DEVICE, include_torch=True)


def _autocast():
    return contextlib.nullcontext() if DTYPE == "fp32" else torch.autocast(DEVICE, dtype=torch.bfloat16)


def _build(arch, impl):
    return same_weights_model(arch, impl.startswith("torchvision")).to(DEVICE, memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("arch", MODELS)
def test_model(benchmark, arch, mode, impl):
    backend = impl if impl in fastres.backends.BACKENDS else ""
    ctx = fastres.use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        model = _build(arch, impl)
        runner = model
        if impl.endswith("+compile"):
            reset_compile()
            runner = torch.compile(model)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g, device=DEVICE).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (BATCH,), generator=g, device=DEVICE)
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step():
                with _autocast():
                    loss = F.cross_entropy(runner(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            model.eval()

            def step():
                with torch.inference_mode(), _autocast():
                    runner(x)
        gflop = forward_gflop_per_image(lambda: getattr(torchvision.models, arch)(weights=None), SIZE) or 0.0
        benchmark.group = f"model {arch} {mode} b{BATCH} {SIZE}px {DTYPE}"
        run_benchmark(benchmark, step, calls=1, rounds=10 if ON_GPU else 3, warmup=5 if ON_GPU else 1, info=dict(
            model=arch, impl=impl if not backend else f"fastres[{backend}]", backend=backend, mode=mode,
            shape=[BATCH, 3, SIZE, SIZE], dtype=DTYPE, layout="NHWC", bytes=None, images=BATCH,
            flops=gflop * 1e9 * BATCH * (3 if mode == "train" else 1) or None))
    if impl.endswith("+compile"):
        reset_compile()
