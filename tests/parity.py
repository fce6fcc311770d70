"""Parity helpers shared by the test files (tests/test_batchnorm_parity.py,
tests/test_fuzz.py, tests/test_edge_cases.py, ...): inputs in every layout, tolerances
per dtype, and the module-level parity check.

A :class:`Case` describes one module-level parity check (shape, dtypes, layouts,
momentum, eps, affine, track_running_stats, residual, activation, number of training
steps, eval step). :func:`check_module_case` runs it on a backend and compares the
output, every gradient (input, residual, weight, bias), running_mean / running_var and
num_batches_tracked with ``nn.BatchNorm2d`` + add + ReLU.

Unlike tests/test_batchnorm_parity.py (whose ``_step`` clones the input, which
materialises a sliced or expanded view), the input and the residual reach the op as
*views* of a leaf tensor: sliced, permuted, channels_last, channel-sliced
channels_last, expanded (stride 0, not materialised) or expanded-then-cloned. The
gradient is compared on the leaf, so it also checks that backward writes through the
view correctly.

Tolerances: fp64 and fp32 use ``TOL`` (plus data-aware, per-channel slack for the
rounding of fp32 statistics, see ``_fp32_slack`` and ``_degenerate_slack``); bf16 / fp16
use the low-precision rule (error against an fp32 run from the same low-precision
values at most 2x PyTorch's own low-precision error), with a floor of one unit of the
dtype's precision (``finfo.eps``, at least 1e-3) times max(1, |reference|): with
randomly drawn shapes a tensor can have a single element, and then PyTorch's own
error can be exactly 0 while a correct kernel rounds the other way.

Every check runs on any device: the data are drawn on the CPU (seeded generators, so a
CUDA case sees the very same values as its CPU twin) and moved to the case's device,
the reference modules too.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import nn

from fastres.nn import BatchNormAct2d

from conftest import run_on

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}
LOW = (torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "channels_last_sliced_c",
           "expanded", "expanded_clone")
FINITE_LOW_FLOOR = {torch.bfloat16: torch.finfo(torch.bfloat16).eps, torch.float16: 1e-3}
BUF_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def same_behaviour(run_ref, run_ours, compare) -> bool:
    """Where the reference raises, ours raises the same exception type carrying the
    reference's message (fastres may prefix its own name); otherwise ``compare(ours,
    expected)``. Returns whether the reference ran (drop-in tests of transforms)."""
    try:
        expected = run_ref()
    except RuntimeError as e:
        with pytest.raises(type(e)) as info:
            run_ours()
        assert str(e) in str(info.value)
        return False
    compare(run_ours(), expected)
    return True


def make_input(shape, dtype, layout, device="cpu", scale=1.0, offset=0.0):
    """layout: 'contiguous', 'channels_last' or 'noncontig' (a permuted view that is
    neither contiguous nor channels_last). Drawn on the CPU (the global generator: the
    same values on every device), then moved to ``device``."""
    n, c, h, w = shape
    if layout == "noncontig":
        base = torch.randn(n, h, c, w, dtype=torch.float64) * scale + offset
        x = base.to(device=device, dtype=dtype).permute(0, 2, 1, 3)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last) or h * w == 1 or c == 1
        return x
    x = (torch.randn(n, c, h, w, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _low_rule(ours_t, theirs_t, hi, dtype, name, floor_unit):
    """bf16 / fp16: ours' error against the fp32 result ``hi`` at most 2x PyTorch's own
    low-precision result's (+ ``floor_unit`` x max(1, |hi|))."""
    ours, theirs = max_err(ours_t, hi), max_err(theirs_t, hi)
    scale = max(1.0, hi.double().abs().max().item()) if hi.numel() else 1.0
    floor = floor_unit * scale
    assert ours <= 2 * theirs + floor, (f"{name}: error {ours:.3g} vs the fp32 run > 2 x PyTorch's "
                                        f"{theirs:.3g} (+{floor:.2g})")


def assert_close_dtype(actual, expected, dtype, name="", ref_low=None, ref_hi=None):
    """fp64/fp32: assert_close with the dtype's tolerance. bf16/fp16: actual's error
    against the fp32 reference ``ref_hi`` must be <= 2x (+ a floor of 1e-3 x max(1, |ref_hi|))
    PyTorch's own low-precision result ``ref_low`` against the same reference."""
    if dtype in TOL:
        torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        return
    assert ref_low is not None and ref_hi is not None
    _low_rule(actual, ref_low, ref_hi, dtype, name, 1e-3)


def view_spec(shape, layout: str) -> Tuple[Tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]:
    """(shape of the dense base tensor, function base -> (N, C, H, W) view in ``layout``)."""
    n, c, h, w = shape
    if layout == "contiguous":
        return (n, c, h, w), lambda b: b
    if layout == "channels_last":
        return (n, h, w, c), lambda b: b.permute(0, 3, 1, 2)
    if layout == "permuted":  # neither contiguous nor channels_last (unless degenerate)
        return (n, h, c, w), lambda b: b.permute(0, 2, 1, 3)
    if layout == "sliced":  # x[:, :, ::2, 1:]
        return (n, c, 2 * h, w + 1), lambda b: b[:, :, ::2, 1:]
    if layout == "channels_last_sliced_c":  # a channels_last tensor sliced in C
        return (n, h, w, c + 2), lambda b: b.permute(0, 3, 1, 2)[:, 1:c + 1]
    if layout == "expanded":  # stride 0 over the batch, overlapping memory, not materialised
        return (1, c, h, w), lambda b: b.expand(n, c, h, w)
    if layout == "expanded_clone":  # expanded, then materialised
        return (1, c, h, w), lambda b: b.expand(n, c, h, w).clone()
    raise ValueError(layout)


def make_base(shape, dtype, gen: Optional[torch.Generator], scale=1.0, offset=0.0, device="cpu"):
    return (torch.randn(shape, dtype=torch.float64, generator=gen) * scale + offset).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- comparisons
def _per_channel(t, like: torch.Tensor) -> torch.Tensor:
    """A slack tensor shaped like ``like`` (as is), or per channel [C], shaped to
    broadcast against ``like`` ([N, C, H, W] or [C])."""
    t = t.to(device=like.device, dtype=torch.float64)
    if t.shape == like.shape:
        return t
    return t.view(1, -1, 1, 1) if like.dim() == 4 else t


def slack_on_base(slack: torch.Tensor, base_shape, fn) -> torch.Tensor:
    """Per-channel ``slack`` [C] laid out like the dense base tensor whose view ``fn(base)``
    is the [N, C, H, W] operand (e.g. a leaf's gradient): each element of the base gets
    its channel's slack, elements outside the view 0."""
    numel = math.prod(base_shape)
    idx = fn(torch.arange(numel, dtype=torch.int64).view(base_shape))
    out = torch.zeros(numel, dtype=torch.float64)
    out[idx.reshape(-1)] = slack.double().view(1, -1, 1, 1).expand(idx.shape).reshape(-1)
    return out.view(base_shape)


def assert_close_slack(actual, expected, rtol, atol, slack, name, equal_nan=False):
    """torch.testing.assert_close(actual, expected, rtol, atol + slack) where ``slack`` is
    a float, a tensor of actual's shape, or a per-channel [C] tensor (the channel
    dimension of [N, C, H, W], or the only one of a [C] tensor)."""
    if not isinstance(slack, torch.Tensor):
        tol = dict(rtol=rtol, atol=atol + slack)
        torch.testing.assert_close(actual, expected, **tol, equal_nan=equal_nan, msg=lambda m: f"{name}: {m}")
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    allowed = atol + _per_channel(slack, a) + rtol * e.abs()
    ok = (a == e) | ((a - e).abs() <= allowed)
    if equal_nan:
        ok |= a.isnan() & e.isnan()
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{name}: {bad.shape[0]} of {a.numel()} elements differ beyond rtol={rtol:g}, "
                             f"atol={atol:g} + per-channel slack; first at {list(i)}: ours {a[i].item()!r}, "
                             f"ref {e[i].item()!r}, allowed {allowed.expand_as(a)[i].item():.3g}")


def assert_parity(actual, expected, dtype, name, hi=None, equal_nan=False, extra_atol=0.0, low_floor=None):
    """``actual`` (ours) vs ``expected`` (PyTorch in the same dtype). Low precision: the
    2x rule against ``hi`` (fp32 from the same values), see the module docstring;
    ``low_floor`` overrides its floor (per unit of max(1, |hi|)). fp64 / fp32:
    ``extra_atol`` (a float or a per-channel [C] tensor) widens the absolute tolerance."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if equal_nan:  # non-finite values must sit at the same places, with the same sign
        for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
            mism = (f(actual) != f(expected)).nonzero()
            assert mism.numel() == 0, (f"{name}: {what} pattern differs at {mism[:5].tolist()} "
                                       f"(ours {actual[tuple(mism[0])].item()}, "
                                       f"ref {expected[tuple(mism[0])].item()})")
        fin = torch.isfinite(expected)
        if isinstance(extra_atol, torch.Tensor):  # per channel: broadcast before masking
            extra_atol = _per_channel(extra_atol, expected).expand_as(expected)[fin]
            extra_atol = extra_atol if extra_atol.numel() else 0.0
        actual, expected = actual[fin], expected[fin]
        hi = hi[fin] if hi is not None else None
    if dtype in TOL:
        assert_close_slack(actual, expected, TOL[dtype]["rtol"], TOL[dtype]["atol"], extra_atol, name)
        return
    assert hi is not None, name
    _low_rule(actual, expected, hi, dtype, name, FINITE_LOW_FLOOR[dtype] if low_floor is None else low_floor)


def assert_buffer(actual, expected, name, hi=None, equal_nan=False, slack=(0.0, 0.0)):
    """Running statistics: tight in fp64 / fp32 buffers, plus ``slack`` = (atol for the
    mean, atol for the variance: floats or per-channel tensors) from the data's
    conditioning (see ``_fp32_slack``).
    In bf16 / fp16 buffers each update is rounded, so ours and PyTorch's may drift apart
    by an ulp per step (a flipped rounding): 4 units of the dtype's precision."""
    tol = dict(BUF_TOL.get(actual.dtype) or dict(rtol=4 * torch.finfo(actual.dtype).eps, atol=1e-3))
    try:
        assert_close_slack(actual, expected, tol["rtol"], tol["atol"],
                           slack[1] if name.endswith("running_var") else slack[0], name, equal_nan=equal_nan)
    except AssertionError:
        if actual.dtype in BUF_TOL or hi is None:
            raise
        # PyTorch updates bf16/fp16 buffers in bf16/fp16 arithmetic ((1-m)*rm and m*mean
        # each rounded, then cancelling): it can be many ulps off the fp32 update, which
        # fastres computes and rounds once. Then ours must be the closer one (2x rule).
        assert_parity(actual, expected, actual.dtype, name, hi=hi.to(torch.float32), equal_nan=equal_nan)


def _channels(x: torch.Tensor) -> torch.Tensor:
    """x as float64 [C, N*H*W] on the CPU, non-finite values replaced by 0."""
    xd = x.detach().double().cpu()
    xd = torch.where(torch.isfinite(xd), xd, torch.zeros((), dtype=torch.float64))
    return xd.transpose(0, 1).reshape(x.shape[1], -1)


def _fp32_slack(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per channel: PyTorch's CPU BatchNorm accumulates fp32/bf16/fp16 statistics in
    float64, its CUDA one and fastres in float32 (docs/DESIGN.md). A stable fp32 algorithm
    (Welford, shifted sums) is off by ~ulp * max|x| in the mean and ~ulp * max|x| * std in
    the variance — the channel's conditioning max|x|/std decides, not the value. 16 ulps
    of that. (The naive E[x^2] - E[x]^2 is off by ~ulp * max|x|^2 * sqrt(M): for
    ill-conditioned data orders of magnitude more.)"""
    c = x.shape[1]
    if x.dtype == torch.float64 or x.numel() == 0:
        return torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    xc = _channels(x)
    xmax = xc.abs().amax(dim=1)
    sd = xc.std(dim=1, unbiased=False) if xc.shape[1] > 1 else torch.zeros(c, dtype=torch.float64)
    u = 16 * torch.finfo(torch.float32).eps
    return u * xmax, u * xmax * sd.clamp_min(1e-30) * 2


# ----------------------------------------------------------------------------- module parity
@dataclass(frozen=True)
class Case:
    shape: Tuple[int, int, int, int]
    dtype: torch.dtype = torch.float64
    param_dtype: Optional[torch.dtype] = None  # None: fp64 for fp64 input, else fp32
    layout: str = "contiguous"
    res_layout: Optional[str] = None           # None: no residual
    grad_layout: str = "contiguous"
    activation: str = "relu"
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    affine: bool = True
    track: bool = True
    train_steps: int = 2
    eval_step: bool = True
    scale: float = 1.0
    offset: float = 0.0
    seed: int = 0
    low_floor: Optional[float] = None          # None: FINITE_LOW_FLOOR of the dtype

    @property
    def pdtype(self) -> torch.dtype:
        if self.param_dtype is not None:
            return self.param_dtype
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def short(self) -> str:
        d = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
        return (f"{'x'.join(map(str, self.shape))}-{d[self.dtype]}/{d[self.pdtype]}-{self.layout}"
                f"-res:{self.res_layout}-{self.activation}-m{self.momentum}-eps{self.eps:g}"
                f"-{'aff' if self.affine else 'noaff'}-{'trs' if self.track else 'notrs'}")


def randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    """weight, bias, running mean and var drawn from ``gen`` (in that order; an absent one,
    e.g. the bias of ``bias=False``, draws nothing), num_batches_tracked 3."""
    c = bn.num_features
    draws = (("weight", lambda: torch.rand(c, dtype=torch.float64, generator=gen) + 0.5),
             ("bias", lambda: torch.randn(c, dtype=torch.float64, generator=gen)),
             ("running_mean", lambda: torch.randn(c, dtype=torch.float64, generator=gen) * 0.3),
             ("running_var", lambda: torch.rand(c, dtype=torch.float64, generator=gen) + 0.5))
    with torch.no_grad():
        for name, draw in draws:
            t = getattr(bn, name)
            if t is not None:
                t.copy_(draw())
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(3)


def make_pair(case: Case, gen: torch.Generator, device="cpu"):
    c = case.shape[1]
    kw = dict(eps=case.eps, momentum=case.momentum, affine=case.affine, track_running_stats=case.track)
    ref = nn.BatchNorm2d(c, **kw).to(device=device, dtype=case.pdtype)
    randomize_bn(ref, gen)
    ours = BatchNormAct2d(c, activation=case.activation, **kw).to(device=device, dtype=case.pdtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def ref_forward(bn, x, residual, activation):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def run_step(mod, fused, activation, xb, xfn, rb, rfn, g):
    """One forward + backward with x = xfn(leaf) and residual = rfn(rleaf) as views.
    Returns (y, grads on the leaves and parameters, the x view)."""
    leaf = xb.detach().clone().requires_grad_(True)
    x = xfn(leaf)
    rleaf = r = None
    if rb is not None:
        rleaf = rb.detach().clone().requires_grad_(True)
        r = rfn(rleaf)
    for p in mod.parameters():
        p.grad = None
    if fused:
        y = mod(x, r)
    else:
        # PyTorch (2.14.1, CPU) computes a wrong grad_input in batch_norm backward when
        # the input or grad_output is channels_last-contiguous with a non-canonical
        # stride on a size-1 dim (e.g. base.permute(0, 2, 1, 3) with W == 1; see
        # test_edge_cases.py::test_ambiguous_channels_last_strides): the reference gets
        # canonical contiguous copies (autograd routes the gradient back to the view).
        y = ref_forward(mod, x.contiguous(), r.contiguous() if r is not None else None, activation)
        g = g.contiguous()
    y.backward(g)
    grads: Dict[str, torch.Tensor] = {"x": leaf.grad}
    if rleaf is not None:
        grads["residual"] = rleaf.grad
    for name, p in mod.named_parameters():
        grads[name] = p.grad
    return y.detach(), grads, x


def uses_batch_stats(mod: nn.BatchNorm2d) -> bool:
    return mod.training or mod.running_mean is None


def check_module_case(backend: str, case: Case, device: str = "cpu", equal_nan: bool = False,
                      xbase: Optional[torch.Tensor] = None, rbase: Optional[torch.Tensor] = None,
                      ref_device: Optional[str] = None) -> None:
    """Run ``case`` on ``backend`` on ``device`` and compare everything with
    nn.BatchNorm2d + add + ReLU, run on ``ref_device`` (default: the same device).
    ``xbase``/``rbase`` (dense base tensors for the layouts, on ``device``) override the
    random data. (``ref_device`` is for cases that run: a case where both must raise
    runs the reference on ``device``.)"""
    gen = torch.Generator().manual_seed(case.seed)
    n, c, h, w = case.shape
    ref, ours = make_pair(case, gen, device)
    rdev = torch.device(ref_device or device)
    ref = ref.to(rdev)
    assert rdev == torch.device(device) or not (n * h * w == 1 or case.eps <= 0), "ref_device: a raising case"

    def on_ref(t):
        return None if t is None else t.to(rdev)

    def back(t):  # a reference result, to ours' device for the comparisons
        return t.to(device) if isinstance(t, torch.Tensor) else {k: v.to(device) for k, v in t.items()}

    xshape, xfn = view_spec(case.shape, case.layout)
    rshape, rfn = view_spec(case.shape, case.res_layout or "contiguous")
    gshape, gfn = view_spec(case.shape, case.grad_layout)
    low = case.dtype in LOW
    steps = ["train"] * case.train_steps + (["eval"] if case.eval_step else [])
    slack = (torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64))
    with run_on(backend, device):
        for i, mode in enumerate(steps):
            if mode == "eval":
                ref.eval(), ours.eval()
            tag = f"[{backend} on {device}: {case.short()} seed={case.seed} step {i} {mode}]"
            xb = xbase if xbase is not None else make_base(xshape, case.dtype, gen, case.scale, case.offset, device)
            rb = None
            if case.res_layout is not None:
                rb = rbase if rbase is not None else make_base(rshape, case.dtype, gen, device=device)
            g = gfn(make_base(gshape, case.dtype, gen, device=device))
            step_slack = _fp32_slack(xfn(xb))
            slack = (torch.maximum(slack[0], step_slack[0]), torch.maximum(slack[1], step_slack[1]))
            one_value = uses_batch_stats(ref) and n * h * w == 1
            if one_value or case.eps <= 0:
                # One value per channel in training: PyTorch's own check, the same
                # ValueError and text. eps <= 0: fastres's one message in training and
                # eval on every torch version (PyTorch refuses it too, in its own words,
                # in training; in eval only torch < 2.14 does). Both have already counted
                # the batch in num_batches_tracked.
                before = _stats(ours)
                if uses_batch_stats(ref):
                    with pytest.raises(ValueError) as e_ref:
                        run_step(ref, False, case.activation, xb, xfn, rb, rfn, g)
                with pytest.raises(ValueError) as e_ours:
                    run_step(ours, True, case.activation, xb, xfn, rb, rfn, g)
                want = str(e_ref.value) if one_value else f"fastres: eps must be positive, got {case.eps!r}"
                assert str(e_ours.value) == want, tag
                after = _stats(ours)
                assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{tag} running stats changed"
                if ref.num_batches_tracked is not None:
                    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item(), tag
                continue
            hi = copy.deepcopy(ref).float() if low else None  # before ref mutates its buffers
            if low:
                y_hi, gr_hi, _ = run_step(hi, False, case.activation, on_ref(xb).float(), xfn,
                                          on_ref(rb).float() if rb is not None else None, rfn, on_ref(g).float())
                y_hi, gr_hi = back(y_hi), back(gr_hi)
            y_ref, gr_ref, _ = run_step(ref, False, case.activation, on_ref(xb), xfn, on_ref(rb), rfn, on_ref(g))
            y_ref, gr_ref = back(y_ref), back(gr_ref)
            y, gr, xv = run_step(ours, True, case.activation, xb, xfn, rb, rfn, g)
            assert y.dtype == case.dtype, f"{tag} output dtype {y.dtype}"
            assert y.device == xv.device, f"{tag} output on {y.device}, input on {xv.device}"
            if xv.is_contiguous(memory_format=torch.channels_last) and not xv.is_contiguous():
                assert y.is_contiguous(memory_format=torch.channels_last), f"{tag} output lost channels_last"
            extra = _degenerate_slack(ref, xfn(xb), g, y_ref, case) if uses_batch_stats(ref) else {}
            if "x" in extra:  # compared on the leaf: the base tensor's layout
                extra["x"] = slack_on_base(extra["x"], xshape, xfn)
            if case.dtype == torch.float32 and g.numel():
                # grad_weight/grad_bias are fp32 sums of M = N*H*W terms |g*x_hat| <~ 4|g|max:
                # two correct implementations summing in different orders (channels_last vs
                # contiguous kernels) differ by ~eps*sqrt(M)*that (seen: 1.3e-5 at M=765).
                m = g.numel() // g.shape[1]
                red = 4 * torch.finfo(torch.float32).eps * math.sqrt(m) * 4 * g.detach().abs().max().item()
                for k in ("weight", "bias"):
                    extra[k] = extra.get(k, 0.0) + red  # float, or per-channel tensor + float
            assert_parity(y, y_ref, case.dtype, f"{tag} output", y_hi if low else None, equal_nan,
                          extra.get("output", 0.0), case.low_floor)
            assert gr.keys() == gr_ref.keys(), f"{tag} grads {sorted(gr)} != {sorted(gr_ref)}"
            if low and case.activation == "relu" and _relu_mask_flipped(y, y_hi, rb, case.dtype, tag):
                _check_buffers(ours, ref, hi, tag, equal_nan, slack)
                continue
            for k in gr:
                assert gr[k] is not None, f"{tag} missing grad {k}"
                assert_parity(gr[k], gr_ref[k], case.dtype, f"{tag} grad {k}",
                              gr_hi[k].to(gr_ref[k].dtype if not low else torch.float32) if low else None,
                              equal_nan, extra.get(k, 0.0), case.low_floor)
            _check_buffers(ours, ref, hi, tag, equal_nan, slack)


def _degenerate_slack(bn, x, g, y_ref, case) -> Dict[str, torch.Tensor]:
    """Extra absolute tolerance (fp64 / fp32), PER CHANNEL ([C] tensors), for the rounding
    of the statistics, which matters in channels whose batch variance is below ~eps
    (constant or near-constant channels, e.g. an expanded input with H*W == 1).

    In channel c a stable accumulator's mean is off by d ~ ulp * max|x_c| (u below: 8
    ulps) and 1/sqrt(var + eps) = invs_c (up to 1/sqrt(eps) ~ 316) multiplies it: x_hat is
    shifted by d * invs_c, and invs_c itself is off by a relative e <= u * max|x_c| * invs_c.
    First order, per channel:
      output       d * s_c * (1 + max|x_hat_c|)                         (s_c = |w_c| invs_c)
      grad_x       u * max|g_c| * s_c * (max|x_c| invs_c + 1), twice, x N views if expanded
      grad_weight  2 * u * max|x_c| * invs_c * (|sum dz_c| + |sum dz_c x_hat_c|)
    (dz = the incoming gradient through the ReLU mask of the reference output). Ordinary
    channels get a slack of the order of the plain tolerance; a near-constant channel's
    slack never widens another channel's. tests/test_edge_cases.py checks such channels
    against float64 truth."""
    c = x.shape[1]
    xc = _channels(x)
    if xc.numel() == 0:
        return {}
    mean = xc.mean(dim=1, keepdim=True)
    var = xc.var(dim=1, unbiased=False)
    invs = 1 / (var + case.eps).sqrt()
    w = bn.weight.detach().double().abs().cpu() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
    s = w * invs
    u = 8 * torch.finfo(torch.float64 if case.dtype == torch.float64 else torch.float32).eps
    xm = xc.abs().amax(dim=1)
    xhat = (xc - mean) * invs[:, None]
    dz = _channels(g)
    if case.activation == "relu":
        dz = dz * (_channels(y_ref) > 0)
    gm = _channels(g).abs().amax(dim=1)
    copies = x.shape[0] if case.layout.startswith("expanded") else 1  # the leaf grad sums N views
    return {"output": u * xm * s * (1 + xhat.abs().amax(dim=1)),
            "x": u * gm * s * (xm * invs + 1) * copies * 2,
            "weight": 2 * u * xm * invs * (dz.sum(dim=1).abs() + (dz * xhat).sum(dim=1).abs())}


def _relu_mask_flipped(y, y_hi, rb, dtype, tag) -> bool:
    """In bf16/fp16 the ReLU decision of an element whose pre-activation is within rounding
    of 0 can differ between implementations (PyTorch rounds bn(x) to bf16 *before* adding
    the residual; a fused kernel rounds once), and a flipped mask moves grad_x, the
    residual's grad and grad_weight/grad_bias by a whole |g| — beyond any tolerance.
    Returns True (skip the gradient comparison of this step) when the mask differs from
    the fp32 run only at such ambiguous elements; fails when it differs elsewhere."""
    pos, pos_hi = y.float() > 0, y_hi > 0
    flips = pos != pos_hi
    if not bool(flips.any()):
        return False
    if y.isnan().any() or y_hi.isnan().any():
        return False
    amb = 4 * FINITE_LOW_FLOOR[dtype] * max(1.0, rb.abs().max().item() if rb is not None else 1.0)
    positive_side = torch.where(pos, y.float(), y_hi)[flips]
    assert bool((positive_side <= amb).all()), (
        f"{tag} ReLU mask differs from the fp32 run where the pre-activation is not ambiguous: "
        f"{positive_side.max().item():.3g} > {amb:.3g}")
    return True


def _stats(mod):
    return [t.clone() for t in (mod.running_mean, mod.running_var) if t is not None]


def _check_buffers(ours, ref, hi, tag, equal_nan, slack=(0.0, 0.0)):
    if ref.running_mean is None:
        assert ours.running_mean is None and ours.running_var is None, f"{tag} ours has running stats"
        return
    for buf in ("running_mean", "running_var"):
        actual = getattr(ours, buf)
        assert_buffer(actual, getattr(ref, buf).to(actual.device), f"{tag} {buf}",
                      hi=getattr(hi, buf).to(actual.device) if hi is not None else None, equal_nan=equal_nan,
                      slack=slack)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item(), f"{tag} num_batches_tracked"


# ----------------------------------------------------------------------------- affine_act
@dataclass(frozen=True)
class AffineCase:
    shape: Tuple[int, int, int, int]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    res_layout: Optional[str] = None
    scale: Optional[torch.dtype] = torch.float32  # dtype of the scale tensor, None: no scale
    shift: Optional[torch.dtype] = torch.float32
    activation: str = "relu"
    seed: int = 0


def _affine_ref(x, scale, shift, residual, relu, acc):
    z = x.to(acc)
    if scale is not None:
        z = z * scale.to(acc).view(1, -1, 1, 1)
    if shift is not None:
        z = z + shift.to(acc).view(1, -1, 1, 1)
    if residual is not None:
        z = z + residual.to(acc)
    return torch.relu(z) if relu else z


def check_affine_case(backend: str, case: AffineCase, device: str = "cpu") -> None:
    """fastres.functional.affine_act (the folded conv epilogue) vs the aten composition
    in the accumulation dtype (PyTorch's own result), forward and backward."""
    from fastres.functional import affine_act
    gen = torch.Generator().manual_seed(case.seed)
    c = case.shape[1]
    xshape, xfn = view_spec(case.shape, case.layout)
    rshape, rfn = view_spec(case.shape, case.res_layout or "contiguous")
    xb = make_base(xshape, case.dtype, gen, device=device)
    rb = make_base(rshape, case.dtype, gen, device=device) if case.res_layout else None
    sb = (torch.rand(c, dtype=torch.float64, generator=gen) * 2 - 0.5).to(device)
    tb = torch.randn(c, dtype=torch.float64, generator=gen).to(device)
    g = make_base(case.shape, case.dtype, gen, device=device)
    relu = case.activation == "relu"
    low = case.dtype in LOW
    tag = f"[{backend} affine_act {case}]"

    def run(x_dtype, fused):
        """fused: ours; else the aten composition in x_dtype's accumulation dtype."""
        acc = torch.float64 if x_dtype == torch.float64 else torch.float32
        hi = x_dtype != case.dtype  # the fp32 run of a low-precision case: fp32 parameters too
        leaf = xb.to(x_dtype).detach().clone().requires_grad_(True)
        rleaf = rb.to(x_dtype).detach().clone().requires_grad_(True) if rb is not None else None
        s = t = None
        if case.scale is not None:
            s = sb.to(case.scale)
            s = (s.float() if hi else s).requires_grad_(True)
        if case.shift is not None:
            t = tb.to(case.shift)
            t = (t.float() if hi else t).requires_grad_(True)
        r = rfn(rleaf) if rleaf is not None else None
        if fused:
            y = affine_act(xfn(leaf), s, t, r, case.activation)
        else:
            y = _affine_ref(xfn(leaf), s, t, r, relu, acc).to(x_dtype)
        y.backward(g.to(x_dtype))
        grads = {"x": leaf.grad}
        if rleaf is not None:
            grads["residual"] = rleaf.grad
        if s is not None:
            grads["scale"] = s.grad
        if t is not None:
            grads["shift"] = t.grad
        return y.detach(), grads

    with run_on(backend, device):
        y, gr = run(case.dtype, True)
    y_ref, gr_ref = run(case.dtype, False)
    y_hi, gr_hi = run(torch.float32, False) if low else (None, {})
    assert_parity(y, y_ref, case.dtype, f"{tag} output", y_hi)
    assert gr.keys() == gr_ref.keys()
    for k in gr:
        assert_parity(gr[k], gr_ref[k], case.dtype, f"{tag} grad {k}", gr_hi.get(k))
