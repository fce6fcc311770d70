"""torch.compile (inductor) over fastres's Triton backend: the kernels behind opaque
``torch.library.custom_op``s (``triton_op=off``, today's default) vs the same kernels
as ``torch.library.triton_op`` (``triton_op=on``: inductor sees each launch as a
user-defined Triton kernel and compiles the small aten ops around them into its own
kernels). Decides ``FASTRES_TRITON_OP=auto`` (fastres/_triton_ops.py, docs/GPU.md).

Training steps, bf16 (autocast) channels_last, ``torch.compile(fullgraph=True)``:
* ``bottleneck``: resnet50 ``layer1.0`` (64 -> 256, projection shortcut), 56x56, forward + backward;
* ``resnet50``: the whole model at 224 px, forward + backward + SGD step.
GPU only (inductor cannot compile user Triton kernels on CPU tensors; Triton's CPU
interpreter is not benchmarked): on the CPU every case skips with that reason. The
compile (and inductor's autotuning of the user kernels) happens in the warm-up rounds.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import fastres  # noqa: E402
from fastres import _triton_ops, backends  # noqa: E402

from _bench_utils import DEVICE, ON_GPU, env_int, reset_compile, run_benchmark  # noqa: E402

BATCH = env_int("FASTRES_BENCH_TRITON_OP_BATCH", 64)
CASES = {"bottleneck": ("layer1.0", (64, 56, 56)), "resnet50": (None, (3, 224, 224))}


def _skip_reason():
    if not ON_GPU:
        return "GPU only: inductor cannot compile user-defined Triton kernels on CPU tensors"
    ok, why = backends.available("triton", DEVICE)
    return None if ok else f"fastres[triton] unavailable on {DEVICE}: {why}"


@pytest.mark.parametrize("triton_op", ["off", "on"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_train_step(benchmark, case, triton_op):
    why = _skip_reason()
    if why:
        pytest.skip(why)
    path, (c, h, w) = CASES[case]
    try:
        with _triton_ops.use_triton_op(triton_op == "on"), fastres.use_backend("triton"):
            torch.manual_seed(0)
            model = fastres.resnet50()
            net = (model.get_submodule(path) if path else model).to(DEVICE, memory_format=torch.channels_last)
            net.train()
            x = torch.randn(BATCH, c, h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
            params = list(net.parameters())
            opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9) if path is None else None
            reset_compile()
            cnet = torch.compile(net, fullgraph=True)

            def step():
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    y = cnet(x)
                loss = y.float().square().mean()
                loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    for p in params:
                        p.grad = None

            benchmark.group = f"compiled {case} train b{BATCH} bf16"
            run_benchmark(benchmark, step, calls=1, rounds=env_int("FASTRES_BENCH_ROUNDS", 10), warmup=3,
                          info=dict(case=case, impl=f"triton_op={triton_op}", triton_op=triton_op,
                                    backend="triton", compile="inductor", mode="train", shape=[BATCH, c, h, w],
                                    dtype="bf16", layout="NHWC", images=BATCH))
    finally:
        reset_compile()
