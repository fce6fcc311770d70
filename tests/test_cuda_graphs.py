"""CUDA graphs (issue #12).

CPU (CI): no host synchronisation anywhere on fastres's training path — no
``.item()``/``bool()``/``float()``/``int()``/``.tolist()``/``.cpu()`` of a tensor, seen
both at the Python level (patched ``Tensor`` methods, which also covers the Python Triton
launchers) and at aten level (a dispatch mode recording ``aten._local_scalar_dense``,
what every such read dispatches to) — and the running statistics are updated in place
(same storage before and after). ``python -m fastres bench --cuda-graphs`` refuses the
CPU with a clear error.

GPU (``gpu`` marker): a whole training step (forward, backward, SGD) of a fastres model
captured with ``torch.cuda.graph`` (``fastres.training.capture_train_step``) and replayed
gives the eager results; an eager step runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from conftest import backend_params, run_on
from fastres.training import capture_train_step, make_train_step
from resnet_ref import randomize

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}


class _RecordSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_python_syncs(monkeypatch):
    calls = []

    def trap(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            calls.append(name)
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, f)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        trap(name)
    return calls


def _model(kind="bottleneck"):
    torch.manual_seed(0)
    if kind == "cifar":  # small enough for the interpreted Triton backend
        return randomize(fastres.cifar_resnet(8, shortcut="B", num_classes=5))
    return randomize(fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_training_step_has_no_host_sync(backend, momentum, no_python_syncs):
    if backend == "torch" and momentum is None:
        pytest.skip("the torch backend is nn.BatchNorm2d's own F.batch_norm, which takes the cumulative "
                    "factor 1/num_batches_tracked as a Python float (a sync, as in torchvision)")
    with run_on(backend):
        model = _model("cifar" if backend == "triton" else "bottleneck").to(memory_format=torch.channels_last)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = momentum
        n0 = int(model.bn1.num_batches_tracked)
        model(torch.randn(2, 3, 16, 16))  # first call: backend set-up (may sync once)
        x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        stats = {n: (b, b.data_ptr()) for n, b in model.named_buffers()}
        no_python_syncs.clear()
        with _RecordSyncs() as rec:
            out = model(x)
            out.square().mean().backward()
        assert no_python_syncs == [], f"host syncs from Python: {no_python_syncs}"
        assert rec.seen == [], f"host syncs at aten level: {rec.seen}"
        for n, b in model.named_buffers():  # updated in place: same tensor, same storage
            assert b is stats[n][0] and b.data_ptr() == stats[n][1], n
        assert int(model.bn1.num_batches_tracked) == n0 + 2


def test_eval_forward_has_no_host_sync(no_python_syncs):
    model = _model().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)  # fills the fold cache
        no_python_syncs.clear()
        with _RecordSyncs() as rec:
            model(x)
    assert no_python_syncs == [] and rec.seen == [], (no_python_syncs, rec.seen)


def test_sync_detectors_detect():
    """The detectors above are not blind: a .item() is caught by both."""
    calls = []
    with _RecordSyncs() as rec:
        torch.ones(2).sum().item()
    assert rec.seen == ["aten._local_scalar_dense.default"]
    mp = pytest.MonkeyPatch()
    orig = torch.Tensor.item
    mp.setattr(torch.Tensor, "item", lambda self: calls.append("item") or orig(self))
    try:
        torch.ones(1).item()
    finally:
        mp.undo()
    assert calls == ["item"]


def test_capture_train_step_refuses_cpu():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        capture_train_step(model, opt, torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_capture_train_step_needs_a_warmup(warmup):
    """No capture without eager warm-up steps: the first calls compile and autotune the
    Triton kernels (timing synchronises the device, which breaks a capture) and
    initialise cuBLAS/cuDNN lazily. Refused before anything runs, on any device."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="warmup >= 1"):
        capture_train_step(model, opt, torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), warmup=warmup)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_bench_cuda_graphs_errors_on_cpu():
    r = subprocess.run([sys.executable, "-m", "fastres", "bench", "--cuda-graphs", "--device", "cpu",
                        "--no-progress", "--no-plot"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--cuda-graphs needs a CUDA device" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_captured_training_step_matches_eager(backend):
    with run_on(backend, "cuda"):
        torch.backends.cudnn.benchmark = False
        base = _model().cuda().to(memory_format=torch.channels_last)
        eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
        opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
        opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
        xs = [torch.randn(4, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
              for _ in range(6)]
        ys = [torch.randint(0, 5, (4,), device="cuda") for _ in range(6)]
        step_e = make_train_step(eager, opt_e)
        # capture_train_step's 3 warm-up steps run on xs[0]: mirror them eagerly
        step_g = capture_train_step(graphed, opt_g, xs[0], ys[0], warmup=3)
        for _ in range(3):
            step_e(xs[0], ys[0])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # an eager step with a host sync raises
        try:
            losses_e = [step_e(x, y) for x, y in zip(xs[1:], ys[1:])]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        losses_g = [step_g(x, y).clone() for x, y in zip(xs[1:], ys[1:])]
        torch.cuda.synchronize()
        for le, lg in zip(losses_e, losses_g):
            torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-5)
        for (n, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=n)
        # num_batches_tracked counted the warm-up steps and the replays (on the device; the
        # capture itself runs nothing)
        assert int(graphed.bn1.num_batches_tracked) == int(eager.bn1.num_batches_tracked) == 3 + 5
