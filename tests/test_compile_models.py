"""torch.compile over every fastres model family (issue #12): ``fullgraph=True`` (a graph
break is an error), training (forward, backward, SGD step, running statistics) and eval
(the fold traced inline), results equal to eager — with ``aot_eager`` for every family
and ``inductor`` on the CPU; inductor (``default`` and ``max-autotune``) on CUDA under
the ``gpu`` marker. Models are tiny (one block per stage, 16×16 images): compiling on a
2-core CI machine is the cost.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastres
from conftest import run_on
from resnet_ref import randomize


def _basic():
    return fastres.ResNet(fastres.BasicBlock, [1, 1, 1, 1], num_classes=5)


def _bottleneck():
    return fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16)


def _cifar():
    return fastres.cifar_resnet(8, num_classes=5)


def _cifar_b():
    return fastres.cifar_resnet(8, shortcut="B", num_classes=5)


FAMILIES = {"resnet_basic": _basic, "resnet_bottleneck": _bottleneck, "cifar_A": _cifar, "cifar_B": _cifar_b}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _compare(name, compiler, device="cpu", mode=None, tol=1e-5):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = randomize(FAMILIES[name]()).to(device, memory_format=torch.channels_last)
    ours = copy.deepcopy(eager)
    kw = {"mode": mode} if mode else {}
    compiled = torch.compile(ours, fullgraph=True, backend=compiler, **kw)
    x = torch.randn(4, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (4,), device=device)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):  # training: forward, backward, optimizer step
        eager.train(), ours.train()
        outs = []
        for m, run, opt in ((eager, eager, opt_e), (ours, compiled, opt_c)):
            out = run(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            outs.append(out.detach())
        assert _rel(outs[1], outs[0]) < tol, f"step {step}: train output"
        for (n, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
            assert _rel(p.grad, q.grad) < 10 * tol, f"step {step}: grad of {n}"
        opt_e.step(), opt_c.step()
        for (n, b), (_, c) in zip(ours.named_buffers(), eager.named_buffers()):
            assert (_rel(b, c) < tol) if b.is_floating_point() else torch.equal(b, c), f"step {step}: {n}"
    eager.eval(), ours.eval()
    with torch.no_grad():
        assert _rel(compiled(x), eager(x)) < tol, "eval output"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_compile_aot_eager_every_family(name):
    _compare(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_bottleneck", "cifar_A"])
def test_compile_inductor_cpu(name):
    _compare(name, "inductor", tol=1e-4)


def test_no_graph_break_explain():
    """torch._dynamo.explain agrees: one graph, no break, in training and in eval."""
    torch._dynamo.reset()
    m = randomize(_bottleneck())
    x = torch.randn(2, 3, 16, 16)
    for train in (True, False):
        m.train(train)
        ex = torch._dynamo.explain(m)(x)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_other_cpu_backends(backend):
    """The Triton (interpreted) and aten families under aot_eager too."""
    with run_on(backend):
        _compare("cifar_B", "aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA path needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "max-autotune"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_inductor_cuda(backend, mode):
    with run_on(backend, "cuda"):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        _compare("resnet_bottleneck", "inductor", "cuda", mode=None if mode == "default" else mode, tol=1e-3)
