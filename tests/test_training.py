"""Training with fastres ResNets: a few SGD-momentum steps of fastres.resnet18 and
torchvision's resnet18 from the same weights and data give the same losses and
weights; and a real-data run (scikit-learn's digits, upsampled) where a small fastres
ResNet and its torchvision twin follow the same loss curve and reach a test accuracy
a person would accept."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import resnet as tvr

import fastres
from resnet_ref import randomize, rel_err


def test_sgd_momentum_loop_parity_resnet18():
    torch.manual_seed(0)
    ref = randomize(torchvision.models.resnet18(num_classes=10)).double()
    ours = fastres.resnet18(num_classes=10).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
            for m in (ref, ours)]
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(4, 3, 48, 48, generator=g, dtype=torch.float64)
        t = torch.randint(0, 10, (4,), generator=g)
        if step == 2:  # channels_last mid-run
            x = x.contiguous(memory_format=torch.channels_last)
        losses = []
        for m, o in zip((ref, ours), opts):
            m.train()
            o.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), t)
            loss.backward()
            o.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-9 * abs(losses[0]), (step, losses)
    for (n, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        if a.is_floating_point():
            assert rel_err(b, a) <= 1e-9, n
        else:
            assert torch.equal(a, b), n
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-9


# ----------------------------------------------------------------------------- real data
def _digits(size=16):
    sk = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data set "
                                                         "(pip install -r requirements-test.txt)")
    d = sk.load_digits()  # 1797 8x8 grey images, 10 classes; ships inside scikit-learn
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = F.interpolate((x[:, None] - 0.5) / 0.5, size=size, mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]  # 80 / 20 split
    return x[tr], y[tr], x[te], y[te]


def _train(model, xtr, ytr, xte, yte, epochs, bs=64):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    curve, steps = [], []
    for epoch in range(epochs):
        if epoch == epochs - 1:  # ÷10 for the last epoch (He et al.'s recipe in small): settles the
            for group in opt.param_groups:  # weights, so the running statistics fit them
                group["lr"] *= 0.1
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(0, len(order) - 1, bs):
            idx = order[i:i + bs]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            steps.append(loss.item())
        curve.append(total / len(order))
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return curve, steps, acc


def test_digits_convergence_matches_torchvision():
    """scikit-learn's digits (8x8 → 16x16, 3 channels), a ResNet with one BasicBlock per
    stage (torchvision's constructor, 4.9M parameters), 4 epochs of SGD-momentum, fp32,
    lr 0.05 (÷10 for the last epoch), the same initial weights and batch order for both.

    Acceptance: the first 3 steps' losses within 1e-3 (relative) of torchvision's —
    after that two fp32 runs drift apart chaotically whatever the implementation, so
    per-epoch mean training loss within 0.1 + 25 % of torchvision's; the loss falls
    below a third of its first-epoch value; test accuracy ≥ 93 % for both (a linear
    model gets ~95 % on this set, these nets ~97-98 %), within 3 points of each other.
    (Without the final lr drop, eval accuracy swings between 88 % and 97 % from one
    batch order to the next for torchvision itself: the running statistics lag the
    still-moving weights.)
    Takes ~10-25 s on 2 idle CPU cores.
    """
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(0)
    ref = tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=10)
    ours = fastres.ResNet(fastres.BasicBlock, [1, 1, 1, 1], num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    curve_ref, steps_ref, acc_ref = _train(ref, xtr, ytr, xte, yte, epochs=4)
    curve, steps, acc = _train(ours, xtr, ytr, xte, yte, epochs=4)
    for i in range(3):
        assert abs(steps[i] - steps_ref[i]) <= 1e-3 * steps_ref[i], (i, steps[:3], steps_ref[:3])
    for e, (a, b) in enumerate(zip(curve, curve_ref)):
        assert abs(a - b) <= 0.1 + 0.25 * b, f"epoch {e}: loss {a:.4f} vs torchvision {b:.4f}"
    assert curve[-1] < curve[0] / 3, curve
    assert acc >= 0.93 and acc_ref >= 0.93, (acc, acc_ref)
    assert abs(acc - acc_ref) <= 0.03, (acc, acc_ref)
