"""End-to-end parity of the fused BN(+add)+ReLU against nn.BatchNorm2d + add + ReLU,
for every backend available on the machine: outputs, every gradient, running_mean,
running_var (unbiased), num_batches_tracked, momentum 0.1 and None, affine off,
track_running_stats off, eval; C ∈ {1, 3, 8, 65}, N ∈ {2, 5}, H×W ∈ {1×1, 7×7, 13×17};
contiguous, channels_last and non-contiguous inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastres
from fastres.nn import BatchNormAct2d

from conftest import backend_params, run_on
from parity import LOW, assert_close_dtype, make_input

BACKENDS = backend_params("cpu")

# (shape, layout, residual, activation, momentum, affine, track_running_stats)
CASES = [
    ((2, 3, 7, 7), "contiguous", True, "relu", 0.1, True, True),
    ((5, 65, 7, 7), "channels_last", False, "relu", None, True, True),
    ((2, 8, 13, 17), "noncontig", True, "none", 0.1, True, True),
    ((5, 1, 13, 17), "contiguous", True, "relu", 0.3, True, True),
    ((2, 8, 1, 1), "channels_last", True, "relu", 0.1, True, True),
    ((5, 3, 1, 1), "contiguous", False, "relu", None, False, True),
    ((2, 65, 13, 17), "channels_last", True, "relu", 0.1, True, False),
    ((5, 8, 7, 7), "noncontig", False, "none", 0.1, False, False),
]
CASE_IDS = ["-".join([("x".join(map(str, c[0]))), c[1], "res" if c[2] else "nores", c[3],
                      f"m{c[4]}", "aff" if c[5] else "noaff", "trs" if c[6] else "notrs"]) for c in CASES]


def _ref_forward(bn, x, residual, activation):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def _randomize(bn: nn.BatchNorm2d, gen_dtype=torch.float64):
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, dtype=gen_dtype) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, dtype=gen_dtype))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(bn.num_features, dtype=gen_dtype) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, dtype=gen_dtype) + 0.5)
            bn.num_batches_tracked.fill_(3)


def _pair(c, momentum, affine, track, dtype):
    ref = nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    _randomize(ref)
    ours = BatchNormAct2d(c, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _step(mod, x, residual, activation, grad_out, fused):
    x = x.detach().clone().requires_grad_(True)
    r = residual.detach().clone().requires_grad_(True) if residual is not None else None
    for p in mod.parameters():
        p.grad = None
    y = mod(x, r) if fused else _ref_forward(mod, x, r, activation)
    y.backward(grad_out)
    grads = {"x": x.grad}
    if r is not None:
        grads["residual"] = r.grad
    for name, p in mod.named_parameters():
        grads[name] = p.grad
    return y.detach(), grads


def _run_case(backend, dtype, case, steps=3):
    shape, layout, has_res, activation, momentum, affine, track = case
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref, ours = _pair(shape[1], momentum, affine, track, param_dtype)
    ours.activation = activation
    with run_on(backend):
        for step in range(steps + 1):
            if step == steps:  # last round: eval
                ref.eval(), ours.eval()
            x = make_input(shape, dtype, layout, scale=1.5, offset=0.5)
            residual = make_input(shape, dtype, layout) if has_res else None
            g = make_input(shape, dtype, "contiguous")
            if dtype in LOW:
                # fp32 truth from the same low-precision values; PyTorch's own low-precision run
                hi = copy.deepcopy(ref).float()
                y_hi, gr_hi = _step(hi, x.float(), residual.float() if has_res else None, activation, g.float(), False)
                y_ref, gr_ref = _step(ref, x, residual, activation, g, False)
            else:
                y_ref, gr_ref = _step(ref, x, residual, activation, g, False)
                y_hi = gr_hi = None
            y, gr = _step(ours, x, residual, activation, g, True)
            assert y.dtype == x.dtype
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                assert y.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
            tag = f"[{backend} {dtype} step {step}]"
            assert_close_dtype(y, y_ref, dtype, f"{tag} output", y_ref, y_hi)
            assert gr.keys() == gr_ref.keys()
            for k in gr:
                assert gr[k] is not None, f"{tag} missing grad {k}"
                assert gr[k].dtype == gr_ref[k].dtype, f"{tag} grad {k} dtype"
                assert_close_dtype(gr[k], gr_ref[k], dtype, f"{tag} grad {k}", gr_ref[k],
                                   gr_hi[k] if gr_hi is not None else None)
            if track:
                for buf in ("running_mean", "running_var"):
                    torch.testing.assert_close(getattr(ours, buf), getattr(ref, buf),
                                               **({"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64
                                                  else {"rtol": 1e-5, "atol": 1e-6}),
                                               msg=lambda m: f"{tag} {buf}: {m}")
                assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
            else:
                assert ours.running_mean is None and ref.running_mean is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float64(backend, case):
    _run_case(backend, torch.float64, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[:4] + CASES[6:7], ids=CASE_IDS[:4] + CASE_IDS[6:7])
def test_parity_float32(backend, case):
    _run_case(backend, torch.float32, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2]], ids=CASE_IDS[:3])
def test_parity_low_precision(backend, dtype, case):
    _run_case(backend, dtype, case, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_var_is_unbiased(backend):
    """running_var must move towards the *unbiased* batch variance (n/(n-1))."""
    x = torch.randn(2, 4, 1, 2, dtype=torch.float64)  # n = 4 per channel: bias factor 4/3
    bn = BatchNormAct2d(4, momentum=1.0, activation="none").double()
    with run_on(backend):
        bn(x)
    unbiased = x.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    torch.testing.assert_close(bn.running_var, unbiased, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cumulative_average_momentum_none(backend):
    """momentum=None: running stats are the plain average over all batches seen."""
    bn = BatchNormAct2d(3, momentum=None, activation="none").double()
    xs = [torch.randn(4, 3, 5, 5, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    with run_on(backend):
        for x in xs:
            bn(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    vars_ = torch.stack([x.transpose(0, 1).reshape(3, -1).var(dim=1) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, vars_, rtol=1e-12, atol=1e-12)
    assert bn.num_batches_tracked.item() == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_functional(backend, training):
    from fastres.functional import batch_norm_act
    x = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def f(x, w, b, r):
        return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, residual=r)

    with run_on(backend):
        assert torch.autograd.gradcheck(f, (x, w, b, r))
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(f, (xc, w, b, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_like_pytorch(backend):
    ref, ours = _pair(3, 0.1, True, True, torch.float32)
    x = torch.randn(0, 3, 4, 4)
    with run_on(backend):
        y = ours(x)
    y_ref = torch.relu(ref(x))
    assert y.shape == y_ref.shape
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_reference(backend):
    ref, ours = _pair(3, 0.1, True, True, torch.float32)
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    with run_on(backend):
        y = ours(x)
    y_ref = torch.relu(ref(x))
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, ref.running_var, equal_nan=True)
