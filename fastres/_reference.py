"""Reference (aten-only) implementations of the fastres op schemas.

These are the oracle for kernel unit tests and the body of the ``torch`` backend's
op family. They follow docs/DESIGN.md exactly, including dtypes and memory format.

Every function here is a composition of differentiable aten operations, so the two
backward formulas double as the *differentiable* backward of the fused ops (used by
``fastres.ops`` when a backward is itself differentiated, ``create_graph=True``), and
:func:`affine_act_composite` is the epilogue under functorch transforms
(:func:`conv2d_act_composite` the fused convolution's).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The one memory-format rule shared by every backend and every fake kernel."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _bc(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _mask(y: Tensor) -> Tensor:
    # aten's threshold_backward(grad, result, 0): grad where result > 0 (NaN passes)
    return ~(y <= 0)


def _affine_act_acc(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                    residual: Optional[Tensor], relu: bool) -> Tensor:
    """``act(z * scale[c] + shift[c] + residual)`` for ``z`` already in the accumulation
    dtype (each term optional, applied in this order), in that dtype."""
    acc = z.dtype
    if scale is not None:
        z = z * _bc(scale.to(acc))
    if shift is not None:
        z = z + _bc(shift.to(acc))
    if residual is not None:
        z = z + residual.to(acc)
    if relu:
        z = torch.relu(z)
    return z


def _act_grad(grad_y: Tensor, y: Tensor, relu: bool, acc: torch.dtype) -> Tensor:
    """``grad_y`` in ``acc``, through the ReLU whose output is ``y`` when ``relu``."""
    dz = grad_y.to(acc)
    if relu:
        dz = torch.where(_mask(y), dz, torch.zeros((), dtype=acc, device=dz.device))
    return dz


def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``x``, in the accumulation dtype
    (differentiable: the double backward recomputes them as functions of ``x``)."""
    xa = x.to(acc_dtype(x.dtype))
    mean = xa.mean(dim=(0, 2, 3))
    var = (xa - _bc(mean)).square().mean(dim=(0, 2, 3))
    return mean, var


def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 residual: Optional[Tensor], eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    fmt = memory_format_of(x)
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    z = _affine_act_acc((xa - _bc(mean)) * _bc(invstd), weight, bias, residual, relu)
    y = z.to(x.dtype).contiguous(memory_format=fmt)
    return y, mean, var


def bn_act_train_backward(grad_y: Tensor, x: Tensor, y: Tensor, weight: Optional[Tensor],
                          mean: Tensor, var: Tensor, eps: float, relu: bool,
                          need_grad_z: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    fmt = memory_format_of(x)
    acc = acc_dtype(x.dtype)
    dz = _act_grad(grad_y, y, relu, acc)
    m = x.numel() // max(x.shape[1], 1) if x.numel() else 0
    invstd = torch.rsqrt(var + eps)
    xhat = (x.to(acc) - _bc(mean)) * _bc(invstd)
    grad_bias = dz.sum(dim=(0, 2, 3))
    grad_weight = (dz * xhat).sum(dim=(0, 2, 3))
    w = weight.to(acc) if weight is not None else torch.ones_like(mean)
    if m > 0:
        gx = _bc(w * invstd) * (dz - _bc(grad_bias / m) - xhat * _bc(grad_weight / m))
    else:
        gx = dz
    grad_x = gx.to(x.dtype).contiguous(memory_format=fmt)
    if need_grad_z:
        grad_z = dz.to(x.dtype).contiguous(memory_format=fmt)
    else:
        grad_z = x.new_empty((0,))
    return grad_x, grad_weight, grad_bias, grad_z


def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
               residual: Optional[Tensor], relu: bool) -> Tensor:
    return affine_act_composite(x, scale, shift, residual, relu).contiguous(memory_format=memory_format_of(x))


def affine_act_composite(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                         residual: Optional[Tensor], relu: bool) -> Tensor:
    """``act(x * scale[c] + shift[c] + residual)`` in the accumulation dtype, with no
    memory-format query (which functorch's batched tensors do not answer): the form
    used under vmap / grad / jvp."""
    return _affine_act_acc(x.to(acc_dtype(x.dtype)), scale, shift, residual, relu).to(x.dtype)


def affine_act_backward(grad_y: Tensor, x: Tensor, y: Tensor, scale: Optional[Tensor], relu: bool,
                        need_grad_z: bool, need_param_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    fmt = memory_format_of(x)
    acc = acc_dtype(x.dtype)
    dz = _act_grad(grad_y, y, relu, acc)
    gx = dz * _bc(scale.to(acc)) if scale is not None else dz
    grad_x = gx.to(x.dtype).contiguous(memory_format=fmt)
    grad_z = dz.to(x.dtype).contiguous(memory_format=fmt) if need_grad_z else x.new_empty((0,))
    if need_param_grads:
        grad_scale = (dz * x.to(acc)).sum(dim=(0, 2, 3))
        grad_shift = dz.sum(dim=(0, 2, 3))
    else:
        grad_scale = torch.empty((0,), dtype=acc, device=x.device)
        grad_shift = torch.empty((0,), dtype=acc, device=x.device)
    return grad_x, grad_z, grad_scale, grad_shift


# The largest input-channel block of oneDNN's affected 1x1 weight-gradient kernels
# (jit_avx2_1x1: 8, jit_avx512_common_1x1: 16): with at least this many input channels
# per group the "rtus" workspace is booked large enough (oneDNN #6035).
ONEDNN_1X1_IC_BLOCK = 16


def strided_1x1_cpu(x: Tensor, weight: Tensor, stride, padding) -> bool:
    """A strided 1x1 convolution without padding on the CPU with fewer than
    :data:`ONEDNN_1X1_IC_BLOCK` input channels per group: its weight gradient is taken as
    the stride-1 1x1 convolution of the subsampled input ``x[:, :, ::s, ::s]`` (the same
    products and sums) by :func:`conv2d` and ``conv_ops._convolution_backward``. oneDNN's
    own strided 1x1 weight gradient (its "rtus" path) writes past its workspace in
    channels_last with fewer input channels per group than its channel block (8 with AVX2,
    16 with AVX-512): heap corruption with one thread, hangs or wrong weight gradients with
    more (oneDNN issue #6035, open; in torch 2.14.1's oneDNN;
    tests/test_conv_act.py::test_strided_1x1_weight_grad_single_thread). With 16 or more
    (every ResNet projection shortcut) oneDNN's strided kernel is correct and the
    subsampling would only cost time: a scattered input gradient (a zero fill and a
    strided copy of the full-size input) in every training step."""
    return (x.device.type == "cpu" and weight.shape[2] == 1 and weight.shape[3] == 1 and not any(padding)
            and max(stride) > 1 and weight.shape[1] < ONEDNN_1X1_IC_BLOCK)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """``F.conv2d``, taken as the stride-1 conv of the subsampled input where
    :func:`strided_1x1_cpu` holds and the weight gradient will be taken (autograd scatters
    the input gradient back); the forward alone stays F.conv2d's, bit for bit."""
    if strided_1x1_cpu(x, weight, stride, padding) and weight.requires_grad and torch.is_grad_enabled():
        return F.conv2d(x[:, :, ::stride[0], ::stride[1]], weight, bias, 1, 0, 1, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv2d_act_composite(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                         in_shift: Optional[Tensor], residual: Optional[Tensor], stride, padding, dilation,
                         groups: int, in_relu: bool, relu: bool, stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``fastres::conv2d_act``'s schema as plain aten ops with no memory-format query
    (which functorch's batched tensors do not answer): the route of
    :func:`fastres.functional.conv2d_act` under vmap / grad / jvp and forward AD.

    ``u = in_act(x*in_scale + in_shift)`` in acc, rounded to x's dtype; ``y = act(conv2d(u,
    weight) + bias + residual)`` summed in acc, rounded once; with ``stats`` the
    per-output-channel mean and biased variance of the returned ``y`` (:func:`batch_stats`),
    else two empty tensors. Every output is differentiable in every input (forward and
    reverse mode, to any order), with the same values as the fused op to rounding."""
    acc = acc_dtype(x.dtype)
    u = x
    if in_scale is not None or in_shift is not None or in_relu:
        u = _affine_act_acc(x.to(acc), in_scale, in_shift, None, in_relu).to(x.dtype)
    y = conv2d(u, weight, None, stride, padding, dilation, groups)
    if bias is not None or residual is not None or relu:
        y = _affine_act_acc(y.to(acc), None, bias, residual, relu).to(x.dtype)
    if not stats:
        empty = torch.empty((0,), dtype=acc, device=x.device)
        return y, empty, empty.clone()
    mean, var = batch_stats(y)
    return y, mean, var
