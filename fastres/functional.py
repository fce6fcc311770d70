"""Functional API: validated, backend-dispatched fused ops.

``batch_norm_act`` has the argument order of ``torch.nn.functional.batch_norm``
plus ``residual`` and ``activation`` and computes ``act(batch_norm(x) + residual)``
with exactly its semantics (biased variance to normalise, unbiased variance into
``running_var``, eval uses the running statistics).

Under a functorch transform (``torch.func.vmap``, ``grad``, ``jvp``, ``jacrev`` …) or
inside a forward-mode AD level (``torch.autograd.forward_ad.dual_level``), both
functions run the aten composition (``F.batch_norm`` (+ add) (+ ReLU)) instead of the
fused custom ops, which have neither batching rules nor forward-mode formulas: the
composition has both, so each transform behaves exactly as over ``nn.BatchNorm2d``
(including the error functorch raises for running statistics under ``vmap`` in
training). See :func:`transforms_active`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwAD
import torch.nn.functional as F

from . import _validate as V
from . import backends, ops
from ._reference import acc_dtype, affine_act_composite, memory_format_of

Tensor = torch.Tensor

__all__ = ["batch_norm_act", "affine_act", "fold_scale_shift", "transforms_active"]


def transforms_active() -> bool:
    """Whether a functorch transform is running (vmap, grad, jvp, jacrev, …) or a
    forward-mode AD level is open, outside ``torch.compile``: then the fused ops give way
    to the aten composition (see the module docstring). Two cheap global reads; under
    ``torch.compile`` always ``False`` (the fused ops are traced, as before)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or _fwAD._current_level >= 0


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


def _torch_batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu,
                          canonical=True):
    """The aten composition. ``canonical=False`` under functorch transforms, whose batched
    tensors answer no stride query (and whose gradients take no hooks)."""
    if canonical:
        x = _canonical(x)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if canonical and y.requires_grad and not torch.compiler.is_compiling():
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
    composite = transforms_active()
    if composite or backend == "torch" or input.numel() == 0:
        if cumulative:
            momentum = 1.0 / float(num_batches_tracked)
        return _torch_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                     residual, relu, canonical=not composite)
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
    if transforms_active():
        return affine_act_composite(input, scale, shift, residual, relu)
    backend = backends.backend_for(input.device)
    if input.numel() == 0:
        backend = "torch"
    return ops.family(backend).affine_act(input, scale, shift, residual, relu)


# ============================================================================
# conv2d_act (issue 10): the fused convolution. Kept at the end of the file, apart
# from the BatchNorm functions above.
# ============================================================================
__all__ += ["conv2d_act"]

from . import conv_aten, conv_backend, conv_ops  # noqa: E402  (the conv op family, its backends and their choice)


def _pair(v, name: str, minimum: int):
    if type(v) is tuple and len(v) == 2:  # the common case (an nn.Conv2d's attributes): checked quickly
        a, b = v
        if type(a) is int and type(b) is int and a >= minimum and b >= minimum:
            return [a, b]
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list)):
        raise TypeError(f"fastres: conv2d_act {name} must be an int or a pair of ints, got {v!r}")
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
        raise TypeError(f"fastres: conv2d_act {name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"fastres: conv2d_act {name} must be >= {minimum}, got {v!r}")
    return [int(pair[0]), int(pair[1])]


def _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual):
    """Validate conv2d_act's convolution arguments; returns (stride, padding, dilation, out_shape)."""
    V.check_input(x)
    if not isinstance(weight, Tensor):
        raise TypeError(f"fastres: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"fastres: expected weight to be 4-D (out_channels, in_channels/groups, kH, kW), "
                         f"got a {weight.dim()}-D tensor of shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"fastres: weight is on {weight.device} but input is on {x.device}; "
                         f"expected both on the same device")
    if weight.dtype != x.dtype:
        raise TypeError(f"fastres: weight has dtype {V._dt(weight.dtype)} but input is {V._dt(x.dtype)}; "
                        f"expected {V._dt(x.dtype)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fastres: groups must be a positive int, got {groups!r}")
    n, c, h, w = x.shape
    k, cg, kh, kw = weight.shape
    if c % groups != 0:
        raise ValueError(f"fastres: input channels ({c}) must be divisible by groups ({groups})")
    if k % groups != 0:
        raise ValueError(f"fastres: weight's out_channels ({k}) must be divisible by groups ({groups})")
    if cg * groups != c:
        raise ValueError(f"fastres: weight of shape {tuple(weight.shape)} expects {cg * groups} input channels "
                         f"(in_channels/groups={cg}, groups={groups}), but input has {c} (shape {tuple(x.shape)})")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    p, q = conv_ops.out_size(h, w, kh, kw, stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(f"fastres: the {kh}x{kw} kernel (dilation {tuple(dilation)}) is larger than the padded "
                         f"input {h}x{w} (padding {tuple(padding)}): the output would be {p}x{q}")
    out_shape = (n, k, p, q)
    if V.check_optional_tensor(bias, "bias", x):
        if bias.dim() != 1 or bias.shape[0] != k:
            raise ValueError(f"fastres: bias must have shape ({k},) to match weight's {k} output channels, "
                             f"got {tuple(bias.shape)}")
        allowed = (x.dtype, acc_dtype(x.dtype))
        if bias.dtype not in allowed:
            raise TypeError(f"fastres: bias has dtype {V._dt(bias.dtype)} but input is {V._dt(x.dtype)}; "
                            f"expected {' or '.join(sorted({V._dt(d) for d in allowed}))}")
    if V.check_optional_tensor(residual, "residual", x):
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"fastres: residual must have the output's shape {out_shape}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"fastres: residual has dtype {V._dt(residual.dtype)} but input is "
                            f"{V._dt(x.dtype)}; expected {V._dt(x.dtype)}")
    return stride, padding, dilation, out_shape


def conv2d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
               groups: int = 1, *, in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
               in_relu: bool = False, residual: Optional[Tensor] = None, activation: Optional[str] = "none",
               stats=False):
    """``act(conv2d(in_act(x*in_scale + in_shift), weight, bias) + residual)`` in one pass.

    * prologue (e.g. the previous BatchNorm + ReLU): ``in_scale``/``in_shift`` are
      per-input-channel (C,) tensors (None: 1/0), ``in_relu`` applies a ReLU after them;
      computed in fp32 (fp64 for fp64) and rounded to x's dtype, and the convolution's
      zero padding is applied to the *transformed* input (padding stays 0).
    * epilogue: ``bias`` (K,) in x's dtype or fp32, ``residual`` of the output's shape,
      ``activation`` ``"relu"`` or ``"none"``/None; summed in fp32 (fp64), rounded once.
    * ``stats``: False → ``y``. True (or ``"sums"``) → ``(y, sum, sumsq)``:
      ``sum[k] = Σ y[:, k]`` and ``sumsq[k] = Σ y[:, k]²`` over the N*P*Q positions of
      the returned ``y`` (its rounded values), in fp32 (fp64 for fp64 input). They are
      derived from the channel's mean and biased variance, which are computed stably
      (never from sumsq - sum²/M): ``sum = M·mean``, ``sumsq = M·(var + mean²)``.
      ``"moments"`` → ``(y, mean, var)`` (biased var) — what a BatchNorm needs; prefer it.
      All outputs are differentiable.

    Differentiable w.r.t. ``x``, ``weight``, ``bias``, ``in_scale``, ``in_shift`` and
    ``residual``. ``y`` keeps x's memory format (channels_last in, channels_last out).
    The convolution is aten's or the fused Triton kernel: see
    :mod:`fastres.conv_backend` (``FASTRES_CONV``, ``fastres.set_conv``); aten's runs, with
    neither prologue nor statistics, as one oneDNN primitive for CPU fp32 inference or as
    aten's convolution + the fused epilogue op (:mod:`fastres.conv_aten`). Twice (and more)
    differentiable; under functorch transforms and forward AD (:func:`transforms_active`)
    it runs the aten composition :func:`fastres._reference.conv2d_act_composite`. Under
    ``torch.autocast`` (non-fp64 input) x, weight and residual are cast to autocast's
    dtype first, as ``F.conv2d`` does.
    """
    from ._reference import conv2d_act_composite as composite_conv2d_act
    if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64 \
            and torch.is_autocast_enabled(x.device.type):
        # autocast: compute in its dtype, as F.conv2d would (the custom ops do not autocast);
        # an fp32 bias stays fp32 (added in the fp32 accumulator)
        dt = torch.get_autocast_dtype(x.device.type)
        x = x.to(dt)
        weight = weight.to(dt) if isinstance(weight, Tensor) and weight.is_floating_point() else weight
        if isinstance(bias, Tensor) and bias.dtype not in (dt, torch.float32):
            bias = bias.to(dt)
        if isinstance(residual, Tensor) and residual.is_floating_point():
            residual = residual.to(dt)
    if stats not in (False, True, "sums", "moments"):
        raise ValueError(f"fastres: stats must be False, True, 'sums' or 'moments', got {stats!r}")
    act = V.normalize_activation(activation)
    if not isinstance(in_relu, bool):
        raise TypeError(f"fastres: in_relu must be a bool, got {in_relu!r}")
    stride, padding, dilation, out_shape = _check_conv_args(x, weight, bias, stride, padding, dilation, groups,
                                                            residual)
    V.check_per_channel(in_scale, "in_scale", x)
    V.check_per_channel(in_shift, "in_shift", x)
    want_stats = stats is not False
    if want_stats and out_shape[0] * out_shape[2] * out_shape[3] == 0:
        raise ValueError(f"fastres: conv2d_act stats need a non-empty output, got output shape {out_shape}")
    relu = act == "relu"
    if transforms_active():  # vmap/grad/jvp, forward AD: the aten composition (see the module docstring)
        conv = composite_conv2d_act
    else:
        path = conv_backend.path_for(x, weight, stride, dilation, groups) if x.numel() > 0 else "aten"
        if path == "aten":  # the aten path's backends (fastres.conv_aten): oneDNN, aten conv + epilogue
            impl = conv_backend.aten_impl(x, weight, bias, residual, stride, padding, dilation,
                                          in_scale is not None or in_shift is not None or in_relu, want_stats,
                                          relu=relu)
            if impl == "onednn":
                return conv_aten.onednn_conv2d_act(x, weight, bias, residual, stride, padding, dilation, groups,
                                                   relu)
            if impl == "epilogue":
                return conv_aten.epilogue_conv2d_act(x, weight, bias, residual, stride, padding, dilation, groups,
                                                     relu)
        conv = conv_ops.family({"fused": "triton", "cudnn": "cudnn"}.get(path, "torch")).conv2d_act
    y, mean, var = conv(x, weight, bias, in_scale, in_shift, residual, stride, padding, dilation, groups, in_relu,
                        relu, want_stats)
    if not want_stats:
        return y
    if stats == "moments":
        return y, mean, var
    m = out_shape[0] * out_shape[2] * out_shape[3]
    return y, mean * m, (var + mean.square()) * m
