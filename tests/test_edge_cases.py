"""Edge shapes, layouts and values (issue #5), on every backend (the CPU ones, and under
the ``gpu`` marker ``cuda`` and ``triton`` on a CUDA device), against
nn.BatchNorm2d + add + ReLU (outputs, grads of input / residual / weight / bias,
running statistics, num_batches_tracked):

* non-contiguous views: sliced ``x[:, :, ::2, 1:]``, permuted, expanded (stride 0),
  expanded-then-materialised, a channels_last tensor sliced in C, a channels_last
  tensor whose size-1 W has a non-canonical stride, a residual that is the input;
* channels_last with C = 3 and 65, 1x1 spatial, batch 1 in eval, C = 4096;
* huge magnitudes (1e4 in bf16/fp16), near-constant and exactly constant channels
  (variance ~ 0: a naive E[x^2] - E[x]^2 cancels to garbage or NaN), eps = 0;
* NaN and +-Inf in the input and the residual (propagate as in PyTorch, running stats
  included), momentum 0 and 1, empty batches (N = 0, H = 0);
* CUDA only (``gpu``; skipped with the reason "no CUDA device" on a CPU machine):
  device-mismatch messages, a non-default CUDA device (device guard).

Validation messages on the CPU are in tests/test_validation.py; the >2^31-element
tensor is in tests/test_large_tensor.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastres.functional import affine_act, batch_norm_act
from fastres.nn import BatchNormAct2d

from conftest import GPU_BACKENDS, HAS_CUDA, gpu_param, run_on, targets
from parity import Case, _degenerate_slack, assert_parity, check_module_case, make_pair, ref_forward

TARGETS = targets()  # (backend, device): the CPU backends; cuda and triton on CUDA (gpu)
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DT_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}


# ----------------------------------------------------------------------------- layouts
VIEW_LAYOUTS = ["sliced", "permuted", "expanded", "expanded_clone", "channels_last_sliced_c"]
# the residual in another layout than the input, the incoming gradient in a third
OTHER = {"sliced": "channels_last", "permuted": "sliced", "expanded": "permuted",
         "expanded_clone": "channels_last_sliced_c", "channels_last_sliced_c": "expanded"}


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [F64, BF16], ids=DT_IDS.get)
@pytest.mark.parametrize("layout", VIEW_LAYOUTS)
def test_noncontiguous_views(backend, device, dtype, layout):
    check_module_case(backend, Case((3, 5, 6, 7), dtype, layout=layout, res_layout=OTHER[layout],
                                    grad_layout="permuted", momentum=0.1, train_steps=2, eval_step=True,
                                    scale=1.5, offset=0.5), device=device)


def test_view_layouts_are_what_they_claim():
    """The layouts above really are neither contiguous nor channels_last (or overlapping)."""
    from parity import view_spec
    for layout in VIEW_LAYOUTS:
        shape, fn = view_spec((3, 5, 6, 7), layout)
        x = fn(torch.randn(shape))
        assert x.shape == (3, 5, 6, 7)
        if layout == "expanded_clone":
            assert x.is_contiguous()
        else:
            assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last), layout


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_ambiguous_channels_last_strides(backend, device, activation):
    """t = base.permute(0, 2, 1, 3) with W == 1 is channels_last-contiguous, but the
    stride of its size-1 W is 1 instead of C. PyTorch 2.14.1's own CPU batch_norm
    backward returns a wrong grad_input when the input or grad_output is such a tensor
    (training and eval); the reference here gets contiguous copies, so a backend that
    hands such tensors to F.batch_norm as they are fails this test."""
    for train_steps, eval_step in ((1, False), (0, True)):
        for layout, grad_layout in (("permuted", "contiguous"), ("contiguous", "permuted")):
            check_module_case(backend, Case((2, 3, 4, 1), F64, layout=layout, grad_layout=grad_layout,
                                            activation=activation, train_steps=train_steps, eval_step=eval_step),
                              device=device)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_is_the_input(backend, device, training):
    """residual aliasing the input (``bn(x, x)``) is legal: kernels only read it."""
    ref, ours = make_pair(Case((2, 4, 5, 5)), torch.Generator().manual_seed(1), device)
    ref.train(training), ours.train(training)
    x0 = torch.randn(2, 4, 5, 5, dtype=F64).to(device)
    g = torch.randn(2, 4, 5, 5, dtype=F64).to(device)
    xr = x0.clone().requires_grad_()
    y_ref = ref_forward(ref, xr, xr, "relu")
    y_ref.backward(g)
    xo = x0.clone().requires_grad_()
    with run_on(backend, device):
        y = ours(xo, xo)
        y.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_IDS.get)
@pytest.mark.parametrize("c", [3, 65])
@pytest.mark.parametrize("res_layout", ["channels_last", "contiguous"])
def test_channels_last_odd_channels(backend, device, dtype, c, res_layout):
    """channels_last with C not a multiple of 8 (apex#1768: wrong stats for C=65 at larger
    H*W); the output stays channels_last (checked inside check_module_case)."""
    check_module_case(backend, Case((3, c, 15, 17), dtype, layout="channels_last", res_layout=res_layout,
                                    grad_layout="channels_last", momentum=0.1, train_steps=2, eval_step=True),
                      device=device)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_one_by_one_spatial(backend, device, layout):
    check_module_case(backend, Case((6, 8, 1, 1), F64, layout=layout, res_layout=layout, momentum=None), device=device)
    check_module_case(backend, Case((6, 8, 1, 1), F32, layout=layout, res_layout=layout, momentum=0.1), device=device)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (1, 8, 5, 5), (1, 1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_batch_one_in_eval(backend, device, shape):
    check_module_case(backend, Case(shape, F64, res_layout="contiguous", train_steps=0, eval_step=True), device=device)
    check_module_case(backend, Case(shape, BF16, layout="channels_last", train_steps=0, eval_step=True), device=device)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_batch_one_in_training(backend, device):
    """N=1 with H*W>1 trains; N*H*W==1 in training raises PyTorch's ValueError, also
    through the functional API and in eval with track_running_stats=False (batch stats)."""
    check_module_case(backend, Case((1, 4, 2, 3), F64, res_layout="contiguous", train_steps=2, eval_step=True),
                      device=device)
    check_module_case(backend, Case((1, 4, 1, 1), F64, train_steps=1, eval_step=True, track=False), device=device)
    x = torch.randn(1, 3, 1, 1, device=device)
    with pytest.raises(ValueError) as e_ref:
        torch.nn.functional.batch_norm(x, None, None, training=True)
    with run_on(backend, device), pytest.raises(ValueError) as e_ours:
        batch_norm_act(x, None, None, training=True)
    assert str(e_ours.value) == str(e_ref.value)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_very_many_channels(backend, device, dtype, layout):
    if backend == "triton" and layout == "contiguous" and device == "cpu":
        pytest.skip("Triton interpreter: NCHW runs one program per channel, 4096 of them take minutes on "
                    "a CPU; channels_last C=4096 runs here, NCHW C=4096 on the GPU (gpu-triton)")
    check_module_case(backend, Case((2, 4096, 2, 3), dtype, layout=layout, res_layout=layout,
                                    grad_layout=layout, train_steps=1, eval_step=True), device=device)


# ----------------------------------------------------------------------------- extreme values
@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=DT_IDS.get)
@pytest.mark.parametrize("scale,offset", [(64.0, 1e4), (1e4, 0.0)], ids=["1e4+-64", "1e4-spread"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_huge_magnitude_low_precision(backend, device, dtype, scale, offset, layout):
    """Activations around 1e4 in bf16/fp16: E[x^2] ~ 1e8 (fp16 would overflow without
    fp32 accumulation; a naive E[x^2] - E[x]^2 in fp32 loses the variance of the
    1e4 +- 64 case). The result must be PyTorch's (low-precision rule), finite."""
    if dtype == F16 and offset == 0.0:
        scale = 1e4 / 4  # keep |x| < 65504
    check_module_case(backend, Case((4, 6, 16, 16), dtype, layout=layout, res_layout="contiguous",
                                    momentum=1.0, train_steps=2, eval_step=True, scale=scale, offset=offset),
                      device=device)


def _special_channels(dtype, n=4, h=8, w=8, spread=1e-4, seed=0):
    """Channel 0: exactly 3.0; 1: exactly 0.1 (not representable: its sum is not exact);
    2: 5 + spread * noise (variance ~ spread^2, far below eps); 3: ordinary data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, h, w, dtype=F64, generator=g)
    x[:, 0] = 3.0
    x[:, 1] = 0.1
    x[:, 2] = 5.0 + spread * x[:, 2]
    return x.to(dtype)


def _truth_and_torch(x, eps, residual, w, b, rm, rv, training, momentum):
    """(fp64 truth from the same values, on the CPU; PyTorch in x's dtype on x's device):
    output, running stats -- all returned on the CPU."""
    outs = []
    for dt, dev in ((F64, "cpu"), (x.dtype, x.device)):
        pdt = F64 if dt == F64 else (F64 if x.dtype == F64 else F32)
        bn = nn.BatchNorm2d(x.shape[1], eps=eps, momentum=momentum).to(device=dev, dtype=pdt)
        with torch.no_grad():
            bn.weight.copy_(w), bn.bias.copy_(b), bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
        bn.train(training)
        y = ref_forward(bn, x.to(device=dev, dtype=dt),
                        residual.to(device=dev, dtype=dt) if residual is not None else None, "relu")
        outs.append((y.detach().cpu(), bn.running_mean.cpu(), bn.running_var.cpu()))
    return outs


def _cond_check(name, ours, theirs, truth, floor):
    """ours must be as close to the fp64 truth as PyTorch (x2) plus a conditioning floor."""
    ours = ours.detach().cpu()
    e_ours = (ours.double() - truth).abs().max().item()
    e_theirs = (theirs.double() - truth).abs().max().item()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values {ours}"
    assert e_ours <= 2 * e_theirs + floor, f"{name}: error {e_ours:.3g} > 2 x PyTorch's {e_theirs:.3g} + {floor:.3g}"


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_constant_and_near_constant_channels(backend, device, dtype, layout):
    """Variance ~ 0 or exactly 0 gives PyTorch's result, not NaN or garbage from
    cancellation (a numerically stable variance: Welford or shifted sums).

    The tolerance is data-aware: an fp32 accumulator may be off by a few ulps of |x|
    in the mean, which the normalisation multiplies by w/sqrt(var+eps) (~316 here);
    the naive formula is off by ~|x|^2 * ulp * M in the variance, orders of magnitude more."""
    spread = {F64: 1e-4, F32: 1e-4, BF16: 0.05, F16: 5e-3}[dtype]
    x = _special_channels(dtype, spread=spread)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(1)).to(dtype)
    c = x.shape[1]
    pdt = F64 if dtype == F64 else F32
    w, b = torch.linspace(0.5, 1.5, c, dtype=pdt), torch.linspace(-0.5, 0.5, c, dtype=pdt)
    rm, rv = torch.zeros(c, dtype=pdt), torch.ones(c, dtype=pdt)
    eps = 1e-5
    acc_eps = torch.finfo(F64 if dtype == F64 else F32).eps
    out_eps = torch.finfo(dtype).eps
    for training in (True, False):
        rm_o, rv_o = rm.clone().to(device), rv.clone().to(device)
        (y_t, rm_t, rv_t), (y_p, rm_p, rv_p) = _truth_and_torch(x.to(device), eps, r, w, b, rm, rv, training, 1.0)
        with run_on(backend, device):
            y = batch_norm_act(x.to(device), rm_o, rv_o, w.to(device), b.to(device), training, 1.0, eps,
                               residual=r.to(device))
        assert y.device == rm_o.device
        y, rm_o, rv_o = y.cpu(), rm_o.cpu(), rv_o.cpu()
        tag = f"[{backend} on {device}: {DT_IDS[dtype]} {layout} {'train' if training else 'eval'}]"
        assert y.dtype == dtype
        xmax = x.double().abs().max().item()
        # bound on |w| / sqrt(var + eps): var >= 0 in training, the running var in eval
        invstd = w.abs().max().item() / (eps if training else rv.min().item() + eps) ** 0.5
        floor = 8 * acc_eps * xmax * invstd + out_eps * max(1.0, y_t.abs().max().item())
        _cond_check(f"{tag} output", y, y_p, y_t, floor)
        if training:
            # exactly constant channels: variance exactly 0 and output relu(b + r)
            exact = torch.relu(b.view(1, -1, 1, 1).double() + r.double())[:, :2]
            _cond_check(f"{tag} constant channels", y[:, :2], y_p[:, :2], exact.to(dtype).double(),
                        8 * acc_eps * 3.0 * invstd + out_eps * max(1.0, exact.abs().max().item()))
            _cond_check(f"{tag} running_mean", rm_o, rm_p, rm_t, 8 * acc_eps * xmax)
            var_floor = 1e-2 * rv_t.abs() + (8 * acc_eps * xmax) ** 2
            e = (rv_o.double() - rv_t).abs()
            assert torch.isfinite(rv_o).all() and (rv_o >= 0).all(), f"{tag} running_var {rv_o}"
            assert (e <= 2 * (rv_p.double() - rv_t).abs() + var_floor).all(), \
                f"{tag} running_var {rv_o.tolist()} vs truth {rv_t.tolist()} (PyTorch {rv_p.tolist()})"
            assert rv_o[:2].abs().max().item() <= (8 * acc_eps * 3.0) ** 2, f"{tag} constant channels: var {rv_o[:2]}"


def _slack_setup(eps, near_constant):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 2, 8, 8, dtype=F64, generator=g)
    if near_constant:
        x[:, 0] = 5.0 + 1e-4 * x[:, 0]
    x = x.float()
    gy = torch.randn(4, 2, 8, 8, generator=g)
    bn = nn.BatchNorm2d(2, eps=eps)
    y = torch.relu(bn(x)).detach()
    case = Case(tuple(x.shape), F32, eps=eps)
    dz = (gy.double() * (y > 0)).transpose(0, 1).reshape(2, -1)
    xc = x.double().transpose(0, 1).reshape(2, -1)
    xhat = (xc - xc.mean(1, keepdim=True)) / (xc.var(1, unbiased=False, keepdim=True) + eps).sqrt()
    return _degenerate_slack(bn, x, gy, y, case), (dz * xhat).sum(1).abs()


def test_degenerate_slack_is_per_channel():
    """tests/parity.py's rounding slack for near-constant channels (issue 9): it widens the
    tolerance of that channel only, and for ordinary data (also with a large eps) it stays
    at the plain fp32 tolerance -- a worst-channel scalar widened every channel's
    grad_weight tolerance ~1000x."""
    sl, gw = _slack_setup(1e-5, near_constant=True)
    plain = 1e-5 + 1e-5 * gw  # TOL[float32] (atol + rtol * |grad_weight|)
    for k in ("output", "x", "weight"):
        assert sl[k].shape == (2,), k
    for k in ("output", "x"):
        assert sl[k][0] > 100 * sl[k][1], f"{k}: near-constant channel {sl[k][0]:.3g}, ordinary {sl[k][1]:.3g}"
    assert sl["weight"][0] > 100 * plain[0] and sl["weight"][1] <= 4 * plain[1], (sl["weight"], plain)
    # an error of 20x the plain tolerance in the ordinary channel's grad_weight is caught,
    # the same error in the near-constant channel is within its rounding slack
    ref_gw = torch.tensor([1.0, 1.0])
    with pytest.raises(AssertionError, match="differ beyond"):
        assert_parity(ref_gw + torch.tensor([0.0, 20 * plain[1].item()]).float(), ref_gw, F32, "gw",
                      extra_atol=sl["weight"])
    assert_parity(ref_gw + torch.tensor([20 * plain[1].item(), 0.0]).float(), ref_gw, F32, "gw",
                  extra_atol=sl["weight"])
    for eps in (0.01, 0.1, 1.0):  # ordinary data, large eps: no widening
        sl, gw = _slack_setup(eps, near_constant=False)
        assert (sl["weight"] <= 4 * (1e-5 + 1e-5 * gw)).all(), (eps, sl["weight"], gw)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_IDS.get)
def test_large_offset_cancellation(backend, device, dtype):
    """x = 1000 + 0.01 * noise (fp32) / 300 + 2 * noise (bf16): mean^2 / var ~ 1e10 / 2e4.
    E[x^2] - E[x]^2 in fp32 is pure rounding noise here; a stable variance is not."""
    scale, offset = (0.01, 1000.0) if dtype == F32 else (2.0, 300.0)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 3, 16, 16, dtype=F64, generator=g) * scale + offset).to(dtype)
    c = 3
    w, b = torch.ones(c), torch.zeros(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    (y_t, rm_t, rv_t), (y_p, rm_p, rv_p) = _truth_and_torch(x.to(device), 1e-5, None, w, b, rm, rv, True, 1.0)
    rm_o, rv_o = rm.clone().to(device), rv.clone().to(device)
    with run_on(backend, device):
        y = batch_norm_act(x.to(device), rm_o, rv_o, w.to(device), b.to(device), True, 1.0, 1e-5)
    y, rm_o, rv_o = y.cpu(), rm_o.cpu(), rv_o.cpu()
    acc_eps = torch.finfo(F32).eps
    xmax = x.double().abs().max().item()
    invstd = 1 / (rv_t.min().item() + 1e-5) ** 0.5
    _cond_check(f"[{backend}] output", y, y_p, y_t,
                8 * acc_eps * xmax * invstd + torch.finfo(dtype).eps * max(1.0, y_t.abs().max().item()))
    rel = ((rv_o.double() - rv_t).abs() / rv_t).max().item()
    assert rel < 1e-2, f"[{backend}] running_var {rv_o.tolist()} vs truth {rv_t.tolist()} (rel {rel:.2g})"


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eps_zero(backend, device, dtype, layout):
    check_module_case(backend, Case((3, 5, 4, 6), dtype, layout=layout, res_layout="contiguous", eps=0.0,
                                    train_steps=2, eval_step=True), device=device)


def _nonfinite_data(dtype, where):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 5, 6, dtype=F64, generator=g)
    r = torch.randn(3, 4, 5, 6, dtype=F64, generator=g)
    if where in ("input_nan", "all"):
        x[0, 1, 2, 3] = float("nan")
    if where in ("input_inf", "all"):
        # PyTorch: mean = sum / M = +-Inf (so running_mean = +-Inf), var = NaN
        x[1, 2, 0, 0] = float("inf")
        x[2, 3, 4, 5] = -float("inf")
    if where in ("residual", "all"):
        r[0, 0, 1, 1] = float("nan")
        r[1, 0, 2, 2] = float("inf")
        r[2, 0, 3, 3] = -float("inf")
        r[0, 3, 0, 1] = float("nan")
    return x.to(dtype), r.to(dtype)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=DT_IDS.get)
@pytest.mark.parametrize("where", ["input_nan", "input_inf", "residual", "all"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_nan_inf_propagate_like_reference(backend, device, dtype, where, activation):
    """NaN / +-Inf in the input (training: the channel's statistics and every output of
    the channel become NaN; eval: only that element) and in the residual: output, grads
    and running stats have NaN / +Inf / -Inf exactly where PyTorch has them, the finite
    values match. Note relu(NaN) = NaN (a kernel using fmax(z, 0) gives 0), and an Inf
    in a channel makes PyTorch's running_mean +-Inf, not NaN (a plain Welford update
    gives NaN: inf + (x - inf) / n).

    The reference runs on the CPU on every device: these are the semantics fastres
    promises (README, "exactly as in PyTorch" on the CPU); PyTorch's own CUDA BatchNorm
    (Welford) gives a NaN running_mean where its CPU one gives +-Inf."""
    x, r = _nonfinite_data(dtype, where)
    for train_steps, eval_step in ((1, False), (0, True)):
        check_module_case(backend, Case(x.shape, dtype, res_layout="contiguous", activation=activation,
                                        train_steps=train_steps, eval_step=eval_step),
                          device=device, equal_nan=True, xbase=x.to(device), rbase=r.to(device), ref_device="cpu")


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_zero_and_one(backend, device, momentum):
    check_module_case(backend, Case((3, 5, 4, 6), F64, res_layout="contiguous", momentum=momentum), device=device)
    check_module_case(backend, Case((3, 5, 4, 6), BF16, layout="channels_last", momentum=momentum), device=device)
    bn = BatchNormAct2d(5, momentum=momentum, activation="none").double().to(device)
    rm0 = torch.randn(5, dtype=F64)
    with torch.no_grad():
        bn.running_mean.copy_(rm0)
    x = torch.randn(3, 5, 4, 6, dtype=F64)
    with run_on(backend, device):
        bn(x.to(device))
    rm, rv = bn.running_mean.cpu(), bn.running_var.cpu()
    if momentum == 0.0:
        assert torch.equal(rm, rm0) and torch.equal(rv, torch.ones(5, dtype=F64))
    else:
        torch.testing.assert_close(rm, x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, x.transpose(0, 1).reshape(5, -1).var(dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (0, 3, 1, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_like_pytorch(backend, device, shape, layout):
    """Empty inputs behave as in PyTorch: right shape, running stats untouched,
    num_batches_tracked counted, backward gives empty / zero grads."""
    check_module_case(backend, Case(shape, F32, layout=layout, res_layout=layout, train_steps=2, eval_step=True),
                      device=device)
    x = torch.empty(shape, device=device).contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                                     else torch.contiguous_format)
    with run_on(backend, device):
        y = affine_act(x, torch.ones(3, device=device), torch.zeros(3, device=device), torch.empty(shape, device=device))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device


# ----------------------------------------------------------------------------- CUDA only
CUDA_BACKENDS = [gpu_param(b, id=f"gpu-{b}") for b in GPU_BACKENDS]
needs_2gpus = pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices (the non-default-device guard)")

DEVICE_BAD = [
    # (which tensor is on the CPU while the input is on cuda, regex)
    ("weight", r"weight is on cpu but input is on cuda:0; expected both on the same device"),
    ("bias", r"bias is on cpu but input is on cuda:0"),
    ("running_mean", r"running_mean is on cpu but input is on cuda:0"),
    ("running_var", r"running_var is on cpu but input is on cuda:0"),
    ("residual", r"residual is on cpu but input is on cuda:0"),
]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("which,msg", DEVICE_BAD, ids=[d[0] for d in DEVICE_BAD])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_device_mismatch_message(backend, which, msg, training):
    """A CPU tensor next to a CUDA input: a ValueError naming the tensor and both devices
    (not Triton's "Pointer argument cannot be accessed from Triton (cpu tensor?)")."""
    kw = dict(running_mean=torch.zeros(3, device="cuda"), running_var=torch.ones(3, device="cuda"),
              weight=torch.ones(3, device="cuda"), bias=torch.zeros(3, device="cuda"),
              residual=torch.randn(2, 3, 4, 4, device="cuda"))
    kw[which] = kw[which].cpu()
    x = torch.randn(2, 3, 4, 4, device="cuda")
    with run_on(backend, "cuda"), pytest.raises(ValueError, match=msg):
        batch_norm_act(x, kw.pop("running_mean"), kw.pop("running_var"), training=training, **kw)
    # and the other way round: a CPU input with CUDA parameters
    with run_on(backend, "cuda"), pytest.raises(ValueError, match=r"weight is on cuda:0 but input is on cpu"):
        batch_norm_act(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), torch.ones(3, device="cuda"),
                       training=training)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_affine_act_device_mismatch(backend):
    x = torch.randn(2, 3, 4, 4, device="cuda")
    with run_on(backend, "cuda"):
        with pytest.raises(ValueError, match=r"scale is on cpu but input is on cuda:0"):
            affine_act(x, torch.ones(3))
        with pytest.raises(ValueError, match=r"residual is on cpu but input is on cuda:0"):
            affine_act(x, None, None, torch.randn(2, 3, 4, 4))


@needs_2gpus
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_IDS.get)
def test_non_default_cuda_device(backend, dtype):
    """Tensors on cuda:1 while cuda:0 is current: the kernels must launch on the tensors'
    device (device guard) and leave the current device alone."""
    torch.cuda.set_device(0)
    check_module_case(backend, Case((4, 65, 9, 11), dtype, layout="channels_last", res_layout="contiguous"),
                      device="cuda:1")
    assert torch.cuda.current_device() == 0, "the op changed the current device"
    torch.cuda.synchronize(1)
