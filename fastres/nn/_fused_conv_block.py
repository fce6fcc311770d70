"""A ResNet block's forward through the fused convolution (``FASTRES_CONV=fused``, or
``FASTRES_CONV=cudnn``: the same composition with each conv2d_act call taking cuDNN's
fused graphs, :mod:`fastres.cudnn`).

Called from :mod:`fastres.nn.blocks` (``BasicBlock`` / ``Bottleneck``) through one hook;
returns None when the block cannot take this path, and the block then runs its usual
forward. Where it applies:

* a BatchNorm that normalises with batch statistics (training, or no running stats):
  the conv before it emits the per-channel mean and biased variance of its output
  (``conv2d_act(..., stats="moments")``), the BN becomes a per-channel scale/shift
  ``w/sqrt(var+eps)``, ``b - mean*scale`` (differentiable through mean and var, so
  every gradient is the BN's), the running statistics are updated from those moments
  exactly as ``nn.BatchNorm2d`` does (unbiased variance, ``num_batches_tracked``,
  ``momentum=None``), and the scale/shift + ReLU are applied by the *next* conv as it
  loads its input (prologue). The last BN, the residual add and the ReLU are one
  ``affine_act`` pass. So a Bottleneck in training is: conv1 (+stats) → conv2
  (prologue bn1+ReLU, +stats) → conv3 (prologue bn2+ReLU, +stats) → bn3 + add + ReLU;
  the downsample conv emits its stats too.
* a BatchNorm in eval with running statistics: the same scale/shift from the running
  statistics. When every BN of the block is in eval, each BN is folded into its conv
  (:func:`fastres.fold.folded_conv_bn`, cached) and each conv runs with its folded bias
  (+ residual) + ReLU in the epilogue: one kernel per conv.

Eligible blocks: plain ``nn.Conv2d`` (zeros padding) and plain BatchNorm2d modules
(the rules of :mod:`fastres.nn.blocks`), downsample None, ``Sequential(conv, bn)`` or
a :class:`~fastres.nn.blocks.PadShortcut`, and an identity in the branch's dtype.
Under autocast the block computes in autocast's dtype (inputs and weights cast once,
as autocast's convolution does).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import conv_backend, fold
from .. import functional as FF
from .. import _validate as V
from .._reference import acc_dtype, memory_format_of
from .batchnorm import _in_backward

Tensor = torch.Tensor


def _pairs(block: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    if hasattr(block, "conv3"):
        return [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    return [(block.conv1, block.bn1), (block.conv2, block.bn2)]


def _downsample_pair(block: nn.Module):
    """(conv, bn) of a standard downsample, "pad" for PadShortcut, None for no downsample,
    False when the downsample is something else."""
    from .blocks import PadShortcut, _has_hooks
    ds = block.downsample
    if ds is None:
        return None
    if type(ds) is nn.Sequential and len(ds) == 2 and not _has_hooks(ds):
        return ds[0], ds[1]
    if type(ds) is PadShortcut and not _has_hooks(ds):
        return "pad"
    return False


def _eligible(block: nn.Module, x: Tensor) -> bool:
    if not conv_backend.may_fuse(x.device):
        return False
    from .blocks import _foldable_conv, _fusable_bn
    pairs = _pairs(block)
    ds = _downsample_pair(block) if block.shortcut else None
    if ds is False:
        return False
    if isinstance(ds, tuple):
        pairs = pairs + [ds]
    for conv, bn in pairs:
        if not (_foldable_conv(conv) and _fusable_bn(bn)):
            return False
        if bn.training and bn.running_mean is not None and FF.transforms_active():
            return False  # vmap/jvp: the usual forward raises F.batch_norm's (functorch's) error for the update
        if conv.weight.dtype != block.conv1.weight.dtype:
            return False
    # FASTRES_CONV=fused or cudnn (the cuDNN graphs), or auto with every conv's shape class
    # measured faster fused
    cl = memory_format_of(x) == torch.channels_last
    dt = fold.compute_dtype(x, block.conv1.weight)
    keys = [conv_backend.shape_key(dt, cl, c.weight.shape, c.stride, c.dilation, c.groups) for c, _ in pairs]
    if conv_backend.convs_for(x.device, keys) not in ("fused", "cudnn"):
        return False
    if block.shortcut and ds is None or ds == "pad":
        if x.dtype != dt:  # autocast with an fp32 identity: the unfused rounding order applies
            return False
    return True


def _bn_affine(bn: nn.BatchNorm2d, mean: Optional[Tensor], var: Optional[Tensor], count: int,
               acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The BN as a per-channel (scale, shift) in ``acc``, with nn.BatchNorm2d's
    bookkeeping (identical to :func:`fastres.nn.batchnorm.batch_norm_act_module`)."""
    if not _uses_batch_stats(bn):
        return FF.fold_scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, acc)
    factor = bn.momentum
    # not in activation checkpointing's recomputation: the forward already counted the batch
    if bn.training and bn.track_running_stats and not _in_backward():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = None
        if bn.running_mean is not None:
            torch.ops.fastres.update_running_stats(
                bn.running_mean, bn.running_var, mean.detach(), var.detach(),
                0.0 if factor is None else float(factor), count,
                bn.num_batches_tracked if factor is None else None)
    if bn.training and not bn.eps > 0:  # F.batch_norm's own check, same type and text
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    return FF.fold_scale_shift(bn.weight, bn.bias, mean, var, bn.eps, acc)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, dt: torch.dtype, in_scale: Optional[Tensor],
             in_shift: Optional[Tensor], in_relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """y = conv(prologue(x)) (no BN applied yet) and bn's (scale, shift) for y."""
    acc = acc_dtype(dt)
    weight = conv.weight.to(dt)
    bias = None if conv.bias is None else conv.bias.to(dt)
    batch = _uses_batch_stats(bn)
    out = FF.conv2d_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, in_scale=in_scale,
                        in_shift=in_shift, in_relu=in_relu, stats="moments" if batch else False)
    if batch:
        y, mean, var = out
        V.check_training_size(y)
    else:
        y, mean, var = out, None, None
    count = y.numel() // y.shape[1]
    scale, shift = _bn_affine(bn, mean, var, count, acc)
    return y, scale, shift


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, dt: torch.dtype, residual: Optional[Tensor],
            relu: bool) -> Tensor:
    weight, bias = fold.folded_conv_bn(conv, bn, dt)
    return FF.conv2d_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, residual=residual,
                         activation="relu" if relu else "none")


def forward(block: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The block's output through :func:`fastres.functional.conv2d_act`, or None when
    the fused conv is not selected for x's device or the block is not eligible."""
    if not _eligible(block, x):
        return None
    dt = fold.compute_dtype(x, block.conv1.weight)
    pairs = _pairs(block)
    ds = _downsample_pair(block) if block.shortcut else None
    all_bns = [bn for _, bn in pairs] + ([ds[1]] if isinstance(ds, tuple) else [])
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dt)
        if not any(_uses_batch_stats(bn) for bn in all_bns):  # eval: one kernel per conv
            out = xc
            for conv, bn in pairs[:-1]:
                out = _folded(conv, bn, out, dt, None, True)
            identity = _identity(block, ds, xc, dt, folded=True)
            return _folded(pairs[-1][0], pairs[-1][1], out, dt, identity, True)
        out, scale, shift = xc, None, None
        for i, (conv, bn) in enumerate(pairs):
            out, scale, shift = _conv_bn(conv, bn, out, dt, scale, shift, in_relu=i > 0)
        identity = _identity(block, ds, xc, dt, folded=False)
        return FF.affine_act(out, scale, shift, identity, "relu")


def _identity(block: nn.Module, ds, xc: Tensor, dt: torch.dtype, folded: bool) -> Optional[Tensor]:
    if not block.shortcut:
        return None
    if ds is None:
        return xc
    if ds == "pad":
        return block.downsample(xc)
    conv, bn = ds
    if folded:
        return _folded(conv, bn, xc, dt, None, False)
    y, scale, shift = _conv_bn(conv, bn, xc, dt, None, None, in_relu=False)
    return FF.affine_act(y, scale, shift, None, "none")
