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

This module only folds and caches. The folds are convolved by
:func:`fastres.functional.conv2d_act` (its backends live in :mod:`fastres.conv_aten`);
an fp32 CPU fold offers that backend a store for its oneDNN-reordered weight
(``conv_aten.allow_prepack``), kept in the cache entry, so it goes stale with the fold.

A fastres ``ResNet`` doing fp32 CPU inference runs a whole-model *eval plan* built from
these folds (:func:`fastres.models.eval_plan.eval_plan_forward`, a layer above: it walks
blocks): cached per model, keyed by a stamp of every submodule, parameter and buffer
under the same rules. Its switches (:func:`use_eval_plan`, :func:`fold_stem`) live here
with the caches it derives from, and :func:`invalidate` / :func:`clear_cache` drop it
too (the plan registers its cache with :func:`register_derived_cache`).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import conv_aten
from . import functional as FF
from ._validate import check_eps
# re-exported under their old names: their home is the conv backend (choice and implementation)
from .conv_aten import onednn_conv_act  # noqa: F401
from .conv_backend import use_onednn  # noqa: F401

Tensor = torch.Tensor

__all__ = ["fold_conv_bn", "folded_conv_bn", "invalidate", "clear_cache", "cache_size", "compute_dtype",
           "onednn_conv_act", "use_onednn", "use_eval_plan", "fold_stem", "register_derived_cache"]


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
        self.packed: Dict[tuple, Tensor] = {}  # oneDNN-reordered weight per input shape (conv_aten fills it)


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
    e = entries[key] = _Entry(refs, pins, stamp, weight, bias)
    if dtype in (torch.float32, torch.bfloat16) and weight.device.type == "cpu":
        conv_aten.allow_prepack(weight, e.packed)  # the oneDNN backend's reordered weights, kept here
    return weight, bias


def invalidate(module: nn.Module) -> None:
    """Drop the cached folds of every convolution in ``module`` (and ``module`` itself),
    and what is derived from them (the eval plan)."""
    for m in module.modules():
        _CACHE.pop(m, None)
        for d in _DERIVED:
            d.pop(m, None)


def clear_cache() -> None:
    """Drop every cached fold (and eval plan)."""
    _CACHE.clear()
    for d in _DERIVED:
        d.clear()


# Caches keyed by module and built from these folds (the eval plan's): registered by their
# owner, a layer above, and dropped with the folds.
_DERIVED: "list[weakref.WeakKeyDictionary]" = []


def register_derived_cache(cache: "weakref.WeakKeyDictionary") -> None:
    """Have :func:`invalidate`, :func:`clear_cache` and a :func:`fold_stem` change also
    drop ``cache``'s entries (a module -> derived object mapping)."""
    if not any(d is cache for d in _DERIVED):
        _DERIVED.append(cache)


def cache_size(module: Optional[nn.Module] = None) -> int:
    """Number of cached folds (of ``module``'s convolutions, or in all)."""
    if module is None:
        return sum(len(v) for v in list(_CACHE.values()))
    return sum(len(_CACHE.get(m, ())) for m in module.modules())


# --------------------------------------------------------------------------- switches of the eval plan
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
        for d in _DERIVED:
            d.clear()
    return _fold_stem[0]


def use_eval_plan(enabled: Optional[bool] = None) -> bool:
    """Get (or set) whether a fastres ResNet in eval mode runs fp32 CPU inference through
    its cached whole-model plan (:func:`fastres.models.eval_plan.eval_plan_forward`,
    also reachable as ``fastres.fold.eval_plan_forward``). On by default."""
    if enabled is not None:
        _use_plan[0] = bool(enabled)
    return _use_plan[0]

