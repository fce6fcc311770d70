"""The fused convolution op family: ``fastres::conv2d_act`` (and its Triton twin).

Schema (one for every family; ``{prefix}`` is ``""`` for the aten implementation and
``"triton_"`` for the Triton kernel of ``fastres.kernels``)::

    fastres::{prefix}conv2d_act(Tensor x, Tensor weight, Tensor? bias, Tensor? in_scale,
        Tensor? in_shift, Tensor? residual, int[] stride, int[] padding, int[] dilation,
        int groups, bool in_relu, bool relu, bool stats) -> (Tensor y, Tensor mean, Tensor var)
    fastres::{prefix}conv2d_act_backward(Tensor grad_y, Tensor? grad_mean, Tensor? grad_var,
        Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, Tensor? y, Tensor? mean,
        int[] stride, int[] padding, int[] dilation, int groups, bool in_relu, bool relu,
        bool[] need) -> (grad_x, grad_weight, grad_bias, grad_in_scale, grad_in_shift, grad_residual)

Semantics (acc = float64 for float64 x, else float32):

* prologue ``u = in_act(x * in_scale[c] + in_shift[c])`` computed in acc and rounded to
  x's dtype (in_scale/in_shift None: 1/0; in_act = ReLU when ``in_relu``); the conv's
  zero padding is applied to ``u`` (padding stays 0 after the transform);
* ``y = act(conv2d(u, weight) + bias[k] + residual)`` summed in acc, rounded once to x's
  dtype, in x's memory format (docs/DESIGN.md's rule); act = ReLU when ``relu``;
* with ``stats``: ``mean``/``var`` = per-output-channel mean and *biased* variance of the
  returned ``y`` (the rounded values) over N*P*Q positions, in acc, computed stably
  (two-pass in the aten family, Chan-merged tile moments in the Triton family); without
  ``stats`` both are empty [0] tensors. ``mean``/``var`` are differentiable outputs.
* backward: grad_y (+ grad_mean/M + grad_var*2(y-mean)/M) masked by ``!(y <= 0)`` when
  ``relu`` gives dz; grad_residual = dz, grad_bias = Σdz; (grad_u, grad_weight) from
  ``aten.convolution_backward(dz, u, weight)`` with u recomputed from x (never stored);
  grad_u masked where the prologue's pre-activation is <= 0 (``in_relu``) gives dv;
  grad_x = dv*in_scale, grad_in_scale = Σdv*x, grad_in_shift = Σdv. Gradients that are
  not needed come back as empty [0] tensors.

Fakes and autograd are registered once for every family by :func:`_register`.
"""
from __future__ import annotations

import importlib.util
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _triton_ops, backends
from ._reference import acc_dtype, conv2d_act_composite, memory_format_of, strided_1x1_cpu
from .ops import _unalias  # the custom-op glue both op families share

Tensor = torch.Tensor

# need flags of the backward, in this order
NEED = ("x", "weight", "bias", "in_scale", "in_shift", "residual")


# ----------------------------------------------------------------------------- aten composition
def _bc(t: Tensor) -> Tensor:
    return t.reshape(1, -1, 1, 1)


def out_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> Tuple[int, int]:
    p = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return p, q


def _pre_activation(x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor]) -> Tensor:
    acc = acc_dtype(x.dtype)
    v = x.to(acc)
    if in_scale is not None:
        v = v * _bc(in_scale.to(acc))
    if in_shift is not None:
        v = v + _bc(in_shift.to(acc))
    return v


def prologue(x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool) -> Tensor:
    """u = in_act(x*in_scale + in_shift), computed in acc, rounded to x's dtype."""
    if in_scale is None and in_shift is None and not in_relu:
        return x
    v = _pre_activation(x, in_scale, in_shift)
    if in_relu:
        v = torch.relu(v)
    return v.to(x.dtype)


def conv2d_act_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                         in_shift: Optional[Tensor], residual: Optional[Tensor], stride, padding, dilation,
                         groups: int, in_relu: bool, relu: bool, stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The aten composition of the schema: the oracle, the ``aten`` conv path and the
    body of ``fastres::conv2d_act``. Differentiable through aten's own autograd."""
    acc = acc_dtype(x.dtype)
    y, _, _ = conv2d_act_composite(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation,
                                   groups, in_relu, relu, False)
    y = y.contiguous(memory_format=memory_format_of(x))
    if not stats:
        e = x.new_empty((0,), dtype=acc)
        return y, e, e.clone()
    ya = y.to(acc)
    mean = ya.mean(dim=(0, 2, 3))
    var = (ya - _bc(mean)).square().mean(dim=(0, 2, 3))
    return y, mean, var


def _grad_conv_out(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], x: Tensor,
                   y: Optional[Tensor], mean: Optional[Tensor], relu: bool) -> Tensor:
    """dz = dL/d(conv + bias + residual): grad_y plus the statistics' gradients, through
    the output ReLU's mask; x's dtype, x's memory format."""
    acc = acc_dtype(x.dtype)
    g = grad_y
    if grad_mean is not None or grad_var is not None:  # the statistics are outputs too
        m = y.numel() // y.shape[1]
        ga = g.to(acc)
        if grad_mean is not None:
            ga = ga + _bc(grad_mean.to(acc) / m)
        if grad_var is not None:
            ga = ga + (y.to(acc) - _bc(mean)) * _bc(grad_var.to(acc) * (2.0 / m))
        g = ga.to(x.dtype)
    if relu:
        g = torch.ops.aten.threshold_backward(g, y, 0)
    return g.contiguous(memory_format=memory_format_of(x))


def _convolution_backward(dz: Tensor, u: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                          dilation: List[int], groups: int, need_u: bool, need_w: bool) -> Tuple[Tensor, Tensor]:
    """aten's ``convolution_backward`` (input and weight gradients); where
    :func:`_reference.strided_1x1_cpu` holds and the weight gradient is needed, taken as
    that of the stride-1 1x1 convolution of the subsampled input ``u[:, :, ::s, ::s]``."""
    if need_w and strided_1x1_cpu(u, weight, stride, padding) and u.shape[2] > 0 and u.shape[3] > 0:
        sh, sw = stride
        fmt = memory_format_of(u)
        gus, gw, _ = torch.ops.aten.convolution_backward(
            dz, u[:, :, ::sh, ::sw].contiguous(memory_format=fmt), weight, None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], groups, [need_u, need_w, False])
        gu = None
        if need_u:
            gu = u.new_zeros(u.shape).contiguous(memory_format=fmt)
            gu[:, :, ::sh, ::sw] = gus
        return gu, gw
    gu, gw, _ = torch.ops.aten.convolution_backward(
        dz, u, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_u, need_w, False])
    return gu, gw


def conv2d_act_backward_aten(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
                             x: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                             y: Optional[Tensor], mean: Optional[Tensor], stride: List[int], padding: List[int],
                             dilation: List[int], groups: int, in_relu: bool, relu: bool,
                             need: List[bool]) -> Tuple[Tensor, ...]:
    """The backward of the schema with aten's convolution_backward (any device)."""
    need_x, need_w, need_b, need_s, need_t, need_r = need
    acc = acc_dtype(x.dtype)
    fmt = memory_format_of(x)
    empty = x.new_empty((0,))
    empty_acc = x.new_empty((0,), dtype=acc)
    dz = _grad_conv_out(grad_y, grad_mean, grad_var, x, y, mean, relu)
    grad_res = dz if need_r else empty
    grad_bias = dz.to(acc).sum(dim=(0, 2, 3)) if need_b else empty_acc
    has_pro = in_scale is not None or in_shift is not None or in_relu
    need_u = need_x or need_s or need_t
    grad_x = empty
    grad_s = grad_t = empty_acc
    grad_w = weight.new_empty((0,))
    if need_u or need_w:
        u = prologue(x, in_scale, in_shift, in_relu)
        gu, gw = _convolution_backward(dz, u, weight, stride, padding, dilation, groups, need_u, need_w)
        if need_w:
            grad_w = gw.contiguous()
        if need_u:
            if not has_pro:
                grad_x = gu.contiguous(memory_format=fmt)
            else:
                dv = gu.to(acc)
                if in_relu:
                    v = _pre_activation(x, in_scale, in_shift)
                    dv = torch.where(v <= 0, torch.zeros((), dtype=acc, device=x.device), dv)
                if need_x:
                    gx = dv * _bc(in_scale.to(acc)) if in_scale is not None else dv
                    grad_x = gx.to(x.dtype).contiguous(memory_format=fmt)
                if need_s and in_scale is not None:
                    grad_s = (dv * x.to(acc)).sum(dim=(0, 2, 3))
                if need_t and in_shift is not None:
                    grad_t = dv.sum(dim=(0, 2, 3))
    return grad_x, grad_w, grad_bias, grad_s, grad_t, grad_res


def _conv_bwd_kernels():
    """``fastres.kernels._conv_bwd`` (the Triton dgrad/wgrad kernels), or None where it
    does not exist or ``FASTRES_CONV_BWD=aten`` asks for aten's convolution_backward."""
    from . import conv_backend
    if conv_backend.requested_conv_bwd() == "aten":
        return None
    if importlib.util.find_spec("fastres.kernels._conv_bwd") is None:  # the file is absent
        return None
    from .kernels import _conv_bwd  # any import error in an existing file is raised
    if not (hasattr(_conv_bwd, "conv2d_act_dgrad") and hasattr(_conv_bwd, "conv2d_act_wgrad")):
        return None
    return _conv_bwd


def conv2d_act_backward_triton(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
                               x: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                               y: Optional[Tensor], mean: Optional[Tensor], stride: List[int], padding: List[int],
                               dilation: List[int], groups: int, in_relu: bool, relu: bool,
                               need: List[bool]) -> Tuple[Tensor, ...]:
    """The backward with the Triton data-gradient kernel (prologue ReLU mask recomputed,
    Σdv·x and Σdv reduced in its epilogue) and weight-gradient kernel (prologue recomputed
    as it loads); the elementwise part (statistics' gradient, output ReLU mask) in aten.
    Each of dgrad and wgrad is Triton's or aten's as :func:`fastres.conv_backend.backward_parts`
    chooses (by measurement under ``FASTRES_CONV=auto``); falls back to
    :func:`conv2d_act_backward_aten` where the kernels are absent."""
    kb = _conv_bwd_kernels()
    from . import conv_backend
    tri_d, tri_w = (False, False) if kb is None else conv_backend.backward_parts(x, weight, stride, dilation,
                                                                                  groups)
    if not (tri_d or tri_w):
        return conv2d_act_backward_aten(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean,
                                        stride, padding, dilation, groups, in_relu, relu, need)
    need_x, need_w, need_b, need_s, need_t, need_r = need
    acc = acc_dtype(x.dtype)
    empty = x.new_empty((0,))
    dz = _grad_conv_out(grad_y, grad_mean, grad_var, x, y, mean, relu)
    grad_res = dz if need_r else empty
    grad_x = empty
    grad_s, grad_t = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    if (need_x or need_s or need_t) and not tri_d:  # aten's dgrad on dz (no output ReLU left to mask)
        grad_x, _, _, grad_s, grad_t, _ = conv2d_act_backward_aten(
            dz, None, None, x, weight, in_scale, in_shift, None, None, stride, padding, dilation, groups, in_relu,
            False, [need_x, False, False, need_s, need_t, False])
    elif need_x or need_s or need_t:
        need_in = bool((need_s and in_scale is not None) or (need_t and in_shift is not None))
        gx, gs, gt = kb.conv2d_act_dgrad(dz, weight, x, in_scale, in_shift, in_relu, stride, padding, dilation,
                                         groups, need_in)
        if need_x:
            grad_x = gx
        if need_s and in_scale is not None:
            grad_s = gs
        if need_t and in_shift is not None:
            grad_t = gt
    grad_w = weight.new_empty((0,))
    if need_w and not tri_w:  # aten's wgrad (+ grad_bias) on dz
        _, grad_w, grad_bias, _, _, _ = conv2d_act_backward_aten(
            dz, None, None, x, weight, in_scale, in_shift, None, None, stride, padding, dilation, groups, in_relu,
            False, [False, True, need_b, False, False, False])
    elif need_w:
        gw, gb = kb.conv2d_act_wgrad(dz, x, in_scale, in_shift, in_relu, tuple(weight.shape), stride, padding,
                                     dilation, groups, bool(need_b))
        grad_w = gw.to(weight.dtype).contiguous()
        grad_bias = gb if need_b else x.new_empty((0,), dtype=acc)
    else:
        grad_bias = dz.to(acc).sum(dim=(0, 2, 3)) if need_b else x.new_empty((0,), dtype=acc)
    return grad_x, grad_w, grad_bias, grad_s, grad_t, grad_res


# ----------------------------------------------------------------------------- fakes
def _fake_fwd(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu, relu,
              stats):
    n, _, h, w = x.shape
    k, _, kh, kw = weight.shape
    p, q = out_size(h, w, kh, kw, stride, padding, dilation)
    acc = acc_dtype(x.dtype)
    y = x.new_empty((n, k, p, q)).contiguous(memory_format=memory_format_of(x))
    ns = k if stats else 0
    return y, x.new_empty((ns,), dtype=acc), x.new_empty((ns,), dtype=acc)


def _fake_bwd(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride, padding, dilation,
              groups, in_relu, relu, need):
    need_x, need_w, need_b, need_s, need_t, need_r = need
    acc = acc_dtype(x.dtype)
    fmt = memory_format_of(x)
    k = weight.shape[0]
    c = x.shape[1]
    gx = torch.empty_like(x, memory_format=fmt) if need_x else x.new_empty((0,))
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty((0,))
    gb = x.new_empty((k if need_b else 0,), dtype=acc)
    gs = x.new_empty((c if need_s and in_scale is not None else 0,), dtype=acc)
    gt = x.new_empty((c if need_t and in_shift is not None else 0,), dtype=acc)
    gr = grad_y.new_empty(grad_y.shape).contiguous(memory_format=fmt) if need_r else x.new_empty((0,))
    return gx, gw, gb, gs, gt, gr


# ----------------------------------------------------------------------------- autograd
def conv2d_act_backward_differentiable(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
                                       x: Tensor, weight: Tensor, in_scale: Optional[Tensor],
                                       in_shift: Optional[Tensor], y: Optional[Tensor], mean: Optional[Tensor],
                                       stride: List[int], padding: List[int], dilation: List[int], groups: int,
                                       in_relu: bool, relu: bool, need: List[bool]) -> Tuple[Tensor, ...]:
    """The backward when it must itself be differentiated (``create_graph=True``:
    gradient penalties, Hessian-vector products, MAML; the engine then runs the backward
    with grad mode on). The fused backward ops have no derivative of their own, so the
    same formulas run as differentiable aten ops, called directly (not as a custom op):
    the statistics' gradient and the output ReLU mask (``threshold_backward``, whose
    derivative aten defines), ``convolution_backward`` (twice differentiable in aten)
    on the prologue ``u`` recomputed from ``x``, and the prologue's own gradient. ``y``
    and ``mean`` are the op's saved *outputs*: unpacked under grad mode they carry this
    op's node, so their own dependence on every input is differentiated through it
    (as aten's built-in ops do with their saved results)."""
    return conv2d_act_backward_aten(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride,
                                    padding, dilation, groups, in_relu, relu, need)


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        (x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu, relu,
         stats) = inputs
        y, mean, _var = output
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no extra pass
        keep_y = relu or stats
        ctx.save_for_backward(x, weight, in_scale, in_shift, y if keep_y else None, mean if stats else None)
        ctx.conf = (list(stride), list(padding), list(dilation), int(groups), bool(in_relu), bool(relu))
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, in_scale, in_shift))

    def backward(ctx, grad_y, grad_mean, grad_var):
        x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
        need = [bool(b) for b in ctx.needs_input_grad[:6]]
        stride, padding, dilation, groups, in_relu, relu = ctx.conf
        if grad_y is None:
            grad_y = torch.zeros_like(y if y is not None else x.new_empty(0))
        if mean is None:  # no stats: mean/var were empty [0]; their gradients (opcheck gives some) carry nothing
            grad_mean = grad_var = None
        # create_graph=True (grad mode on in the backward): differentiable aten formulas;
        # an ordinary backward (also AOTAutograd's traced one) runs the fused op as before
        bwd = conv2d_act_backward_differentiable if torch.is_grad_enabled() else bwd_op
        gx, gw, gb, gs, gt, gr = bwd(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean,
                                     stride, padding, dilation, groups, in_relu, relu, need)
        b_dt, s_dt, t_dt = ctx.dtypes
        return (gx if need[0] else None, gw if need[1] else None, gb.to(b_dt) if need[2] else None,
                gs.to(s_dt) if need[3] else None, gt.to(t_dt) if need[4] else None, gr if need[5] else None,
                None, None, None, None, None, None, None)

    return backward, setup_context


def _define(prefix: str, fwd_impl, bwd_impl) -> Tuple[object, object]:
    """Define ``fastres::{prefix}conv2d_act`` and its backward around two Python callables,
    with the shared fake kernels and autograd formula."""

    @torch.library.custom_op(f"fastres::{prefix}conv2d_act_backward", mutates_args=())
    def conv2d_act_backward(grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], x: Tensor,
                            weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                            y: Optional[Tensor], mean: Optional[Tensor], stride: List[int], padding: List[int],
                            dilation: List[int], groups: int, in_relu: bool, relu: bool,
                            need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        outs = bwd_impl(grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean, stride, padding,
                        dilation, groups, in_relu, relu, need)
        return _unalias(outs, (grad_y, grad_mean, grad_var, x, weight, in_scale, in_shift, y, mean))

    @torch.library.custom_op(f"fastres::{prefix}conv2d_act", mutates_args=())
    def conv2d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                   in_shift: Optional[Tensor], residual: Optional[Tensor], stride: List[int], padding: List[int],
                   dilation: List[int], groups: int, in_relu: bool, relu: bool,
                   stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
        outs = fwd_impl(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu,
                        relu, stats)
        return _unalias(outs, (x, weight, bias, in_scale, in_shift, residual))

    conv2d_act.register_fake(_fake_fwd)
    conv2d_act_backward.register_fake(_fake_bwd)
    bw, setup = _make_autograd(getattr(torch.ops.fastres, f"{prefix}conv2d_act_backward"))
    conv2d_act.register_autograd(bw, setup_context=setup)
    return getattr(torch.ops.fastres, f"{prefix}conv2d_act"), getattr(torch.ops.fastres,
                                                                      f"{prefix}conv2d_act_backward")


# ----------------------------------------------------------------------------- families
class ConvFamily(NamedTuple):
    name: str
    conv2d_act: object           # forward (x, weight, bias, ...) -> (y, mean, var), differentiable
    conv2d_act_backward: object  # None for the plain aten composition (aten's autograd)


def _triton_forward(*args):
    from .kernels import _conv  # fastres.kernels (the top-level kernels/ folder)
    return _conv.conv2d_act(*args)


_families: Dict[str, ConvFamily] = {"torch": ConvFamily("torch", conv2d_act_reference, None)}
_lock = threading.Lock()

# ``fastres::conv2d_act``: the aten composition behind the custom-op machinery (any
# device). It checks the fakes and the autograd formula without any kernel, and it is
# the op a traced graph sees when the aten path is asked for as an op.
_families["ops"] = ConvFamily("ops", *_define("", conv2d_act_reference, conv2d_act_backward_aten))


def family(name: str) -> ConvFamily:
    """The conv op family ``name``: ``torch`` (plain aten composition), ``ops``
    (``fastres::conv2d_act``, aten inside) or ``triton`` (``fastres::triton_conv2d_act``, or
    ``fastres::tritonop_conv2d_act`` when ``FASTRES_TRITON_OP`` selects the triton_op variant)."""
    return _triton_ops.cached_family(_families, _lock, name, _build_family)


def _build_family(name: str) -> ConvFamily:
    if name == "cudnn":  # issue 11: cuDNN graphs where a pattern applies, the aten forward elsewhere
        from . import cudnn
        return ConvFamily(name, *_define("cudnn_", cudnn.family_forward(conv2d_act_reference),
                                         cudnn.family_backward(_grad_conv_out)))
    if name not in ("triton", "triton_op"):
        raise ValueError(f"fastres: unknown conv op family {name!r}")
    ok, msg = backends._triton_installed()
    if not ok:
        raise RuntimeError(f"fastres: the triton conv is unavailable: {msg}")
    if name == "triton_op":  # the same kernels as torch.library.triton_op (_triton_ops.py)
        return ConvFamily(name, *_triton_ops.define_conv_ops(_triton_forward, conv2d_act_backward_triton))
    # the backward: the Triton dgrad/wgrad kernels of kernels/_conv_bwd.py where they
    # exist (FASTRES_CONV_BWD=aten forces aten; under FASTRES_CONV=auto the measured choice per
    # shape class, conv_backend.backward_parts), else aten's convolution_backward
    return ConvFamily(name, *_define("triton_", _triton_forward, conv2d_act_backward_triton))


def preload() -> None:
    """Register the Triton family where it can run (see ``fastres.ops.preload``)."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if any(backends.available("triton", d)[0] for d in device_types):
        family("triton")
        if _triton_ops.enabled():
            family("triton_op")
    from . import cudnn
    if cudnn.built()[0]:  # the cudnn family's ops (their fakes are needed by torch.compile on any device)
        family("cudnn")
