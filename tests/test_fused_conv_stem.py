"""The ResNet stem (conv1 + bn1 + relu) through conv2d_act with FASTRES_CONV=fused:
training = conv1 with the BN statistics in its epilogue + one fused scale/shift + ReLU;
eval = conv1 folded with bn1, bias + ReLU in the epilogue. fp64 parity against
torchvision's stem (output, input and every parameter gradient, running statistics,
num_batches_tracked, momentum None), with the conv family ``ops`` (the aten composition
behind the custom op) and ``triton`` (the kernel, interpreted); fx keeps torchvision's
stem ops."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fastres
from fastres import functional as FF
from conv_helpers import conv_family
from resnet_ref import check_parity, randomize


class Stem(nn.Module):
    """A model's stem alone (maxpool included): parameters named as in the model."""

    def __init__(self, model: nn.Module, fused: bool):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = model.conv1, model.bn1, model.relu, model.maxpool
        self._model = [model]  # not a submodule: same parameter names in both stems
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return self._model[0]._stem(x)
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _stems(momentum=0.1):
    ref = torchvision.models.resnet18(num_classes=10)
    ours = fastres.resnet18(num_classes=10)
    for m in (ref, ours):
        m.bn1.momentum = momentum
    randomize(ref)
    ref, ours = ref.double(), ours.double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return Stem(ref, False), Stem(ours, True)


@pytest.mark.parametrize("family,momentum", [("ops", 0.1), ("ops", None), ("triton", 0.1)],
                         ids=["ops-momentum0.1", "ops-momentumNone", "triton-momentum0.1"])
def test_fused_conv_stem_parity_fp64(family, momentum, monkeypatch):
    """(the interpreted Triton kernel is slow: one step on a smaller input)"""
    ref, ours = _stems(momentum)
    calls = []
    real = FF.conv2d_act
    monkeypatch.setattr(FF, "conv2d_act", lambda *a, **k: calls.append(k) or real(*a, **k))
    steps = 2 if family == "ops" else 1
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64) if family == "ops" else torch.randn(2, 3, 5, 6,
                                                                                          dtype=torch.float64)
    with conv_family(family):
        check_parity(ref, ours, x.contiguous(memory_format=torch.channels_last), train=True, tol=1e-9, steps=steps,
                     what=f"stem {family} train")
        assert len(calls) == steps and all(c["stats"] == "moments" for c in calls)
        calls.clear()
        check_parity(ref, ours, x, train=False, tol=1e-9, what=f"stem {family} eval")
        assert len(calls) == 1 and calls[0]["activation"] == "relu" and not calls[0].get("stats")
    assert ours.bn1.num_batches_tracked.item() == ref.bn1.num_batches_tracked.item() > 0


def test_stem_without_fused_conv_is_unchanged(monkeypatch):
    """FASTRES_CONV=aten: the usual stem (conv through conv2d_act's aten path without prologue
    or statistics -- the conv step's one home -- then the fused BN op; unfolded modules in
    eval), never the fused-conv stem (statistics from the conv)."""
    ref, ours = _stems()
    calls = []
    real = FF.conv2d_act
    monkeypatch.setattr(FF, "conv2d_act", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    with fastres.use_conv("aten"):
        check_parity(ref, ours, x, train=True, tol=1e-9, what="stem aten train")
        check_parity(ref, ours, x, train=False, tol=1e-9, what="stem aten eval")
    assert calls and all(k.get("in_scale") is None and not k.get("in_relu") and not k.get("stats") for k in calls)


def test_fused_conv_stem_fx_keeps_torchvision_ops():
    model = fastres.resnet18(num_classes=10).double().eval()
    with conv_family("ops"):
        gm = torch.fx.symbolic_trace(model)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        assert targets[:3] == ["conv1", "bn1", "relu"], targets
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-9, atol=1e-9)
