"""fastres.functional.conv2d_act: the fused convolution (issue 10).

Parity against an independent reference built from F.conv2d (+ a BatchNorm-style
scale/shift + ReLU prologue, + bias / residual / ReLU epilogue) for every shape family
of a ResNet (1x1 s1/s2, 3x3 s1/s2, dilation 2, the 7x7 s2 stem with C=3, grouped, odd
channel counts, batch 1), NCHW / NHWC / non-contiguous inputs, fp64 / fp32 / bf16,
forward, every gradient, and the statistics against a float64 reference. The three
families are checked: ``torch`` (aten's autograd), ``ops`` (``fastres::conv2d_act``:
the custom-op fakes and autograd formula with aten inside) and ``triton`` (the Triton
kernel; under TRITON_INTERPRET=1 on the CPU with one small fixed tiling).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import backends, conv_backend, conv_ops
from fastres.functional import conv2d_act
from conv_helpers import conv_family
from parity import assert_close_dtype, make_input, max_err

FAMILIES = ["torch", "ops", "triton"]

# name: (x shape, weight shape, stride, padding, dilation, groups)
SHAPES = {
    "1x1s1": ((2, 8, 5, 5), (12, 8, 1, 1), 1, 0, 1, 1),
    "1x1s2": ((2, 8, 6, 6), (12, 8, 1, 1), 2, 0, 1, 1),
    "3x3s1": ((2, 6, 6, 6), (8, 6, 3, 3), 1, 1, 1, 1),
    "3x3s2": ((2, 6, 7, 7), (8, 6, 3, 3), 2, 1, 1, 1),
    "3x3d2": ((2, 6, 7, 7), (8, 6, 3, 3), 1, 2, 2, 1),
    "3x3s2d2": ((2, 6, 9, 9), (8, 6, 3, 3), 2, 2, 2, 1),
    "7x7s2c3": ((2, 3, 8, 8), (8, 3, 7, 7), 2, 3, 1, 1),
    "grouped": ((2, 8, 5, 5), (8, 2, 3, 3), 1, 1, 1, 4),
    "c65b1": ((1, 65, 4, 4), (17, 65, 3, 3), 1, 1, 1, 1),
}


def _reference(x, w, b, s, t, in_relu, r, relu, stride, padding, dilation, groups):
    """Independent composition: BN-style affine (+ReLU), zero padding of the transformed
    input by F.conv2d, bias, residual, ReLU; in x's dtype (fp32 math for bf16 pieces)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = x
    if s is not None or t is not None or in_relu:
        u = x.to(acc)
        if s is not None:
            u = u * s.to(acc).view(1, -1, 1, 1)
        if t is not None:
            u = u + t.to(acc).view(1, -1, 1, 1)
        if in_relu:
            u = torch.relu(u)
        u = u.to(x.dtype)
    z = F.conv2d(u, w, None, stride, padding, dilation, groups).to(acc)
    if b is not None:
        z = z + b.to(acc).view(1, -1, 1, 1)
    if r is not None:
        z = z + r.to(acc)
    if relu:
        z = torch.relu(z)
    return z.to(x.dtype)


def _make(shape_name, dtype, layout="channels_last", pro=True, epi=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ws, stride, padding, dilation, groups = SHAPES[shape_name]
    torch.manual_seed(seed)
    x = make_input(xs, dtype, layout)
    fan = ws[1] * ws[2] * ws[3]
    w = (torch.randn(ws, generator=g, dtype=torch.float64) / fan ** 0.5).to(dtype)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    c = xs[1]
    s = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pdt) if pro else None
    t = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(pdt) if pro else None
    k = ws[0]
    n, _, h, wd = xs
    p = (h + 2 * padding - dilation * (ws[2] - 1) - 1) // stride + 1
    q = (wd + 2 * padding - dilation * (ws[3] - 1) - 1) // stride + 1
    b = (torch.randn(k, generator=g, dtype=torch.float64) * 0.1).to(dtype) if epi else None
    r = torch.randn((n, k, p, q), generator=g, dtype=torch.float64).to(dtype) if epi else None
    if r is not None and layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    return dict(x=x, w=w, b=b, s=s, t=t, r=r, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _run(case, in_relu, relu, stats, hi=None):
    """conv2d_act on ``case``, or (``hi`` = a dtype) the reference on copies cast to ``hi``."""
    c = case
    if hi is not None:
        same = hi == c["x"].dtype  # keep the graph (reference gradients); else a detached copy

        def cv(v):
            return v if v is None or same else v.detach().to(hi)
        y = _reference(cv(c["x"]), cv(c["w"]), cv(c["b"]), cv(c["s"]), cv(c["t"]), in_relu, cv(c["r"]), relu,
                       c["stride"], c["padding"], c["dilation"], c["groups"])
        return y
    return conv2d_act(c["x"], c["w"], c["b"], c["stride"], c["padding"], c["dilation"], c["groups"],
                      in_scale=c["s"], in_shift=c["t"], in_relu=in_relu, residual=c["r"],
                      activation="relu" if relu else "none", stats=stats)


def _leaves(case):
    return {k: v for k, v in case.items() if isinstance(v, torch.Tensor)}


def _grads(case, out_fn):
    leaves = _leaves(case)
    for v in leaves.values():
        v.grad = None
        v.requires_grad_(True)
    loss = out_fn()
    loss.backward()
    return {k: v.grad for k, v in leaves.items()}


def _loss(y, sums=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    loss = (y * gy).sum().double()
    if sums is not None:
        s, ss = sums
        ws = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.device)
        loss = loss + (s.double() * ws).sum() * 0.1 + (ss.double() * ws.flip(0)).sum() * 0.01
    return loss


# ----------------------------------------------------------------------------- fp64 parity, every shape
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp64_forward_backward_stats_every_shape(family, shape):
    """Prologue + epilogue + stats together, output, stats and all six gradients, fp64 at 1e-9."""
    case = _make(shape, torch.float64)
    with conv_family(family):
        got = _grads(case, lambda: _loss(*_split(_run(case, True, True, "sums"))))
        y, s, ss = _run(case, True, True, "sums")
    ref = _grads(case, lambda: _loss(*_split_ref(_run(case, True, True, None, hi=torch.float64))))
    y_ref = _run(case, True, True, None, hi=torch.float64)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(s, y_ref.sum(dim=(0, 2, 3)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ss, y_ref.square().sum(dim=(0, 2, 3)), rtol=1e-9, atol=1e-9)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")


def _split(out):
    y, s, ss = out
    return y, (s, ss)


def _split_ref(y):
    return y, (y.sum(dim=(0, 2, 3)), y.square().sum(dim=(0, 2, 3)))


# ----------------------------------------------------------------------------- prologue / epilogue separately
@pytest.mark.parametrize("family", ["ops", "triton"])
@pytest.mark.parametrize("pro,in_relu,epi,relu", [
    (False, False, False, False),   # a plain convolution
    (True, False, False, False),    # scale/shift only
    (True, True, False, False),     # prologue only
    (False, True, False, True),     # ReLU in, ReLU out, nothing else
    (False, False, True, False),    # bias + residual, no ReLU
    (False, False, True, True),     # epilogue only
])
def test_prologue_and_epilogue_separately(family, pro, in_relu, epi, relu):
    case = _make("3x3s2", torch.float64, pro=pro, epi=epi)
    with conv_family(family):
        got = _grads(case, lambda: _loss(_run(case, in_relu, relu, False)))
        y = _run(case, in_relu, relu, False)
    ref = _grads(case, lambda: _loss(_run(case, in_relu, relu, None, hi=torch.float64)))
    torch.testing.assert_close(y, _run(case, in_relu, relu, None, hi=torch.float64), rtol=1e-9, atol=1e-9)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_padding_stays_zero_after_the_transform(family):
    """x = 0 and in_shift = 1: inside the image the transformed input is 1, in the padding 0.
    With all-ones 3x3 weights each output counts its in-image taps: 4 at a corner, 6 on an
    edge, 9 inside. Transforming the padding would give 9 everywhere."""
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    w = torch.ones(1, 2, 3, 3, dtype=torch.float64)
    shift = torch.ones(2, dtype=torch.float64)
    with conv_family(family):
        y = conv2d_act(x, w, padding=1, in_shift=shift, in_relu=True)
    taps = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float64) * 2
    torch.testing.assert_close(y[0, 0], taps, rtol=0, atol=0)


# ----------------------------------------------------------------------------- layouts, batch 1
@pytest.mark.parametrize("family", ["ops", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_input_layouts(family, layout):
    case = _make("1x1s2", torch.float64, layout=layout)
    with conv_family(family):
        got = _grads(case, lambda: _loss(*_split(_run(case, True, True, True))))
        y, s, ss = _run(case, True, True, True)
    ref = _grads(case, lambda: _loss(*_split_ref(_run(case, True, True, None, hi=torch.float64))))
    y_ref = _run(case, True, True, None, hi=torch.float64)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    want_cl = layout == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")


# ----------------------------------------------------------------------------- fp32 / bf16
@pytest.mark.parametrize("family", ["ops", "triton"])
@pytest.mark.parametrize("shape", ["3x3s1", "1x1s2", "7x7s2c3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_forward_backward(family, shape, dtype):
    """fp32 at 1e-5 against fp32 aten; bf16/fp16: error vs the fp32 reference <= 2x aten's own error."""
    check_against_reference(_make(shape, dtype), dtype, conv_family(family), torch.float32)


def check_against_reference(case, dtype, ctx, hi):
    """conv2d_act (run inside ``ctx``) with prologue, epilogue and stats on ``case``:
    output, Σy, Σy² and all six gradients against the reference computed in ``hi`` from
    the same (rounded) inputs. dtype == hi: within 1e-9 (fp64) / 1e-5 (fp32, gradients
    1e-4: sums over N*P*Q in another order); else each within 2x the error of PyTorch's
    own ``dtype`` computation against ``hi`` (the low-precision rule)."""
    with ctx:
        got = _grads(case, lambda: _loss(*_split(_run(case, True, True, True))))
        y, s, ss = _run(case, True, True, True)
    hi_case = {k: (v.detach().to(hi) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    ref_hi = _grads(hi_case, lambda: _loss(*_split_ref(_run(hi_case, True, True, None, hi=hi))))
    y_hi = _run(hi_case, True, True, None, hi=hi).detach()
    if dtype == hi:
        tol = dict(rtol=1e-9, atol=1e-9) if hi == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        gtol = dict(rtol=1e-9, atol=1e-9) if hi == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y, y_hi, **tol)
        torch.testing.assert_close(s, y_hi.sum(dim=(0, 2, 3)), **gtol)
        torch.testing.assert_close(ss, y_hi.square().sum(dim=(0, 2, 3)), **gtol)
        for k in ref_hi:
            torch.testing.assert_close(got[k], ref_hi[k], **gtol, msg=lambda m: f"grad {k}: {m}")
        return
    ref_low = _grads(case, lambda: _loss(*_split_ref(_run(case, True, True, None, hi=dtype))))
    y_low = _run(case, True, True, None, hi=dtype).detach()
    rule = torch.bfloat16  # assert_close_dtype's 2x rule (also for fp32 against an fp64 reference)
    assert_close_dtype(y, None, rule, "y", ref_low=y_low, ref_hi=y_hi)
    # the statistics are of the returned (rounded) y: compare with an fp64 sum of that y
    yd = y.double()
    torch.testing.assert_close(s.double(), yd.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ss.double(), yd.square().sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    for k in ref_hi:
        assert got[k].dtype == case[k].dtype, k
        assert_close_dtype(got[k], None, rule, f"grad {k}", ref_low=ref_low[k], ref_hi=ref_hi[k])


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("family", FAMILIES)
def test_stats_stable_with_a_large_mean(family):
    """Output ~ 1e4 + N(0, 1) in fp32: the moments must come out with var ~ 1 to fp32
    accuracy. E[y^2] - E[y]^2 in fp32 would lose every digit (y^2 ~ 1e8, ulp ~ 8)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 1, 1, generator=g) * 0.5
    b = torch.full((6,), 1e4)
    with conv_family(family):
        y, mean, var = conv2d_act(x, w, b, stats="moments")
    yd = y.double()
    mean_ref = yd.mean(dim=(0, 2, 3))
    var_ref = yd.var(dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-3, atol=1e-3)  # y itself is rounded to ~1e-3
    naive = (yd.float().square().mean(dim=(0, 2, 3)) - yd.float().mean(dim=(0, 2, 3)).square())
    assert max_err(naive, var_ref) > 10 * max_err(var, var_ref)  # the test can tell the difference


@pytest.mark.parametrize("family", ["ops", "triton"])
def test_stats_gradients_moments(family):
    """mean and var are differentiable outputs (a BatchNorm after the conv needs it)."""
    case = _make("3x3s1", torch.float64)

    def ours():
        y, m, v = _run(case, True, True, "moments")
        return _loss(y, (m, v))

    def ref():
        y = _run(case, True, True, None, hi=torch.float64)
        return _loss(y, (y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)))

    with conv_family(family):
        got = _grads(case, ours)
    want = _grads(case, ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")


def test_multi_tile_stats_merge_interpreter():
    """Stats over several BLOCK_M tiles and a ragged last tile (M = 2*9*9 = 162 rows over
    16-row tiles): the Chan merge of the tile moments against fp64."""
    case = _make("3x3s1", torch.float64)
    case["x"] = make_input((2, 6, 9, 9), torch.float64, "channels_last")
    case["r"] = None
    with conv_family("triton"):
        y, mean, var = conv2d_act(case["x"], case["w"], case["b"], 1, 1, in_scale=case["s"], in_shift=case["t"],
                                  stats="moments")
    torch.testing.assert_close(mean, y.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, y.var(dim=(0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)


def test_tuner_names_every_failed_candidate(monkeypatch):
    """GPU tuner (run here with the interpreter switch off and a failing timer): when no
    tiling runs on the device, the error lists each candidate and why it failed."""
    import triton.testing
    from triton.runtime.errors import OutOfResources
    from fastres.kernels import _conv

    def refuse(fn, **kw):
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(_conv, "INTERPRETED", False)
    monkeypatch.setattr(triton.testing, "do_bench", refuse)
    monkeypatch.delenv("FASTRES_CONV_CONFIG", raising=False)
    monkeypatch.delenv("FASTRES_CONV_AUTOTUNE", raising=False)
    key = ("test-key", torch.bfloat16)
    cands = _conv._candidates(torch.bfloat16, 64, 64, 4096)
    with pytest.raises(RuntimeError, match="no conv2d_act tiling compiles") as info:
        _conv._pick_config(key, lambda c: None, torch.bfloat16, 64, 64, 4096)
    msg = str(info.value)
    assert msg.count("out of resource: shared memory") == len(cands) > 0, msg
    assert str(cands[0]) in msg
    assert key not in _conv._tuned


def test_tuner_propagates_real_errors(monkeypatch):
    """Only "this tiling does not fit" (Triton's OutOfResources, PTXASError,
    CompileTimeAssertionFailure) skips a candidate: out of memory or any other failure
    while timing propagates with its own type instead of being reported as a tiling that
    does not compile."""
    import triton.testing
    from fastres.kernels import _conv

    def oom(fn, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")

    monkeypatch.setattr(_conv, "INTERPRETED", False)
    monkeypatch.setattr(triton.testing, "do_bench", oom)
    monkeypatch.delenv("FASTRES_CONV_CONFIG", raising=False)
    monkeypatch.delenv("FASTRES_CONV_AUTOTUNE", raising=False)
    key = ("test-key-oom", torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        _conv._pick_config(key, lambda c: None, torch.bfloat16, 64, 64, 4096)
    assert key not in _conv._tuned


def test_tuner_does_not_time_in_capture_or_deterministic_mode(monkeypatch):
    """No timing (it synchronises the device) while a CUDA graph is being captured: a
    problem tuned before keeps its tiling, an untuned one runs the first candidate and is
    not remembered. Deterministic mode: always the first candidate (timing noise must not
    choose the reduction order). Checked with the GPU tuner's code and a timer that fails."""
    import triton.testing
    from fastres.kernels import _conv
    from fastres.kernels import _launch as L

    def no_timing(fn, **kw):
        raise AssertionError("timed a candidate")

    monkeypatch.setattr(_conv, "INTERPRETED", False)
    monkeypatch.setattr(triton.testing, "do_bench", no_timing)
    monkeypatch.delenv("FASTRES_CONV_CONFIG", raising=False)
    monkeypatch.delenv("FASTRES_CONV_AUTOTUNE", raising=False)
    first = _conv._candidates(torch.bfloat16, 64, 64, 4096)[0]
    other = _conv._candidates(torch.bfloat16, 64, 64, 4096)[-1]
    assert first != other
    cuda = torch.device("cuda", 0)
    # capture
    monkeypatch.setattr(L.torch.cuda, "is_current_stream_capturing", lambda: True)
    assert L.untimed_reason(cuda) == "capture" and L.untimed_reason(torch.device("cpu")) is None
    key = ("test-key-capture", torch.bfloat16)
    assert _conv._pick_config(key, lambda c: None, torch.bfloat16, 64, 64, 4096, "capture") == first
    assert key not in _conv._tuned
    monkeypatch.setitem(_conv._tuned, key, other)
    assert _conv._pick_config(key, lambda c: None, torch.bfloat16, 64, 64, 4096, "capture") == other
    # deterministic mode
    monkeypatch.setattr(L.torch.cuda, "is_current_stream_capturing", lambda: False)
    assert L.untimed_reason(cuda) is None
    monkeypatch.setattr(L.torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert L.untimed_reason(cuda) == "deterministic"
    assert _conv._pick_config(key, lambda c: None, torch.bfloat16, 64, 64, 4096, "deterministic") == first


def test_backward_tuners_do_not_time_in_capture_or_deterministic_mode(monkeypatch):
    """The dgrad/wgrad autotuners (triton.autotune: they time a problem on its first call)
    run in a capture only for a problem they have timed before, never in deterministic
    mode; otherwise the fixed tiling runs. FASTRES_CONV_BWD_AUTOTUNE=0 is read per call."""
    from fastres.kernels import _conv_bwd as B
    from fastres.kernels import _launch as L

    tuned = object()
    monkeypatch.setattr(B, "_INTERPRETED", False)
    monkeypatch.setitem(B._TUNED, "dgrad16", tuned)
    monkeypatch.setitem(B.CONFIG, "autotune", True)
    monkeypatch.delenv("FASTRES_CONV_BWD_AUTOTUNE", raising=False)
    monkeypatch.setattr(B, "_TUNED_KEYS", set())
    cuda = torch.device("cuda", 0)
    reason = {"now": None}
    monkeypatch.setattr(B, "untimed_reason", lambda dev: reason["now"])
    key = ("dgrad", "test")
    assert B._tuned_or_fixed("dgrad", torch.bfloat16, key, cuda) == (tuned, None)
    reason["now"] = "capture"
    assert B._tuned_or_fixed("dgrad", torch.bfloat16, key, cuda) == (None, B._fixed(torch.bfloat16))
    B._TUNED_KEYS.add(key)  # what a launch of the tuned kernel outside a capture records
    assert B._tuned_or_fixed("dgrad", torch.bfloat16, key, cuda) == (tuned, None)
    reason["now"] = "deterministic"
    assert B._tuned_or_fixed("dgrad", torch.bfloat16, key, cuda) == (None, B._fixed(torch.bfloat16))
    reason["now"] = None
    monkeypatch.setenv("FASTRES_CONV_BWD_AUTOTUNE", "0")
    assert B._tuned_or_fixed("dgrad", torch.bfloat16, key, cuda) == (None, B._fixed(torch.bfloat16))
    assert L.untimed_reason(torch.device("cpu")) is None


# ----------------------------------------------------------------------------- registration
def _op_args(dtype=torch.float64, stats=True):
    case = _make("3x3s2", dtype)
    return (case["x"], case["w"], case["b"], case["s"], case["t"], case["r"], [2, 2], [1, 1], [1, 1], 1, True, True,
            stats)


@pytest.mark.parametrize("family", ["ops", "triton"])
def test_opcheck_forward(family):
    if family == "triton":
        ok, why = backends.available("triton", "cpu")
        if not ok:
            pytest.skip(f"triton unavailable on cpu: {why}")
    op = conv_ops.family(family).conv2d_act
    args = list(_op_args())
    for i in (0, 1, 2, 3, 4, 5):
        args[i] = args[i].requires_grad_(True)
    torch.library.opcheck(op, tuple(args))
    args2 = list(_op_args(stats=False))
    args2[2] = args2[3] = args2[4] = args2[5] = None
    torch.library.opcheck(op, tuple(args2))


def test_opcheck_backward():
    x, w, b, s, t, r, stride, padding, dilation, groups, in_relu, relu, _ = _op_args()
    y, mean, var = conv_ops.conv2d_act_reference(x, w, b, s, t, r, stride, padding, dilation, groups, in_relu, relu,
                                                 True)
    gy = torch.randn_like(y)
    gm, gv = torch.randn_like(mean), torch.randn_like(var)
    op = conv_ops.family("ops").conv2d_act_backward
    torch.library.opcheck(op, (gy, gm, gv, x, w, s, t, y, mean, stride, padding, dilation, groups, in_relu, relu,
                               [True] * 6))
    torch.library.opcheck(op, (gy, None, None, x, w, None, None, None, None, stride, padding, dilation, groups, False,
                               False, [True, False, True, False, False, False]))


@pytest.mark.parametrize("family", ["torch", "ops", "triton"])
def test_compile_fullgraph(family):
    case = _make("3x3s1", torch.float64)

    def f(x, w, b, s, t, r):
        y, m, v = conv2d_act(x, w, b, 1, 1, in_scale=s, in_shift=t, in_relu=True, residual=r, activation="relu",
                             stats="moments")
        return (y * 2).sum() + m.sum() + v.sum()

    args = [case[k] for k in ("x", "w", "b", "s", "t", "r")]
    with conv_family(family):
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        a1 = [a.detach().clone().requires_grad_(True) for a in args]
        a2 = [a.detach().clone().requires_grad_(True) for a in args]
        out = cf(*a1)
        out.backward()
        ref = f(*a2)
        ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for p, q in zip(a1, a2):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- choice
def test_conv_choice_env_switch_and_info(monkeypatch):
    monkeypatch.setenv("FASTRES_CONV", "aten")
    conv_backend._clear_resolved()
    assert conv_backend.conv_for(torch.device("cpu")) == "aten"
    monkeypatch.setenv("FASTRES_CONV", "auto")
    assert conv_backend.conv_for(torch.device("cpu")) == "aten"  # auto: aten on the CPU
    assert "aten on the CPU" in conv_backend.conv_info("cpu")["reason"]
    assert "unmeasured" in conv_backend.AUTO_REASON["cuda"]
    with fastres.use_conv("fused"):
        want = "fused" if backends.available("triton", "cpu")[0] else "aten"
        assert conv_backend.conv_for(torch.device("cpu")) == want
        info = fastres.backend_info()
        assert info["devices"]["cpu"]["conv"]["path"] == want
        assert info["devices"]["cpu"]["conv"]["requested"] == "fused"
    assert fastres.backend_info()["devices"]["cpu"]["conv"]["path"] == "aten"
    with pytest.raises(ValueError, match="unknown conv path 'cuda'"):  # (cudnn is a path: issue 11)
        fastres.set_conv("cuda")
    monkeypatch.setenv("FASTRES_CONV", "nope")
    with pytest.raises(ValueError, match="unknown conv path 'nope'"):
        conv_backend.conv_for(torch.device("cpu"))


def test_fused_unavailable_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton cannot run on the CPU then
    conv_backend._clear_resolved()
    conv_backend._warned.clear()
    try:
        with fastres.use_conv("fused"):
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                x = torch.randn(1, 2, 3, 3)
                y = conv2d_act(x, torch.randn(2, 2, 1, 1))
                conv2d_act(x, torch.randn(2, 2, 1, 1))
    finally:
        monkeypatch.undo()
        conv_backend._clear_resolved()
    msgs = [str(w.message) for w in rec if "fused conv is unavailable" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert y.shape == (1, 2, 3, 3)


# ----------------------------------------------------------------------------- errors
def _bad(**over):
    x = torch.randn(2, 4, 5, 5)
    args = dict(x=x, weight=torch.randn(6, 4, 3, 3), bias=None, stride=1, padding=1, dilation=1, groups=1)
    kw = {}
    for k, v in over.items():
        if k in args:
            args[k] = v
        else:
            kw[k] = v
    return lambda: conv2d_act(args["x"], args["weight"], args["bias"], args["stride"], args["padding"],
                              args["dilation"], args["groups"], **kw)


@pytest.mark.parametrize("call,exc,match", [
    (_bad(x=torch.randn(4, 5, 5)), ValueError, r"expected input to be 4-D .* got a 3-D tensor of shape \(4, 5, 5\)"),
    (_bad(x=torch.ones(2, 4, 5, 5, dtype=torch.int64)), TypeError, "input must be float64, float32, bfloat16 or "
                                                                   "float16, got int64"),
    (_bad(weight=torch.randn(6, 4, 3)), ValueError, r"expected weight to be 4-D .* got a 3-D tensor of shape"),
    (_bad(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError,
     "weight has dtype float64 but input is float32; expected float32"),
    (_bad(weight=torch.randn(6, 3, 3, 3)), ValueError, r"expects 3 input channels .* but input has 4"),
    (_bad(weight=torch.randn(6, 2, 3, 3), groups=3), ValueError, r"input channels \(4\) must be divisible by "
                                                                 r"groups \(3\)"),
    (_bad(weight=torch.randn(5, 2, 3, 3), groups=2), ValueError, r"out_channels \(5\) must be divisible by "
                                                                 r"groups \(2\)"),
    (_bad(groups=0), ValueError, "groups must be a positive int, got 0"),
    (_bad(stride=0), ValueError, "stride must be >= 1, got 0"),
    (_bad(padding=-1), ValueError, "padding must be >= 0, got -1"),
    (_bad(padding="same"), TypeError, "padding must be an int or a pair of ints, got 'same'"),
    (_bad(dilation=(1, 2, 3)), TypeError, "dilation must be an int or a pair of ints"),
    (_bad(padding=0, weight=torch.randn(6, 4, 7, 7)), ValueError, "kernel .* is larger than the padded input 5x5"),
    (_bad(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\) to match weight's 6 output channels, "
                                            r"got \(5,\)"),
    (_bad(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias has dtype float64 but input is float32"),
    (_bad(in_scale=torch.randn(3)), ValueError, r"in_scale must have shape \(4,\) to match the input's 4 channels"),
    (_bad(in_shift=torch.randn(4, dtype=torch.float64)), TypeError, "in_shift has dtype float64"),
    (_bad(residual=torch.randn(2, 6, 4, 4)), ValueError, r"residual must have the output's shape "
                                                         r"\(2, 6, 5, 5\), got \(2, 6, 4, 4\)"),
    (_bad(residual=torch.randn(2, 6, 5, 5, dtype=torch.float64)), TypeError, "residual has dtype float64"),
    (_bad(activation="gelu"), ValueError, "activation must be one of"),
    (_bad(stats="yes"), ValueError, "stats must be False, True, 'sums' or 'moments', got 'yes'"),
    (_bad(in_relu=1), TypeError, "in_relu must be a bool, got 1"),
    (_bad(x=torch.randn(0, 4, 5, 5), stats=True), ValueError, "stats need a non-empty output"),
    # device mismatches (a meta tensor stands in for another device on a CPU-only machine)
    (_bad(weight=torch.empty(6, 4, 3, 3, device="meta")), ValueError,
     "weight is on meta but input is on cpu; expected both on the same device"),
    (_bad(bias=torch.empty(6, device="meta")), ValueError, "bias is on meta but input is on cpu"),
    (_bad(in_scale=torch.empty(4, device="meta")), ValueError, "in_scale is on meta but input is on cpu"),
    (_bad(residual=torch.empty(2, 6, 5, 5, device="meta")), ValueError, "residual is on meta but input is on cpu"),
])
def test_errors_name_the_tensor_expected_and_actual(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_errors_device_mismatch():
    x = torch.randn(2, 4, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu but input is on cuda:0"):
        conv2d_act(x, torch.randn(6, 4, 3, 3))


def test_empty_batch_without_stats():
    with conv_family("triton"):
        y = conv2d_act(torch.randn(0, 4, 5, 5), torch.randn(6, 4, 3, 3), padding=1)
    assert y.shape == (0, 6, 5, 5)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton conv compiled for it)")
@pytest.mark.parametrize("shape", [
    ((8, 64, 56, 56), (64, 64, 1, 1), 1, 0, 1, 1), ((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1),
    ((8, 256, 56, 56), (128, 256, 1, 1), 2, 0, 1, 1), ((8, 128, 28, 28), (128, 128, 3, 3), 2, 1, 1, 1),
    ((8, 3, 64, 64), (64, 3, 7, 7), 2, 3, 1, 1), ((4, 256, 14, 14), (256, 8, 3, 3), 1, 1, 1, 32),
    ((4, 65, 9, 9), (33, 65, 3, 3), 1, 2, 2, 1),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gpu_parity_resnet_shapes(shape, dtype, monkeypatch):
    """The kernel on CUDA (default tilings: FASTRES_CONV_AUTOTUNE=0 and
    FASTRES_CONV_BWD_AUTOTUNE=0 keep the compile count small; test_gpu_autotuned_tiling and
    test_conv_bwd_kernels' CUDA cases run the tuners), every dtype, ResNet-like shapes:
    fp64 within 1e-9 of the fp64 reference, others within 2x PyTorch's own error against
    fp64, output, statistics and every gradient."""
    monkeypatch.setenv("FASTRES_CONV_AUTOTUNE", "0")
    monkeypatch.setenv("FASTRES_CONV_BWD_AUTOTUNE", "0")  # the backward's too (read per call)
    _device_parity(shape, dtype, "cuda")


def _device_parity(shape, dtype, device):
    SHAPES["_dev"] = shape
    try:
        case = _make("_dev", dtype)
    finally:
        del SHAPES["_dev"]
    case = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    check_against_reference(case, dtype, fastres.use_conv("fused"), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_device_parity_helper_on_cpu(dtype):
    """The body of the gpu-marked parity test, run here on a tiny grouped shape through the
    interpreted kernel, so that the GPU test's own logic is exercised on every machine."""
    ok, why = backends.available("triton", "cpu")
    if not ok:
        pytest.skip(f"triton unavailable on cpu: {why}")
    _device_parity(((2, 8, 5, 5), (8, 4, 3, 3), 2, 1, 1, 2), dtype, "cpu")


# ----------------------------------------------------------------------------- backward wiring
@pytest.mark.parametrize("force_aten", [False, True])
def test_triton_family_backward_uses_the_triton_kernels(monkeypatch, force_aten):
    """With kernels/_conv_bwd.py present the triton family's backward runs its dgrad/wgrad
    launchers (FASTRES_CONV_BWD=aten: aten's convolution_backward instead); gradients
    match the fp64 reference either way."""
    monkeypatch.delenv("FASTRES_CONV_BWD", raising=False)
    kb = conv_ops._conv_bwd_kernels()
    if kb is None:
        pytest.skip("kernels/_conv_bwd.py (the Triton dgrad/wgrad kernels) is not in this tree")
    calls = []
    for name in ("conv2d_act_dgrad", "conv2d_act_wgrad"):
        orig = getattr(kb, name)
        monkeypatch.setattr(kb, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    if force_aten:
        monkeypatch.setenv("FASTRES_CONV_BWD", "aten")
    case = _make("3x3s2", torch.float64)
    with conv_family("triton"):
        got = _grads(case, lambda: _loss(*_split(_run(case, True, True, True))))
    ref = _grads(case, lambda: _loss(*_split_ref(_run(case, True, True, None, hi=torch.float64))))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")
    assert sorted(calls) == ([] if force_aten else ["conv2d_act_dgrad", "conv2d_act_wgrad"])


@pytest.mark.parametrize("cfg", [(16, 16, 16, 4), (32, 16, 16, 8), (64, 32, 32, 3)],
                         ids=["16x16x16-g4", "32x16x16-g8", "64x32x32-g3"])
def test_tilings_and_program_order_interpreter(monkeypatch, cfg):
    """Other tilings than the interpreter's default, with the GROUP_M band ordering of the
    GPU configurations (several row and column tiles, ragged edges, two groups): fp64
    output and statistics."""
    with conv_family("triton"):
        from fastres.kernels import _conv
        monkeypatch.setattr(_conv, "INTERPRETER_CONFIG", _conv.Config(*cfg, 1, 1))
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 12, 9, 9, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        w = torch.randn(40, 6, 3, 3, generator=g, dtype=torch.float64)
        s, t = torch.rand(12, generator=g, dtype=torch.float64) + 0.5, torch.randn(12, generator=g, dtype=torch.float64)
        y, mean, var = conv2d_act(x, w, None, 1, 1, 1, 2, in_scale=s, in_shift=t, in_relu=True, stats="moments")
    y_ref = _reference(x, w, None, s, t, True, None, False, 1, 1, 1, 2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, y_ref.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, y_ref.var(dim=(0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["torch", "triton"])
def test_autocast_computes_in_autocast_dtype(family):
    """Under torch.autocast(bfloat16) fp32 inputs/weights are cast as F.conv2d's autocast
    does: a bf16 result, within 2x of aten's own autocast error against fp32."""
    case = _make("3x3s1", torch.float32)
    hi = _run(case, True, True, None, hi=torch.float32).detach()
    with conv_family(family), torch.autocast("cpu", dtype=torch.bfloat16):
        y = _run(case, True, True, False)
        y_low = _reference(case["x"], case["w"], case["b"], case["s"], case["t"], True, case["r"], True, 1, 1, 1,
                           1)  # F.conv2d autocasts; the rest follows its bf16 output
    assert y.dtype == torch.bfloat16
    assert_close_dtype(y, None, torch.bfloat16, "y", ref_low=y_low, ref_hi=hi)


def _gpu_prologue_case(seed, n, c, hw, k):
    """bf16 NHWC x [n, c, hw, hw], a 3x3 weight [k, c], fp32 in_scale / in_shift, on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(k, c, 3, 3, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05
    return x, w, torch.rand(c, generator=g, device="cuda") + 0.5, torch.randn(c, generator=g, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton conv compiled for it)")
def test_gpu_autotuned_tiling(monkeypatch):
    """The autotuner on CUDA: the chosen tiling is one of the candidates and gives the
    same result as the default tiling. (Tuning switched on here: run_gpu.sh's tests
    steps switch it off for every other test.)"""
    from fastres.kernels import _conv
    monkeypatch.setenv("FASTRES_CONV_AUTOTUNE", "1")
    monkeypatch.delenv("FASTRES_CONV_CONFIG", raising=False)
    x, w, s, t = _gpu_prologue_case(0, 16, 64, 28, 128)
    _conv._tuned.clear()
    with fastres.use_conv("fused"):
        y, m, v = conv2d_act(x, w, None, 1, 1, in_scale=s, in_shift=t, in_relu=True, stats="moments")
        (cfg,) = _conv._tuned.values()
        assert cfg in _conv._candidates(torch.bfloat16, 64, 128, 16 * 28 * 28)
        monkeypatch.setenv("FASTRES_CONV_AUTOTUNE", "0")
        try:
            _conv._tuned.clear()
            y0, m0, v0 = conv2d_act(x, w, None, 1, 1, in_scale=s, in_shift=t, in_relu=True, stats="moments")
        finally:
            _conv._tuned.clear()
    torch.testing.assert_close(y.float(), y0.float(), rtol=2e-2, atol=2e-2)  # summation order only
    torch.testing.assert_close(m, m0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(v, v0, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton conv compiled for it)")
def test_gpu_deterministic_mode_runs_the_default_tilings(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the Triton conv's tuners time
    nothing (the tile fixes the fp32 summation order: timing noise would choose it
    differently in another process): forward and backward run the default tilings --
    bit for bit what FASTRES_CONV_AUTOTUNE=0 FASTRES_CONV_BWD_AUTOTUNE=0 give -- and
    remember no tuned shape; two runs are bitwise equal."""
    from fastres.kernels import _conv, _conv_bwd
    monkeypatch.setenv("FASTRES_CONV_AUTOTUNE", "1")
    monkeypatch.setenv("FASTRES_CONV_BWD_AUTOTUNE", "1")
    monkeypatch.setenv("FASTRES_CONV_BWD", "triton")
    monkeypatch.delenv("FASTRES_CONV_CONFIG", raising=False)
    x0, w0, s0, t0 = _gpu_prologue_case(1, 8, 48, 20, 80)

    def run():
        x, w, s, t = (v.detach().clone().requires_grad_() for v in (x0, w0, s0, t0))
        with fastres.use_conv("fused"):
            y, m, v = conv2d_act(x, w, None, 1, 1, in_scale=s, in_shift=t, in_relu=True, stats="moments")
        (y.float().square().sum() + m.sum() + v.sum()).backward()
        return [y, m, v, x.grad, w.grad, s.grad, t.grad]

    _conv._tuned.clear()
    bwd_keys = set(_conv_bwd._TUNED_KEYS)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(was)
    assert not _conv._tuned and _conv_bwd._TUNED_KEYS == bwd_keys, "a tuner ran in deterministic mode"
    monkeypatch.setenv("FASTRES_CONV_AUTOTUNE", "0")
    monkeypatch.setenv("FASTRES_CONV_BWD_AUTOTUNE", "0")
    untuned = run()
    _conv._tuned.clear()
    for name, a, b, c in zip(["y", "mean", "var", "grad_x", "grad_w", "grad_scale", "grad_shift"],
                             first, second, untuned):
        assert torch.equal(a, b), f"{name}: two deterministic runs differ"
        assert torch.equal(a, c), f"{name}: deterministic mode is not the default tiling"


_STRIDED_1X1 = r"""
import sys, torch
import fastres
import fastres.functional as FF
torch.set_num_threads(1)
how = sys.argv[1]
g = torch.Generator().manual_seed(0)
worst = 0.0
# 3-15 input channels take the subsampled route; 16 and 17 oneDNN's own strided kernel
for cin, h, wd in ((4, 6, 6), (3, 7, 6), (8, 8, 8), (15, 6, 6), (16, 6, 6), (17, 7, 6)):
    for it in range(40):
        x = torch.randn(2, cin, h, wd, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(6, cin, 1, 1, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
        dy = torch.randn(2, 6, (h + 1) // 2, (wd + 1) // 2, generator=g)
        if how == "block":  # a fastres BasicBlock with a projection shortcut vs torchvision's in fp64 NCHW
            import copy
            import torchvision.models.resnet as tvr
            torch.manual_seed(it)
            ds = torch.nn.Sequential(torch.nn.Conv2d(cin, 6, 1, 2, bias=False), torch.nn.BatchNorm2d(6))
            ours = fastres.BasicBlock(cin, 6, 2, copy.deepcopy(ds)).to(memory_format=torch.channels_last)
            ref = tvr.BasicBlock(cin, 6, 2, ds).double()
            ours.load_state_dict(ref.state_dict())
            xr = x.detach().double().contiguous().requires_grad_()
            ref(xr).backward(dy.double())
            ours(x).backward(dy)
            for name, p in ours.named_parameters():
                rp = dict(ref.named_parameters())[name]
                worst = max(worst, ((p.grad.double() - rp.grad).abs().max() / rp.grad.abs().max()).item())
            worst = max(worst, ((x.grad.double() - xr.grad).abs().max() / xr.grad.abs().max()).item())
            continue
        if how == "plain":  # fastres's aten path (aten convolution + epilogue)
            y = FF.conv2d_act(x, w, None, 2)
        elif how == "prologue":  # the composite custom op (explicit backward)
            y = FF.conv2d_act(x, w, None, 2, in_scale=torch.ones(cin), in_shift=torch.zeros(cin))
        else:  # statistics: the composite custom op too
            y, _, _ = FF.conv2d_act(x, w, None, 2, stats=True)
        y.backward(dy)
        xs = x.detach().double()[:, :, ::2, ::2]
        rw = torch.einsum("nkhw,nchw->kc", dy.double(), xs)
        rx = torch.zeros_like(x, dtype=torch.float64)
        rx[:, :, ::2, ::2] = torch.einsum("nkhw,kc->nchw", dy.double(), w.detach().double()[:, :, 0, 0])
        worst = max(worst, ((w.grad.double()[:, :, 0, 0] - rw).abs().max() / rw.abs().max()).item(),
                    ((x.grad.double() - rx).abs().max() / rx.abs().max()).item())
print("max relative error", worst)
assert worst < 1e-5, worst
"""


@pytest.mark.parametrize("how", ["plain", "prologue", "stats", "block"])
def test_strided_1x1_weight_grad_single_thread(how):
    """The gradients of a strided 1x1 conv in channels_last with fewer input channels than
    oneDNN's channel block, on one thread: oneDNN's own weight gradient for it (the "rtus"
    path) writes past its workspace -- `free(): invalid size` and a dead process a few
    calls later, or wrong weights with more threads (oneDNN #6035). fastres takes it as
    the stride-1 conv of the subsampled input (fastres._reference.conv2d and
    conv_ops._convolution_backward), and so do its blocks (``block``: a BasicBlock with a
    projection shortcut against torchvision's in fp64 NCHW, where torchvision's own
    channels_last fp32 block dies). In a child process: the bug kills the process."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _STRIDED_1X1, how], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "max relative error" in r.stdout


def _graph_ops(t):
    """The names of every autograd node behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("cin,groups,subsampled", [(15, 1, True), (16, 1, False), (256, 1, False),
                                                   (32, 4, True), (64, 4, False)])
def test_strided_1x1_route_only_below_onednn_channel_block(cin, groups, subsampled):
    """The subsampled route of ``_reference.strided_1x1_cpu`` (oneDNN #6035) is taken only
    below 16 input channels per group: above, oneDNN's strided kernel is correct (the
    single-thread test above runs 16 and 17) and the route would cost every ResNet
    projection shortcut a zero-filled, scattered full-size input gradient per step.
    Both routes give F.conv2d's gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, 6, 5, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, cin // groups, 1, 1, generator=g, dtype=torch.float64).requires_grad_()
    y = conv2d_act(x, w, None, 2, groups=groups)
    assert ("SliceBackward0" in _graph_ops(y)) is subsampled
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    ref = F.conv2d(x, w, None, 2, groups=groups)
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)
