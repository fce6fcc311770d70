"""Shared helpers of the ResNet tests: randomised BN state, independent (torchvision-
block based) references for the paper's models, and the parity check (output, input
gradient, every parameter gradient, running statistics)."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tvr

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max |a - b| / max(max |b|, floor) (norm-wise relative error)."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor)


def randomize(model: nn.Module, seed: int = 0, branch_gamma=(0.1, 0.3), margin: bool = False) -> nn.Module:
    """Random BN affine parameters and running statistics (not the defaults).

    The last BN of each residual branch gets gamma in ``branch_gamma`` (trained ResNets
    have small ones; torchvision's ``zero_init_residual`` sets them to 0). With gamma ~ 1
    the residual stream of a 50+-layer net grows block after block and training-mode
    gradients become so ill-conditioned that torchvision's own fp32 gradients are
    10-40 % off its fp64 ones — nothing could be compared at 1e-4 there.

    ``margin`` (for fp32 comparisons): the BNs that feed a ReLU directly get gamma in
    [0.2, 0.3] and beta = ±[1.5, 2]; the branch-final and projection BNs, whose sum
    (with the identity) feeds the block's ReLU, gamma in [0.1, 0.2] and beta = 1 ± 0.1.
    So (almost) no pre-activation lies near a ReLU kink. Otherwise a rounding difference of 1e-7 now
    and then puts a unit on the other side of 0 in one implementation, and that single
    flip moves the gradients of every layer below it by ~1e-2 — a legitimate
    difference of subgradient, not an error. (The fp64 tests keep kinks everywhere.)
    """
    g = torch.Generator().manual_seed(seed)
    last = set()
    for m in model.modules():
        if hasattr(m, "conv3") and isinstance(getattr(m, "bn3", None), nn.BatchNorm2d):
            last.add(id(m.bn3))
        elif hasattr(m, "downsample") and isinstance(getattr(m, "bn2", None), nn.BatchNorm2d):
            last.add(id(m.bn2))
        if isinstance(getattr(m, "downsample", None), nn.Sequential):
            last.add(id(m.downsample[-1]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                rand = torch.rand(c, generator=g, dtype=torch.float64)
                if id(m) in last:
                    lo, hi = branch_gamma
                    if margin:
                        lo, hi = 0.1, 0.2
                    m.weight.copy_(rand * (hi - lo) + lo)
                    m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * (0.1 if margin else 0.2)
                                 + (1.0 if margin else 0.0))
                elif margin:
                    sign = torch.randint(0, 2, (c,), generator=g).double() * 2 - 1
                    m.weight.copy_(rand * 0.1 + 0.2)
                    m.bias.copy_(sign * (torch.rand(c, generator=g, dtype=torch.float64) * 0.5 + 1.5))
                else:
                    m.weight.copy_(rand * 0.6 + 0.7)
                    m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 0.6 + 0.7)
                m.num_batches_tracked.fill_(7)
    return model


# ----------------------------------------------------------------------------- references
class RefPad(nn.Module):
    """Option A shortcut, written independently: subsample, zero-pad channels at the end."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.cout - self.cin))


class RefPlainBlock(tvr.BasicBlock):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


def _ref_layer(inplanes, planes, n, stride, shortcut, plain):
    layers = []
    for i in range(n):
        s = stride if i == 0 else 1
        grows = s != 1 or inplanes != planes
        ds = None
        if shortcut == "A" and grows:
            ds = RefPad(inplanes, planes, s)
        elif shortcut == "C" or (shortcut == "B" and grows):
            ds = nn.Sequential(tvr.conv1x1(inplanes, planes, s), nn.BatchNorm2d(planes))
        cls = RefPlainBlock if plain else tvr.BasicBlock
        layers.append(cls(inplanes, planes, s, ds))
        inplanes = planes
    return nn.Sequential(*layers)


class RefCifar(nn.Module):
    def __init__(self, depth, shortcut="A", num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        plain = shortcut is None
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _ref_layer(16, 16, n, 1, shortcut, plain)
        self.layer2 = _ref_layer(16, 32, n, 2, shortcut, plain)
        self.layer3 = _ref_layer(32, 64, n, 2, shortcut, plain)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ref_plain_imagenet(layers, num_classes=1000):
    """torchvision's ResNet with plain blocks and no projections (He et al. Fig. 3 middle)."""
    m = tvr.ResNet(RefPlainBlock, layers, num_classes=num_classes)
    for blk in m.modules():
        if isinstance(blk, RefPlainBlock):
            blk.downsample = None
    return m


# ----------------------------------------------------------------------------- parity
def check_parity(ref: nn.Module, ours: nn.Module, x: torch.Tensor, train: bool, tol: float, steps: int = 1,
                 what: str = "", truth: Optional[nn.Module] = None) -> Dict[str, float]:
    """Run ``steps`` forward/backward passes on both; compare the output, the input's
    gradient and every parameter gradient each time, then the buffers (running stats,
    num_batches_tracked). Returns the worst relative error per kind.

    ``truth`` (an fp64 copy of ``ref``, run alongside): a quantity further than ``tol``
    from ``ref`` still passes when it is no further from the fp64 truth than 2x ``ref``'s
    own error (+ ``tol``) — the rule used for bf16 elsewhere, for the few fp32 quantities
    whose condition number makes torchvision's own fp32 result differ from its fp64 one
    by more than ``tol`` (training-mode BN over a handful of values deep in a 50+-layer
    net). Everything else must be within ``tol`` of ``ref``.

    A parameter gradient is relative to max(its own max, 1e-3 x the largest parameter
    gradient of the net): some are ~0 analytically and only rounding noise remains.
    """
    nets = [ref, ours] + ([truth] if truth is not None else [])
    for m in nets:
        m.train(train)
    worst: Dict[str, float] = {}

    def note(kind, a, b, t, name, floor=1e-30):
        e = rel_err(a, b, floor)
        if e > tol and t is not None:
            theirs, mine = rel_err(b, t, floor), rel_err(a, t, floor)
            assert mine <= 2 * theirs + tol, (f"{what}: {kind} {name} relative error {e:.3g} > {tol:g}, and "
                                              f"{mine:.3g} from the fp64 truth > 2 x torchvision's {theirs:.3g}")
        else:
            assert e <= tol, f"{what}: {kind} {name} relative error {e:.3g} > {tol:g}"
        worst[kind] = max(worst.get(kind, 0.0), e)

    g = torch.Generator().manual_seed(1)
    params = [dict(m.named_parameters()) for m in nets]
    for _ in range(steps):
        xs = [x.detach().clone().to(torch.float64 if m is truth else x.dtype).requires_grad_(True) for m in nets]
        for m in nets:
            m.zero_grad(set_to_none=True)
        ys = [m(xi) for m, xi in zip(nets, xs)]
        gy = torch.randn(ys[0].shape, generator=g, dtype=torch.float64)
        for y in ys:
            y.backward(gy.to(device=y.device, dtype=y.dtype))
        t = truth is not None
        note("output", ys[1], ys[0], ys[2] if t else None, "")
        note("input grad", xs[1].grad, xs[0].grad, xs[2].grad if t else None, "")
        # a parameter whose gradient is ~0 analytically (e.g. a BN bias whose shift the
        # next training-mode BN removes) is compared relative to 1e-3 x the largest gradient
        scale = max((p.grad.abs().max().item() for p in params[0].values() if p.grad is not None), default=0.0)
        for name, p in params[1].items():
            pr = params[0][name]
            assert (p.grad is None) == (pr.grad is None), f"{what}: grad presence differs for {name}"
            if p.grad is not None:
                note("param grad", p.grad, pr.grad, params[2][name].grad if t else None, name, 1e-3 * scale)
    bufs = [dict(m.named_buffers()) for m in nets]
    for name, b in bufs[1].items():
        br = bufs[0][name]
        if b.is_floating_point():
            note("buffer", b, br, bufs[2][name] if truth is not None else None, name)
        else:
            assert torch.equal(b, br), f"{what}: {name} differs"
    return worst


def twin(ref: nn.Module, make_ours: Callable[[], nn.Module], dtype, fmt=torch.contiguous_format):
    """ours = make_ours() (built on the meta device: no time spent on an initialisation
    that the strict load overwrites), cast like ref, loaded strictly from ref's state_dict."""
    with torch.device("meta"):
        ours = make_ours()
    ours = ours.to_empty(device="cpu").to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(memory_format=fmt)
