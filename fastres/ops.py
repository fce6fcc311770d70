"""Custom-op registration: fake (meta) kernels and autograd for every op family.

Two families implement the schemas of docs/DESIGN.md:

* the C++ family, defined in ``csrc/`` with ``TORCH_LIBRARY(fastres, m)`` and loaded
  from ``fastres._C`` (``torch.ops.fastres.bn_act_train`` …; CPU and CUDA kernels),
* the Triton family, defined here with ``torch.library.custom_op`` around the
  launchers of ``fastres.kernels`` (``torch.ops.fastres.triton_bn_act_train`` …).

Both get their fake kernels and autograd formulas from :func:`_register_family`, so
the two can never drift apart. The in-place running-stat update is a separate op,
``fastres::update_running_stats``, with ``mutates_args`` declared (torch.library
refuses autograd on mutating ops, so the differentiable ops stay functional).

Higher-order autograd: the fused backward ops have no derivative of their own. When a
backward must itself be differentiated (``create_graph=True``: gradient penalties,
Hessian-vector products, MAML; the engine then runs the backward with grad mode on),
the registered backward computes the same formulas with the differentiable aten
composition of :mod:`fastres._reference` instead, the batch statistics recomputed as
functions of ``x``. An ordinary backward (grad mode off, also while AOTAutograd traces
a compiled backward) runs the fused backward op, exactly as before.
"""
from __future__ import annotations

import threading
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from . import _triton_ops, backends
from . import _reference as ref
from ._reference import acc_dtype, memory_format_of

Tensor = torch.Tensor

OP_NAMES = ("bn_act_train", "bn_act_train_backward", "affine_act", "affine_act_backward")


class Family(NamedTuple):
    """The callables of one backend. ``bn_act_train`` and ``affine_act`` support autograd."""
    name: str
    bn_act_train: object
    bn_act_train_backward: object
    affine_act: object
    affine_act_backward: object


# ----------------------------------------------------------------------------- fakes
def _fake_bn_act_train(x, weight, bias, residual, eps, relu):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _fake_bn_act_train_backward(grad_y, x, y, weight, mean, var, eps, relu, need_grad_z):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    fmt = memory_format_of(x)
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_z = torch.empty_like(x, memory_format=fmt) if need_grad_z else x.new_empty((0,))
    return grad_x, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), grad_z


def _fake_affine_act(x, scale, shift, residual, relu):
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _fake_affine_act_backward(grad_y, x, y, scale, relu, need_grad_z, need_param_grads):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    fmt = memory_format_of(x)
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_z = torch.empty_like(x, memory_format=fmt) if need_grad_z else x.new_empty((0,))
    n = c if need_param_grads else 0
    return grad_x, grad_z, x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


# ----------------------------------------------------------------------------- autograd
def _make_autograd(bn_bwd, affine_bwd):
    def bn_setup(ctx, inputs, output):
        x, weight, bias, residual, eps, relu = inputs
        y, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, y if relu else None, weight, mean, var)
        ctx.eps, ctx.relu = eps, relu

    def bn_backward(ctx, grad_y, _grad_mean, _grad_var):
        x, y, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        relu = ctx.relu
        bwd = bn_bwd
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            bwd = ref.bn_act_train_backward
            mean, var = ref.batch_stats(x)  # as functions of x, for the second derivative
        grad_x, grad_w, grad_b, grad_z = bwd(grad_y, x, y if relu else x, weight, mean, var,
                                             ctx.eps, relu, bool(need_r and relu))
        grad_res = (grad_z if relu else grad_y) if need_r else None
        return (grad_x if need_x else None,
                grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(weight.dtype if weight is not None else grad_b.dtype) if need_b else None,
                grad_res, None, None)

    def affine_setup(ctx, inputs, output):
        x, scale, shift, residual, relu = inputs
        ctx.save_for_backward(x, output if relu else None, scale)
        ctx.relu = relu

    def affine_backward(ctx, grad_y):
        x, y, scale = ctx.saved_tensors
        need_x, need_s, need_t, need_r = ctx.needs_input_grad[:4]
        relu = ctx.relu
        bwd = ref.affine_act_backward if torch.is_grad_enabled() else affine_bwd  # create_graph=True
        grad_x, grad_z, grad_s, grad_t = bwd(grad_y, x, y if relu else x, scale, relu,
                                             bool(need_r and relu), bool(need_s or need_t))
        grad_res = (grad_z if relu else grad_y) if need_r else None
        return (grad_x if need_x else None, grad_s if need_s else None, grad_t if need_t else None,
                grad_res, None)

    return (bn_backward, bn_setup), (affine_backward, affine_setup)


def _register_family(prefix: str) -> None:
    """Register fakes and autograd for ``fastres::{prefix}<op>`` (both families share this)."""
    q = {n: f"fastres::{prefix}{n}" for n in OP_NAMES}
    torch.library.register_fake(q["bn_act_train"])(_fake_bn_act_train)
    torch.library.register_fake(q["bn_act_train_backward"])(_fake_bn_act_train_backward)
    torch.library.register_fake(q["affine_act"])(_fake_affine_act)
    torch.library.register_fake(q["affine_act_backward"])(_fake_affine_act_backward)
    ns = torch.ops.fastres
    (bn_bw, bn_setup), (af_bw, af_setup) = _make_autograd(
        getattr(ns, prefix + "bn_act_train_backward"), getattr(ns, prefix + "affine_act_backward"))
    torch.library.register_autograd(q["bn_act_train"], bn_bw, setup_context=bn_setup)
    torch.library.register_autograd(q["affine_act"], af_bw, setup_context=af_setup)


def _family_from_ops(name: str, prefix: str) -> Family:
    ns = torch.ops.fastres
    return Family(name, *(getattr(ns, prefix + n) for n in OP_NAMES))


# ----------------------------------------------------------------------------- triton family
def _unalias(outs, inputs, storage: bool = True):
    """custom_op outputs may alias neither an input nor each other: copy any that does
    (e.g. a launcher that returns grad_y itself, or dz as both grad_x and grad_z, or the
    same (empty) tensor twice). Shared by the conv op family (``fastres.conv_ops``).
    ``storage=False`` (traced tensors, which have no storage address: the triton_op
    variant's ``_fresh``): only an output that *is* an input or an earlier output is copied."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()} if storage else ()
    ids = {id(t) for t in inputs if isinstance(t, Tensor)}
    fixed = []
    for o in outs:
        if id(o) in ids:
            o = o.clone()
        ids.add(id(o))
        if storage and o.numel():
            ptr = o.untyped_storage().data_ptr()
            if ptr in seen:
                o = o.clone()
                ptr = o.untyped_storage().data_ptr()
            seen.add(ptr)
        fixed.append(o)
    return tuple(fixed)


def _define_python_ops(prefix: str, K) -> None:
    """Define ``fastres::{prefix}<op>`` custom ops around the launchers of module ``K``.

    Used for the Triton family (``K = fastres.kernels``) and, in tests, for the aten
    reference (``K = fastres._reference``), which checks this registration path on any
    machine.
    """

    @torch.library.custom_op(f"fastres::{prefix}bn_act_train", mutates_args=())
    def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     residual: Optional[Tensor], eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return _unalias(K.bn_act_train(x, weight, bias, residual, eps, relu), (x, weight, bias, residual))

    @torch.library.custom_op(f"fastres::{prefix}bn_act_train_backward", mutates_args=())
    def bn_act_train_backward(grad_y: Tensor, x: Tensor, y: Tensor, weight: Optional[Tensor],
                              mean: Tensor, var: Tensor, eps: float, relu: bool,
                              need_grad_z: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        outs = K.bn_act_train_backward(grad_y, x, y, weight, mean, var, eps, relu, need_grad_z)
        return _unalias(outs, (grad_y, x, y, weight, mean, var))

    @torch.library.custom_op(f"fastres::{prefix}affine_act", mutates_args=())
    def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                   residual: Optional[Tensor], relu: bool) -> Tensor:
        return _unalias((K.affine_act(x, scale, shift, residual, relu),), (x, scale, shift, residual))[0]

    @torch.library.custom_op(f"fastres::{prefix}affine_act_backward", mutates_args=())
    def affine_act_backward(grad_y: Tensor, x: Tensor, y: Tensor, scale: Optional[Tensor], relu: bool,
                            need_grad_z: bool, need_param_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        outs = K.affine_act_backward(grad_y, x, y, scale, relu, need_grad_z, need_param_grads)
        return _unalias(outs, (grad_y, x, y, scale))


# ----------------------------------------------------------------------------- running stats
@torch.library.custom_op("fastres::update_running_stats", mutates_args=("running_mean", "running_var"))
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         momentum: float, count: int, num_batches_tracked: Optional[Tensor] = None) -> None:
    """running = (1-m)·running + m·batch, with the *unbiased* batch variance (count/(count-1)).

    m = ``momentum``, or, when ``num_batches_tracked`` is given (``momentum=None`` in the
    module: a cumulative average), m = 1/num_batches_tracked computed on the device — no
    host sync, so it works under CUDA graphs and torch.compile without a graph break.
    """
    acc = torch.float64 if running_mean.dtype == torch.float64 else torch.float32
    if num_batches_tracked is not None:
        m = 1.0 / num_batches_tracked.to(acc)
    else:
        m = float(momentum)
    unbiased = var.to(acc) * (count / (count - 1)) if count > 1 else var.to(acc)
    running_mean.copy_(running_mean.to(acc) * (1.0 - m) + mean.to(acc) * m)
    running_var.copy_(running_var.to(acc) * (1.0 - m) + unbiased * m)


@update_running_stats.register_fake
def _(running_mean, running_var, mean, var, momentum, count, num_batches_tracked=None):
    return None


# ----------------------------------------------------------------------------- families
_TORCH = Family("torch", ref.bn_act_train, ref.bn_act_train_backward, ref.affine_act, ref.affine_act_backward)
_families: Dict[str, Family] = {"torch": _TORCH}
_lock = threading.Lock()


def family(name: str) -> Family:
    """The op family of backend ``name`` (registering it on first use). ``triton`` is the
    triton_op variant (``fastres/_triton_ops.py``) when ``FASTRES_TRITON_OP`` selects it."""
    return _triton_ops.cached_family(_families, _lock, name, _build_family)


def _build_family(name: str) -> Family:
    if name in ("cpp", "cuda"):
        loaded, _, msg = backends._C_status()
        if not loaded:
            raise RuntimeError(msg)
        if "cpp" not in _families:  # one registration serves both: CPU and CUDA dispatch keys
            _register_family("")
            _families["cpp"] = _family_from_ops("cpp", "")
            _families["cuda"] = _family_from_ops("cuda", "")
        return _families[name]
    if name in ("triton", "triton_op"):
        ok, msg = backends._triton_installed()
        if not ok:
            raise RuntimeError(f"fastres: the triton backend is unavailable: {msg}")
        from . import kernels  # fastres.kernels (the top-level kernels/ folder)
        if name == "triton":
            _define_python_ops("triton_", kernels)
            _register_family("triton_")
            return _family_from_ops("triton", "triton_")
        _triton_ops.define_bn_ops(kernels)  # the same launchers as torch.library.triton_op (_triton_ops.py)
        return _family_from_ops(name, _triton_ops.PREFIX)
    if name == "reference_ops":  # tests: the aten reference behind the custom-op machinery
        _define_python_ops("ref_", ref)
        _register_family("ref_")
        return _family_from_ops(name, "ref_")
    raise ValueError(f"fastres: unknown backend {name!r}")


def preload() -> None:
    """Register, eagerly, every family that can run here, so that the first call to a
    fused op inside ``torch.compile`` finds its ops ready (registration itself cannot be
    traced). Triton is registered only where it can run (CUDA, or the interpreter)."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in ("cpp", "cuda", "triton"):
        if any(backends.available(name, d)[0] for d in device_types):
            family(name)
    if _triton_ops.enabled() and any(backends.available("triton", d)[0] for d in device_types):
        family("triton_op")
