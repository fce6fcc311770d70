"""The CUDA kernels of csrc/cuda/ops_cuda.cu, run on the host.

ops_cuda.cu is compiled for the CPU against csrc/cuda/emulation.h (CUDA threads as
std::threads, __syncthreads / __shfl_down_sync as barriers) and registered as
torch.ops.fastres_cuda_emu.*; this checks its launch plans, index math, reductions,
finalize kernels and tensor glue against fastres._reference without a GPU. The real
build of the same file runs on GPUs (test_build.py / the parity suite there).

Slow (compiles the emulation, ~40 s; emulated threads): marked ``slow``.
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
    torch.set_num_threads(old)


TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


def _acc_tol(dt):
    return TOL[torch.float64] if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def _close(a, b, tol, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.dim() == 4 and a.numel():
        assert a.stride() == b.stride(), (what, a.stride(), b.stride())
    torch.testing.assert_close(a.double(), b.double(), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def _check(E, shape, dt, cl, relu, use_res, gen):
    tol = TOL[dt]
    acc = ref.acc_dtype(dt)

    def mk():
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dt)
        return t.contiguous(memory_format=torch.channels_last) if cl else t

    x, r, gy = mk(), mk(), mk()
    C = shape[1]
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).float()
    b = torch.randn(C, generator=gen, dtype=torch.float64).float()
    s = torch.randn(C, generator=gen, dtype=torch.float64).to(acc)
    res = r if use_res else None
    tag = f"{shape} {dt} cl={cl} relu={relu} res={use_res}"
    out, outr = E.bn_act_train(x, w, b, res, 1e-5, relu), ref.bn_act_train(x, w, b, res, 1e-5, relu)
    for a, e, nm in zip(out, outr, ("y", "mean", "var")):
        _close(a, e, tol if nm == "y" else _acc_tol(dt), f"{nm} {tag}")
    yr, mr, vr = outr
    for gz in (True, False):
        out = E.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, relu, gz)
        outr = ref.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, relu, gz)
        for a, e, nm in zip(out, outr, ("grad_x", "grad_weight", "grad_bias", "grad_z")):
            _close(a, e, tol if nm in ("grad_x", "grad_z") else _acc_tol(dt), f"{nm} {tag}")
    _close(E.affine_act(x, s, s, res, relu), ref.affine_act(x, s, s, res, relu), tol, f"affine {tag}")
    _close(E.affine_act(x, None, s, None, relu), ref.affine_act(x, None, s, None, relu), tol, f"affine2 {tag}")
    for gz, pg in itertools.product((True, False), (True, False)):
        out = E.affine_act_backward(gy, x, yr, s, relu, gz, pg)
        outr = ref.affine_act_backward(gy, x, yr, s, relu, gz, pg)
        for a, e, nm in zip(out, outr, ("grad_x", "grad_z", "grad_scale", "grad_shift")):
            _close(a, e, tol if nm in ("grad_x", "grad_z") else _acc_tol(dt), f"affine {nm} {tag}")


SMALL = [(2, 3, 7, 7), (5, 65, 1, 1), (2, 1, 13, 17), (3, 40, 5, 3), (1, 2, 40, 70), (9, 5, 2, 2)]


@pytest.mark.parametrize("dt", list(TOL), ids=lambda d: str(d).split(".")[-1])
def test_emulated_cuda_ops_small(E, dt):
    gen = torch.Generator().manual_seed(0)
    for i, (shape, cl) in enumerate(itertools.product(SMALL, (False, True))):
        _check(E, shape, dt, cl, relu=i % 2 == 0, use_res=i % 3 != 0, gen=gen)


# Several partials per channel: NCHW split over space (2,3,64,64) and over the
# batch (4,2,32,32); rows split into many row parts (8,5,32,32).
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (4, 2, 32, 32), (8, 5, 32, 32)])
def test_emulated_cuda_ops_multi_partial(E, shape):
    gen = torch.Generator().manual_seed(1)
    for cl in (False, True):
        _check(E, shape, torch.float32, cl, relu=True, use_res=True, gen=gen)


def test_emulated_cuda_nonfinite(E):
    for cl in (False, True):
        x = torch.randn(3, 4, 9, 10, generator=torch.Generator().manual_seed(2))
        x[1, 0, 3, 4] = float("inf")
        x[0, 1, 0, 0] = float("-inf")
        x[2, 2, 5, 5], x[1, 2, 6, 6] = float("inf"), float("-inf")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        out, outr = E.bn_act_train(x, None, None, None, 1e-5, True), ref.bn_act_train(x, None, None, None, 1e-5, True)
        for a, e in zip(out, outr):
            torch.testing.assert_close(a, e, equal_nan=True)
        assert out[1][0] == float("inf") and out[1][1] == float("-inf") and out[1][2].isnan()


def test_emulated_cuda_empty_and_deterministic(E):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 5)]:
        x = torch.empty(shape)
        y, m, v = E.bn_act_train(x, None, None, None, 1e-5, True)
        assert y.shape == x.shape and m.shape == (3,) and torch.isnan(m).all()
        gx, gw, gb, gz = E.bn_act_train_backward(x, x, x, None, m, v, 1e-5, True, False)
        assert gx.shape == x.shape and gz.shape == (0,) and not gw.any() and not gb.any()
    x = torch.randn(4, 6, 33, 35).contiguous(memory_format=torch.channels_last) * 100 + 1e4
    a = E.bn_act_train(x, None, None, None, 1e-5, True)
    b = E.bn_act_train(x, None, None, None, 1e-5, True)
    for t0, t1 in zip(a, b):
        assert torch.equal(t0, t1)
    torch.testing.assert_close(a[2].double(), x.double().var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-3)
