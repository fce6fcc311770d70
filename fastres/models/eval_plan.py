"""The whole-model CPU eval plan of a fastres ``ResNet`` (fp32 inference, and bf16 under
``torch.autocast("cpu", torch.bfloat16)`` where oneDNN has bf16 kernels).

Built from the folds of :mod:`fastres.fold` (cached per model, keyed by a stamp of every
submodule, parameter and buffer under the fold cache's rules; dropped by
``fastres.fold.invalidate`` / ``clear_cache``, switched by ``fastres.fold.use_eval_plan``
and ``fastres.fold.fold_stem``). It lives in the models layer because it walks a model's
blocks (``models -> nn -> fold -> functional -> ops``: nothing below imports it).

Each folded convolution runs the ``onednn`` backend of
:func:`fastres.functional.conv2d_act` -- the plan binds
:func:`fastres.conv_aten.onednn_conv2d_act` and :func:`fastres.conv_aten.onednn_conv2d_add_relu_`
once, when it is built, and calls them with the weights it prepacked (no per-conv
validation or dispatch: one implementation of the step, one home).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
from torch import nn

from .. import conv_aten, conv_backend, fold
from .. import functional as FF
from ..nn.blocks import _FusedBlock, _foldable_conv, _fusable_bn

Tensor = torch.Tensor

__all__ = ["eval_plan_forward", "plan_of", "plan_dtype"]


class _PlanUnit:
    """One folded conv of an eval plan: its oneDNN-packed weight per input shape, and the
    oneDNN backend functions, bound once."""
    __slots__ = ("weight", "bias", "pad", "stride", "dil", "groups", "packed", "conv_act", "add_relu_")

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype = torch.float32):
        # (bf16: the fold computed in fp32, then the weight and the bias rounded once to bf16
        # -- oneDNN's bf16 primitive with a fused add takes a bias of the input's dtype, and
        # inductor's frozen bf16 graphs hold the same rounded constants)
        self.weight, self.bias = fold.folded_conv_bn(conv, bn, dtype)
        if self.bias.dtype != dtype:
            self.bias = self.bias.to(dtype)
        self.pad, self.stride, self.dil = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.groups = conv.groups
        self.packed: Dict[tuple, Tensor] = {}
        self.conv_act = conv_aten.onednn_conv2d_act
        self.add_relu_ = conv_aten.onednn_conv2d_add_relu_

    def w(self, x: Tensor) -> Tensor:
        key = x.shape
        p = self.packed.get(key)
        if p is None:
            p = conv_aten.packed_weight(self.weight, x, self.pad, self.stride, self.dil, self.groups)
            if len(self.packed) >= conv_aten.MAX_PACKED:
                self.packed.pop(next(iter(self.packed)))
            self.packed[key] = p
        return p

    def __call__(self, x: Tensor, relu: bool) -> Tensor:
        return self.conv_act(x, self.weight, self.bias, None, self.stride, self.pad, self.dil, self.groups, relu,
                             self.w(x))

    def add_relu_into(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(conv(x) + bias + other)`` written into ``other`` (a buffer the plan owns;
        a 1x1 output returns a new tensor: see :func:`fastres.conv_aten.onednn_conv2d_add_relu_`)."""
        return self.add_relu_(other, x, self.weight, self.bias, self.stride, self.pad, self.dil, self.groups,
                              self.w(x))


class _EvalPlan:
    __slots__ = ("stamp", "pins", "stem", "blocks", "dtype", "__weakref__")


# model -> {compute dtype: _EvalPlan}; weak, and dropped by fold.invalidate() / clear_cache()
# like the folds.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, Dict[torch.dtype, _EvalPlan]]" = weakref.WeakKeyDictionary()
fold.register_derived_cache(_PLANS)


def plan_of(model: nn.Module, dtype: torch.dtype = torch.float32) -> Optional[_EvalPlan]:
    """The cached eval plan of ``model`` for ``dtype`` (``None`` if none is built)."""
    plans = _PLANS.get(model)
    return None if plans is None else plans.get(dtype)


def _model_stamp(model: nn.Module):
    """(stamp, pins) of everything the plan depends on: every submodule (object,
    training flag, no hooks), every parameter and buffer (object, ``_version``,
    address, strides; dtype and device are checked when the plan is built). ``None`` when the model cannot use a plan
    (a module in training mode or with hooks, an inference tensor, a non-fp32 or
    non-CPU parameter)."""
    items = []
    pins = []
    add, pin = items.append, pins.append
    try:
        for m in model.modules():
            if m.training or m._forward_hooks or m._forward_pre_hooks:
                return None
            add(id(m))
            for d in (m._parameters, m._buffers):
                for t in d.values():
                    if t is None:
                        add(None)
                    else:  # (a new dtype or device is a new storage: data_ptr changes)
                        add((id(t), t._version, t.data_ptr(), t.stride()))
                        pin(t)
    except RuntimeError:  # an inference tensor has no version counter: no plan
        return None
    return tuple(items), pins


def _build_plan(model: nn.Module, stamp, pins, dtype: torch.dtype = torch.float32) -> Optional[_EvalPlan]:
    for t in pins:
        if t.dtype not in (torch.float32, torch.int64) or t.device.type != "cpu":
            return None
    if not all(hasattr(model, n) for n in ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc")):
        return None  # (e.g. CifarResNet: no max-pool)
    if not (_fusable_bn(model.bn1) and _foldable_conv(model.conv1) and type(model.maxpool) is nn.MaxPool2d
            and type(model.avgpool) is nn.AdaptiveAvgPool2d and tuple(_pair(model.avgpool.output_size)) == (1, 1)
            and type(model.fc) is nn.Linear and type(model.relu) is nn.ReLU):
        return None
    blocks = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name, None)
        if type(layer) is not nn.Sequential:
            return None
        for blk in layer:
            if not isinstance(blk, _FusedBlock) or not blk.shortcut or type(blk.relu) is not nn.ReLU:
                return None
            units = blk._units()
            ds = blk.downsample
            if ds is not None:
                if type(ds) is not nn.Sequential or len(ds) != 2:
                    return None
                units = units + [(ds[0], ds[1])]
            for conv, bn in units:
                if not (_foldable_conv(conv) and _fusable_bn(bn) and bn.running_mean is not None
                        and bn.running_var is not None):
                    return None
            with torch.no_grad():
                pu = [_PlanUnit(c, b, dtype) for c, b in units]
            blocks.append((pu[:-1], pu[-1]) if ds is not None else (pu, None))
    plan = _EvalPlan()
    plan.stamp, plan.pins, plan.blocks, plan.dtype = stamp, pins, blocks, dtype
    plan.stem = None
    if fold.fold_stem():
        with torch.no_grad():
            plan.stem = _PlanUnit(model.conv1, model.bn1, dtype)
    return plan


def _pair(v):
    return (v, v) if isinstance(v, int) else v


_BF16: list = []


def _onednn_bf16() -> bool:
    """Whether oneDNN has bf16 convolution kernels on this CPU (avx512_bf16 / AMX, or
    avx512 emulation where torch allows it), asked once."""
    if not _BF16:
        try:
            _BF16.append(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        except (AttributeError, RuntimeError):
            _BF16.append(False)
    return _BF16[0]


def plan_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype an eval plan would compute ``x`` in: fp32 for an fp32 input outside
    autocast; bf16 under ``torch.autocast("cpu", dtype=torch.bfloat16)`` for an fp32 or
    bf16 input where oneDNN has bf16 kernels (:func:`_onednn_bf16`); ``None`` otherwise
    (fp16 autocast, other dtypes: the module-by-module path)."""
    if torch.is_autocast_enabled("cpu"):
        if (torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
                and _onednn_bf16()):
            return torch.bfloat16
        return None
    return torch.float32 if x.dtype == torch.float32 else None


def eval_plan_forward(model: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The whole eval forward of a fastres ``ResNet`` on fp32 CPU tensors without any
    gradient, or ``None`` where the plan does not apply (then the caller runs the
    module-by-module forward, which raises the clear errors).

    The plan (built on the first call, cached per model) holds every block's folded,
    oneDNN-packed convolutions; a call walks them without the per-block and per-conv
    checks: one bias+ReLU-fused primitive per conv, the last conv of each block adding
    the identity and the ReLU in place into the identity buffer (which the plan owns),
    the pools and the classifier as modules. The stem runs as the module-by-module forward does
    (unfolded), so ``torch.fx`` graphs stay bit-identical to eager (:func:`fastres.fold.fold_stem` folds it). Validity: the plan
    is rebuilt whenever the model stamp changes — any submodule replaced, put in
    training mode or given hooks, any parameter or buffer replaced, written in place
    (``_version``), moved or re-laid-out — the same rules as the fold cache;
    :func:`fastres.fold.invalidate` drops it.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # (first: no traced shape arithmetic)
        return None
    if (not fold.use_eval_plan() or not conv_backend.use_onednn() or type(x) is not torch.Tensor
            or x.device.type != "cpu" or x.dim() != 4 or x.requires_grad):
        return None
    dtype = plan_dtype(x)
    if dtype is None or x.numel() == 0:
        return None
    from torch.nn.modules import module as _module
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or getattr(_module, "_global_backward_pre_hooks", None)):
        return None
    if not conv_aten.onednn_available():
        return None
    if FF.transforms_active():  # vmap/grad/jvp, forward AD
        return None
    if conv_backend.conv_for(x.device) != "aten":  # FASTRES_CONV=fused asks for fastres's conv
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return None  # gradients wanted: the differentiable module path (no plan built)
    got = _model_stamp(model)
    if got is None:
        return None
    stamp, pins = got
    plans = _PLANS.get(model)
    plan = None if plans is None else plans.get(dtype)
    if plan is None or plan.stamp != stamp:
        if plans is not None and plan is not None:
            plans.clear()  # stale: every dtype's plan was built from the old stamp
        plan = _build_plan(model, stamp, pins, dtype)
        if plan is None:
            _PLANS.pop(model, None)
            return None
        _PLANS.setdefault(model, {})[dtype] = plan
    w = model.conv1.weight
    if x.shape[1] != w.shape[1] * model.conv1.groups:
        return None  # the module path raises the clear error
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if plan.stem is not None:
        y = model.maxpool(plan.stem(x.to(dtype), True))
    else:  # as the module path: the fx graph's stem nodes compute exactly this (under
        # autocast conv1 computes in bf16 and bn1 keeps bf16, as in the module path)
        y = model.maxpool(torch.relu_(model.bn1(model.conv1(x))))
        if y.dtype != dtype:  # (a bf16 input outside autocast never gets here: no plan)
            y = y.to(dtype)
    for units, ds in plan.blocks:
        out = y
        for u in units[:-1]:
            out = u(out, True)
        idn = y if ds is None else ds(y, False)  # y: the previous block's output, owned by the plan
        if idn.stride() != out.stride():
            idn = idn.contiguous(memory_format=_fmt(out))
        y = units[-1].add_relu_into(out, idn)
    y = torch.flatten(model.avgpool(y), 1)
    return model.fc(y)


def _fmt(t: Tensor):
    return torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last)
                                   and not t.is_contiguous()) else torch.contiguous_format

