"""Triton backward kernels of the fused convolution ``conv2d_act`` (issue 10), and their launchers.

Forward being differentiated (per input channel ``s``, ``t``; either may be None = identity)::

    a = relu(x * s + t) if in_relu else x * s + t          # prologue, computed in fp32 (fp64)
    y = act(conv2d(pad0(a), W, bias, stride, padding, dilation, groups) (+ residual))

The zero padding is applied to ``a`` (after the transform). The caller (the op's autograd)
applies the output activation's mask and takes the residual's gradient; these launchers
get ``grad_out`` = dL/d(conv output) and return:

* :func:`conv2d_act_dgrad` -> ``(grad_x, grad_in_scale, grad_in_shift)``: one implicit-GEMM
  kernel computes ``da = conv_transpose(grad_out, W)`` per tile, masks it with the prologue
  ReLU (recomputed from ``x * s + t > 0``; nothing is stored by the forward), stores
  ``grad_x = da * s`` and, in the same epilogue, per-tile column partials of ``sum(da * x)``
  and ``sum(da)``, which the fixed-order ``_bwd_finalize`` of ``_kernels`` combines.
* :func:`conv2d_act_wgrad` -> ``(grad_weight, grad_bias)``: an implicit GEMM over the
  N*P*Q output positions that recomputes ``a`` from ``x`` as it loads (padding taps are
  zero after the transform), optionally split along N*P*Q into fixed partial buffers
  summed in a fixed order; ``grad_bias = sum(grad_out)`` rides along in the programs of
  tap (0, 0) and channel block 0.

Layout: both kernels work on NHWC-dense tensors (``x`` and ``grad_out`` are made
channels_last by the launchers if they are not: a copy for NCHW inputs). The weight
``[K, C/groups, R, S]`` is re-laid out as ``[groups, R, S, K/groups, C/groups]`` for the
data gradient (a small copy). Element offsets of activations are int64.

Data gradient and stride: input positions are split into ``stride_h * stride_w``
phases (h % stride_h, w % stride_w). All positions of a phase receive gradient from
the same taps (r, s) -- those with (h + pad_h - r * dil_h) divisible by stride_h, an
arithmetic progression each program finds in a short scalar loop -- so a program owns
a tile of one phase
and loops over its valid taps only, with exact divisions: no masked-out taps, no
atomics. Phases without taps (e.g. the odd positions of a 1x1 stride-2 conv) just
store zeros.

Accumulation: fp32 for fp32/bf16/fp16 (fp32 dots in IEEE precision, never TF32), fp64
for fp64. Reductions are deterministic (fixed tile shapes, fixed combine order).

Tuning: on CUDA (bf16/fp16/fp32) the kernels are autotuned over a few tilings in the
style of Triton's matmul tutorial and inductor's conv template (Ampere/Hopper
friendly: 64-256 wide tiles, 3-4 stages); fp64 and the interpreter (TRITON_INTERPRET=1)
use one fixed small tiling from ``CONFIG`` (tests shrink it to walk multi-tile paths).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from . import _kernels as K
from ._launch import (_INTERPRETED, MAX_GRID_1, _acc, _cdiv, _device_ctx, _finalize_meta, _p2, _rne, _tl_acc, concrete,
                      launch, untimed_reason)

Tensor = torch.Tensor
IntPair = Union[int, Sequence[int]]
_LOW = (torch.bfloat16, torch.float16)

# Fixed tilings (interpreter, fp64, and CUDA when autotuning is switched off with
# FASTRES_CONV_BWD_AUTOTUNE=0). wgrad_rows: fewest output positions a wgrad split
# walks; wgrad_target: programs the split aims for (None: two per SM on CUDA, 1024
# elsewhere); more splits mean a larger fp32 partial buffer to sum afterwards.
CONFIG = {
    "interp": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1),
    "fp64": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=8, num_warps=4, num_stages=2),
    "gpu": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),  # (K 64: wgmma on sm_90)
    "part_unit": None,  # fixed tilings: partial-row unit (divides BLOCK_M; None = BLOCK_M)
    "wgrad_rows": 4096,
    "wgrad_target": None,
    "autotune": True,  # a programmatic switch; FASTRES_CONV_BWD_AUTOTUNE=0 (read at each call) also turns it off
}


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _dgrad_kernel(go_ptr, w_ptr, x_ptr, s_ptr, t_ptr, gx_ptr, ps_dz_ptr, ps_dzx_ptr,
                  N, H, W, C, P, Q, KT, CG, KG, HQ, WQ,
                  R, S, SH, SW, PH, PW, DH, DW, STEP_R, STEP_S,
                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
                  SUMS: tl.constexpr, RNE_BF16: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr,
                  IEEE: tl.constexpr, ACC: tl.constexpr, MIN_BM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """da[n, h, w, c] = sum over taps (r, s) with h = p*SH - PH + r*DH (w likewise) and
    k of the group of grad_out[n, p, q, k] * W[k, c, r, s]; then the prologue's backward.

    Program (pid0, pid1): pid0 = phase * TILES_PH + tile of that phase's N*HQ*WQ
    positions (n, h = ph_h + SH*i, w = ph_w + SW*j), pid1 = group * N_CB + block of the
    group's input channels (TILES_PH, N_CB: tiles per phase / channel blocks per group).
    go: [N*P*Q, KT] NHWC; w: [G, R, S, KG, CG]; x, gx: [N*H*W, C] NHWC.
    A phase's taps: r = r0 + i * STEP_R, i < nr (STEP_R = SH / gcd(SH, DH)), likewise s.
    Partials (SUMS): [phases * cdiv(N*HQ*WQ, MIN_BM), C] buffers, see below.
    """
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    TILES_PH = (N * HQ * WQ + BLOCK_M - 1) // BLOCK_M
    N_CB = (CG + BLOCK_N - 1) // BLOCK_N
    phase = pid0 // TILES_PH
    tile = pid0 - phase * TILES_PH
    g = pid1 // N_CB
    cb = pid1 - g * N_CB
    ph_h = phase // SW
    ph_w = phase - ph_h * SW
    # this phase's taps: r with (ph_h + PH - r*DH) divisible by SH (first r0, count nr)
    # (tensor-typed initial values: R, S == 1 are constexpr-specialised on the GPU, and
    # older Triton versions refuse a constexpr as a loop-carried variable)
    r0 = tl.zeros([], tl.int32) + R
    nr = tl.zeros([], tl.int32)
    for rr in range(0, R):
        hit = ((ph_h + PH - rr * DH) % SH) == 0
        nr += hit.to(tl.int32)
        r0 = tl.minimum(r0, tl.where(hit, rr, R))
    s0 = tl.zeros([], tl.int32) + S
    ns = tl.zeros([], tl.int32)
    for ss in range(0, S):
        hit = ((ph_w + PW - ss * DW) % SW) == 0
        ns += hit.to(tl.int32)
        s0 = tl.minimum(s0, tl.where(hit, ss, S))

    idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    wi = idx % WQ
    tmp = idx // WQ
    hi = tmp % HQ
    n = tmp // HQ
    h = ph_h + hi * SH
    w = ph_w + wi * SW
    row_ok = (n < N) & (h < H) & (w < W)
    n64 = n.to(tl.int64)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < CG
    kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    nkb = (KG + BLOCK_K - 1) // BLOCK_K
    total = nr * ns * nkb
    for it in range(0, total):
        kb = it % nkb
        tap = it // nkb
        jr = tap // ns
        r = r0 + jr * STEP_R
        s = s0 + (tap - jr * ns) * STEP_S
        # exact divisions: the phase makes the numerators multiples of SH / SW
        p = (h + PH - r * DH) // SH
        q = (w + PW - s * DW) // SW
        ok = row_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        ks = kb * BLOCK_K + kk
        k_ok = ks < KG
        go_row = ((n64 * P + p) * Q + q) * KT + g * KG
        a = tl.load(go_ptr + go_row[:, None] + ks[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        w_base = ((g * R + r) * S + s) * KG
        b = tl.load(w_ptr + (w_base + ks)[:, None] * CG + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if not DOT:  # fp64: broadcast-multiply-reduce (a parity dtype; no fp64 tl.dot assumed)
            acc += tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)
        else:  # DOT_F32: interpreter only, its tl.dot mis-multiplies bf16 (fp32 products are exact)
            acc = K._dot_acc(a, b, acc, DOT_F32, IEEE)

    c_glob = g * CG + cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = (((n64 * H + h) * W + w) * C)[:, None] + c_glob[None, :]
    da = acc
    if RELU or SUMS:  # (a phase without taps has da == 0: no need to read x)
        xv = tl.load(x_ptr + offs, mask=mask & (total > 0), other=0.0).to(ACC)
    if HAS_SCALE:
        sc = tl.load(s_ptr + c_glob, mask=col_ok, other=0.0).to(ACC)[None, :]
    if RELU:
        z = xv
        if HAS_SCALE:
            z = z * sc
        if HAS_SHIFT:
            z = z + tl.load(t_ptr + c_glob, mask=col_ok, other=0.0).to(ACC)[None, :]
        da = tl.where(z <= 0, 0.0, da)  # as aten's threshold_backward: a NaN z passes the gradient
    gx = da
    if HAS_SCALE:
        gx = da * sc
    tl.store(gx_ptr + offs, K._out(gx, gx_ptr, RNE_BF16), mask=mask)
    if SUMS:
        # partial rows in units of MIN_BM positions (the smallest BLOCK_M that may run):
        # this tile's sums go to its first unit row, zeros to the others, so every run
        # of every tiling writes every row (autotuning leaves no stale partials)
        da = tl.where(mask, da, 0.0)
        TILES_MIN = (N * HQ * WQ + MIN_BM - 1) // MIN_BM
        RATIO: tl.constexpr = BLOCK_M // MIN_BM
        urow = tile * RATIO
        prow = (phase * TILES_MIN + urow).to(tl.int64) * C + c_glob
        tl.store(ps_dz_ptr + prow, tl.sum(da, 0), mask=col_ok)
        tl.store(ps_dzx_ptr + prow, tl.sum(da * xv, 0), mask=col_ok)
        zero = tl.zeros([BLOCK_N], ACC)
        for j in tl.static_range(1, RATIO):
            zmask = col_ok & (urow + j < TILES_MIN)
            tl.store(ps_dz_ptr + prow + j * C, zero, mask=zmask)
            tl.store(ps_dzx_ptr + prow + j * C, zero, mask=zmask)


@triton.jit
def _wgrad_kernel(go_ptr, x_ptr, s_ptr, t_ptr, gw_ptr, gb_ptr,
                  N, H, W, C, P, Q, KT, CG, KG, M, M_PER,
                  R, S, SH, SW, PH, PW, DH, DW,
                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
                  BIAS: tl.constexpr, RNE_BF16: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr,
                  IEEE: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gW[k, c, r, s] (one split's share) = sum over output positions m = (n, p, q) in
    [split*M_PER, +M_PER) of grad_out[m, k] * a[n, p*SH - PH + r*DH, q*SW - PW + s*DW, c],
    with a recomputed from x (zero outside the image).

    Program (pid0, pid1, pid2): pid0 = (group * N_KB + block of output channels) * N_CB
    + block of input channels, pid1 = tap r*S + s, pid2 = split. gw: [splits, KT, CG, R, S]
    (ACC), gb: [splits, KT] (ACC, written by the tap-0 channel-block-0 programs).
    """
    pid0 = tl.program_id(0)
    rs = tl.program_id(1)
    split = tl.program_id(2)
    N_KB = (KG + BLOCK_K - 1) // BLOCK_K
    N_CB = (CG + BLOCK_N - 1) // BLOCK_N
    gk = pid0 // N_CB
    cb = pid0 - gk * N_CB
    g = gk // N_KB
    kb = gk - g * N_KB
    r = rs // S
    s = rs - r * S
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < KG
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < CG
    c_glob = g * CG + cols
    if HAS_SCALE:
        sc = tl.load(s_ptr + c_glob, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_SHIFT:
        sh = tl.load(t_ptr + c_glob, mask=col_ok, other=0.0).to(ACC)[None, :]
    do_bias = (cb == 0) & (rs == 0)

    m0 = split * M_PER
    m1 = tl.minimum(m0 + M_PER, M)
    acc = tl.zeros([BLOCK_K, BLOCK_N], ACC)
    gb = tl.zeros([BLOCK_K], ACC)
    for mt in range(m0, m1, BLOCK_M):
        m = mt + tl.arange(0, BLOCK_M)
        m_ok = m < m1
        q = m % Q
        tmp = m // Q
        p = tmp % P
        n = tmp // P
        h = p * SH - PH + r * DH
        w = q * SW - PW + s * DW
        in_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        go = tl.load(go_ptr + (m.to(tl.int64) * KT + g * KG)[:, None] + ks[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        amask = in_ok[:, None] & col_ok[None, :]
        xv = tl.load(x_ptr + (((n.to(tl.int64) * H + h) * W + w) * C)[:, None] + c_glob[None, :],
                     mask=amask, other=0.0)
        if HAS_SCALE or HAS_SHIFT or RELU:
            a = xv.to(ACC)
            if HAS_SCALE:
                a = a * sc
            if HAS_SHIFT:
                a = a + sh
            if RELU:
                a = tl.where(a <= 0, 0.0, a)  # torch.relu: NaN stays NaN
            a = K._out(tl.where(amask, a, 0.0), x_ptr, RNE_BF16)  # padding: zero after the transform
        else:
            a = xv
        if BIAS:
            if do_bias:
                gb += tl.sum(go.to(ACC), 0)
        if not DOT:  # fp64 (see _dgrad_kernel)
            acc += tl.sum(go.to(ACC)[:, :, None] * a.to(ACC)[:, None, :], axis=0)
        else:
            acc = K._dot_acc(tl.trans(go), a, acc, DOT_F32, IEEE)

    k_glob = g * KG + ks
    RS = R * S
    out = split.to(tl.int64) * KT * CG * RS + ((k_glob * CG)[:, None] + cols[None, :]) * RS + rs
    tl.store(gw_ptr + out, acc, mask=k_ok[:, None] & col_ok[None, :])
    if BIAS:
        if do_bias:
            tl.store(gb_ptr + split.to(tl.int64) * KT + k_glob, gb, mask=k_ok)


# GPU tilings (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), benchmarked once per problem key
# by triton.autotune. dgrad: BLOCK_M input positions x BLOCK_N input channels, reduction
# steps of BLOCK_K output channels. wgrad: BLOCK_K output x BLOCK_N input channels,
# reduction steps of BLOCK_M output positions. 16-bit: Hopper-size tiles (228 KiB shared
# memory) and Ampere-size ones (<= 128x128, 164 KiB); fp32 (IEEE products) keeps BLOCK_K
# at 32. Tilings that do not fit a device fail to compile there and are skipped by the
# autotuner; tilings far wider than the channel counts are pruned before timing.
_DGRAD_16 = [(128, 128, 64, 3, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 32, 4, 4),
             (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 32, 64, 4, 4),
             (128, 16, 64, 4, 4), (64, 32, 32, 5, 2)]
_WGRAD_16 = [(64, 128, 128, 3, 8), (64, 256, 128, 3, 8), (32, 128, 128, 4, 4), (64, 64, 128, 4, 4),
             (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 64, 4, 4), (64, 16, 64, 4, 4),
             (64, 16, 128, 4, 4), (32, 64, 64, 5, 2)]
_DGRAD_32 = [(64, 64, 32, 3, 4), (128, 64, 32, 3, 4), (64, 128, 32, 3, 4), (128, 128, 32, 3, 8),
             (128, 16, 32, 3, 4), (32, 64, 32, 4, 4)]
_WGRAD_32 = [(32, 64, 64, 3, 4), (32, 128, 64, 3, 4), (32, 64, 128, 3, 4), (32, 128, 128, 3, 8),
             (32, 16, 64, 3, 4), (32, 32, 32, 4, 4)]
MIN_BM_TUNED = 32  # the smallest BLOCK_M of the dgrad lists (partial-row unit)


def _configs(shapes):
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_stages=st, num_warps=wp)
            for bm, bn, bk, st, wp in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop tilings more than one power of two wider than the channels they span."""
    def fits(cf):
        return (cf.kwargs["BLOCK_N"] <= max(16, _p2(named_args["CG"]))
                and cf.kwargs["BLOCK_K"] <= max(16, _p2(named_args["KG"])))
    kept = [cf for cf in configs if fits(cf)]
    return kept or [min(configs, key=lambda cf: (cf.kwargs["BLOCK_N"], cf.kwargs["BLOCK_K"]))]


_TUNED = {}
if not _INTERPRETED:  # pragma: no cover - needs a GPU
    # the flags select different code (and register pressure): part of the tuning key
    _DKEY = ["N", "H", "W", "C", "KT", "CG", "KG", "R", "S", "SH", "SW", "PH", "PW", "DH", "DW",
             "HAS_SCALE", "HAS_SHIFT", "RELU", "SUMS"]
    _WKEY = ["N", "H", "W", "C", "KT", "CG", "KG", "R", "S", "SH", "SW", "PH", "PW", "DH", "DW", "M_PER",
             "HAS_SCALE", "HAS_SHIFT", "RELU", "BIAS"]
    for _name, _shapes, _kern, _key in (("dgrad16", _DGRAD_16, _dgrad_kernel, _DKEY),
                                        ("dgrad32", _DGRAD_32, _dgrad_kernel, _DKEY),
                                        ("wgrad16", _WGRAD_16, _wgrad_kernel, _WKEY),
                                        ("wgrad32", _WGRAD_32, _wgrad_kernel, _WKEY)):
        _TUNED[_name] = triton.autotune(_configs(_shapes), key=_key,
                                        prune_configs_by={"early_config_prune": _prune})(_kern)


def _tuned_kernel(kind: str, dtype: torch.dtype):
    """The autotuned kernel for (kind, dtype), or None: fixed tiling (interpreter, fp64,
    CONFIG['autotune'] off, or FASTRES_CONV_BWD_AUTOTUNE=0 at the time of the call)."""
    if _INTERPRETED or dtype == torch.float64 or not CONFIG["autotune"]:
        return None
    if os.environ.get("FASTRES_CONV_BWD_AUTOTUNE", "1").strip() == "0":
        return None
    return _TUNED[kind + ("32" if dtype == torch.float32 else "16")]


_TUNED_KEYS = set()  # problems the autotuners have timed (their cache holds a tiling for each)


def _note_tuned(key: tuple) -> None:
    if concrete(key):  # (symbolic sizes while tracing: nothing timed)
        _TUNED_KEYS.add(key)


def _tuned_or_fixed(kind: str, dtype: torch.dtype, key: tuple, device: torch.device):
    """(autotuned kernel or None, fixed tiling or None) for this problem; the caller adds
    ``key`` to ``_TUNED_KEYS`` once the autotuned kernel has run outside a capture.

    In a CUDA-graph capture the autotuner may run only for a problem it has already
    timed (timing synchronises the device, which breaks the capture); an untimed
    problem runs the fixed tiling there. Deterministic mode always runs the fixed
    tiling (the tile decides the order of the fp32 partial sums; see
    ``_launch.untimed_reason``)."""
    tuned = _tuned_kernel(kind, dtype)
    if tuned is not None:
        why = untimed_reason(device)
        if why == "deterministic" or (why == "capture" and not (concrete(key) and key in _TUNED_KEYS)):
            tuned = None
    return tuned, (None if tuned is not None else _fixed(dtype))


def _fixed(dtype: torch.dtype) -> dict:
    return dict(CONFIG["interp" if _INTERPRETED else "fp64" if dtype == torch.float64 else "gpu"])


# ----------------------------------------------------------------------------- launchers
def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return v, v
    t = tuple(int(e) for e in v)
    if len(t) == 1:
        return t[0], t[0]
    if len(t) != 2:
        raise ValueError(f"conv2d_act backward: {name} must be an int or a pair, got {v!r}")
    return t


def _geometry(x_shape, w_shape, go_shape, stride, padding, dilation, groups):
    n, c, h, w = x_shape
    k, cg, r, s = w_shape
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if groups < 1 or c != cg * groups or k % groups:
        raise ValueError(f"conv2d_act backward: input channels {c}, weight {tuple(w_shape)} and groups={groups} "
                         "do not match")
    p = (h + 2 * ph - dh * (r - 1) - 1) // sh + 1
    q = (w + 2 * pw - dw * (s - 1) - 1) // sw + 1
    if tuple(go_shape) != (n, k, p, q):
        raise ValueError(f"conv2d_act backward: grad_out has shape {tuple(go_shape)}, expected {(n, k, p, q)}")
    return n, c, h, w, k, cg, r, s, sh, sw, ph, pw, dh, dw, p, q


_SMS = {}


def _sm_count(dev: torch.device) -> int:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _out_fmt(x: Tensor) -> torch.memory_format:
    """The memory format of the returned grad_x (as _launch._fmt): x's if x is dense in
    one, else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _prologue_args(in_scale, in_shift):
    s = None if in_scale is None else in_scale.contiguous()
    t = None if in_shift is None else in_shift.contiguous()
    return s, t


def conv2d_act_dgrad(grad_out: Tensor, weight: Tensor, x: Tensor, in_scale: Optional[Tensor],
                     in_shift: Optional[Tensor], in_relu: bool, stride: IntPair, padding: IntPair,
                     dilation: IntPair, groups: int, need_in_grads: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Data gradient of conv2d_act through its prologue.

    grad_out: [N, K, P, Q], dL/d(conv output) (after the output activation's mask),
    any memory format (made NHWC; it is cast to x's dtype). weight: [K, C/groups, R, S]
    (cast to x's dtype). x: [N, C, H, W], the raw input of the prologue. in_scale,
    in_shift: [C] or None (identity), any float dtype. Returns ``(grad_x, grad_in_scale,
    grad_in_shift)``: grad_x = da * s in x's dtype, channels_last if x is channels_last
    (and not also contiguous) else contiguous, where da = conv_transpose(grad_out, W),
    zeroed where in_relu and x*s+t <= 0; grad_in_scale = sum_{N,H,W} da * x and
    grad_in_shift = sum_{N,H,W} da, [C] in fp32 (fp64 for fp64 x) when need_in_grads,
    else empty [0] tensors. (Meaningful whatever in_scale/in_shift are: with s None,
    grad_in_scale is still sum(da * x).)
    """
    n, c, h, w, k, cg, r, s, sh, sw, ph, pw, dh, dw, p, q = _geometry(
        x.shape, weight.shape, grad_out.shape, stride, padding, dilation, groups)
    kg = k // groups
    acc = _acc(x.dtype)
    fmt = _out_fmt(x)
    dev = x.device
    nsum = c if need_in_grads else 0
    if x.numel() == 0 or grad_out.numel() == 0:
        return (torch.zeros_like(x, memory_format=fmt), torch.zeros((nsum,), dtype=acc, device=dev),
                torch.zeros((nsum,), dtype=acc, device=dev))
    if n * _cdiv(h, sh) * _cdiv(w, sw) >= 2 ** 31 - 2 ** 16:  # positions are int32 in the kernel
        raise ValueError(f"fastres: conv2d_act's data gradient supports N*ceil(H/stride)*ceil(W/stride) < 2^31 "
                         f"input positions per stride phase, got {n * _cdiv(h, sh) * _cdiv(w, sw)}")
    if groups * _cdiv(cg, 16) > MAX_GRID_1:  # grid axis 1: groups x channel blocks (>= 16 wide)
        raise ValueError(f"fastres: conv2d_act's data gradient supports groups * ceil(C/groups / 16) <= "
                         f"{MAX_GRID_1} (a CUDA grid's second axis), got groups={groups}, C/groups={cg}; "
                         f"use FASTRES_CONV=aten for this convolution")
    xc = _nhwc(x)
    go = _nhwc(grad_out.to(x.dtype))
    wt = weight.to(x.dtype).reshape(groups, kg, cg, r, s).permute(0, 3, 4, 1, 2).contiguous()
    sc, shf = _prologue_args(in_scale, in_shift)
    gx = torch.empty_like(xc, memory_format=torch.channels_last)
    step_r, step_s = sh // math.gcd(sh, dh), sw // math.gcd(sw, dw)
    hq, wq = _cdiv(h, sh), _cdiv(w, sw)
    rows_ph = n * hq * wq
    tkey = ("dgrad", dev.index, x.dtype, None if sc is None else sc.dtype, None if shf is None else shf.dtype,
            n, h, w, c, k, cg, kg, r, s, sh, sw, ph, pw, dh, dw, bool(in_relu), bool(need_in_grads))
    tuned, fixed = _tuned_or_fixed("dgrad", x.dtype, tkey, dev)
    min_bm = MIN_BM_TUNED if tuned is not None else CONFIG["part_unit"] or fixed["BLOCK_M"]
    n_part = sh * sw * _cdiv(rows_ph, min_bm)
    part = torch.empty((2, n_part, c), dtype=acc, device=dev) if need_in_grads else None
    grad_s = torch.empty((nsum,), dtype=acc, device=dev)
    grad_t = torch.empty((nsum,), dtype=acc, device=dev)
    d = xc  # dummy pointer for absent operands (never dereferenced)

    def grid(meta):
        return (sh * sw * _cdiv(rows_ph, meta["BLOCK_M"]), groups * _cdiv(cg, meta["BLOCK_N"]))

    with _device_ctx(x):
        args = (go, wt, xc, d if sc is None else sc, d if shf is None else shf, gx,
                d if part is None else part[0], d if part is None else part[1],
                n, h, w, c, p, q, k, cg, kg, hq, wq, r, s, sh, sw, ph, pw, dh, dw, step_r, step_s)
        consts = dict(HAS_SCALE=sc is not None, HAS_SHIFT=shf is not None, RELU=bool(in_relu),
                      SUMS=bool(need_in_grads), RNE_BF16=_rne(x.dtype),
                      DOT=x.dtype != torch.float64, DOT_F32=_INTERPRETED and x.dtype in _LOW,
                      IEEE=x.dtype in (torch.float32, torch.float64), ACC=_tl_acc(x.dtype))
        if tuned is not None:  # pragma: no cover - needs a GPU
            launch(tuned)[grid](*args, **consts, MIN_BM=min_bm)
            _note_tuned(tkey)
        else:
            launch(_dgrad_kernel)[grid(fixed)](*args, **consts, MIN_BM=min_bm, **fixed)
        if need_in_grads:
            fgrid, fmeta = _finalize_meta(c, n_part)
            launch(K._bwd_finalize)[fgrid](part[0], part[1], xc, xc, grad_s, grad_t, xc, c, n_part, 1, 1.0,
                                   BN=False, HAS_W=False, ACC=_tl_acc(x.dtype), **fmeta)
    return gx.contiguous(memory_format=fmt), grad_s, grad_t


def conv2d_act_wgrad(grad_out: Tensor, x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                     in_relu: bool, weight_shape: Sequence[int], stride: IntPair, padding: IntPair,
                     dilation: IntPair, groups: int, need_bias_grad: bool = False) -> Tuple[Tensor, Tensor]:
    """Weight (and bias) gradient of conv2d_act, recomputing the prologue from x.

    grad_out: [N, K, P, Q] as for :func:`conv2d_act_dgrad`; x: [N, C, H, W]; weight_shape:
    (K, C/groups, R, S). Returns ``(grad_weight, grad_bias)``: grad_weight [K, C/groups, R, S]
    contiguous, accumulated and returned in fp32 (fp64 for fp64 x) -- the caller casts to
    the weight's dtype; grad_bias = sum_{N,P,Q} grad_out, [K] in the same dtype when
    need_bias_grad, else an empty [0] tensor.
    """
    n, c, h, w, k, cg, r, s, sh, sw, ph, pw, dh, dw, p, q = _geometry(
        x.shape, tuple(weight_shape), grad_out.shape, stride, padding, dilation, groups)
    kg = k // groups
    acc = _acc(x.dtype)
    dev = x.device
    nb = k if need_bias_grad else 0
    m = n * p * q
    if m == 0 or k == 0 or c == 0:
        return (torch.zeros((k, cg, r, s), dtype=acc, device=dev), torch.zeros((nb,), dtype=acc, device=dev))
    if m >= 2 ** 31 - 2 ** 16:  # output positions are int32 in the kernel
        raise ValueError(f"fastres: conv2d_act's weight gradient supports N*P*Q < 2^31 output positions, got {m}")
    xc = _nhwc(x)
    go = _nhwc(grad_out.to(x.dtype))
    sc, shf = _prologue_args(in_scale, in_shift)
    tkey = ("wgrad", dev.index, x.dtype, None if sc is None else sc.dtype, None if shf is None else shf.dtype,
            n, h, w, c, k, cg, kg, r, s, sh, sw, ph, pw, dh, dw, bool(in_relu), bool(need_bias_grad),
            CONFIG["wgrad_rows"], CONFIG["wgrad_target"])  # (the split, M_PER, follows from these)
    tuned, fixed = _tuned_or_fixed("wgrad", x.dtype, tkey, dev)
    # split the N*P*Q reduction so that the grid has about wgrad_target programs (nominal
    # 128x128 output tiles), each split walking at least wgrad_rows positions
    if tuned is not None:  # pragma: no cover - needs a GPU
        tiles = groups * _cdiv(kg, 128) * _cdiv(cg, 128) * r * s
    else:
        tiles = groups * _cdiv(kg, fixed["BLOCK_K"]) * _cdiv(cg, fixed["BLOCK_N"]) * r * s
    rows = max(1, int(CONFIG["wgrad_rows"]))
    target = CONFIG["wgrad_target"] or (2 * _sm_count(dev) if dev.type == "cuda" else 1024)
    splits = max(1, min(_cdiv(target, tiles), _cdiv(m, rows)))
    gran = 256 if tuned is not None else fixed["BLOCK_M"]  # a multiple of every BLOCK_M that may run
    m_per = _cdiv(_cdiv(m, splits), gran) * gran if splits > 1 else m
    splits = _cdiv(m, m_per)
    buf = torch.empty((splits, k, cg, r, s), dtype=acc, device=dev)
    gbuf = torch.empty((splits, nb), dtype=acc, device=dev)
    d = xc

    def grid(meta):
        return (groups * _cdiv(kg, meta["BLOCK_K"]) * _cdiv(cg, meta["BLOCK_N"]), r * s, splits)

    with _device_ctx(x):
        args = (go, xc, d if sc is None else sc, d if shf is None else shf, buf, gbuf if nb else d,
                n, h, w, c, p, q, k, cg, kg, m, m_per, r, s, sh, sw, ph, pw, dh, dw)
        consts = dict(HAS_SCALE=sc is not None, HAS_SHIFT=shf is not None, RELU=bool(in_relu),
                      BIAS=bool(need_bias_grad), RNE_BF16=_rne(x.dtype),
                      DOT=x.dtype != torch.float64, DOT_F32=_INTERPRETED and x.dtype in _LOW,
                      IEEE=x.dtype in (torch.float32, torch.float64), ACC=_tl_acc(x.dtype))
        if tuned is not None:  # pragma: no cover - needs a GPU
            launch(tuned)[grid](*args, **consts)
            _note_tuned(tkey)
        else:
            launch(_wgrad_kernel)[grid(fixed)](*args, **consts, **fixed)
    if splits == 1:
        return buf[0], gbuf[0]
    return buf.sum(0), gbuf.sum(0)
