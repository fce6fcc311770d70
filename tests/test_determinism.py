"""Determinism (issue #12): with ``torch.use_deterministic_algorithms(True)`` two training
steps (forward, backward, SGD with momentum) from the same state give bitwise-equal
outputs, losses, gradients, parameters and running statistics — on every fastres CPU
backend (torch, cpp, the Triton interpreter, the custom-op path with aten kernels) and,
under the ``gpu`` marker, on every CUDA backend.

fastres's own kernels use no atomics in their reductions (two-level per-channel
reductions: kernels/_kernels.py, csrc/README.md), so no deterministic variant has to be
chosen; the check is that the whole step, around them, stays deterministic.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import fastres
from conftest import backend_params, run_on
from resnet_ref import randomize

# cuBLAS needs this before its first handle for deterministic matmuls (the fc layer)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def deterministic():
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    prev_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn


def _model(kind):
    torch.manual_seed(0)
    if kind == "cifar":
        return randomize(fastres.cifar_resnet(8, num_classes=5))
    return randomize(fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16))


def _two_steps(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    record = []
    for _ in range(2):
        model.train()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        record.append(out.detach().clone())
        record += [p.grad.clone() for p in model.parameters()]
        opt.step()
    model.eval()
    with torch.no_grad():
        record.append(model(x))
    record += [t.detach().clone() for t in model.state_dict().values()]
    return record


def _check(kind, device):
    base = _model(kind).to(device, memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (4,), device=device)
    a = _two_steps(copy.deepcopy(base), x, y)
    b = _two_steps(copy.deepcopy(base), x, y)
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and torch.equal(u, v), f"tensor #{i} differs between the two runs"
    # and the steps did train: the parameters moved
    assert any(not torch.equal(p, q) for p, q in zip(base.state_dict().values(), a[-len(base.state_dict()):]))


@pytest.mark.parametrize("kind", ["cifar", "bottleneck"])
@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_two_training_steps_bitwise_equal_cpu(backend, kind, deterministic):
    if backend == "triton" and kind == "bottleneck":
        pytest.skip("interpreted Triton: the CIFAR model covers the backend (CI time)")
    with run_on(backend):
        _check(kind, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA backends need a CUDA device")
@pytest.mark.parametrize("kind", ["cifar", "bottleneck"])
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_two_training_steps_bitwise_equal_cuda(backend, kind, deterministic):
    with run_on(backend, "cuda"):
        _check(kind, "cuda")
