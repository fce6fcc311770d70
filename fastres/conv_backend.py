"""Which convolution runs under :func:`fastres.functional.conv2d_act`.

* ``aten``  — ``F.conv2d`` (cuDNN / oneDNN) plus the prologue/epilogue as aten ops;
* ``fused`` — the Triton implicit-GEMM kernel of ``fastres.kernels._conv`` with the
  prologue and epilogue inside (``fastres::triton_conv2d_act``); on a device where
  Triton cannot run (the CPU without ``TRITON_INTERPRET=1``) it falls back to ``aten``
  with one warning;
* ``cudnn`` — cuDNN's fused-conv graphs (``fastres.cudnn``, issue 11: conv + bias + add +
  ReLU for inference, scale/shift/ReLU + conv + genstats for training) where a pattern
  applies, the aten composition elsewhere (``fastres::cudnn_conv2d_act``); where the graphs
  cannot run (the CPU, a build without cuDNN) it falls back to ``aten`` with one warning;
* ``auto``  — ``aten`` on the CPU. On a GPU also ``aten`` for now: ``auto`` is to pick
  the fused conv only where committed measurements under ``benchmarks/results/`` show
  it faster on that device, dtype and shape class, and no GPU measurement exists yet.

Order: :func:`set_conv` / :func:`use_conv`, then ``FASTRES_CONV=auto|fused|aten|cudnn``,
then ``auto``. Independent of ``FASTRES_BACKEND`` (which picks the BN+ReLU ops).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from functools import lru_cache
from typing import Iterator, Optional, Tuple

import torch

from . import backends

CONV_CHOICES = ("auto", "fused", "aten", "cudnn")
AUTO_REASON = {
    "cpu": "auto: aten on the CPU",
    "cuda": ("auto: aten; the fused Triton conv is unmeasured on GPUs (no measurements under "
             "benchmarks/results/ yet), set FASTRES_CONV=fused to use it"),
}

_override: Optional[str] = None
_warned: set = set()


def _check(name: Optional[str]) -> str:
    name = (name or "auto").strip().lower()
    if name not in CONV_CHOICES:
        raise ValueError(f"fastres: unknown conv path {name!r}; expected one of {', '.join(CONV_CHOICES)}")
    return name


def set_conv(name: Optional[str]) -> Optional[str]:
    """Force the conv path (``"auto"|"fused"|"aten"``; ``None`` restores the
    environment's choice). Returns the previous override."""
    global _override
    prev = _override
    _override = None if name is None else _check(name)
    _resolve.cache_clear()
    return prev


@contextlib.contextmanager
def use_conv(name: Optional[str]) -> Iterator[None]:
    """Context-manager form of :func:`set_conv`."""
    prev = set_conv(name)
    try:
        yield
    finally:
        set_conv(prev)


def requested_conv() -> str:
    if _override is not None:
        return _override
    return _check(os.environ.get("FASTRES_CONV", "auto"))


@lru_cache(maxsize=None)
def _resolve(requested: str, device_type: str) -> Tuple[str, str, Optional[str]]:
    """(path, reason, fallback warning or None); path is ``aten``, ``fused`` or ``cudnn``."""
    if requested == "aten":
        return "aten", "FASTRES_CONV/set_conv: aten", None
    if requested == "cudnn":  # issue 11: cuDNN's fused-conv graphs (fastres/cudnn.py)
        from . import cudnn
        ok, why = cudnn.available(device_type)
        if ok:
            return "cudnn", f"cuDNN fused-conv graphs ({why})", None
        warning = f"fastres: the cuDNN conv graphs are unavailable on {device_type} ({why}); using aten's convolution"
        return "aten", warning, warning
    if requested == "auto":
        return "aten", AUTO_REASON.get(device_type, f"auto: aten on {device_type}"), None
    ok, why = backends.available("triton", device_type)
    if ok:
        return "fused", f"fused Triton conv ({why})", None
    warning = f"fastres: the fused conv is unavailable on {device_type} ({why}); using aten's convolution"
    return "aten", warning, warning


def conv_for(device: torch.device) -> str:
    """``"fused"``, ``"cudnn"`` or ``"aten"`` for tensors on ``device`` (warns once on a fallback)."""
    path, _, warning = _resolve(requested_conv(), device.type)
    if warning is not None and warning not in _warned:
        _warned.add(warning)
        if not torch.compiler.is_compiling():
            warnings.warn(warning, RuntimeWarning, stacklevel=3)
    return path


def conv_info(device_type: str) -> dict:
    """For :func:`fastres.backend_info`: the conv path on ``device_type`` and why."""
    path, reason, warning = _resolve(requested_conv(), device_type)
    return {"requested": requested_conv(), "path": path, "reason": reason, "fallback_warning": warning}
