"""The CUDA kernels of csrc/cuda/ops_cuda.cu, run on the host.

ops_cuda.cu is compiled for the CPU against csrc/cuda/emulation.h (CUDA threads as
std::threads, __syncthreads / __shfl_down_sync as barriers) and registered as
torch.ops.fastres_cuda_emu.*; this checks its launch plans, index math, reductions,
finalize kernels and tensor glue against fastres._reference without a GPU. The real
build of the same file runs on GPUs (the ``gpu``-marked parity suite there).

The cases reach every branch of ops_cuda.cu (``_plan_parts`` below mirrors its launch
plans, and the tests assert that their shapes reach what they claim):

* both layouts: NCHW (reduce_nchw / ew_nchw) and rows (channels_last, or H*W == 1),
  each with ReLU on and off, with and without a residual (AffineApplyOp<RELU, RES>),
  every dtype;
* bn_act_train with weight / bias None; bn_act_train_backward with RELU x need_grad_z
  (DsumOp, BnBwdApplyOp FROM_GZ) and weight None (sums_finalize MODE 0); affine_act
  with scale / shift None; affine_act_backward with and without parameter grads
  (DsumOp GX, sums_finalize MODE 1 / AffineBwdOp), RELU x need_grad_z, scale None;
* the reduction plans: NCHW split over space (Jh > 1) and over the batch (Jn > 1),
  rows split in row parts, and more than 32 partials per channel in both layouts
  (the finalize kernels' lane-strided loop takes a second pass); channel tiles with
  idle lanes (C not a power of two, C > 32), finalize blocks with idle warps (C % 4);
* the grid-stride loops of the element-wise kernels (NCHW planes and H*W, rows): with
  the grid capped (emulation.h's set_ew_grid_cap: a real launch reaches the later
  iterations only past 65535 blocks), and ew_nchw's idle columns (H*W < block width);
* non-finite statistics (the sum / M fallback), empty tensors in all four ops, inputs
  in another memory format than x (the glue's copies).

Slow (compiles the emulation, ~40 s; emulated threads): marked ``slow``. Shapes are
small: emulated threads cost ~10 us each.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from fastres import _reference as ref

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def E():
    from torch.utils.cpp_extension import load

    load(name="fastres_cuda_emu", sources=[os.path.join(ROOT, "csrc", "cuda", "emulation_main.cpp")],
         extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O1", "-std=c++20", "-g0"],
         is_python_module=False, verbose=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch.ops.fastres_cuda_emu
    torch.ops.fastres_cuda_emu.set_ew_grid_cap(0, 0)
    torch.set_num_threads(old)


TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


# ----------------------------------------------------------------------------- plans
def _p2(v, lo, hi):
    p = lo
    while p < v and p < hi:
        p <<= 1
    return p


def _cdiv(a, b):
    return -(-a // b)


def _plan_parts(shape, cl):
    """Mirror of ops_cuda.cu's make_reduce_plan / make_ew_plan (kThreads 256,
    kTargetBlocks 1024): (J, Jn, Jh, ew grid (gx, gy), ew block (tx, ty), rows)."""
    n, c, h, w = shape
    hw, m = h * w, n * h * w
    rows = cl or hw == 1
    if not rows:
        tx = _p2(hw, 32, 256)
        ty = 256 // tx
        want = min(max(1, _cdiv(1024, c)), max(1, m // 2048))
        jh = max(1, min(want, hw // (4 * tx)))
        jn = max(1, min(_cdiv(want, jh), _cdiv(n, ty)))
        ew = (min(_cdiv(hw, tx), 1 << 16), min(_cdiv(n * c, ty), 65535))
        return dict(J=jn * jh, Jn=jn, Jh=jh, ew=ew, ew_block=(tx, ty), rows=False)
    tx = _p2(c, 1, 32)
    ty = 256 // tx
    j = min(max(1, _cdiv(1024, _cdiv(c, tx))), max(1, m // (16 * ty)), 65535)
    etx = _p2(c, 1, 256)
    ety = 256 // etx
    ew = (_cdiv(c, etx), min(_cdiv(m, ety), 65535))
    return dict(J=j, Jn=j, Jh=1, ew=ew, ew_block=(etx, ety), rows=True, red_block=(tx, ty))


# ----------------------------------------------------------------------------- checks
def _acc_tol(dt):
    return TOL[torch.float64] if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def _close(a, b, tol, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.dim() == 4 and a.numel():
        assert a.stride() == b.stride(), (what, a.stride(), b.stride())
    torch.testing.assert_close(a.double(), b.double(), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def _check(E, shape, dt, cl, relu, use_res, gen, params=True, other_fmt=False):
    """All four ops (and every flag combination of the backward ones) vs the reference.
    params=False: weight, bias and scale None. other_fmt: residual and grad_y in the
    other memory format than x (the ops copy them into x's)."""
    tol = TOL[dt]
    acc = ref.acc_dtype(dt)

    def mk(channels_last):
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dt)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    x, r, gy = mk(cl), mk(cl != other_fmt), mk(cl != other_fmt)
    C = shape[1]
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).float() if params else None
    b = torch.randn(C, generator=gen, dtype=torch.float64).float() if params else None
    s = torch.randn(C, generator=gen, dtype=torch.float64).to(acc)
    t = torch.randn(C, generator=gen, dtype=torch.float64).to(acc)
    res = r if use_res else None
    tag = f"{shape} {dt} cl={cl} relu={relu} res={use_res} params={params} other_fmt={other_fmt}"
    out, outr = E.bn_act_train(x, w, b, res, 1e-5, relu), ref.bn_act_train(x, w, b, res, 1e-5, relu)
    for a, e, nm in zip(out, outr, ("y", "mean", "var")):
        _close(a, e, tol if nm == "y" else _acc_tol(dt), f"{nm} {tag}")
    yr, mr, vr = outr
    for gz in (True, False):
        out = E.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, relu, gz)
        outr = ref.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, relu, gz)
        for a, e, nm in zip(out, outr, ("grad_x", "grad_weight", "grad_bias", "grad_z")):
            _close(a, e, tol if nm in ("grad_x", "grad_z") else _acc_tol(dt), f"{nm} {tag}")
    for sc, sh, rr in ((s, t, res), (None, t, None), (s, None, res), (None, None, res)):
        _close(E.affine_act(x, sc, sh, rr, relu), ref.affine_act(x, sc, sh, rr, relu), tol,
               f"affine scale={sc is not None} shift={sh is not None} res={rr is not None} {tag}")
    sc = s if params else None
    for gz, pg in itertools.product((True, False), (True, False)):
        out = E.affine_act_backward(gy, x, yr, sc, relu, gz, pg)
        outr = ref.affine_act_backward(gy, x, yr, sc, relu, gz, pg)
        for a, e, nm in zip(out, outr, ("grad_x", "grad_z", "grad_scale", "grad_shift")):
            _close(a, e, tol if nm in ("grad_x", "grad_z") else _acc_tol(dt), f"affine {nm} gz={gz} pg={pg} {tag}")


# (shape, channels_last, relu, residual, params): every shape in both layouts, ReLU on
# and off in both layouts, residual on and off, weight/bias/scale None in both layouts.
SMALL = [
    ((2, 3, 7, 7), False, True, True, True),     # NCHW, idle columns (49 < 64), C % 4 != 0
    ((2, 3, 7, 7), True, False, False, False),   # rows with idle lanes (C=3 in 4)
    ((5, 65, 1, 1), False, False, True, True),   # H*W == 1: rows although contiguous
    ((5, 65, 1, 1), True, True, False, True),
    ((3, 40, 5, 3), False, False, False, False),  # NCHW, many channels
    ((3, 40, 5, 3), True, True, True, True),     # rows, C > 32: two channel tiles
    ((9, 5, 2, 2), False, True, False, False),
    ((9, 5, 2, 2), True, False, True, True),
]


@pytest.mark.parametrize("dt", list(TOL), ids=lambda d: str(d).split(".")[-1])
def test_emulated_cuda_ops_small(E, dt):
    E.set_ew_grid_cap(0, 0)
    gen = torch.Generator().manual_seed(0)
    for shape, cl, relu, use_res, params in SMALL:
        _check(E, shape, dt, cl, relu, use_res, gen, params=params)


def test_small_cases_cover_the_flag_combinations():
    """The SMALL table has ReLU on and off, residual on and off, parameters on and off in
    each layout (rows = channels_last or H*W == 1, as ops_cuda.cu decides)."""
    seen = {(_plan_parts(s, cl)["rows"], flag, v) for s, cl, relu, res, par in SMALL
            for flag, v in (("relu", relu), ("res", res), ("params", par))}
    for rows, flag, v in itertools.product((False, True), ("relu", "res", "params"), (False, True)):
        assert (rows, flag, v) in seen, f"no {'rows' if rows else 'NCHW'} case with {flag}={v}"


def test_emulated_cuda_other_memory_formats(E):
    gen = torch.Generator().manual_seed(3)
    for cl in (False, True):
        _check(E, (2, 4, 3, 5), torch.float32, cl, relu=True, use_res=True, gen=gen, other_fmt=True)


# Several partials per channel: NCHW split over space (2,3,64,64: Jh=4) and over the
# batch (4,2,32,32: Jn=2); rows split into many row parts (8,5,32,32: J=16). More than
# 32 partials (NCHW 2112,1,4,8 and rows 2112,2,4,8: J=33): the finalize loop's second pass.
# The element-wise grid is capped (1 x 2 blocks) so the grid-stride loops iterate: H*W
# (600 > 256 threads), NCHW planes and rows.
PARTIAL_CASES = [((2, 3, 64, 64), False, True), ((2, 3, 64, 64), True, False), ((4, 2, 32, 32), False, False),
                 ((8, 5, 32, 32), True, True), ((2112, 1, 4, 8), False, True), ((2112, 2, 4, 8), True, False),
                 ((2, 3, 20, 30), False, False), ((2, 3, 20, 30), True, True)]


@pytest.mark.parametrize("shape,cl,relu", PARTIAL_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_emulated_cuda_ops_multi_partial_grid_stride(E, shape, cl, relu):
    cap = (1, 2)
    p = _plan_parts(shape, cl)
    assert p["J"] > 1 or shape == (2, 3, 20, 30), p
    assert p["ew"][1] > cap[1], f"{shape}: the rows / planes loop would not iterate: {p}"
    E.set_ew_grid_cap(*cap)
    try:
        gen = torch.Generator().manual_seed(1)
        _check(E, shape, torch.float32, cl, relu=relu, use_res=not relu, gen=gen, params=relu)
    finally:
        E.set_ew_grid_cap(0, 0)


def test_partial_cases_reach_the_branches():
    """The shapes above reach what their comment says (in the mirror of the plans)."""
    P = {(s, cl): _plan_parts(s, cl) for s, cl, _ in PARTIAL_CASES}
    assert P[(2, 3, 64, 64), False]["Jh"] > 1 and P[(4, 2, 32, 32), False]["Jn"] > 1
    assert P[(8, 5, 32, 32), True]["J"] > 1
    assert P[(2112, 1, 4, 8), False]["J"] > 32 and P[(2112, 2, 4, 8), True]["J"] > 32
    assert P[(2, 3, 20, 30), False]["ew"][0] > 1  # H*W needs 3 column blocks: the cap of 1 loops


def test_emulated_cuda_nonfinite(E):
    for cl in (False, True):
        x = torch.randn(3, 5, 9, 10, generator=torch.Generator().manual_seed(2))
        x[1, 0, 3, 4] = float("inf")
        x[0, 1, 0, 0] = float("-inf")
        x[2, 2, 5, 5], x[1, 2, 6, 6] = float("inf"), float("-inf")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        out, outr = E.bn_act_train(x, None, None, None, 1e-5, True), ref.bn_act_train(x, None, None, None, 1e-5, True)
        for a, e in zip(out, outr):
            torch.testing.assert_close(a, e, equal_nan=True)
        assert out[1][0] == float("inf") and out[1][1] == float("-inf") and out[1][2].isnan()
        assert torch.isfinite(out[0][:, 3:]).all() and torch.isfinite(out[1][3:]).all()  # untouched channels


def test_emulated_cuda_empty_and_deterministic(E):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 5)]:
        x = torch.empty(shape)
        y, m, v = E.bn_act_train(x, None, None, None, 1e-5, True)
        assert y.shape == x.shape and m.shape == (3,) and torch.isnan(m).all()
        gx, gw, gb, gz = E.bn_act_train_backward(x, x, x, None, m, v, 1e-5, True, False)
        assert gx.shape == x.shape and gz.shape == (0,) and not gw.any() and not gb.any()
        assert E.affine_act(x, torch.ones(3), torch.zeros(3), x, True).shape == x.shape
        gx, gz, gs, gt = E.affine_act_backward(x, x, x, torch.ones(3), True, True, True)
        assert gx.shape == x.shape and gz.shape == x.shape and gs.shape == (3,) and not gs.any() and not gt.any()
        gx, gz, gs, gt = E.affine_act_backward(x, x, x, None, False, False, False)
        assert gx.shape == x.shape and gz.shape == (0,) and gs.shape == (0,) and gt.shape == (0,)
    x = torch.randn(4, 6, 33, 35).contiguous(memory_format=torch.channels_last) * 100 + 1e4
    E.set_ew_grid_cap(0, 4)
    try:
        a = E.bn_act_train(x, None, None, None, 1e-5, True)
        b = E.bn_act_train(x, None, None, None, 1e-5, True)
    finally:
        E.set_ew_grid_cap(0, 0)
    for t0, t1 in zip(a, b):
        assert torch.equal(t0, t1)
    torch.testing.assert_close(a[2].double(), x.double().var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-3)
