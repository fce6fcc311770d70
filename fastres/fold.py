"""Eval-mode folding of a BatchNorm into the convolution before it, and its cache.

In eval, ``bn(conv(x))`` is ``conv'(x)`` with ``W' = W * s`` and ``b' = (b - rm) * s + beta``
(``s = gamma / sqrt(rv + eps)``). The fold is computed in fp32 (fp64 for fp64) and
only then cast to the compute dtype (pytorch#120545: folding in bf16/fp16 loses
accuracy); the folded bias stays in fp32/fp64.

The cache is never stale, and needs no invalidation: an entry is keyed by what the
fold depends on. It is reused only when every source tensor (conv weight and bias, BN
weight and bias, running mean and var) is the *same object*, at the same storage
address, with the same strides (memory format), device, dtype and ``_version``
counter as when the entry was made, with the same eps and compute dtype. The entry
holds a detached alias of each source, so a source's storage cannot be freed and its
address reused while the entry lives. ``load_state_dict`` (``param.copy_``), optimizer
steps, ``copy_``, ``torch.no_grad(): p.mul_(...)`` and the running-stat updates of a
training step all bump ``_version``; ``p.data = t`` changes the address; replacing a
parameter changes the object. Mode switches (``train()``/``eval()``) therefore keep
the cache: a validation loop or a server calling ``model.eval()`` before every
forward folds once. ``.to()`` / ``.float()`` drop the module's entries (memory). The
one change no counter sees is an in-place write through ``p.data`` (``p.data.mul_(2)``:
``.data`` has its own version counter); call :func:`invalidate` after such a write.

Where gradients can flow into the fold (an eval-mode model whose parameters are
being trained, e.g. frozen-BN fine-tuning), the cached values are returned through an
autograd function whose backward is the fold's, so gradients match
``nn.BatchNorm2d`` in eval mode; under ``torch.compile`` the fold is traced inline.

A fastres ``ResNet`` doing fp32 CPU inference runs a whole-model *eval plan* built from
these folds (:func:`eval_plan_forward`): cached per model, keyed by a stamp of every
submodule, parameter and buffer under the same rules, dropped by :func:`invalidate`.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from . import functional as FF
from ._validate import check_eps

Tensor = torch.Tensor

__all__ = ["fold_conv_bn", "folded_conv_bn", "invalidate", "clear_cache", "cache_size", "compute_dtype",
           "onednn_conv_act", "use_onednn", "use_eval_plan", "eval_plan_forward", "fold_stem"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` with ``weight`` computes in: autocast's dtype
    for a non-fp64 input while autocast is on for x's device, else the weight's."""
    dev = x.device.type
    if x.dtype != torch.float64 and x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def fold_conv_bn(conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                 bn_bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
                 dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The folded ``(weight, bias)`` of conv → eval BN; differentiable, uncached.

    ``weight`` is returned in ``dtype`` (computed in fp32, fp64 for fp64, then cast);
    ``bias`` in fp32 (fp64 for fp64).
    """
    acc = _acc(dtype)
    scale, shift = FF.fold_scale_shift(bn_weight, bn_bias, running_mean, running_var, eps, acc)
    w = conv_weight.to(acc) * scale.reshape(-1, *([1] * (conv_weight.dim() - 1)))
    b = shift if conv_bias is None else conv_bias.to(acc) * scale + shift
    return w.to(dtype), b


class _Entry:
    __slots__ = ("refs", "pins", "stamp", "weight", "bias", "packed")

    def __init__(self, refs, pins, stamp, weight, bias):
        self.refs, self.stamp, self.weight, self.bias = refs, stamp, weight, bias
        self.pins = pins  # detached aliases: the sources' storages stay alive, so addresses are never reused
        self.packed: Dict[tuple, Tensor] = {}  # oneDNN-reordered weight per input shape


# conv module -> {(id(bn), dtype): _Entry}; weak, so a deleted model frees its entries.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Entry]]" = weakref.WeakKeyDictionary()


def _sources(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _stamp(tensors, eps) -> Optional[tuple]:
    try:
        return (eps,) + tuple(None if t is None else (t._version, t.data_ptr(), t.stride(), t.device, t.dtype)
                              for t in tensors)
    except RuntimeError:  # inference tensors have no version counter: never cache them
        return None


def _same_objects(refs, tensors) -> bool:
    for r, t in zip(refs, tensors):
        if (r is None) != (t is None) or (r is not None and r() is not t):
            return False
    return True


class _CachedFold(torch.autograd.Function):
    """Returns the cached folded ``(weight, bias)`` and gives their gradients back to the
    conv and BN parameters — the backward of :func:`fold_conv_bn`, without recomputing
    the fold in the forward."""

    @staticmethod
    def forward(ctx, weight_f, bias_f, conv_w, conv_b, bn_w, bn_b, rm, rv, eps):  # type: ignore[override]
        ctx.save_for_backward(conv_w, conv_b, bn_w, rm, rv)
        ctx.eps = eps
        ctx.has_bn_b = bn_b is not None
        ctx.bn_b_dtype = bn_b.dtype if bn_b is not None else None
        return weight_f, bias_f

    @staticmethod
    def backward(ctx, g_w, g_b):  # type: ignore[override]
        conv_w, conv_b, bn_w, rm, rv = ctx.saved_tensors
        acc = _acc(conv_w.dtype) if g_b is None else g_b.dtype
        inv = torch.rsqrt(rv.to(acc) + ctx.eps)
        s = inv * bn_w.to(acc) if bn_w is not None else inv
        need = ctx.needs_input_grad
        g_conv_w = g_conv_b = g_bn_w = g_bn_b = None
        g_s = torch.zeros_like(s)
        if g_w is not None:
            gw = g_w.to(acc)
            if need[2]:
                g_conv_w = (gw * s.reshape(-1, *([1] * (gw.dim() - 1)))).to(conv_w.dtype)
            g_s = g_s + (gw * conv_w.to(acc)).sum(dim=tuple(range(1, gw.dim())))
        if g_b is not None:
            centered = -rm.to(acc) if conv_b is None else conv_b.to(acc) - rm.to(acc)
            g_s = g_s + g_b * centered
            if need[3] and conv_b is not None:
                g_conv_b = (g_b * s).to(conv_b.dtype)
            if need[5] and ctx.has_bn_b:
                g_bn_b = g_b.to(ctx.bn_b_dtype)
        if need[4] and bn_w is not None:
            g_bn_w = (g_s * inv).to(bn_w.dtype)
        return None, None, g_conv_w, g_conv_b, g_bn_w, g_bn_b, None, None, None


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(weight, bias)`` of ``conv`` with the eval-mode ``bn`` folded in, cached where
    safe (see the module docstring). ``weight`` in ``dtype``, ``bias`` in fp32/fp64.

    When gradients can flow into the fold (grad mode, parameters requiring grad), the
    cached values come back through an autograd function whose backward is the fold's,
    so an eval-mode model being fine-tuned neither recomputes the fold each forward nor
    loses any gradient."""
    check_eps(bn.eps)  # as the unfolded eval BatchNorm would (fastres.functional), on every torch
    tensors = _sources(conv, bn)
    if torch.compiler.is_compiling() or FF.transforms_active():  # vmap/grad/jvp, forward AD: uncached aten fold
        return fold_conv_bn(*tensors, bn.eps, dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    stamp = _stamp(tensors, bn.eps)
    if stamp is None:
        return fold_conv_bn(*tensors, bn.eps, dtype)
    weight, bias = _cached(conv, bn, dtype, tensors, stamp)
    if needs_grad:
        return _CachedFold.apply(weight, bias, *tensors, bn.eps)
    return weight, bias


def _cached(conv, bn, dtype, tensors, stamp) -> Tuple[Tensor, Tensor]:
    key = (id(bn), dtype)
    entries = _CACHE.get(conv)
    if entries is not None:
        e = entries.get(key)
        if e is not None and e.stamp == stamp and _same_objects(e.refs, tensors):
            return e.weight, e.bias
    else:
        entries = {}
        _CACHE[conv] = entries
    # normal (non-inference) tensors, so the cache also serves calls outside inference_mode
    with torch.inference_mode(False), torch.no_grad():
        weight, bias = fold_conv_bn(*tensors, bn.eps, dtype)
    refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
    pins = tuple(None if t is None else t.detach() for t in tensors)
    entries[key] = _Entry(refs, pins, stamp, weight, bias)
    return weight, bias


def invalidate(module: nn.Module) -> None:
    """Drop the cached folds of every convolution in ``module`` (and ``module`` itself)."""
    for m in module.modules():
        _CACHE.pop(m, None)
        _PLANS.pop(m, None)


def clear_cache() -> None:
    """Drop every cached fold (and eval plan)."""
    _CACHE.clear()
    _PLANS.clear()


def cache_size(module: Optional[nn.Module] = None) -> int:
    """Number of cached folds (of ``module``'s convolutions, or in all)."""
    if module is None:
        return sum(len(v) for v in list(_CACHE.values()))
    return sum(len(_CACHE.get(m, ())) for m in module.modules())


# --------------------------------------------------------------------------- oneDNN fused conv (CPU inference)
_ONEDNN = None


def _onednn_op():
    global _ONEDNN
    if _ONEDNN is None:
        try:
            op = torch.ops.mkldnn._convolution_pointwise
            _ONEDNN = op if torch.backends.mkldnn.is_available() else False
        except (AttributeError, RuntimeError):
            _ONEDNN = False
    return _ONEDNN


_use_onednn = [True]


def use_onednn(enabled: Optional[bool] = None) -> bool:
    """Get (or set) whether CPU inference runs the folded conv as one oneDNN primitive
    with the bias, residual add and ReLU fused in (``torch.ops.mkldnn._convolution_pointwise``,
    the kernel inductor uses for frozen CPU graphs). On by default; returns the setting."""
    if enabled is not None:
        _use_onednn[0] = bool(enabled)
    return _use_onednn[0]


def _out_hw(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


_MAX_PACKED = 4  # input shapes remembered per folded conv


def _packed_weight(conv: nn.Conv2d, bn: Optional[nn.Module], weight: Tensor, x: Tensor, pad, stride, dil) -> Tensor:
    """The folded weight reordered once into oneDNN's blocked layout for this input
    shape (kept with the cache entry, so it goes stale exactly when the fold does)."""
    entries = _CACHE.get(conv)
    e = entries.get((id(bn), weight.dtype)) if entries is not None and bn is not None else None
    if e is None or e.weight is not weight:
        return weight
    shape = tuple(x.shape)
    w = e.packed.get(shape)
    if w is None:
        try:
            with torch.inference_mode(False), torch.no_grad():
                w = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), pad, stride, dil, conv.groups,
                                                              list(shape))
        except (RuntimeError, AttributeError, NotImplementedError):
            return weight
        if len(e.packed) >= _MAX_PACKED:
            e.packed.pop(next(iter(e.packed)))
        e.packed[shape] = w
    return w


def onednn_conv_act(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                    activation: Optional[str], bn: Optional[nn.Module] = None) -> Optional[Tensor]:
    """``act(conv(x, weight) + bias (+ residual))`` as one oneDNN primitive, or ``None``
    where that does not apply (then the caller runs conv + the fused epilogue op).

    Applies to fp32 CPU tensors outside autocast and torch.compile, when no gradient is
    needed (the primitive has no autograd): inference, i.e. the cached-fold case.
    """
    if not _use_onednn[0] or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return None
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu") or x.numel() == 0 \
            or FF.transforms_active():  # the primitive has no batching rule nor forward-AD formula
        return None
    op = _onednn_op()
    if not op:
        return None
    pad, stride, dil = list(conv.padding), list(conv.stride), list(conv.dilation)
    packed = _packed_weight(conv, bn, weight, x, pad, stride, dil)
    if residual is not None:
        kh, kw = weight.shape[2], weight.shape[3]
        shape = (x.shape[0], weight.shape[0], _out_hw(x.shape[2], kh, stride[0], pad[0], dil[0]),
                 _out_hw(x.shape[3], kw, stride[1], pad[1], dil[1]))
        if tuple(residual.shape) != shape or residual.dtype != torch.float32 or residual.device != x.device:
            return None  # let the validated path raise its clear error
        if shape[2] * shape[3] == 1:
            # A 1x1 output with the residual add fused in: torch 2.11's primitive fails
            # ("could not create a memory") whenever it runs channels-last -- always with
            # a packed (blocked) weight, and with a channels-last-strided input; 2.14
            # works. Every version takes the conv + fused epilogue path here instead (a
            # 1x1 map is tiny; the unary primitive below has no such failure).
            return None
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            residual = residual.contiguous(memory_format=torch.channels_last)
        else:
            residual = residual.contiguous()
        return op.binary(x, residual, packed, bias, pad, stride, dil, conv.groups, "add", 1.0,
                         activation or "none", [], "")
    return op(x, packed, bias, pad, stride, dil, conv.groups, activation or "none", [], "")


# --------------------------------------------------------------------------- whole-model CPU eval plan
class _PlanUnit:
    """One folded conv of an eval plan: its oneDNN-packed weight per input shape."""
    __slots__ = ("conv", "bn", "weight", "bias", "pad", "stride", "dil", "groups", "packed")

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        self.conv, self.bn = conv, bn
        self.weight, self.bias = folded_conv_bn(conv, bn, torch.float32)
        self.pad, self.stride, self.dil = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.groups = conv.groups
        self.packed: Dict[tuple, Tensor] = {}

    def w(self, x: Tensor) -> Tensor:
        key = tuple(x.shape)
        p = self.packed.get(key)
        if p is None:
            p = _packed_weight(self.conv, self.bn, self.weight, x, self.pad, self.stride, self.dil)
            if len(self.packed) >= _MAX_PACKED:
                self.packed.pop(next(iter(self.packed)))
            self.packed[key] = p
        return p

    def __call__(self, x: Tensor, act: str) -> Tensor:
        return _CONV_ACT(x, self.w(x), self.bias, self.pad, self.stride, self.dil, self.groups, act, [], "")

    def add_relu_into(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(conv(x) + bias + other)`` written into ``other`` (a buffer the plan owns).
        A 1x1 output takes the module path's conv + fused epilogue instead (the same
        torch 2.11 oneDNN failure as in :func:`onednn_conv_act`), computing what it does."""
        if other.shape[2] * other.shape[3] == 1:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dil, self.groups)
            return FF.affine_act(y, None, None, other, "relu")
        return _CONV_ADD_RELU_(other, x, self.w(x), self.bias, self.pad, self.stride, self.dil, self.groups,
                               "add", 1.0, "relu", [], "")


_CONV_ACT = _CONV_ADD_RELU_ = None
_CONV_BACKEND = []


def _conv_backend():
    """fastres.conv_backend (the conv selection, ``FASTRES_CONV``) where this fastres has it."""
    if not _CONV_BACKEND:
        try:
            from . import conv_backend as cb  # type: ignore[attr-defined]
        except ImportError:
            cb = None
        _CONV_BACKEND.append(cb)
    return _CONV_BACKEND[0]


def _plan_ops() -> bool:
    """Resolve the oneDNN overloads once (calling an overload packet resolves it per call)."""
    global _CONV_ACT, _CONV_ADD_RELU_
    if _CONV_ACT is None:
        try:
            _CONV_ACT = torch.ops.mkldnn._convolution_pointwise.default
            _CONV_ADD_RELU_ = torch.ops.mkldnn._convolution_pointwise_.binary
        except (AttributeError, RuntimeError):
            _CONV_ACT = False
    return bool(_CONV_ACT)


class _EvalPlan:
    __slots__ = ("stamp", "pins", "stem", "blocks", "__weakref__")


# model -> _EvalPlan; weak, and dropped by invalidate() like the folds.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, _EvalPlan]" = weakref.WeakKeyDictionary()
_use_plan = [True]
_fold_stem = [False]


def fold_stem(enabled: Optional[bool] = None) -> bool:
    """Get (or set) whether the eval plan also folds the stem's BN into ``conv1`` (one
    oneDNN conv+ReLU instead of conv, BN, ReLU: ~2 % of resnet50's CPU inference).
    Off by default: with it, eager eval differs from the ``torch.fx`` graph of the
    model (whose stem runs ``conv1``/``bn1``/``relu`` unfused) by rounding, no longer
    bit for bit. Returns the setting; changing it drops every plan."""
    if enabled is not None and bool(enabled) != _fold_stem[0]:
        _fold_stem[0] = bool(enabled)
        _PLANS.clear()
    return _fold_stem[0]


def use_eval_plan(enabled: Optional[bool] = None) -> bool:
    """Get (or set) whether a fastres ResNet in eval mode runs fp32 CPU inference through
    its cached whole-model plan (:func:`eval_plan_forward`). On by default."""
    if enabled is not None:
        _use_plan[0] = bool(enabled)
    return _use_plan[0]


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


def _build_plan(model: nn.Module, stamp, pins) -> Optional[_EvalPlan]:
    from .nn.blocks import _FusedBlock, _fusable_bn, _foldable_conv  # models -> nn -> fold: imported lazily
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
                pu = [_PlanUnit(c, b) for c, b in units]
            blocks.append((pu[:-1], pu[-1]) if ds is not None else (pu, None))
    plan = _EvalPlan()
    plan.stamp, plan.pins, plan.blocks = stamp, pins, blocks
    plan.stem = None
    if _fold_stem[0]:
        with torch.no_grad():
            plan.stem = _PlanUnit(model.conv1, model.bn1)
    return plan


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def eval_plan_forward(model: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The whole eval forward of a fastres ``ResNet`` on fp32 CPU tensors without any
    gradient, or ``None`` where the plan does not apply (then the caller runs the
    module-by-module forward, which raises the clear errors).

    The plan (built on the first call, cached per model) holds every block's folded,
    oneDNN-packed convolutions; a call walks them without the per-block and per-conv
    checks: one bias+ReLU-fused primitive per conv, the last conv of each block adding
    the identity and the ReLU in place into the identity buffer (which the plan owns),
    the pools and the classifier as modules. The stem runs as the module-by-module forward does
    (unfolded), so ``torch.fx`` graphs stay bit-identical to eager (:func:`fold_stem` folds it). Validity: the plan
    is rebuilt whenever the model stamp changes — any submodule replaced, put in
    training mode or given hooks, any parameter or buffer replaced, written in place
    (``_version``), moved or re-laid-out — the same rules as the fold cache;
    :func:`invalidate` drops it.
    """
    if (not _use_plan[0] or not _use_onednn[0] or type(x) is not torch.Tensor or x.device.type != "cpu"
            or x.dtype != torch.float32 or x.dim() != 4 or x.numel() == 0 or x.requires_grad):
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_autocast_enabled("cpu"):
        return None
    from torch.nn.modules import module as _module
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or getattr(_module, "_global_backward_pre_hooks", None)):
        return None
    if not _onednn_op() or not _plan_ops():
        return None
    ta = getattr(FF, "transforms_active", None)  # vmap/grad/jvp, forward AD (where fastres has them)
    if ta is not None and ta():
        return None
    cb = _conv_backend()
    if cb is not None and cb.conv_for(x.device) != "aten":  # FASTRES_CONV=fused asks for fastres's conv
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return None  # gradients wanted: the differentiable module path (no plan built)
    got = _model_stamp(model)
    if got is None:
        return None
    stamp, pins = got
    plan = _PLANS.get(model)
    if plan is None or plan.stamp != stamp:
        plan = _build_plan(model, stamp, pins)
        if plan is None:
            _PLANS.pop(model, None)
            return None
        _PLANS[model] = plan
    w = model.conv1.weight
    if x.shape[1] != w.shape[1] * model.conv1.groups:
        return None  # the module path raises the clear error
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if plan.stem is not None:
        y = model.maxpool(plan.stem(x, "relu"))
    else:  # as the module path: the fx graph's stem nodes compute exactly this
        y = model.maxpool(torch.relu_(model.bn1(model.conv1(x))))
    for units, ds in plan.blocks:
        out = y
        for u in units[:-1]:
            out = u(out, "relu")
        idn = y if ds is None else ds(y, "none")  # y: the previous block's output, owned by the plan
        if idn.stride() != out.stride():
            idn = idn.contiguous(memory_format=_fmt(out))
        y = units[-1].add_relu_into(out, idn)
    y = torch.flatten(model.avgpool(y), 1)
    return model.fc(y)


def _fmt(t: Tensor):
    return torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last)
                                   and not t.is_contiguous()) else torch.contiguous_format

