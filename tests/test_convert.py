"""fastres.convert(): torchvision blocks (and a torchvision ResNet's stem) become fused
ones sharing the very same parameter and buffer tensors; outputs equal; an optimizer
built before the call keeps training; unknown modules untouched; inplace=False."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from resnet_ref import check_parity, randomize, rel_err


def _tensors(m):
    return [t for t in list(m.parameters()) + list(m.buffers())]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_convert_torchvision_resnet_shares_tensors(arch):
    model = randomize(getattr(tvr, arch)(num_classes=10)).double()
    ref = copy.deepcopy(model)
    before = _tensors(model)
    ptrs = [t.data_ptr() for t in before]
    keys = list(model.state_dict())
    out = fastres.convert(model)
    assert out is model and type(model) is fastres.ResNet
    assert all(type(b) in (fastres.BasicBlock, fastres.Bottleneck)
               for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer)
    after = _tensors(model)
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before))
    assert [t.data_ptr() for t in after] == ptrs
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    check_parity(ref, model, x[:2], train=False, tol=1e-9, what="converted eval")
    check_parity(ref, model, x, train=True, tol=1e-9, what="converted train")


def test_optimizer_built_before_convert_keeps_training():
    torch.manual_seed(0)
    model = randomize(tvr.resnet18(num_classes=10)).double()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    t = torch.randint(0, 10, (4,))
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        if step == 1:
            fastres.convert(model)  # mid-training, optimizer state (momentum) already exists
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), t).backward()
            o.step()
    for (n, p), (_, pr) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(p, pr, rtol=1e-9, atol=1e-12), n
    # the optimizer really trained the converted model: every parameter moved from the
    # initial weights (the same weights as `ref` before the loop), including after convert()
    for (n, p), p0 in zip(model.named_parameters(), start):
        assert not torch.equal(p, p0), f"{n} did not move"


def test_inplace_false_deep_copies():
    model = randomize(tvr.resnet18(num_classes=10)).double().eval()
    conv = fastres.convert(model, inplace=False)
    assert type(model) is tvr.ResNet and type(model.layer1[0]) is tvr.BasicBlock
    assert type(conv) is fastres.ResNet
    ptrs = {t.data_ptr() for t in _tensors(model)}
    assert not ptrs & {t.data_ptr() for t in _tensors(conv)}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), rtol=1e-9, atol=1e-12)


class Custom(nn.Module):
    """A torchvision-style tree that is not a torchvision ResNet."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.body = nn.Sequential(tvr.BasicBlock(64, 64), tvr.Bottleneck(64, 16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))

    def forward(self, x):
        return self.head(self.body(self.relu(self.bn1(self.conv1(x)))))


def test_convert_any_tree_leaves_unknown_modules():
    model = randomize(Custom()).double()
    ref = copy.deepcopy(model)
    head = model.head
    fastres.convert(model)
    assert type(model) is Custom and model.head is head
    assert type(model.body[0]) is fastres.BasicBlock and type(model.body[1]) is fastres.Bottleneck
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    check_parity(ref, model, x, train=True, tol=1e-9, what="custom train")
    check_parity(ref, model, x, train=False, tol=1e-9, what="custom eval")


def test_convert_bare_block_keeps_hooks_and_skips_subclasses():
    blk = randomize(tvr.BasicBlock(8, 8)).double()
    seen = []
    blk.register_forward_hook(lambda m, i, o: seen.append(1))
    w = blk.conv1.weight
    new = fastres.convert(blk)
    assert type(new) is fastres.BasicBlock and new.conv1.weight is w
    new(torch.randn(2, 8, 4, 4, dtype=torch.float64))
    assert seen == [1]

    class MyBlock(tvr.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    tree = nn.Sequential(MyBlock(8, 8))
    fastres.convert(tree)
    assert type(tree[0]) is MyBlock


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_converted_model_saves_and_loads(train):
    """A converted model pickled whole, and its state_dict loaded into a fresh fastres
    model, both give the converted model's outputs (and torchvision's)."""
    tv = randomize(tvr.resnet18(num_classes=3)).double()
    model = fastres.convert(copy.deepcopy(tv))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert type(again) is fastres.ResNet and type(again.layer1[0]) is fastres.BasicBlock
    fresh = fastres.resnet18(num_classes=3).double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m in (tv, model, again, fresh):
        m.train(train)
        outs.append(m(x))
    for y, name in zip(outs[1:], ("converted", "reloaded", "fresh + state_dict")):
        assert rel_err(y, outs[0]) < 1e-12, name
    if train:  # the running statistics moved the same way in every copy
        for m in (model, again, fresh):
            for (n, a), (_, b) in zip(m.state_dict().items(), tv.state_dict().items()):
                assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-14), n


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError):
        fastres.convert(object())
