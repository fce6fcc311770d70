"""Fused synchronised BatchNorm: ``act(sync_bn(x) + residual)`` across the ranks of a
``torch.distributed`` process group, and :func:`convert_sync_batchnorm`.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` replaces a BatchNorm subclass by a
plain ``nn.SyncBatchNorm`` and so drops fastres's fused add + ReLU (and it refuses CPU
tensors). :class:`SyncBatchNormAct2d` keeps the fusion: it is a :class:`BatchNormAct2d`
(same parameters, buffers and state_dict keys, same ``forward(x, residual=None)``) whose
training-mode statistics are those of the *global* batch.

Communication (one collective each way, no host synchronisation):

* forward: each rank computes its per-channel ``(count, mean, M2)`` (Welford, in the
  accumulation dtype) and the ranks exchange them — ``all_gather_into_tensor`` (NCCL …)
  or, for gloo (which gathers no CUDA tensors), an all-reduce of a zero-filled
  ``(world, 2C+1)`` table in which each rank fills its own row. The global moments are
  merged with Chan's formula in float64 (no ``E[x²]-E[x]²`` cancellation), so uneven
  per-rank batches, including a rank with no samples, give the exact global mean,
  biased variance (to normalise) and unbiased variance (``running_var``; count = global
  ``N*H*W``). The normalisation is the fused ``affine_act`` op with
  ``scale = w/sqrt(var+eps)``, ``shift = b - mean*scale``.
* backward: the fused ``bn_act_train_backward`` op, given the global mean/variance,
  yields the local ``Σdz`` and ``Σdz·x̂`` (stable: on x̂, not on raw x) and a gradient
  normalised with the local sums; one all-reduce of ``[Σdz, Σdz·x̂]``, then the fused
  ``affine_act`` adds the per-channel affine correction ``β·x + α`` that turns the
  local normalisation into the global one. ``grad_weight``/``grad_bias`` are the
  *local* sums (as ``nn.SyncBatchNorm``: DDP averages parameter gradients itself).

Without an initialised process group, with a world size of 1, in eval mode (or with
``track_running_stats=False`` … in eval) the module is exactly :class:`BatchNormAct2d`
— ``nn.SyncBatchNorm``'s rule (``need_sync = training and dist.is_initialized() and
world_size > 1``; identical in torch 2.11 and 2.14). ``torch.compile`` traces the
synchronised op, collectives included (``fullgraph=True`` checked with aot_eager and
inductor on gloo, torch 2.14.1); where a torch version cannot trace a collective, dynamo
graph-breaks around it and the rest of the model still compiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import _validate as V
from .. import backends, ops
from .. import functional as FF
from .._reference import acc_dtype, memory_format_of
from .batchnorm import BatchNormAct2d

Tensor = torch.Tensor

__all__ = ["SyncBatchNormAct2d", "convert_sync_batchnorm", "sync_batch_norm_act"]


def _world(group) -> int:
    """World size of ``group`` when a synchronised step is possible, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group if group is not None else dist.group.WORLD)


def _gather_moments(packed: Tensor, group, world: int) -> Tensor:
    """``(world, K)``: every rank's ``packed`` (K,) row, with ONE collective:
    ``all_gather_into_tensor`` for CUDA tensors on NCCL; elsewhere (gloo, which has no
    ``all_gather_into_tensor`` and gathers no CUDA tensors; a "cpu:gloo,cuda:nccl" group
    with CPU tensors) an all-reduce of a zero-filled table in which each rank fills its row."""
    if not (packed.is_cuda and "nccl" in str(dist.get_backend(group)).lower()):
        table = packed.new_zeros(world, packed.numel())
        table[dist.get_rank(group)] = packed
        dist.all_reduce(table, group=group)
        return table
    out = packed.new_empty(world * packed.numel())
    dist.all_gather_into_tensor(out, packed, group=group)
    return out.view(world, packed.numel())


class _SyncBNAct(torch.autograd.Function):
    """y, mean, var, unbiased_var = sync-BN(+residual)(+ReLU) of x over ``group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, group, world, backend):
        fam = ops.family(backend)
        acc = acc_dtype(x.dtype)
        c = x.shape[1]
        n_local = x.numel() // c if c else 0
        f64 = torch.float64
        if x.numel() > 0:
            xs = x if x.dtype in (torch.float32, torch.float64) else x.to(acc)
            var_l, mean_l = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
            packed = torch.cat([x.new_full((1,), float(n_local), dtype=f64), mean_l.to(f64),
                                var_l.to(f64) * n_local])
        else:  # an empty rank still takes part in the collective, with count 0
            packed = x.new_zeros(2 * c + 1, dtype=f64)
        table = _gather_moments(packed, group, world)
        counts, means, m2s = table[:, :1], table[:, 1:c + 1], table[:, c + 1:]
        n = counts.sum()
        mean64 = (counts * means).sum(0) / n.clamp_min(1)
        m2 = m2s.sum(0) + (counts * (means - mean64) ** 2).sum(0)  # Chan: exact merge of uneven parts
        var64 = m2 / n.clamp_min(1)
        unbiased = torch.where(n > 1, m2 / (n - 1).clamp_min(1), var64)
        mean, var = mean64.to(acc), var64.to(acc)
        scale, shift = FF.fold_scale_shift(weight, bias, mean, var, eps, acc)
        if x.numel() > 0:
            y = fam.affine_act(x, scale, shift, residual, relu)
        else:
            y = torch.empty_like(x, memory_format=memory_format_of(x))
        ctx.save_for_backward(x, y if relu else None, weight, mean, var)
        ctx.eps, ctx.relu, ctx.group, ctx.backend, ctx.n_local = eps, relu, group, backend, n_local
        ctx.n_global = n.to(acc)
        ctx.mark_non_differentiable(mean, var, unbiased)
        return y, mean, var, unbiased.to(acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _gm, _gv, _gu):
        x, y, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        relu, eps = ctx.relu, ctx.eps
        acc = acc_dtype(x.dtype)
        c = x.shape[1]
        fam = ops.family(ctx.backend)
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if x.numel() > 0:
            grad_x_local, sum_dzxhat, sum_dz, grad_z = fam.bn_act_train_backward(
                grad_y, x, y if relu else x, weight, mean, var, eps, relu, bool(need_r and relu))
        else:
            grad_x_local = torch.empty_like(x, memory_format=memory_format_of(x))
            sum_dzxhat = sum_dz = x.new_zeros(c, dtype=acc)
            grad_z = grad_y
        sums = torch.cat([sum_dz, sum_dzxhat])
        dist.all_reduce(sums, group=ctx.group)  # the backward's one collective
        grad_x = None
        if need_x and x.numel() > 0:
            # grad_x_local = w·invstd·(dz - Σₗdz/Mₗ - x̂·Σₗdz·x̂/Mₗ); the global gradient differs by
            # w·invstd·((Σₗdz/Mₗ - Σdz/M) + x̂·(Σₗdz·x̂/Mₗ - Σdz·x̂/M)) = β·x + α per channel.
            invstd = torch.rsqrt(var + eps)
            k = invstd if weight is None else weight.to(acc) * invstd
            n_l, n_g = float(ctx.n_local), ctx.n_global.clamp_min(1)
            da = sum_dz / n_l - sums[:c] / n_g
            db = sum_dzxhat / n_l - sums[c:] / n_g
            beta = k * invstd * db
            alpha = k * da - beta * mean
            grad_x = fam.affine_act(x, beta, alpha, grad_x_local, False)
        elif need_x:
            grad_x = grad_x_local
        grad_w = sum_dzxhat.to(weight.dtype) if need_w else None
        grad_b = sum_dz.to(weight.dtype if weight is not None else acc) if need_b else None
        grad_res = (grad_z if relu else grad_y) if need_r else None
        return grad_x, grad_w, grad_b, grad_res, None, None, None, None, None


def sync_batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                        momentum: Optional[float] = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
                        activation: Optional[str] = "relu", *, num_batches_tracked: Optional[Tensor] = None,
                        process_group=None) -> Tensor:
    """:func:`fastres.functional.batch_norm_act` with the training statistics of the whole
    batch spread over ``process_group`` (default: the world). Falls back to
    ``batch_norm_act`` when not training, or when no process group of more than one rank
    is initialised."""
    world = _world(process_group) if training else 1
    if world <= 1:
        return FF.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                 residual, activation, num_batches_tracked=num_batches_tracked)
    act = V.normalize_activation(activation)
    # the single-process checks, less "more than 1 value per channel" (global here)
    V.check_input(input)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        V.check_per_channel(t, name, input)
    V.check_residual(residual, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fastres: running_mean and running_var must both be tensors or both be None")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    cumulative = momentum is None and running_mean is not None
    if cumulative and num_batches_tracked is None:
        raise ValueError("fastres: momentum=None (cumulative average) needs num_batches_tracked")
    group = process_group if process_group is not None else dist.group.WORLD
    backend = backends.backend_for(input.device)
    y, _mean, _var, unbiased = _SyncBNAct.apply(input, weight, bias, residual, float(eps), act == "relu",
                                                group, world, backend)
    if running_mean is not None:
        # the variance passed is already unbiased (global count): count=1 applies no correction
        torch.ops.fastres.update_running_stats(running_mean, running_var, _mean, unbiased,
                                               0.0 if cumulative else float(momentum), 1,
                                               num_batches_tracked if cumulative else None)
    return y


class SyncBatchNormAct2d(BatchNormAct2d):
    """:class:`BatchNormAct2d` whose training statistics span ``process_group`` (default:
    the whole world) — a fused ``nn.SyncBatchNorm``. Same parameters, buffers and
    state_dict keys as ``nn.BatchNorm2d``; ``forward(x, residual=None)``. fastres blocks
    holding one keep their fused conv → BN (+ add) + ReLU path."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None, device=None,
                 dtype=None, activation: Optional[str] = "relu") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         activation=activation)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, activation: Optional[str] = "relu",  # type: ignore[override]
                       process_group=None) -> "SyncBatchNormAct2d":
        """A SyncBatchNormAct2d *sharing* ``bn``'s parameter and buffer tensors (no copies)."""
        new = super().from_batchnorm(bn, activation)
        new.process_group = process_group
        return new

    # called by fastres.nn.batchnorm.batch_norm_act_module (BatchNormAct2d.forward and the
    # fused conv → BN paths of the blocks) in place of fastres.functional.batch_norm_act
    def _fused_batch_norm_act(self, *args, **kwargs) -> Tensor:
        if not self.training:  # eval, even on batch statistics (no running stats): local, as nn.SyncBatchNorm
            return FF.batch_norm_act(*args, **kwargs)
        return sync_batch_norm_act(*args, process_group=self.process_group, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synchronised"


def _fusable(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and type(m).forward in (nn.BatchNorm2d.forward, BatchNormAct2d.forward)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` and :class:`BatchNormAct2d` in ``module`` by a
    :class:`SyncBatchNormAct2d` that shares its parameters and buffers (state_dict keys
    unchanged) and keeps its activation (plain BN: none) and, inside fastres blocks, the
    fused conv → BN + add + ReLU. Other BatchNorm layers (1d/3d, subclasses with their own
    forward) get ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Returns the converted
    module (a new one only when ``module`` itself is a BatchNorm)."""
    if isinstance(module, SyncBatchNormAct2d):
        module.process_group = process_group
        return module
    if isinstance(module, nn.SyncBatchNorm):
        return module
    if _fusable(module):
        act = module.activation if isinstance(module, BatchNormAct2d) else "none"
        new = SyncBatchNormAct2d.from_batchnorm(module, act, process_group)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module
