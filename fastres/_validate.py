"""One validation layer in front of every backend.

Every public entry point (functional ops, modules) calls these checks before an op
runs, so a user gets a ``TypeError`` (wrong dtype) or ``ValueError`` (wrong device,
shape, rank or value) naming the tensor with what was expected and what came,
instead of a crash deep inside a kernel.

Where PyTorch itself raises ``RuntimeError`` (wrong channel count, wrong weight /
running-stat size, dtype or device mismatch) or ``NotImplementedError`` (integer
input), the error classes below are *also* that type, so code written against
``nn.BatchNorm2d`` / torchvision (``except RuntimeError``) catches fastres's errors too.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

_FLOATING = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_REDUCED = (torch.bfloat16, torch.float16)
ACTIVATIONS = ("relu", "none")


class ShapeError(ValueError, RuntimeError):
    """Wrong rank, channel count or per-channel tensor size: a ``ValueError`` that is
    also the ``RuntimeError`` PyTorch raises for the same mistake."""


class DeviceError(ValueError, RuntimeError):
    """Tensors on different devices (``RuntimeError`` in PyTorch)."""


class DTypeError(TypeError, RuntimeError):
    """Input/parameter dtype mismatch: a ``TypeError`` that is also PyTorch's ``RuntimeError``."""


class UnsupportedDTypeError(DTypeError, NotImplementedError):
    """Integer (or bool, complex) input: PyTorch raises ``NotImplementedError``
    (``"batch_norm" not implemented for 'Long'``); this is that, a ``TypeError`` and a
    ``RuntimeError``."""


ERRORS = (ShapeError, DeviceError, DTypeError, UnsupportedDTypeError)


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def normalize_activation(activation) -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ValueError(f"fastres: activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    return activation.lower()


def check_input(x, name: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fastres: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ShapeError(f"fastres: expected {name} to be 4-D (N, C, H, W), got a {x.dim()}-D tensor "
                         f"of shape {_shape(x)}")
    if x.dtype not in _FLOATING:
        raise UnsupportedDTypeError(f"fastres: {name} must be float64, float32, bfloat16 or float16, "
                                    f"got {_dt(x.dtype)}")


def check_channels(x: Tensor, num_features: int, name: str = "input") -> None:
    if x.shape[1] != num_features:
        raise ShapeError(f"fastres: {name} has {x.shape[1]} channels (shape {_shape(x)}), "
                         f"expected num_features={num_features}")


def check_optional_tensor(t: Optional[Tensor], name: str, x: Tensor) -> bool:
    """False for an absent (None) optional tensor argument; else True once ``t`` is checked
    to be a tensor on ``x``'s device."""
    if t is None:
        return False
    if not isinstance(t, Tensor):
        raise TypeError(f"fastres: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != x.device:
        raise DeviceError(f"fastres: {name} is on {t.device} but input is on {x.device}; "
                          f"expected both on the same device")
    return True


def check_per_channel(t: Optional[Tensor], name: str, x: Tensor) -> None:
    """weight / bias / running stats / scale / shift: 1-D (C,), on x's device, a dtype x allows."""
    if not check_optional_tensor(t, name, x):
        return
    c = x.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        raise ShapeError(f"fastres: {name} must have shape ({c},) to match the input's {c} channels, "
                         f"got {_shape(t)}")
    allowed = (x.dtype, torch.float32) if x.dtype in _REDUCED else (x.dtype,)
    if t.dtype not in allowed:
        want = " or ".join(_dt(d) for d in allowed)
        raise DTypeError(f"fastres: {name} has dtype {_dt(t.dtype)} but input is {_dt(x.dtype)}; "
                        f"expected {want}")


def check_residual(residual: Optional[Tensor], x: Tensor, name: str = "residual") -> None:
    if not check_optional_tensor(residual, name, x):
        return
    if residual.shape != x.shape:
        raise ShapeError(f"fastres: {name} must have the output's shape {_shape(x)}, got {_shape(residual)}")
    if residual.dtype != x.dtype:
        raise DTypeError(f"fastres: {name} has dtype {_dt(residual.dtype)} but input is {_dt(x.dtype)}; "
                        f"expected {_dt(x.dtype)}")


def check_training_size(x: Tensor) -> None:
    """PyTorch's own check (torch.nn.functional._verify_batch_size), same type and text."""
    size = x.size()
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def check_batch_norm_args(x, running_mean, running_var, weight, bias, residual, training: bool,
                          momentum, eps) -> None:
    check_input(x)
    check_per_channel(weight, "weight", x)
    check_per_channel(bias, "bias", x)
    check_per_channel(running_mean, "running_mean", x)
    check_per_channel(running_var, "running_var", x)
    check_residual(residual, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fastres: running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("fastres: running_mean and running_var must be given when training=False")
    if training and running_mean is not None and not isinstance(momentum, (int, float, type(None))):
        raise TypeError(f"fastres: momentum must be a float (or None with num_batches_tracked), got {momentum!r}")
    if training:
        check_training_size(x)  # before eps, in PyTorch's order
    check_eps(eps)


def check_eps(eps) -> None:
    """eps > 0 in training and in eval, whatever the torch version. PyTorch's batch_norm
    requires a positive eps too, but in its own words and not on every version (torch 2.14
    checks training only, 2.11 eval as well); fastres checks first, with one message."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:  # (NaN fails eps > 0)
        raise ValueError(f"fastres: eps must be positive, got {eps!r}")
