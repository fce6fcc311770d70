"""Activation checkpointing (issue #12): ``torch.utils.checkpoint`` over fastres blocks,
with ``use_reentrant=True`` and ``False``, gives the gradients of the plain run, and the
backward's recomputation does not update the running statistics a second time:
``running_mean``/``running_var``/``num_batches_tracked`` are those of ONE forward.

torchvision's ``nn.BatchNorm2d`` under the same checkpoint updates them twice (the
recomputation is a second training forward); ``test_torchvision_updates_twice``
measures it, so docs/RESNET.md's statement about it stays true.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torchvision.models import resnet as tvr

import fastres
from conftest import run_on
from fastres.nn import BatchNormAct2d
from resnet_ref import randomize

REENTRANT = [pytest.param(True, id="reentrant"), pytest.param(False, id="non_reentrant")]
BACKENDS = ["cpp", "triton", "torch"]


def _blocks():
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    seq = nn.Sequential(fastres.BasicBlock(4, 4), fastres.Bottleneck(4, 2, stride=2, downsample=ds))
    return randomize(seq).double()


class _Head(nn.Module):
    """blocks run under checkpoint; a BatchNormAct2d with momentum=None outside and inside."""

    def __init__(self, blocks, reentrant):
        super().__init__()
        self.blocks, self.reentrant = blocks, reentrant
        self.bn = BatchNormAct2d(8, momentum=None).double()

    def forward(self, x, ckpt):
        if ckpt:
            y = checkpoint(self.blocks, x, use_reentrant=self.reentrant)
            y = checkpoint(self.bn, y, use_reentrant=self.reentrant)
        else:
            y = self.bn(self.blocks(x))
        return y


def _buffers(m):
    return {k: v.clone() for k, v in m.named_buffers()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", REENTRANT)
def test_checkpoint_same_grads_and_one_stats_update(backend, reentrant):
    with run_on(backend):
        plain = _Head(_blocks(), reentrant)
        ck = copy.deepcopy(plain)
        x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
        xp, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(4, 8, 3, 3, dtype=torch.float64)
        for step in range(2):  # the second step runs from updated statistics (momentum=None: 1/n)
            plain.zero_grad(), ck.zero_grad()
            yp = plain(xp, ckpt=False)
            yc = ck(xc, ckpt=True)
            torch.testing.assert_close(yc, yp, rtol=1e-10, atol=1e-10)
            after_forward = _buffers(ck)
            (yp * g).sum().backward()
            (yc * g).sum().backward()
            # the recomputation in backward left every buffer as the forward left it
            for k, v in _buffers(ck).items():
                assert torch.equal(v, after_forward[k]), f"step {step}: {k} changed by the recomputation"
            for k, v in _buffers(plain).items():
                torch.testing.assert_close(after_forward[k], v, rtol=1e-12, atol=1e-12, msg=k)
            torch.testing.assert_close(xc.grad, xp.grad, rtol=1e-10, atol=1e-10)
            for (n, pp), (_, pc) in zip(plain.named_parameters(), ck.named_parameters()):
                torch.testing.assert_close(pc.grad, pp.grad, rtol=1e-10, atol=1e-10, msg=n)
            xp.grad = xc.grad = None
        assert int(ck.bn.num_batches_tracked) == 2


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_checkpoint_fused_conv_blocks(reentrant):
    """The fused conv+BN block path (FASTRES_CONV=fused) keeps its own BN bookkeeping:
    the recomputation must leave it alone too."""
    from fastres import conv_backend
    with conv_backend.use_conv("fused"):
        if not conv_backend.may_fuse(torch.device("cpu")):
            pytest.skip("the fused conv path cannot run on this CPU (conv_backend.may_fuse)")
        plain = _blocks()
        ck = copy.deepcopy(plain)
        x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
        xp, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        yp = plain(xp)
        yc = checkpoint(ck, xc, use_reentrant=reentrant)
        after_forward = _buffers(ck)
        yp.square().sum().backward()
        yc.square().sum().backward()
        for k, v in _buffers(ck).items():
            assert torch.equal(v, after_forward[k]), f"{k} changed by the recomputation"
            torch.testing.assert_close(v, _buffers(plain)[k], rtol=1e-12, atol=1e-12, msg=k)
        torch.testing.assert_close(xc.grad, xp.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_checkpoint_sequential_resnet(reentrant):
    """A whole small fastres ResNet's layers under checkpoint_sequential: same gradients
    as the plain model, statistics of one forward (the stem and head run normally)."""
    torch.manual_seed(0)
    plain = randomize(fastres.ResNet(fastres.BasicBlock, [1, 1, 1, 1], num_classes=5)).double()
    ck = copy.deepcopy(plain)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    def run(m, use_ckpt):
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        layers = nn.Sequential(m.layer1, m.layer2, m.layer3, m.layer4)
        h = checkpoint_sequential(layers, 2, h, use_reentrant=reentrant) if use_ckpt else layers(h)
        return m.fc(torch.flatten(m.avgpool(h), 1))

    yp, yc = run(plain, False), run(ck, True)
    yp.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(yc, yp, rtol=1e-10, atol=1e-10)
    for (n, pp), (_, pc) in zip(plain.named_parameters(), ck.named_parameters()):
        torch.testing.assert_close(pc.grad, pp.grad, rtol=1e-9, atol=1e-10, msg=n)
    for (n, bp), (_, bc) in zip(plain.named_buffers(), ck.named_buffers()):
        torch.testing.assert_close(bc, bp, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_torchvision_updates_twice(reentrant):
    """What torchvision does (documented in docs/RESNET.md): its BatchNorm2d under
    checkpoint counts the batch twice and moves the running statistics twice."""
    torch.manual_seed(0)
    blk = tvr.BasicBlock(4, 4).double()
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    checkpoint(blk, x, use_reentrant=reentrant).sum().backward()
    assert int(blk.bn1.num_batches_tracked) == 2
    torch.manual_seed(0)
    ref = tvr.BasicBlock(4, 4).double()
    ref(x.detach())
    ref(x.detach())  # two plain forwards = what the checkpointed step did
    torch.testing.assert_close(blk.bn1.running_mean, ref.bn1.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blk.bn1.running_var, ref.bn1.running_var, rtol=1e-12, atol=1e-12)


def test_eval_and_no_grad_unaffected():
    """Outside a recomputation nothing changes: a forward inside a no-grad block still
    updates statistics in training (as nn.BatchNorm2d does), and a checkpoint in eval
    mode touches none."""
    bn = BatchNormAct2d(3).double()
    with torch.no_grad():
        bn(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    before = _buffers(bn)
    checkpoint(bn, x, use_reentrant=False).sum().backward()
    for k, v in _buffers(bn).items():
        assert torch.equal(v, before[k]), k
