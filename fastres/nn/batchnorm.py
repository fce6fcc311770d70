"""``BatchNormAct2d``: an ``nn.BatchNorm2d`` whose forward fuses ``+ residual`` and ReLU."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional as FF
from .. import _validate as V

Tensor = torch.Tensor


class BatchNormAct2d(nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` (same parameters, buffers and state_dict keys) that
    computes ``act(bn(x) + residual)`` in one fused op.

    ``activation``: ``"relu"`` (default) or ``"none"``. ``forward(x, residual=None)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 activation: Optional[str] = "relu") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation = V.normalize_activation(activation)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, activation: Optional[str] = "relu") -> "BatchNormAct2d":
        """A BatchNormAct2d *sharing* ``bn``'s parameter and buffer tensors (no copies)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_features, new.eps, new.momentum = bn.num_features, bn.eps, bn.momentum
        new.affine, new.track_running_stats = bn.affine, bn.track_running_stats
        for name in ("weight", "bias"):
            new.register_parameter(name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new.register_buffer(name, getattr(bn, name))
        new.training = bn.training
        new.activation = V.normalize_activation(activation)
        return new

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"fastres: BatchNormAct2d input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        self._check_input_dim(input)
        return batch_norm_act_module(self, input, residual, self.activation)


def batch_norm_act_module(bn: nn.BatchNorm2d, input: Tensor, residual: Optional[Tensor] = None,
                          activation: Optional[str] = "relu") -> Tensor:
    """``act(bn(input) + residual)`` for any ``nn.BatchNorm2d`` module ``bn``, fused.

    Replicates ``nn.BatchNorm2d.forward``'s bookkeeping exactly (``num_batches_tracked``
    += 1, ``momentum=None`` → cumulative factor, ``track_running_stats=False``, eval
    with or without running statistics) around :func:`fastres.functional.batch_norm_act`.
    Shared by :class:`BatchNormAct2d` and the ResNet blocks (which keep plain
    ``nn.BatchNorm2d`` submodules).
    """
    V.check_input(input)
    V.check_channels(input, bn.num_features)
    # identical bookkeeping to torch.nn.modules.batchnorm._BatchNorm.forward
    if bn.momentum is None:
        exponential_average_factor = 0.0
    else:
        exponential_average_factor = bn.momentum
    if bn.training and bn.track_running_stats:
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative: 1/num_batches_tracked, on the device
                exponential_average_factor = None
            else:
                exponential_average_factor = bn.momentum
    if bn.training:
        bn_training = True
    else:
        bn_training = (bn.running_mean is None) and (bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    # a SyncBatchNormAct2d (fastres.nn.syncbn) brings its synchronised variant of the op
    batch_norm_act = getattr(bn, "_fused_batch_norm_act", None) or FF.batch_norm_act
    return batch_norm_act(
        input,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        bn.weight, bn.bias, bn_training, exponential_average_factor, bn.eps,
        residual=residual, activation=activation,
        num_batches_tracked=bn.num_batches_tracked if exponential_average_factor is None else None)
