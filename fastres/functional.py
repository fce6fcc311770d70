"""Functional API: validated, backend-dispatched fused ops.

``batch_norm_act`` has the argument order of ``torch.nn.functional.batch_norm``
plus ``residual`` and ``activation`` and computes ``act(batch_norm(x) + residual)``
with exactly its semantics (biased variance to normalise, unbiased variance into
``running_var``, eval uses the running statistics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _validate as V
from . import backends, ops
from ._reference import acc_dtype, memory_format_of

Tensor = torch.Tensor

__all__ = ["batch_norm_act", "affine_act", "fold_scale_shift"]


def _canonical(t: Tensor) -> Tensor:
    """``t`` with the canonical strides of its memory format (a copy only when they differ).

    PyTorch 2.14.1's CPU batch_norm backward returns a wrong grad_input for a
    channels_last-contiguous tensor whose size-1 dimension has a non-canonical stride
    (e.g. ``base.permute(0, 2, 1, 3)`` with W == 1); the torch backend sidesteps it.
    """
    want = torch.empty_like(t, memory_format=memory_format_of(t))
    if want.stride() == t.stride():
        return t
    return want.copy_(t)


def _canonical_grad(g: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None else _canonical(g)


def _torch_batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu):
    x = _canonical(x)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if y.requires_grad and not torch.compiler.is_compiling():
        # the incoming gradient can carry such strides too (eager only: a stride-dependent
        # hook is a graph break for torch.compile, whose backward graph fixes the strides)
        y.register_hook(_canonical_grad)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def fold_scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, eps: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Eval-mode BN as a per-channel affine map, computed in ``dtype`` (fp32, or fp64):
    scale = w / sqrt(running_var + eps), shift = b - running_mean * scale. Differentiable."""
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if weight is not None:
        scale = weight.to(dtype) * scale
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = bias.to(dtype) + shift
    return scale, shift


def batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
                   activation: Optional[str] = "relu", *,
                   num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``act(F.batch_norm(input, ...) + residual)`` in one fused pass where the backend allows.

    ``running_mean``/``running_var`` are updated in place in training (if given) with
    ``momentum``. ``momentum=None`` with ``num_batches_tracked`` (the module's counter,
    already incremented) is ``nn.BatchNorm2d``'s cumulative average, factor
    ``1/num_batches_tracked``, computed on the device. ``activation``: ``"relu"``,
    ``"none"`` or ``None``.
    """
    act = V.normalize_activation(activation)
    V.check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training, momentum, eps)
    relu = act == "relu"
    cumulative = momentum is None and training and running_mean is not None
    if cumulative and num_batches_tracked is None:
        raise ValueError("fastres: momentum=None (cumulative average) needs num_batches_tracked")
    backend = backends.backend_for(input.device)
    if backend == "torch" or input.numel() == 0:
        if cumulative:
            momentum = 1.0 / float(num_batches_tracked)
        return _torch_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                     residual, relu)
    fam = ops.family(backend)
    if training:
        y, mean, var = fam.bn_act_train(input, weight, bias, residual, float(eps), relu)
        if running_mean is not None:
            count = input.numel() // input.shape[1]
            torch.ops.fastres.update_running_stats(running_mean, running_var, mean, var,
                                                   0.0 if cumulative else float(momentum), count,
                                                   num_batches_tracked if cumulative else None)
        return y
    scale, shift = fold_scale_shift(weight, bias, running_mean, running_var, eps, acc_dtype(input.dtype))
    return fam.affine_act(input, scale, shift, residual, relu)


def affine_act(input: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
               residual: Optional[Tensor] = None, activation: Optional[str] = "relu") -> Tensor:
    """``act(input * scale[c] + shift[c] + residual)`` — the fused epilogue of a folded conv+BN.

    ``scale``/``shift`` are per-channel (C,) tensors (None: 1 / 0); they are used in
    fp32 (fp64 for fp64 inputs) whatever their dtype.
    """
    act = V.normalize_activation(activation)
    V.check_input(input)
    V.check_per_channel(scale, "scale", input)
    V.check_per_channel(shift, "shift", input)
    V.check_residual(residual, input)
    relu = act == "relu"
    acc = acc_dtype(input.dtype)
    scale = scale.to(acc) if scale is not None else None
    shift = shift.to(acc) if shift is not None else None
    backend = backends.backend_for(input.device)
    if input.numel() == 0:
        backend = "torch"
    return ops.family(backend).affine_act(input, scale, shift, residual, relu)
