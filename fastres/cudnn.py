"""cuDNN fused-convolution graphs (issue 11): availability, pattern choice, fallbacks.

The C++ side (``csrc/cudnn/conv_graph.cpp``, built where the cuDNN headers were found,
``fastres._C.WITH_CUDNN``) provides two ops:

* ``fastres::cudnn_conv_bias_act(x, w, bias, residual, stride, padding, dilation,
  groups, relu) -> y``: conv_fprop -> [+ bias] -> [+ residual] -> [ReLU] in one cuDNN
  graph (inference, the folded conv-BN);
* ``fastres::cudnn_conv_act_stats(x, w, scale, shift, stride, padding, dilation,
  groups, in_relu) -> (y, sum, sumsq)``: [x*scale + shift -> ReLU] -> conv_fprop -> y,
  with the per-output-channel sum and sum of squares of y in fp32 ("genstats"; the
  training forward of a conv whose input is the previous BatchNorm + ReLU).

and two training-backward ops:

* ``fastres::cudnn_dgrad_drelu_dbn(dy, w, x, scale, shift, stride, padding, dilation,
  groups) -> (dv, dscale, dshift)``: ``dv = relu_bwd(conv_dgrad(dy, w), x*scale + shift)``
  with ``dscale = Σ dv·x`` and ``dshift = Σ dv`` (fp32) — cuDNN's dgrad + dReLU +
  BN-backward-weight pattern (DgradDreluBNBwdWeight) with the BN in folded form;
* ``fastres::cudnn_wgrad_scale_shift_relu(dy, x, scale, shift, weight_size, stride,
  padding, dilation, groups, in_relu) -> dw``: the weight gradient with the input's
  scale/shift/ReLU recomputed as x is loaded (scale-bias-relu-wgrad, ConvBNwgrad).

This module registers their fake kernels and the autograd of the forward ops, decides
per call which graph pattern applies (:func:`pattern_for`, :func:`backward_pattern_for`)
and falls back where none does — the forward to the aten composition, each backward
part to aten's ``convolution_backward`` (cuDNN's unfused dgrad/wgrad) plus the existing
fused elementwise kernels (``affine_act`` / ``affine_act_backward``) — or where cuDNN
refuses a graph before its plan first ran (remembered per graph key with the reason, one
warning; docs/DESIGN.md "Failures").
:func:`family_backward` is the backward of the ``cudnn`` conv family
(``FASTRES_CONV=cudnn``), :func:`prologue_conv_backward` the part shared with the raw
op's autograd.

:func:`conv2d_act_forward` has the signature of the ``fwd_impl`` of
``fastres.conv_ops`` (``fastres.functional.conv2d_act``'s families) so that the
``cudnn`` conv backend plugs in as one more family.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import backends
from ._reference import acc_dtype, memory_format_of

Tensor = torch.Tensor

FWD_PATTERNS = ("conv_bias_add_relu", "conv_genstats", "scale_shift_relu_conv_genstats")
BWD_PATTERNS = ("dgrad_drelu_dbn", "scale_shift_relu_wgrad")
PATTERNS = FWD_PATTERNS + BWD_PATTERNS
# cuDNN versions that introduced the backward patterns (cudnn-frontend's samples gate them so)
MIN_CUDNN = {"dgrad_drelu_dbn": 90800, "scale_shift_relu_wgrad": 8800}
FALLBACK = "aten"
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}
NO_ENGINE = "fastres cudnn: no engine supports this graph"  # csrc/cudnn/conv_graph.cpp's message
NOT_IN_CAPTURE = "fastres cudnn: no plan is built during CUDA graph capture"  # (its kNotInCapture)

# bf16 dgrad goes to the fallback up front: cuDNN documents the fused dgrad + dReLU +
# dBN-weight pattern (DgradDreluBNBwdWeight) with fp16 I/O only (cudnn-frontend's sample
# "Dgrad Drelu DBNweight" is fp16; no bf16 variant is documented), and the deviceless
# check (fastres_cudnn::graph_check, cuDNN 9.24) finds no pre-compiled engine for the bf16
# graph on sm_80 or sm_90 while it finds one for fp16 (docs/DESIGN.md).
BF16_DGRAD_WHY = ("bf16 dgrad_drelu_dbn is not in cuDNN's documented support (DgradDreluBNBwdWeight: fp16 I/O); "
                  "the deviceless check finds no pre-compiled sm_80/sm_90 engine for it")
# The I/O dtypes cuDNN documents per fused pattern (fastres asks for these; anything else
# is the fallback up front or, for the inference graph, cuDNN's decision at run time).
DOCUMENTED_DTYPES = {
    "conv_bias_add_relu": ("fp16", "bf16", "fp32"),
    "conv_genstats": ("fp16", "bf16"),
    "scale_shift_relu_conv_genstats": ("fp16", "bf16"),
    "dgrad_drelu_dbn": ("fp16",),
    "scale_shift_relu_wgrad": ("fp16", "bf16"),
}

_lock = threading.Lock()
_no_engine: dict = {}  # key -> message; graphs cuDNN found no engine for (fall back)
_warned: set = set()


# ----------------------------------------------------------------------------- availability
_BUILT: dict = {}


def built() -> Tuple[bool, str]:
    """Was ``fastres._C`` built with the cuDNN graphs? (ok, reason); probed once
    (:func:`backends.remembered`)."""
    return backends.remembered(_BUILT, "built", _probe_built)


def _probe_built() -> Tuple[bool, str]:
    loaded, has_cuda, msg = backends._C_status()
    if not loaded:
        return False, msg
    from . import _C
    if not bool(getattr(_C, "WITH_CUDNN", False)):
        why = "without CUDA kernels" if not has_cuda else "without cuDNN headers (see the build log)"
        return False, f"fastres._C was built {why}"
    return True, "fastres._C built with the cuDNN fused-conv graphs"


def available(device_type: str) -> Tuple[bool, str]:
    """Can the cuDNN graphs run on ``device_type``? (ok, reason)."""
    if device_type != "cuda":
        return False, f"the cuDNN graphs run on CUDA devices only, not {device_type}"
    ok, msg = built()
    if not ok:
        return False, msg
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not torch.backends.cudnn.is_available():
        return False, "torch reports cuDNN unavailable"
    if not torch.backends.cudnn.enabled:
        return False, "torch.backends.cudnn.enabled is False"
    return True, f"{msg}, cuDNN {torch.backends.cudnn.version()}"


def pattern_for(dtype: torch.dtype, in_channels: int, out_channels: int, groups: int, *, prologue: bool,
                residual: bool, bias: bool, relu: bool, stats: bool,
                capability: Optional[Tuple[int, int]]) -> Tuple[Optional[str], str]:
    """The cuDNN graph pattern for one conv2d_act call, or (None, why) for the aten
    fallback. The table is docs/DESIGN.md's "cuDNN graph patterns" section."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None, f"cuDNN's fusion engines have no {dtype}"
    if not stats:
        if prologue:
            return None, "no cuDNN inference pattern with an input prologue (scale/shift/ReLU before the conv)"
        return "conv_bias_add_relu", "conv_fprop -> add residual -> bias -> ReLU (ConvBiasAct engines)"
    # training forward: the ConvBNfprop family (specialised runtime fusion engine)
    if dtype == torch.float32:
        return None, "the ConvBNfprop/genstats engines take fp16/bf16 only"
    if capability is None or capability[0] not in (8, 9):
        return None, f"the ConvBNfprop/genstats engines are for sm_80/sm_90 (Ampere/Hopper), not {capability}"
    if groups != 1:
        return None, "the ConvBNfprop/genstats engines have no grouped convolution"
    if in_channels % 8 or out_channels % 8:
        return None, (f"the ConvBNfprop/genstats engines need channel counts that are multiples of 8, "
                      f"got C={in_channels}, K={out_channels}")
    if residual or bias or relu:
        return None, "no genstats pattern with a bias, residual or ReLU after the conv"
    if prologue:
        return "scale_shift_relu_conv_genstats", "scale -> shift -> ReLU -> conv_fprop -> genstats (ConvBNfprop)"
    return "conv_genstats", "conv_fprop -> genstats (ConvBNfprop without its prologue)"


def backward_pattern_for(part: str, dtype: torch.dtype, in_channels: int, out_channels: int, groups: int, *,
                         scale: bool, shift: bool, in_relu: bool, capability: Optional[Tuple[int, int]],
                         cudnn_version: Optional[int]) -> Tuple[Optional[str], str]:
    """The cuDNN graph for the ``part`` (``"dgrad"`` or ``"wgrad"``) of a conv2d_act's
    backward, or (None, why): then aten's ``convolution_backward`` + the fused elementwise
    kernels. The table is docs/DESIGN.md's "cuDNN graph patterns" section."""
    if part not in ("dgrad", "wgrad"):
        raise ValueError(f"fastres: part must be 'dgrad' or 'wgrad', got {part!r}")
    pattern = "dgrad_drelu_dbn" if part == "dgrad" else "scale_shift_relu_wgrad"
    if not (scale and shift and in_relu):
        return None, ("no input prologue (scale, shift and ReLU): cuDNN's own "
                      f"{part} (aten.convolution_backward) is the whole work")
    if dtype not in (torch.float16, torch.bfloat16):
        return None, f"the {pattern} engines take fp16/bf16 only, not {dtype}"
    if part == "dgrad" and dtype == torch.bfloat16:
        return None, BF16_DGRAD_WHY
    if capability is None or capability[0] not in (8, 9):
        return None, f"the {pattern} engines are for sm_80/sm_90 (Ampere/Hopper), not {capability}"
    if groups != 1:
        return None, f"the {pattern} engines have no grouped convolution"
    if in_channels % 8 or out_channels % 8:
        return None, (f"the {pattern} engines need channel counts that are multiples of 8, "
                      f"got C={in_channels}, K={out_channels}")
    need = MIN_CUDNN[pattern]
    if cudnn_version is None or cudnn_version < need:
        return None, f"the {pattern} pattern needs cuDNN >= {need}, found {cudnn_version}"
    if part == "dgrad":
        return pattern, "conv_dgrad -> dReLU (x*scale + shift recomputed) -> BN-backward weights (Σdv·x, Σdv)"
    return pattern, "x -> scale -> shift -> ReLU (recomputed) -> conv_wgrad (ConvBNwgrad)"


def info(device_type: str) -> dict:
    """For :func:`fastres.backend_info`: availability, the patterns and their fallback."""
    ok, why = available(device_type)
    cap = _capability(None) if ok else None  # the current device
    b_ok, b_why = built()
    return {
        "built": b_ok,
        "available": ok,
        "reason": why if ok else (why if b_ok else b_why),
        "capability": cap,
        "patterns": list(PATTERNS) if ok else [],
        # per 16-bit dtype on this device: each backward part's graph, or why its fallback runs
        "backward": ({DTYPE_NAME[dt]: {part: (lambda p: p[0] or f"fallback: {p[1]}")(backward_pattern_for(
            part, dt, 64, 64, 1, scale=True, shift=True, in_relu=True, capability=cap,
            cudnn_version=_cudnn_version())) for part in ("dgrad", "wgrad")} for dt in (torch.bfloat16, torch.float16)}
            if ok else {}),
        "fallback": FALLBACK,
        "documented_dtypes": {k: list(v) for k, v in DOCUMENTED_DTYPES.items()},
        "bf16_dgrad": f"fallback: {BF16_DGRAD_WHY}",
        # the graphs cuDNN refused so far: "pattern dtype x-shape operands: reason"
        "no_engine": sorted(f"{k[0]} {DTYPE_NAME.get(k[2], str(k[2]))} x{k[3]} {list(k[1])}: {v}"
                            for k, v in list(_no_engine.items())),
    }


# ----------------------------------------------------------------------------- fakes + autograd
def _out_hw(x: Tensor, w: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    h, wd = x.shape[-2:]
    r, s = w.shape[-2:]
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (wd + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _fake_bias_act(x, w, bias, residual, stride, padding, dilation, groups, relu):
    p, q = _out_hw(x, w, stride, padding, dilation)
    return x.new_empty((x.shape[0], w.shape[0], p, q)).contiguous(memory_format=memory_format_of(x))


def _fake_act_stats(x, w, scale, shift, stride, padding, dilation, groups, in_relu):
    y = _fake_bias_act(x, w, None, None, stride, padding, dilation, groups, False)
    k = w.shape[0]
    return y, x.new_empty((k,), dtype=torch.float32), x.new_empty((k,), dtype=torch.float32)


def _fake_dgrad_drelu_dbn(dy, w, x, scale, shift, stride, padding, dilation, groups):
    c = x.shape[1]
    dv = x.new_empty(x.shape).contiguous(memory_format=memory_format_of(x))
    return dv, x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


def _fake_wgrad(dy, x, scale, shift, weight_size, stride, padding, dilation, groups, in_relu):
    return x.new_empty(list(weight_size))


def _bc(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _prologue(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], in_relu: bool):
    """(u, pre-activation v or None): u = relu(x*scale + shift) in acc, rounded to x's dtype."""
    if scale is None and shift is None and not in_relu:
        return x, None
    acc = acc_dtype(x.dtype)
    v = x.to(acc)
    if scale is not None:
        v = v * _bc(scale.to(acc))
    if shift is not None:
        v = v + _bc(shift.to(acc))
    u = v.clamp_min(0) if in_relu else v
    return u.to(x.dtype), v


def _conv_bwd(dz: Tensor, u: Tensor, w: Tensor, stride, padding, dilation, groups, need_u: bool, need_w: bool):
    fmt = memory_format_of(u)
    gu, gw, _ = torch.ops.aten.convolution_backward(
        dz.contiguous(memory_format=fmt), u, w, None, list(stride), list(padding), list(dilation), False, [0, 0],
        groups, [need_u, need_w, False])
    return gu, gw


def _setup_bias_act(ctx, inputs, output):
    x, w, bias, residual, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(x, w, output if relu else None)
    ctx.conf = (list(stride), list(padding), list(dilation), int(groups), bool(relu))
    ctx.bias_dtype = None if bias is None else bias.dtype


def _fused_ops(device: torch.device):
    """The BN+ReLU op family that runs on ``device`` (fastres.ops: cuda/triton/cpp/torch):
    its affine_act / affine_act_backward are the existing fused elementwise kernels used
    around cuDNN's unfused dgrad/wgrad."""
    from . import ops
    return ops.family(backends.backend_for(device))


def _backward_bias_act(ctx, grad_y):
    x, w, y = ctx.saved_tensors
    stride, padding, dilation, groups, relu = ctx.conf
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    gb = gr = None
    if relu or need_b:
        # ReLU mask, grad_residual and grad_bias (= sum of dz) in one fused pass
        ref_y = y if y is not None else grad_y
        dz, gz, _, gshift = _fused_ops(x.device).affine_act_backward(grad_y, ref_y, ref_y, None, relu, need_r, need_b)
        gr = gz if need_r else None
        gb = gshift.to(ctx.bias_dtype) if need_b else None
    else:
        dz = grad_y
        gr = grad_y.contiguous(memory_format=memory_format_of(x)) if need_r else None
    gx = gw = None
    if need_x or need_w:
        gx, gw = _conv_bwd(dz, x, w, stride, padding, dilation, groups, need_x, need_w)
    return gx if need_x else None, gw if need_w else None, gb, gr, None, None, None, None, None


def _setup_act_stats(ctx, inputs, output):
    x, w, scale, shift, stride, padding, dilation, groups, in_relu = inputs
    y = output[0]
    ctx.save_for_backward(x, w, scale, shift, y)
    ctx.conf = (list(stride), list(padding), list(dilation), int(groups), bool(in_relu))
    ctx.dtypes = (None if scale is None else scale.dtype, None if shift is None else shift.dtype)


def _backward_act_stats(ctx, grad_y, grad_sum, grad_sumsq):
    x, w, scale, shift, y = ctx.saved_tensors
    stride, padding, dilation, groups, in_relu = ctx.conf
    acc = acc_dtype(x.dtype)
    # d/dy of sum = 1, of sumsq = 2y: one fp32 pass, rounded once
    dz = torch.zeros_like(y, dtype=acc) if grad_y is None else grad_y.to(acc)
    if grad_sum is not None:
        dz = dz + _bc(grad_sum.to(acc))
    if grad_sumsq is not None:
        dz = dz + 2.0 * y.to(acc) * _bc(grad_sumsq.to(acc))
    dz = dz.to(x.dtype)
    need_x, need_w, need_s, need_t = ctx.needs_input_grad[:4]
    gx, gw, gs, gt = prologue_conv_backward(dz, x, w, scale, shift, in_relu, stride, padding, dilation, groups,
                                            (need_x, need_w, need_s, need_t))
    gs = gs.to(ctx.dtypes[0]) if gs is not None else None
    gt = gt.to(ctx.dtypes[1]) if gt is not None else None
    return gx, gw, gs, gt, None, None, None, None, None


def choose_backward(part: str, x: Tensor, weight: Tensor, in_scale, in_shift, in_relu: bool, stride, padding,
                    dilation, groups: int) -> Tuple[Optional[str], str]:
    """(pattern or None, why) for the ``part`` (dgrad/wgrad) of this call's backward on its
    device, including availability and graphs cuDNN found no engine for earlier."""
    ok, why = available(x.device.type)
    if not ok:
        return None, why
    if x.numel() == 0:
        return None, "empty input (no kernel to run)"
    pattern, why = backward_pattern_for(part, x.dtype, x.shape[1], weight.shape[0], groups,
                                        scale=in_scale is not None, shift=in_shift is not None, in_relu=in_relu,
                                        capability=_capability(x.device), cudnn_version=_cudnn_version())
    if pattern is not None:
        refused = _no_engine.get(_key(x, weight, stride, padding, dilation, groups, pattern,
                                      _bwd_operands(in_scale, in_shift, in_relu)))
        if refused is not None:
            return None, f"cuDNN refused this graph earlier: {refused}"
    return pattern, why


def _cudnn_version() -> Optional[int]:
    return torch.backends.cudnn.version()


def _run_bwd_graph(pattern: str, dz, x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
    """One call of the C++ backward op for ``pattern``."""
    if pattern == "dgrad_drelu_dbn":
        return torch.ops.fastres.cudnn_dgrad_drelu_dbn(dz, weight, x, in_scale, in_shift, list(stride),
                                                       list(padding), list(dilation), groups)
    return torch.ops.fastres.cudnn_wgrad_scale_shift_relu(dz, x, in_scale, in_shift, list(weight.shape),
                                                          list(stride), list(padding), list(dilation), groups,
                                                          in_relu)


def prologue_conv_backward(dz: Tensor, x: Tensor, w: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                           in_relu: bool, stride, padding, dilation, groups: int, need) -> Tuple[Optional[Tensor], ...]:
    """(grad_x, grad_w, grad_scale, grad_shift) of ``conv2d(in_act(x*scale + shift), w)``
    given dz = dL/d(conv output); None where not needed (grad_scale/grad_shift in acc).

    dgrad: the ``dgrad_drelu_dbn`` graph where :func:`choose_backward` picks it (then
    grad_x = dv·scale by the fused ``affine_act`` kernel); wgrad: the
    ``scale_shift_relu_wgrad`` graph likewise. Each part falls back on its own to aten's
    ``convolution_backward`` on the prologue output u (recomputed by the fused
    ``affine_act`` kernel, never stored) + the fused ``affine_act_backward`` (ReLU mask,
    ·scale, Σdv·x, Σdv in one pass)."""
    need_x, need_w, need_s, need_t = (bool(b) for b in need)
    need_s = need_s and scale is not None
    need_t = need_t and shift is not None
    need_u = need_x or need_s or need_t
    conf = (stride, padding, dilation, groups)
    fmt = memory_format_of(x)
    prologue = scale is not None or shift is not None or in_relu
    gx = gw = gs = gt = None
    dgrad = choose_backward("dgrad", x, w, scale, shift, in_relu, *conf)[0] if need_u else None
    wgrad = choose_backward("wgrad", x, w, scale, shift, in_relu, *conf)[0] if need_w else None
    if dgrad is not None and register():
        out = _try_graph(dgrad, x, w, conf, lambda: _run_bwd_graph(dgrad, dz, x, w, scale, shift, in_relu, *conf),
                         _bwd_operands(scale, shift, in_relu))
        if out is not None:
            dv, ds, dt = out
            gx = _fused_ops(x.device).affine_act(dv, scale, None, None, False) if need_x else None
            gs, gt = (ds if need_s else None), (dt if need_t else None)
            need_u = False
    if wgrad is not None and register():
        out = _try_graph(wgrad, x, w, conf, lambda: _run_bwd_graph(wgrad, dz, x, w, scale, shift, in_relu, *conf),
                         _bwd_operands(scale, shift, in_relu))
        if out is not None:
            gw = out.to(w.dtype).contiguous()
            need_w = False
    if need_u or need_w:  # the fallback of the part(s) left
        fam = _fused_ops(x.device) if prologue else None
        u = fam.affine_act(x, scale, shift, None, in_relu) if prologue else x
        gu, gw_ = _conv_bwd(dz, u, w, stride, padding, dilation, groups, need_u, need_w)
        if need_w:
            gw = gw_
        if need_u:
            if prologue:
                gx, _, gs_, gt_ = fam.affine_act_backward(gu, x, u, scale, in_relu, False, need_s or need_t)
                gs, gt = (gs_ if need_s else None), (gt_ if need_t else None)
            else:
                gx = gu
    if gx is not None:
        gx = gx.contiguous(memory_format=fmt) if need_x else None
    return gx, gw, gs, gt


def family_backward(grad_conv_out: Callable) -> Callable:
    """The ``bwd_impl`` of the ``cudnn`` conv family (``fastres::cudnn_conv2d_act_backward``,
    the schema of ``fastres.conv_ops``): ``grad_conv_out`` (conv_ops' statistics-gradient
    + output-ReLU-mask pass) gives dz; grad_residual = dz, grad_bias = Σdz; then
    :func:`prologue_conv_backward` (the fused dgrad/wgrad graphs or their fallback)."""
    def bwd(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride, padding, dilation, groups,
            in_relu, relu, need):
        need_x, need_w, need_b, need_s, need_t, need_r = (bool(b) for b in need)
        acc = acc_dtype(x.dtype)
        dz = grad_conv_out(grad_y, grad_mean, grad_var, x, y, mean, relu)
        gx, gw, gs, gt = prologue_conv_backward(dz, x, weight, in_scale, in_shift, in_relu, stride, padding,
                                                dilation, groups, (need_x, need_w, need_s, need_t))
        empty_acc = x.new_empty((0,), dtype=acc)
        return (x.new_empty((0,)) if gx is None else gx,
                weight.new_empty((0,)) if gw is None else gw,
                dz.to(acc).sum(dim=(0, 2, 3)) if need_b else empty_acc,
                empty_acc if gs is None else gs.to(acc),
                empty_acc if gt is None else gt.to(acc),
                dz if need_r else x.new_empty((0,)))
    return bwd


_registered = False


def register() -> bool:
    """Register the fake kernels and autograd of the two ops (once; needs fastres._C,
    which defines their schemas on every build). Returns whether the ops exist."""
    global _registered
    if _registered:
        return True
    with _lock:
        if _registered:
            return True
        ops = ("cudnn_conv_bias_act", "cudnn_conv_act_stats", "cudnn_dgrad_drelu_dbn", "cudnn_wgrad_scale_shift_relu")
        if not backends._C_status()[0] or not all(hasattr(torch.ops.fastres, o) for o in ops):
            return False
        torch.library.register_fake("fastres::cudnn_conv_bias_act")(_fake_bias_act)
        torch.library.register_fake("fastres::cudnn_conv_act_stats")(_fake_act_stats)
        torch.library.register_fake("fastres::cudnn_dgrad_drelu_dbn")(_fake_dgrad_drelu_dbn)
        torch.library.register_fake("fastres::cudnn_wgrad_scale_shift_relu")(_fake_wgrad)
        torch.library.register_autograd("fastres::cudnn_conv_bias_act", _backward_bias_act,
                                        setup_context=_setup_bias_act)
        torch.library.register_autograd("fastres::cudnn_conv_act_stats", _backward_act_stats,
                                        setup_context=_setup_act_stats)
        _registered = True
        return True


# ----------------------------------------------------------------------------- forward (family impl)
def reference_forward(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu,
                      relu, stats):
    """The aten composition with conv2d_act's semantics (fastres.conv_ops'); used as the
    fallback when no ``fallback`` is given to :func:`conv2d_act_forward`."""
    acc = acc_dtype(x.dtype)
    u, _ = _prologue(x, in_scale, in_shift, in_relu)
    z = F.conv2d(u, weight, None, stride, padding, dilation, groups).to(acc)
    if bias is not None:
        z = z + _bc(bias.to(acc))
    if residual is not None:
        z = z + residual.to(acc)
    if relu:
        z = z.clamp_min(0)
    y = z.to(x.dtype).contiguous(memory_format=memory_format_of(x))
    if not stats:
        e = x.new_empty((0,), dtype=acc)
        return y, e, e.clone()
    yf = y.to(acc)
    mean = yf.mean(dim=(0, 2, 3))
    var = (yf - _bc(mean)).square().mean(dim=(0, 2, 3))
    return y, mean, var


def _modes(dtype: torch.dtype) -> Tuple[bool, bool]:
    """(deterministic, tf32) as the C++ side reads them: they choose which engines are
    acceptable (csrc/cudnn/conv_graph.cpp, engine_rejection), so they are part of a key."""
    det = bool(torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic)
    tf32 = bool(torch.backends.cudnn.allow_tf32) if dtype == torch.float32 else True
    return det, tf32


def _key(x, weight, stride, padding, dilation, groups, pattern, operands=()):
    """The identity of one cuDNN graph for the refused-graph memory: the pattern, which
    optional operands are present (``operands``: names, e.g. ("bias", "relu")), dtype,
    shapes, conv parameters, device and the engine filters (deterministic, TF32). Strides
    are not part of it: the C++ side makes every operand dense channels_last first."""
    return (pattern, tuple(sorted(operands)), x.dtype, tuple(x.shape), tuple(weight.shape), tuple(stride),
            tuple(padding), tuple(dilation), groups, x.device.index) + _modes(x.dtype)


def _fwd_operands(bias, in_scale, in_shift, residual, in_relu, relu) -> Tuple[str, ...]:
    named = (("bias", bias is not None), ("scale", in_scale is not None), ("shift", in_shift is not None),
             ("residual", residual is not None), ("in_relu", bool(in_relu)), ("relu", bool(relu)))
    return tuple(n for n, on in named if on)


def _bwd_operands(scale, shift, in_relu) -> Tuple[str, ...]:
    return _fwd_operands(None, scale, shift, None, in_relu, False)


def choose(x: Tensor, weight: Tensor, bias, in_scale, in_shift, residual, stride, padding, dilation, groups,
           in_relu: bool, relu: bool, stats: bool) -> Tuple[Optional[str], str]:
    """(pattern or None, why) for this call on its device, including availability and
    graphs cuDNN found no engine for earlier."""
    ok, why = available(x.device.type)
    if not ok:
        return None, why
    if x.numel() == 0:
        return None, "empty input (no kernel to run)"
    cap = _capability(x.device)
    pattern, why = pattern_for(x.dtype, x.shape[1], weight.shape[0], groups,
                               prologue=in_scale is not None or in_shift is not None or in_relu,
                               residual=residual is not None, bias=bias is not None, relu=relu, stats=stats,
                               capability=cap)
    if pattern is not None:
        refused = _no_engine.get(_key(x, weight, stride, padding, dilation, groups, pattern,
                                      _fwd_operands(bias, in_scale, in_shift, residual, in_relu, relu)))
        if refused is not None:
            return None, f"cuDNN refused this graph earlier: {refused}"
    return pattern, why


def _capability(device: Optional[torch.device]) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _run_graph(pattern: str, x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups,
               in_relu, relu):
    """One call of the C++ op for ``pattern``: y, or (y, sum, sumsq)."""
    if pattern == "conv_bias_add_relu":
        return torch.ops.fastres.cudnn_conv_bias_act(x, weight, bias, residual, list(stride), list(padding),
                                                     list(dilation), groups, relu)
    return torch.ops.fastres.cudnn_conv_act_stats(x, weight, in_scale, in_shift, list(stride), list(padding),
                                                  list(dilation), groups, in_relu)


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        if not torch.compiler.is_compiling():
            warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _try_graph(pattern: str, x: Tensor, weight: Tensor, conf, run: Callable, operands=()):
    """``run()``, or None where cuDNN refused the graph before its plan ever ran (the C++
    error starts with :data:`NO_ENGINE` and names the descriptor / attribute / status):
    the key (:func:`_key`, with the ``operands`` present) is remembered with that reason,
    reported by :func:`info`, warned about once, and the caller runs the fallback. A graph
    without a plan yet met inside a CUDA graph capture (:data:`NOT_IN_CAPTURE`) falls back
    for that call only (warned once; nothing remembered). Any other error (a plan that
    fails after having run, out of memory, a CUDA error) propagates."""
    try:
        return run()
    except RuntimeError as e:
        text = str(e)
        if NOT_IN_CAPTURE in text:  # a graph first met inside a capture: fall back this once
            _warn_once(f"fastres: the cuDNN {pattern} graph (x {tuple(x.shape)} {x.dtype}, weight "
                       f"{tuple(weight.shape)}) was first called inside a CUDA graph capture, where no plan is "
                       f"built; the capture records the aten fallback for it (warm the model up before capturing)")
            return None
        if NO_ENGINE not in text:
            raise
    reason = text[text.index(NO_ENGINE) + len(NO_ENGINE):].split("\n")[0].strip().rstrip(";").strip() or "(no details)"
    key = _key(x, weight, *conf, pattern, operands)
    msg = (f"fastres: cuDNN refused the {pattern} graph (x {tuple(x.shape)} {x.dtype}, weight "
           f"{tuple(weight.shape)}, operands {sorted(operands)}): {reason}; using the aten fallback for it")
    with _lock:
        _no_engine[key] = reason
    _warn_once(msg)
    return None


def conv2d_act_forward(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu,
                       relu, stats, fallback: Optional[Callable] = None):
    """``fwd_impl`` of the ``cudnn`` conv family: ``(y, mean, var)`` as
    ``fastres.conv_ops``' families return them (mean/var empty without ``stats``).
    Where no cuDNN pattern applies, ``fallback`` (default :func:`reference_forward`)
    runs instead."""
    fallback = fallback or reference_forward
    args = (x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu, relu,
            stats)
    pattern, _why = choose(*args)
    if pattern is None or not register():
        return fallback(*args)
    acc = acc_dtype(x.dtype)
    out = _try_graph(pattern, x, weight, (stride, padding, dilation, groups), lambda: _run_graph(pattern, *args[:-1]),
                     _fwd_operands(bias, in_scale, in_shift, residual, in_relu, relu))
    if out is None:
        return fallback(*args)
    if pattern == "conv_bias_add_relu":
        e = x.new_empty((0,), dtype=acc)
        return out, e, e.clone()
    y, s, sq = out
    m = y.shape[0] * y.shape[2] * y.shape[3]
    mean = s / m
    # genstats gives sum and sum of squares (fp32); the biased variance follows
    var = (sq / m - mean.square()).clamp_min(0)
    return y, mean, var


def family_forward(fallback: Callable) -> Callable:
    """The ``fwd_impl`` of the ``cudnn`` conv family (``fastres.conv_ops.family("cudnn")``,
    ``FASTRES_CONV=cudnn``): this module's graphs where a pattern applies, ``fallback``
    (the aten family's forward, ``conv_ops.conv2d_act_reference``) elsewhere."""
    def fwd(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu, relu,
            stats):
        return conv2d_act_forward(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups,
                                  in_relu, relu, stats, fallback=fallback)
    return fwd


def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                  stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, relu: bool = True) -> Tensor:
    """Inference helper: ``relu(conv2d(x, weight) + bias + residual)`` through the cuDNN
    graph where one applies, else the aten composition (differentiable either way)."""
    stride, padding, dilation = (list(v) if isinstance(v, (tuple, list)) else [v, v]
                                 for v in (stride, padding, dilation))
    return conv2d_act_forward(x, weight, bias, None, None, residual, stride, padding, dilation, groups, False,
                              relu, False)[0]


def conv_act_stats(x: Tensor, weight: Tensor, in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
                   stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                   in_relu: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward helper: ``(y, mean, var)`` of ``conv2d(relu(x*in_scale + in_shift))``
    (biased var of y per output channel), through the cuDNN genstats graph where one applies."""
    stride, padding, dilation = (list(v) if isinstance(v, (tuple, list)) else [v, v]
                                 for v in (stride, padding, dilation))
    return conv2d_act_forward(x, weight, None, in_scale, in_shift, None, stride, padding, dilation, groups, in_relu,
                              False, True)


# ----------------------------------------------------------------------------- deviceless check
# cuDNN's device-property JSON (CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION, cuDNN >= 9.8)
# for the targets fastres is checked against, written by hand: these are the fields cuDNN
# 9.24 reads (its finalize errors name each missing one, 'convert_child_from_json(...,
# "<field>", ...)' in the CUDNN_LOGLEVEL_DBG=2 log); the values are the public
# specifications of an H200 SXM (sm_90) and an A100 SXM4 80GB (sm_80). deviceVer is
# major*100 + minor*10, smCountOrigin 0 = the full device. Unverified until a GPU run
# compares them with the real device's serialization (test_device_props_match_the_gpu).
_SM90 = {
    "maxGridSize": [2147483647, 65535, 65535], "maxBlockSize": [1024, 1024, 64], "regsPerBlock": 65536,
    "multiProcessorCount": 132, "smCountOrigin": 0, "warpSize": 32, "maxSharedMemoryPerBlock": 49152,
    "maxSharedMemoryPerBlockOptin": 232448, "reservedSharedMemoryPerBlock": 1024, "maxRegistersPerSM": 65536,
    "maxCtasPerSM": 32, "maxThreadsPerBlock": 1024, "maxThreadsPerSM": 2048, "pciDeviceId": 0x2335,
    "isTccDriver": 0, "supportCoopLaunch": 1, "smClockRateKHz": 1980000, "memClockRateKHz": 3201000,
    "l2CacheSize": 52428800, "deviceName": "NVIDIA H200", "totalGlobalMem": 150754820096, "cudaDeviceId": 0,
    "deviceVer": 900, "driverVer": 13000,
}
_SM80 = dict(_SM90, multiProcessorCount=108, maxSharedMemoryPerBlockOptin=166912, l2CacheSize=41943040,
             pciDeviceId=0x20B2, smClockRateKHz=1410000, memClockRateKHz=1593000, deviceName="NVIDIA A100-SXM4-80GB",
             totalGlobalMem=85198045184, deviceVer=800)
DEVICE_PROPS = {"sm_90": _SM90, "sm_80": _SM80}

# The graphs fastres builds (pattern, optional operands): eval blocks (conv + bias + ReLU,
# the projection's conv + bias, the last conv + bias + residual + ReLU), training forward
# (the first conv's plain genstats, the later convs' BN+ReLU prologue) and backward.
CHECKED_GRAPHS = (
    ("conv_bias_add_relu", ("bias", "relu")),
    ("conv_bias_add_relu", ("bias",)),
    ("conv_bias_add_relu", ("bias", "residual", "relu")),
    ("conv_genstats", ()),
    ("scale_shift_relu_conv_genstats", ("scale", "shift", "in_relu")),
    ("dgrad_drelu_dbn", ("scale", "shift", "in_relu")),
    ("scale_shift_relu_wgrad", ("scale", "shift", "in_relu")),
)
DTYPE_STR = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def deviceless_available() -> Tuple[bool, str]:
    """Can :func:`graph_check` run here (no GPU needed)? (ok, the exact reason if not)."""
    ok, why = built()
    if not ok:
        return False, why
    if not hasattr(torch.ops, "fastres_cudnn") or not hasattr(torch.ops.fastres_cudnn, "graph_check"):
        return False, "fastres._C has no fastres_cudnn::graph_check (built before it existed: rebuild)"
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if v is None:
        return False, "torch reports no loadable cuDNN library"
    if v < 90800:
        return False, f"deviceless plans need cuDNN >= 9.8 (CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR), found {v}"
    return True, f"cuDNN {v}"


def graph_check(pattern: str, dtype: torch.dtype, target: str = "sm_90", x_shape=(8, 64, 56, 56),
                w_shape=(64, 64, 3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), operands=(),
                deterministic: bool = False, allow_tf32: bool = True) -> dict:
    """Build the ``pattern`` graph (the C++ builders the ops use) for ``target`` -- a
    :data:`DEVICE_PROPS` description, checked without a GPU, or ``"cuda"``: the present GPU
    as cuDNN describes it -- and ask cuDNN's heuristics for an engine whose plan
    finalizes: ``{ok, detail, configs, plans, runtime_compiled}``. ``detail`` names
    the failing descriptor/attribute and cuDNN's status where ``ok`` is False;
    ``runtime_compiled`` False means cuDNN could not consider its runtime-compiled engines
    here (no CUDA driver library), so ``ok`` False only says no pre-compiled engine fits."""
    ok, why = deviceless_available()
    if not ok:
        raise RuntimeError(f"fastres: the deviceless cuDNN check is unavailable: {why}")
    if target not in DEVICE_PROPS and target != "cuda":
        raise ValueError(f"fastres: target must be one of {sorted(DEVICE_PROPS) + ['cuda']}, got {target!r}")
    if dtype not in DTYPE_STR:
        raise ValueError(f"fastres: dtype must be float32, float16 or bfloat16, got {dtype}")
    import json
    if target == "cuda":  # the present GPU, described by cuDNN itself
        if not torch.cuda.is_available():
            raise RuntimeError("fastres: graph_check target 'cuda' describes the present GPU and needs one "
                               "(torch.cuda.is_available() is False); use 'sm_90' or 'sm_80' without a GPU")
        props = torch.ops.fastres_cudnn.device_json(torch.cuda.current_device())
    else:
        props = json.dumps(DEVICE_PROPS[target])
    opts = [] if pattern == "dgrad_drelu_dbn" else list(operands)
    r = torch.ops.fastres_cudnn.graph_check(pattern, DTYPE_STR[dtype], props,
                                            list(x_shape), list(w_shape), list(stride), list(padding),
                                            list(dilation), opts, deterministic, allow_tf32)
    return dict(zip(("ok", "detail", "configs", "plans", "runtime_compiled"), r))


def deviceless_table(target: str = "sm_90", dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> dict:
    """{"pattern[+operands]": {dtype name: graph_check result}} for :data:`CHECKED_GRAPHS`
    on ``target`` (a 64-channel 3x3 conv; the graphs are shape-generic for C, K % 8 == 0)."""
    out = {}
    for pattern, ops in CHECKED_GRAPHS:
        name = pattern + ("" if not ops or pattern != "conv_bias_add_relu" else "[" + "+".join(ops) + "]")
        out[name] = {DTYPE_STR[dt]: graph_check(pattern, dt, target, operands=ops) for dt in dtypes}
    return out


__all__: List[str] = ["available", "built", "pattern_for", "backward_pattern_for", "info", "register",
                      "conv2d_act_forward", "reference_forward", "family_forward", "family_backward",
                      "prologue_conv_backward", "conv_bias_act", "conv_act_stats", "PATTERNS", "FWD_PATTERNS",
                      "BWD_PATTERNS", "FALLBACK", "graph_check", "deviceless_available", "deviceless_table",
                      "DEVICE_PROPS", "CHECKED_GRAPHS", "DOCUMENTED_DTYPES", "BF16_DGRAD_WHY"]
