"""Launchers: allocate outputs, pick a tiling, launch, return (docs/DESIGN.md semantics).

Pure functions of tensors: no host syncs, no op registration (fastres/ops.py wraps
these in torch.library.custom_op; fastres/_triton_ops.py in torch.library.triton_op).
Imports torch and triton only.

Every launch goes through :func:`launch`: the kernel itself, or, inside
:func:`launching` (the ``triton_op`` variant), the kernel as the given hook wraps it
(``torch.library.wrap_triton``), so that torch.compile records each launch as a
user-defined Triton kernel that inductor sees, instead of an opaque call.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _kernels as K

Tensor = torch.Tensor

# Tiling knobs. TILE: elements per [rows, cols] register tile (8 warps -> 16 per thread;
# smaller tiles of tiny tensors get fewer warps, >= 8 elements per thread);
# TARGET_PROGRAMS: programs a reduction/elementwise pass aims for (a few per SM on an
# H100, so each streams tens of KiB); MIN_TILES: fewest tiles a program walks (amortises
# its parameter loads and partial stores); MAX_CHUNKS bounds the partial buffers (and
# grid axis 1). Tests shrink them to exercise the multi-tile / multi-chunk paths.
CONFIG = {
    "tile": 4096,
    "max_block_c": 256,
    "target_programs": 1024,
    "min_tiles": 4,
    "max_chunks": 4096,
    "max_warps": 8,
    "finalize_tile": 4096,
    "finalize_block_c": 64,
}


# Under TRITON_INTERPRET=1 the kernels are InterpretedFunctions, whose fp32 -> bf16 cast
# truncates; the kernels then round to nearest even by hand (the GPU cast already does).
_INTERPRETED = not isinstance(K._act_kernel, triton.runtime.JITFunction)


_HOOK: "contextvars.ContextVar" = contextvars.ContextVar("fastres_kernel_launch_hook", default=None)


def launch(kernel):
    """``kernel`` as it is launched here: itself, or ``hook(kernel)`` inside :func:`launching`."""
    hook = _HOOK.get()
    return kernel if hook is None else hook(kernel)


@contextlib.contextmanager
def launching(hook):
    """Launch every kernel of the launchers called in this block through ``hook``."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def _rne(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def _p2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _fmt(x: Tensor) -> torch.memory_format:
    """DESIGN.md: contiguous if x is contiguous, else channels_last if x is, else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(t: Optional[Tensor], fmt: torch.memory_format) -> Optional[Tensor]:
    return None if t is None else t.contiguous(memory_format=fmt)


def _vec(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


class _Plan(NamedTuple):
    cl: bool        # channels-last tiling
    grid: tuple
    chunks: int     # partials per channel
    args: tuple     # shape args after the pointers
    meta: dict      # CL, BLOCK_A, BLOCK_B constexprs and num_warps


def untimed_reason(device: torch.device) -> Optional[str]:
    """Why the conv tuners must not time candidates now, or None.

    * ``"capture"``: the current CUDA stream is being captured into a graph; timing
      synchronises the device (``triton.testing.do_bench``), which invalidates the
      capture. A problem tuned before the capture keeps its tiling; an untuned one runs
      the untimed default tiling (and is not remembered).
    * ``"deterministic"``: ``torch.use_deterministic_algorithms(True)``; the tile shape
      fixes the order of the fp32 reductions (statistics partials, dgrad partial sums,
      reduction steps), so a choice made by timing noise could differ between processes.
      The untimed default tiling runs instead, as cuDNN does without ``benchmark``.
    """
    if device.type != "cuda":
        return None
    if torch.cuda.is_current_stream_capturing():
        return "capture"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic"
    return None


def concrete(values) -> bool:
    """No symbolic size among ``values`` (a torch.SymInt when traced with dynamic shapes):
    a problem the tuners can time and remember (a SymInt cannot be hashed)."""
    return not any(isinstance(v, torch.SymInt) for v in values)


def _tiling_errors() -> tuple:
    """The exceptions that mean "this tiling does not fit this device" (out of shared
    memory or registers, a compile-time assertion, ptxas refusing it): what Triton's own
    autotuner skips a configuration on. Everything else (out of memory, an illegal
    address) is a real error and propagates."""
    import importlib
    found = []
    for mod, name in (("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError"),
                      ("triton.compiler.errors", "CompileTimeAssertionFailure")):
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


TILING_ERRORS = _tiling_errors()
MAX_GRID_1 = 65535  # CUDA's limit on a grid's second (and third) axis


def _meta(cl: bool, block_a: int, block_b: int) -> dict:
    warps = max(1, min(CONFIG["max_warps"], block_a * block_b // 256))
    return dict(CL=cl, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=warps)


def _pick_block_hw(hw: int, cap: int) -> int:
    """Row width of a channels-first tile: among the powers of two from the largest
    useful one down to 128 (or top/8 if that is larger), the one that wastes the fewest
    lanes on the last tile of each HW run; ties go to the wider (longer contiguous runs).
    Masked lanes cost issue slots only, not memory traffic."""
    top = min(_p2(hw), 1024, cap)
    low = max(min(top, 128), top // 8)
    best, best_u = top, 0.0
    b = top
    while b >= low:
        u = hw / (_cdiv(hw, b) * b)
        if u > best_u + 1e-9:
            best, best_u = b, u
        b //= 2
    return best


def _plan(x: Tensor, cl: bool) -> _Plan:
    n, c, h, w = x.shape
    hw = h * w
    cfg = CONFIG
    tile = cfg["tile"] // (2 if x.dtype == torch.float64 else 1)  # fp64: keep clear of spills
    if cl:
        m = n * hw
        bc = min(_p2(c), cfg["max_block_c"], tile)
        bm = max(1, min(tile // bc, _p2(m)))
        ncb = _cdiv(c, bc)
        tiles = _cdiv(m, bm)
        want = max(1, min(cfg["target_programs"] // ncb, _cdiv(tiles, cfg["min_tiles"]), cfg["max_chunks"]))
        rows_per = _cdiv(tiles, want) * bm
        chunks = _cdiv(m, rows_per)
        return _Plan(True, (chunks, ncb), chunks, (m, c, hw, c * hw, rows_per, 1, 1),
                     _meta(True, bm, bc))
    bhw = _pick_block_hw(hw, tile)
    bn = max(1, min(tile // bhw, _p2(n)))
    nt, ht = _cdiv(n, bn), _cdiv(hw, bhw)
    want = max(1, min(cfg["target_programs"] // c, _cdiv(nt * ht, cfg["min_tiles"]), cfg["max_chunks"]))
    if nt >= want:  # split the batch only: each program streams whole HW runs
        n_per = _cdiv(nt, want) * bn
        hw_per = ht * bhw
    else:           # one batch tile per chunk, and split HW too
        n_per = bn
        hw_per = _cdiv(ht, _cdiv(want, nt)) * bhw
    nj, hj = _cdiv(n, n_per), _cdiv(hw, hw_per)
    chunks = nj * hj
    return _Plan(False, (c, chunks), chunks, (n, c, hw, c * hw, n_per, hw_per, hj),
                 _meta(False, bn, bhw))


def _finalize_meta(c: int, chunks: int):
    bc = min(_p2(c), CONFIG["finalize_block_c"])
    bj = max(1, min(_p2(chunks), CONFIG["finalize_tile"] // bc))
    return (_cdiv(c, bc),), dict(BLOCK_J=bj, BLOCK_C=bc, num_warps=4)


def _prep(x: Tensor):
    fmt = _fmt(x)
    xc = x.contiguous(memory_format=fmt)
    # channels-last tiling unless the tensor is (also) plain NCHW-dense; for tensors whose
    # H*W == 1 or C == 1 both orders are the same memory, and either tiling is valid.
    cl = fmt == torch.channels_last
    return fmt, xc, cl


def _launch_act(xc: Tensor, res: Optional[Tensor], mean: Optional[Tensor], scale: Optional[Tensor],
                shift: Optional[Tensor], y: Tensor, relu: bool, cl: bool) -> None:
    plan = _plan(xc, cl)
    acc = _tl_acc(xc.dtype)
    d = xc  # dummy pointer for absent operands (never dereferenced)
    launch(K._act_kernel)[plan.grid](xc, d if res is None else res, d if mean is None else mean,
                             d if scale is None else scale, d if shift is None else shift, y, *plan.args,
                             HAS_MEAN=mean is not None, HAS_SCALE=scale is not None,
                             HAS_SHIFT=shift is not None, HAS_RES=res is not None, RELU=bool(relu),
                             RNE_BF16=_rne(y.dtype), ACC=acc, **plan.meta)


# ----------------------------------------------------------------------------- forward
def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                 eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """y = act((x - mean) * invstd * w + b (+ residual)); returns (y, mean, biased var)."""
    fmt, xc, cl = _prep(x)
    c = x.shape[1]
    acc = _acc(x.dtype)
    y = torch.empty_like(xc, memory_format=fmt)
    if x.numel() == 0:
        return (y, torch.full((c,), float("nan"), dtype=acc, device=x.device),
                torch.full((c,), float("nan"), dtype=acc, device=x.device))
    res = _dense(residual, fmt)
    weight, bias = _vec(weight), _vec(bias)
    plan = _plan(xc, cl)
    tacc = _tl_acc(x.dtype)
    # partials: mean | M2 | count | sum, means and sums relative to K = x[0, c, 0, 0]
    part = torch.empty((4, plan.chunks, c), dtype=acc, device=x.device)
    # separate allocations: custom_op outputs may not share storage
    mean, var, scale = (torch.empty((c,), dtype=acc, device=x.device) for _ in range(3))
    with _device_ctx(x):
        launch(K._stats_kernel)[plan.grid](xc, part[0], part[1], part[2], part[3], *plan.args, ACC=tacc, **plan.meta)
        fgrid, fmeta = _finalize_meta(c, plan.chunks)
        stride_c = 1 if cl else x.shape[2] * x.shape[3]  # of x[0, c, 0, 0]
        launch(K._stats_finalize)[fgrid](xc, part[0], part[1], part[2], part[3], xc if weight is None else weight,
                                 mean, var, scale, c, stride_c, plan.chunks, float(eps),
                                 HAS_W=weight is not None, ACC=tacc, **fmeta)
        _launch_act(xc, res, mean, scale, bias, y, relu, cl)
    return y, mean, var


def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
               relu: bool) -> Tensor:
    """y = act(x * scale[c] + shift[c] (+ residual)); None scale/shift mean 1/0."""
    fmt, xc, cl = _prep(x)
    y = torch.empty_like(xc, memory_format=fmt)
    if x.numel() == 0:
        return y
    with _device_ctx(x):
        _launch_act(xc, _dense(residual, fmt), None, _vec(scale), _vec(shift), y, relu, cl)
    return y


# ----------------------------------------------------------------------------- backward
def _launch_bwd(plan: _Plan, gy, xc, yc, mean, coef, gx, gz, part, relu, sums, center, gx_mode, has_a):
    d = xc
    launch(K._bwd_kernel)[plan.grid](gy, xc, d if yc is None else yc, d if mean is None else mean,
                             d if coef is None else coef, d if gx is None else gx, d if gz is None else gz,
                             d if part is None else part[0], d if part is None else part[1], *plan.args,
                             RELU=bool(relu), SUMS=sums, CENTER=center, GX_MODE=gx_mode, HAS_A=has_a,
                             WRITE_GZ=gz is not None, RNE_BF16=_rne(xc.dtype), ACC=_tl_acc(xc.dtype),
                             **plan.meta)


def bn_act_train_backward(grad_y: Tensor, x: Tensor, y: Tensor, weight: Optional[Tensor], mean: Tensor,
                          var: Tensor, eps: float, relu: bool,
                          need_grad_z: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight, grad_bias, grad_z); grad_z is empty [0] unless need_grad_z."""
    fmt, xc, cl = _prep(x)
    n, c, h, w = x.shape
    m = n * h * w
    acc = _acc(x.dtype)
    grad_x = torch.empty_like(xc, memory_format=fmt)
    grad_z = torch.empty_like(xc, memory_format=fmt) if need_grad_z else x.new_empty((0,))
    if x.numel() == 0:
        return (grad_x, torch.zeros((c,), dtype=acc, device=x.device),
                torch.zeros((c,), dtype=acc, device=x.device), grad_z)
    grad_w, grad_b = (torch.empty((c,), dtype=acc, device=x.device) for _ in range(2))
    gy = grad_y.contiguous(memory_format=fmt)
    yc = y.contiguous(memory_format=fmt) if relu else None
    mean, var, weight = mean.contiguous(), var.contiguous(), _vec(weight)
    plan = _plan(xc, cl)
    part = torch.empty((2, plan.chunks, c), dtype=acc, device=x.device)
    coef = torch.empty((3, c), dtype=acc, device=x.device)  # w*invstd | grad_bias/M | invstd*grad_weight/M
    with _device_ctx(x):
        _launch_bwd(plan, gy, xc, yc, mean, None, None, None, part, relu, sums=True, center=True,
                    gx_mode=0, has_a=False)
        fgrid, fmeta = _finalize_meta(c, plan.chunks)
        launch(K._bwd_finalize)[fgrid](part[0], part[1], var, xc if weight is None else weight, grad_w, grad_b,
                               coef, c, plan.chunks, m, float(eps), BN=True, HAS_W=weight is not None,
                               ACC=_tl_acc(x.dtype), **fmeta)
        _launch_bwd(plan, gy, xc, yc, mean, coef, grad_x, grad_z if need_grad_z else None, None, relu,
                    sums=False, center=True, gx_mode=2, has_a=True)
    return grad_x, grad_w, grad_b, grad_z


def affine_act_backward(grad_y: Tensor, x: Tensor, y: Tensor, scale: Optional[Tensor], relu: bool,
                        need_grad_z: bool, need_param_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_z, grad_scale, grad_shift); one pass over the tensors
    (grad_x, grad_z and the per-chunk partials of S(dz x), S(dz)), then a small combine."""
    fmt, xc, cl = _prep(x)
    c = x.shape[1]
    acc = _acc(x.dtype)
    grad_x = torch.empty_like(xc, memory_format=fmt)
    grad_z = torch.empty_like(xc, memory_format=fmt) if need_grad_z else x.new_empty((0,))
    np_ = c if need_param_grads else 0
    if x.numel() == 0:
        return (grad_x, grad_z, torch.zeros((np_,), dtype=acc, device=x.device),
                torch.zeros((np_,), dtype=acc, device=x.device))
    grad_s, grad_t = (torch.empty((np_,), dtype=acc, device=x.device) for _ in range(2))
    gy = grad_y.contiguous(memory_format=fmt)
    yc = y.contiguous(memory_format=fmt) if relu else None
    scale = _vec(scale)
    plan = _plan(xc, cl)
    part = torch.empty((2, plan.chunks, c), dtype=acc, device=x.device) if need_param_grads else None
    with _device_ctx(x):
        _launch_bwd(plan, gy, xc, yc, None, scale, grad_x, grad_z if need_grad_z else None, part, relu,
                    sums=bool(need_param_grads), center=False, gx_mode=1, has_a=scale is not None)
        if need_param_grads:
            fgrid, fmeta = _finalize_meta(c, plan.chunks)
            launch(K._bwd_finalize)[fgrid](part[0], part[1], xc, xc, grad_s, grad_t, xc, c, plan.chunks, 1,
                                   1.0, BN=False, HAS_W=False, ACC=_tl_acc(x.dtype), **fmeta)
    return grad_x, grad_z, grad_s, grad_t
