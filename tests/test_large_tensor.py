"""64-bit indexing (issue #5): the fused ops on a tensor of more than 2^31 elements.

The bf16 input is ~4.3 GB. Its values are small integers, exact in bf16,
``x[n, c, h, w] = u[n, c][h] + v[n, c][w]``, with the last rows of every plane (the
elements past 2^31 among them) set far from the rest: the exact float64 statistics
then follow from two histograms (no float64 copy of the tensor), and the output is
checked at the first, middle and last rows of every plane and at random positions.
An index computed in 32 bits wraps there: a crash, or wrong / unwritten outputs.

* NCHW (2, 1, 32768, 32769): one channel of 2^31 + 65536 values (the per-channel
  count itself exceeds 2^31); NHWC (1, 64, 2048, 16385) channels_last.
* training forward (``bn_act_train`` + running-stat update, residual = the input
  itself, so no second 4.3 GB tensor), then eval (``affine_act``); the backward op
  separately (grad_y = y = x, again no extra tensors).

Peak memory ~8.6 GB (x and one output); skipped with the reason when the machine has
less than FASTRES_LARGE_MIN_GB (default 11) GB available. Marked ``slow`` (CI runs it,
``-m "not slow"`` skips it locally). The same tests run on CUDA for the triton and cuda
backends when a GPU is present (the GPU script). ``test_checker_small`` runs the same
checks on a small tensor on every backend, so the checker itself is tested everywhere.
"""
from __future__ import annotations

import gc
import os
from typing import Tuple

import pytest
import torch

from fastres import ops
from fastres.functional import batch_norm_act

from conftest import REFERENCE_OPS, backend_params, require_backend, run_on

BIG_NCHW = (2, 1, 32768, 32769)  # 2 * 32768 * 32769 = 2_147_549_184 > 2^31 = 2_147_483_648
BIG_NHWC = (1, 64, 2048, 16385)  # 2_147_614_720 (C=64: the vectorised NHWC path, not C=2's scalar one)
TAIL_ROWS = 3
EPS = 1e-5
MIN_GB = float(os.environ.get("FASTRES_LARGE_MIN_GB", "11"))
CUDA = torch.cuda.is_available()


def _available_gb(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / 2 ** 30
    try:
        import psutil
        return psutil.virtual_memory().available / 2 ** 30
    except ImportError:  # pragma: no cover
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    return 0.0


def _need_memory(device: str, gb: float = MIN_GB) -> None:
    have = _available_gb(device)
    if have < gb:
        pytest.skip(f"needs ~{gb:.0f} GB free on {device} for a >2^31-element bf16 tensor "
                    f"and its output, only {have:.1f} GB available")


# ----------------------------------------------------------------------------- data + truth
class Pattern:
    """x[n, c, h, w] = u[n, c, h] + v[n, c, w], small integers (exact in bf16)."""

    def __init__(self, shape, seed=0):
        n, c, h, w = shape
        g = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.u = torch.randint(-8, 9, (n, c, h), generator=g) + (torch.arange(c) % 7).view(1, c, 1) - 2
        self.v = torch.randint(-8, 9, (n, c, w), generator=g)
        self.u[:, :, -TAIL_ROWS:] = torch.tensor([100, 90, 80][:TAIL_ROWS])  # the rows past 2^31
        assert (self.u.abs().max() + self.v.abs().max()) <= 128  # exact in bf16

    def fill(self, x: torch.Tensor) -> None:
        n, c, _, _ = self.shape
        if x.is_contiguous():  # plane by plane
            for i in range(n):
                for j in range(c):
                    torch.add(self.u[i, j].to(x.device, x.dtype).view(-1, 1),
                              self.v[i, j].to(x.device, x.dtype).view(1, -1), out=x[i, j])
        else:  # channels_last: write (H, W, C) in memory order
            assert x.is_contiguous(memory_format=torch.channels_last)
            xp = x.permute(0, 2, 3, 1)
            for i in range(n):
                torch.add(self.u[i].t().to(x.device, x.dtype).unsqueeze(1),
                          self.v[i].t().to(x.device, x.dtype).unsqueeze(0), out=xp[i])

    def value_hist(self, c: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(values, counts) of channel c over (N, H, W), exactly, in float64."""
        lo = int(self.u[:, c].min() + self.v[:, c].min())
        hi = int(self.u[:, c].max() + self.v[:, c].max())
        counts = torch.zeros(hi - lo + 1, dtype=torch.float64)
        for i in range(self.shape[0]):
            hu = torch.bincount(self.u[i, c] - self.u[i, c].min()).double()
            hv = torch.bincount(self.v[i, c] - self.v[i, c].min()).double()
            joint = torch.outer(hu, hv)  # joint[a, b]: value = a + b + mins
            base = int(self.u[i, c].min() + self.v[i, c].min()) - lo
            for a in range(joint.shape[0]):
                counts[base + a: base + a + joint.shape[1]] += joint[a]
        return torch.arange(lo, hi + 1, dtype=torch.float64), counts

    def stats(self, c: int) -> Tuple[float, float, float]:
        vals, cnt = self.value_hist(c)
        m = cnt.sum().item()
        mean = (vals * cnt).sum().item() / m
        var = (((vals - mean) ** 2) * cnt).sum().item() / m
        return mean, var, m

    def values(self, n, hs, ws) -> torch.Tensor:
        """x[n, :, hs, ws] as (C, K) float64."""
        return (self.u[n][:, hs] + self.v[n][:, ws]).double()


def _positions(shape, gen, k=20000):
    """(h, w) index pairs: the first, middle and last rows in full, and k random ones."""
    _, _, h, w = shape
    rows = sorted({0, 1, h // 2, *range(h - TAIL_ROWS - 1, h)})
    hs = torch.tensor(rows).repeat_interleave(w)
    ws = torch.arange(w).repeat(len(rows))
    rh = torch.randint(0, h, (k,), generator=gen)
    rw = torch.randint(0, w, (k,), generator=gen)
    return torch.cat([hs, rh]), torch.cat([ws, rw])


def _check_samples(name, out, truth_fn, pat, gen):
    """out[n, :, h, w] at the sampled positions vs truth_fn(x values (C, K)) -> (C, K)."""
    hs, ws = _positions(pat.shape, gen)
    for n in range(pat.shape[0]):
        got = out[n][:, hs.to(out.device), ws.to(out.device)].double().cpu()
        exp = truth_fn(pat.values(n, hs, ws))
        # one bf16 ulp of the value (rounding of an fp32 result) + fp32-statistics slack
        bad = ((got - exp).abs() > torch.finfo(out.dtype).eps * exp.abs() + 2e-2).nonzero()
        if bad.numel():
            c, i = bad[0].tolist()
            raise AssertionError(
                f"{name}: {bad.shape[0]} of {got.numel()} sampled values wrong in batch {n}; first at "
                f"(c={c}, h={hs[i].item()}, w={ws[i].item()}): got {got[c, i].item()}, expected {exp[c, i].item()}")


def _params(c, device):
    w = torch.linspace(0.5, 1.5, c, dtype=torch.float32, device=device)
    b = torch.linspace(-0.25, 0.25, c, dtype=torch.float32, device=device)
    return w, b


# ----------------------------------------------------------------------------- the checks
def run_forward_checks(backend: str, shape, channels_last: bool, device: str = "cpu") -> None:
    """Training forward (with running stats, momentum 1) then eval, residual = x."""
    pat = Pattern(shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=torch.bfloat16, device=device, memory_format=fmt)
    pat.fill(x)
    c = shape[1]
    w, b = _params(c, device)
    rm = torch.zeros(c, dtype=torch.float32, device=device)
    rv = torch.ones(c, dtype=torch.float32, device=device)
    truth = [pat.stats(j) for j in range(c)]
    gen = torch.Generator().manual_seed(1)
    with run_on(backend, torch.device(device).type):
        y = batch_norm_act(x, rm, rv, w, b, training=True, momentum=1.0, eps=EPS, residual=x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=fmt), "output lost the input's memory format"
    for j, (mean, var, m) in enumerate(truth):
        got_m, got_v = rm[j].item(), rv[j].item()
        unbiased = var * m / (m - 1)
        assert abs(got_m - mean) <= 1e-3 * var ** 0.5, f"channel {j}: running_mean {got_m} vs exact {mean}"
        assert abs(got_v - unbiased) <= 1e-3 * unbiased, f"channel {j}: running_var {got_v} vs exact {unbiased}"

    t_mean = torch.tensor([t[0] for t in truth], dtype=torch.float64).view(-1, 1)
    t_var = torch.tensor([t[1] for t in truth], dtype=torch.float64).view(-1, 1)
    wd, bd = w.double().cpu().view(-1, 1), b.double().cpu().view(-1, 1)

    def train_truth(xv):
        return ((xv - t_mean) / (t_var + EPS).sqrt() * wd + bd + xv).clamp_min(0)

    _check_samples(f"[{backend}] train output", y, train_truth, pat, gen)
    del y
    gc.collect()

    # eval: affine_act with the running statistics just computed
    rm_e, rv_e = rm.clone(), rv.clone()
    with run_on(backend, torch.device(device).type):
        y = batch_norm_act(x, rm_e, rv_e, w, b, training=False, eps=EPS, residual=x)
    assert y.is_contiguous(memory_format=fmt)

    rmd, rvd = rm.double().cpu().view(-1, 1), rv.double().cpu().view(-1, 1)

    def eval_truth(xv):
        return ((xv - rmd) * (wd / (rvd + EPS).sqrt()) + bd + xv).clamp_min(0)

    _check_samples(f"[{backend}] eval output", y, eval_truth, pat, gen)
    # the input was not written to
    _check_samples(f"[{backend}] input unchanged", x, lambda xv: xv, pat, gen)
    del x, y
    gc.collect()


def run_backward_check(backend: str, shape, device: str = "cpu") -> None:
    """bn_act_train_backward(grad_y = x, x, y = x, relu=True) on the >2^31 tensor: the
    ReLU mask is x > 0, so dz = x * (x > 0) and every reduction has an exact value."""
    pat = Pattern(shape, seed=2)
    x = torch.empty(shape, dtype=torch.bfloat16, device=device)
    pat.fill(x)
    c = shape[1]
    w, _ = _params(c, device)
    truth = [pat.stats(j) for j in range(c)]
    mean = torch.tensor([t[0] for t in truth], dtype=torch.float32, device=device)
    var = torch.tensor([t[1] for t in truth], dtype=torch.float32, device=device)
    if backend == REFERENCE_OPS:
        fam = ops.family(REFERENCE_OPS)
    else:
        require_backend(backend, torch.device(device).type)
        fam = ops.family(backend)
    grad_x, grad_w, grad_b, grad_z = fam.bn_act_train_backward(x, x, x, w, mean, var, EPS, True, False)
    assert grad_x.shape == x.shape and grad_z.numel() == 0
    exact_gb, exact_gw = [], []
    for j in range(c):
        vals, cnt = pat.value_hist(j)
        dz = vals.clamp_min(0)
        invstd = 1 / (float(var[j]) + EPS) ** 0.5  # the op normalises with the var it is given
        exact_gb.append((dz * cnt).sum().item())
        exact_gw.append((dz * (vals - float(mean[j])) * invstd * cnt).sum().item())
    exact_gb = torch.tensor(exact_gb, dtype=torch.float64)
    exact_gw = torch.tensor(exact_gw, dtype=torch.float64)
    # sums of ~2^31 terms accumulated in fp32 (blocked): 1e-4 relative
    torch.testing.assert_close(grad_b.double().cpu(), exact_gb, rtol=1e-4, atol=1e-6 * exact_gb.abs().max().item())
    torch.testing.assert_close(grad_w.double().cpu(), exact_gw, rtol=1e-4, atol=1e-6 * exact_gw.abs().max().item())
    m_count = x.numel() / c

    invstd = 1 / (var.double().cpu().view(-1, 1) + EPS).sqrt()
    md, wd = mean.double().cpu().view(-1, 1), w.double().cpu().view(-1, 1)
    gb, gw = exact_gb.view(-1, 1), exact_gw.view(-1, 1)

    def gx_truth(xv):
        xhat = (xv - md) * invstd
        return wd * invstd * (xv.clamp_min(0) - gb / m_count - xhat * gw / m_count)

    _check_samples(f"[{backend}] grad_x", grad_x, gx_truth, pat, torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_checker_small(backend, layout):
    """The same checks on a small tensor, on every CPU backend (checks the checker)."""
    shape = (2, 1, 37, 41) if layout == "nchw" else (1, 5, 37, 41)
    run_forward_checks(backend, shape, layout == "nhwc")
    if layout == "nchw":
        run_backward_check(backend, shape)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_over_2e31_elements_cpp(layout):
    require_backend("cpp")
    _need_memory("cpu")
    shape = BIG_NCHW if layout == "nchw" else BIG_NHWC
    assert shape[0] * shape[1] * shape[2] * shape[3] > 2 ** 31
    run_forward_checks("cpp", shape, layout == "nhwc")


@pytest.mark.slow
def test_over_2e31_elements_cpp_backward():
    require_backend("cpp")
    _need_memory("cpu")
    run_backward_check("cpp", BIG_NCHW)


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run by the GPU script)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_over_2e31_elements_gpu(backend, layout):
    require_backend(backend, "cuda")
    _need_memory("cuda", 10.0)
    shape = BIG_NCHW if layout == "nchw" else BIG_NHWC
    run_forward_checks(backend, shape, layout == "nhwc", device="cuda")
    if layout == "nchw":
        run_backward_check(backend, shape, device="cuda")
