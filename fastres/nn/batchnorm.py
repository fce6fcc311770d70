"""``BatchNormAct2d``: an ``nn.BatchNorm2d`` whose forward fuses ``+ residual`` and ReLU."""
import inspect
from typing import Any, Optional

import torch
from torch import nn

from .. import functional as FF
from .. import _validate as V

Tensor = torch.Tensor

# nn.BatchNorm2d's keyword-only constructor arguments in the installed torch (``bias=``
# since torch 2.14; none in 2.11): BatchNormAct2d accepts exactly these besides its own.
_BN_KWONLY = tuple(p.name for p in inspect.signature(nn.BatchNorm2d.__init__).parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY)


class BatchNormAct2d(nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` (same constructor, parameters, buffers, state_dict
    keys, repr and errors) that computes ``act(bn(x) + residual)`` in one fused op.

    ``activation``: ``"relu"`` (default) or ``"none"``. ``forward(x, residual=None)``.
    Every argument of the installed ``nn.BatchNorm2d`` is accepted (keyword-only ones
    such as torch 2.14's ``bias=`` by keyword). With ``activation="none"`` the module
    is an ``nn.BatchNorm2d`` in every observable way but its type name.
    TorchScript compiles the unfused ``F.batch_norm`` (+ residual, ReLU) forward;
    torch.fx records it as one ``call_module`` node.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 activation: Optional[str] = "relu", **kwargs: Any) -> None:
        for name in kwargs:
            if name not in _BN_KWONLY:
                raise TypeError(f"BatchNormAct2d.__init__() got an unexpected keyword argument '{name}' "
                                f"(nn.BatchNorm2d of torch {torch.__version__} takes "
                                f"{', '.join(_BN_KWONLY) or 'no other keyword arguments'})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **kwargs)
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
        if self.activation == "none":  # an nn.BatchNorm2d, also in its repr
            return super().extra_repr()
        return super().extra_repr() + f", activation={self.activation}"

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        if torch.jit.is_scripting():
            return self._scripted_forward(input, residual)
        return self._fused_forward(input, residual)

    @torch.jit.unused
    def _fused_forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy) or isinstance(residual, torch.fx.Proxy):
            from .blocks import fx_leaf  # blocks imports this module
            if residual is None:
                leaf = fx_leaf(self, input)
                if leaf is not None:
                    return leaf
            return self._scripted_forward(input, residual)
        if portable_trace():  # a portable trace of aten ops
            return self._scripted_forward(input, residual)
        self._check_input_dim(input)
        return batch_norm_act_module(self, input, residual, self.activation)

    def _scripted_forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        """``nn.BatchNorm2d.forward`` (+ residual, + ReLU), unfused and scriptable."""
        if input.dim() != 4:
            raise ValueError("expected 4D input")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        y = torch.nn.functional.batch_norm(
            input, self.running_mean if use_running else None, self.running_var if use_running else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        if residual is not None:
            y = y + residual
        if self.activation == "relu":
            y = torch.relu(y)
        return y


def portable_trace() -> bool:
    """Record plain aten ops (torchvision's unfused forward) instead of the fastres ops:
    under ``torch.jit.trace`` and ``torch.export`` (so the ONNX exporter, AOTInductor or
    a machine without fastres can use the program)."""
    # The flag behind torch.compiler.is_exporting(): Dynamo before torch 2.14 folds
    # is_exporting() to True under plain torch.compile too (2.14 reads the flag)
    return torch.jit.is_tracing() or bool(getattr(torch.compiler, "_is_exporting_flag", False)) \
        or (not hasattr(torch.compiler, "_is_exporting_flag") and torch.compiler.is_exporting())


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread (where checkpoint
    recomputes its forward). Never under torch.compile: the compiled checkpoint's
    recomputation is traced from the forward graph, which updates the statistics once."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


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
    # activation checkpointing's recomputation (torch.utils.checkpoint, either
    # use_reentrant) runs this forward again inside the backward: it normalises with the
    # batch statistics as before but must not count the batch or move the running
    # statistics a second time (nn.BatchNorm2d does both; docs/RESNET.md)
    recomputing = bn.training and _in_backward()
    # identical bookkeeping to torch.nn.modules.batchnorm._BatchNorm.forward
    if bn.momentum is None:
        exponential_average_factor = 0.0
    else:
        exponential_average_factor = bn.momentum
    if bn.training and bn.track_running_stats and not recomputing:
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
    running_mean = bn.running_mean if use_running else None
    running_var = bn.running_var if use_running else None
    if recomputing and running_mean is not None and running_var is not None:
        # the recomputation must run the forward's ops (checkpoint compares the tensors
        # they save): it updates throw-away copies
        running_mean, running_var = running_mean.clone(), running_var.clone()
    # a SyncBatchNormAct2d (fastres.nn.syncbn) brings its synchronised variant of the op
    batch_norm_act = getattr(bn, "_fused_batch_norm_act", None) or FF.batch_norm_act
    y = batch_norm_act(
        input,
        running_mean,
        running_var,
        bn.weight, bn.bias, bn_training, exponential_average_factor, bn.eps,
        residual=residual, activation=activation,
        num_batches_tracked=bn.num_batches_tracked if exponential_average_factor is None else None)
    if input.numel() == 0 and y.stride() != input.stride():
        # elementwise ops give an empty tensor contiguous strides; nn.BatchNorm2d keeps
        # the input's (a zero-batch channels_last input stays channels_last)
        y = y.as_strided(input.size(), input.stride())
    return y
