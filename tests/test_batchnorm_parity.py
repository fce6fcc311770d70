"""End-to-end parity of the fused BN(+add)+ReLU against nn.BatchNorm2d + add + ReLU,
for every backend available on the machine, on the CPU and (``gpu`` marker) on a CUDA
device for the ``cuda`` and ``triton`` backends: outputs, every gradient, running_mean,
running_var (unbiased), num_batches_tracked, momentum 0.1 and None, affine off,
track_running_stats off, eval; C in {1, 3, 8, 65}, N in {2, 5}, HxW in {1x1, 7x7, 13x17};
contiguous, channels_last and non-contiguous inputs. The module-level check is
tests/parity.py's check_module_case."""
from __future__ import annotations

import pytest
import torch

from fastres.nn import BatchNormAct2d

from conftest import run_on, targets
from parity import LOW, Case, check_module_case, make_pair

TARGETS = targets()

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


def _run_case(backend, device, dtype, case, steps=3):
    """``steps`` training steps, then one in eval, each with fresh data (x drawn as
    1.5 * randn + 0.5; the residual, when there is one, in the input's layout)."""
    shape, layout, has_res, activation, momentum, affine, track = case
    lay = "permuted" if layout == "noncontig" else layout
    check_module_case(backend, Case(shape, dtype, layout=lay, res_layout=lay if has_res else None,
                                    activation=activation, momentum=momentum, affine=affine, track=track,
                                    train_steps=steps, eval_step=True, scale=1.5, offset=0.5,
                                    low_floor=1e-3 if dtype in LOW else None), device=device)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float64(backend, device, case):
    _run_case(backend, device, torch.float64, case)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", CASES[:4] + CASES[6:7], ids=CASE_IDS[:4] + CASE_IDS[6:7])
def test_parity_float32(backend, device, case):
    _run_case(backend, device, torch.float32, case)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2]], ids=CASE_IDS[:3])
def test_parity_low_precision(backend, device, dtype, case):
    _run_case(backend, device, dtype, case, steps=2)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_running_var_is_unbiased(backend, device):
    """running_var must move towards the *unbiased* batch variance (n/(n-1))."""
    x = torch.randn(2, 4, 1, 2, dtype=torch.float64)  # n = 4 per channel: bias factor 4/3
    bn = BatchNormAct2d(4, momentum=1.0, activation="none").double().to(device)
    with run_on(backend, device):
        bn(x.to(device))
    unbiased = x.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    torch.testing.assert_close(bn.running_var.cpu(), unbiased, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_cumulative_average_momentum_none(backend, device):
    """momentum=None: running stats are the plain average over all batches seen."""
    bn = BatchNormAct2d(3, momentum=None, activation="none").double().to(device)
    xs = [torch.randn(4, 3, 5, 5, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    with run_on(backend, device):
        for x in xs:
            bn(x.to(device))
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    vars_ = torch.stack([x.transpose(0, 1).reshape(3, -1).var(dim=1) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean.cpu(), means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var.cpu(), vars_, rtol=1e-12, atol=1e-12)
    assert bn.num_batches_tracked.item() == 4


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_functional(backend, device, training):
    from fastres.functional import batch_norm_act

    def leaf(t):
        return t.to(device).requires_grad_()

    x = leaf(torch.randn(3, 4, 3, 5, dtype=torch.float64))
    w = leaf(torch.rand(4, dtype=torch.float64) + 0.5)
    b = leaf(torch.randn(4, dtype=torch.float64))
    r = leaf(torch.randn(3, 4, 3, 5, dtype=torch.float64))
    rm, rv = torch.randn(4, dtype=torch.float64, device=device), torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def f(x, w, b, r):
        return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, residual=r)

    # Interpreted Triton costs ~0.1 s a call and a full gradcheck makes ~750 of them: there
    # gradcheck runs in its fast mode (a random projection of the Jacobian, u^T J v, against
    # the numerical one: a wrong gradient still fails it); the full Jacobian of the Triton
    # kernels is checked compiled on a GPU, and their gradients elementwise in fp64 by
    # tests/test_triton_kernels.py
    interpreted = backend == "triton" and torch.device(device).type == "cpu"
    with run_on(backend, device):
        assert torch.autograd.gradcheck(f, (x, w, b, r), fast_mode=interpreted)
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(f, (xc, w, b, r), fast_mode=interpreted)


def _pair(device):
    ref, ours = make_pair(Case((2, 3, 4, 4), torch.float32), torch.Generator().manual_seed(0), device)
    return ref, ours


@pytest.mark.parametrize("backend,device", TARGETS)
def test_empty_batch_like_pytorch(backend, device):
    ref, ours = _pair(device)
    x = torch.randn(0, 3, 4, 4, device=device)
    with run_on(backend, device):
        y = ours(x)
    y_ref = torch.relu(ref(x))
    assert y.shape == y_ref.shape and y.device == x.device
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("backend,device", TARGETS)
def test_nan_propagates_like_reference(backend, device):
    ref, ours = _pair(device)
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    x = x.to(device)
    with run_on(backend, device):
        y = ours(x)
    y_ref = torch.relu(ref(x))
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, ref.running_var, equal_nan=True)
