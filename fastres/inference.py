"""Inference helpers: a whole eval forward replayed as one CUDA graph.

With the BatchNorms folded (eval mode), every convolution of a fastres ResNet is
followed by at most one fused epilogue (bias (+ residual) + ReLU) and no step of the
forward synchronises with the host or allocates outside PyTorch's caching allocator,
so the whole forward can be captured in a CUDA graph and replayed with one launch —
what ``torch.compile(mode="reduce-overhead")`` does for a compiled model, without a
compilation.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from . import _validate as V
from .training import graph_capture

Tensor = torch.Tensor

__all__ = ["cuda_graph_inference"]


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _is_cuda(device: torch.device) -> bool:
    # (a function: tests run the capture logic on the CPU with torch.cuda's graph API faked)
    return device.type == "cuda"


def _uncached_autocast(device_type: str):
    """The caller's autocast (same dtype) with its weight-cast cache off, or a no-op
    without autocast. Under a cached autocast the capture would reuse the low-precision
    casts of the parameters (``nn.Linear``'s weight …) made in the warm-up, outside the
    graph's memory pool; the caller's autocast frees them when it exits, and every replay
    would read freed memory (torch's ``make_graphed_callables`` refuses a cached autocast
    for this reason). Uncached, the casts are made inside the capture, from its pool."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


def cuda_graph_inference(model: nn.Module, example: Tensor, *, warmup: int = 3) -> Callable[[Tensor], Tensor]:
    """Capture ``model``'s eval forward on ``example`` in a CUDA graph; returns
    ``run(x)`` that copies ``x`` into the graph's static input buffer, replays the
    graph and returns the static output buffer.

    * ``model`` is put in eval mode; the graph runs under ``torch.inference_mode``.
      An autocast context active at the call is captured with the graph.
    * ``x`` must have ``example``'s shape, dtype and device (memory format may differ:
      it is copied). A different batch size needs another graph.
    * The returned tensor is the graph's output buffer, overwritten by the next
      ``run``: ``.clone()`` it to keep it.
    * The folded weights are computed before the capture and baked into it: after
      changing the weights (``load_state_dict``, an optimizer step), capture again.

    Raises :class:`fastres._validate.DeviceError` (a ``ValueError``/``RuntimeError``)
    when ``example`` or the model is not on a CUDA device.
    """
    if not isinstance(example, Tensor):
        raise TypeError(f"cuda_graph_inference: example must be a torch.Tensor, got {type(example).__name__}")
    if not _is_cuda(example.device):
        raise V.DeviceError(f"cuda_graph_inference: example is on {example.device}, expected a CUDA tensor: "
                            "CUDA graphs need a CUDA device (on the CPU, call the model directly)")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device != example.device:
            raise V.DeviceError(f"cuda_graph_inference: model {name} is on {p.device} but example is on "
                                f"{example.device}; move the model with .to({str(example.device)!r})")
    model.eval()
    static_in = example.detach().clone()
    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(side), torch.inference_mode(), _uncached_autocast(example.device.type):
        for _ in range(max(1, warmup)):  # folds, packs, autotunes and JIT-compiles outside the capture
            model(static_in)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), _uncached_autocast(example.device.type), graph_capture(graph, example.device):
        static_out = model(static_in)

    def run(x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"cuda_graph_inference: input must be a torch.Tensor, got {type(x).__name__}")
        if x.shape != static_in.shape:
            raise V.ShapeError(f"cuda_graph_inference: input has shape {tuple(x.shape)}, the graph was captured "
                               f"for {tuple(static_in.shape)}")
        if x.dtype != static_in.dtype:
            raise V.DTypeError(f"cuda_graph_inference: input dtype {_dt(x.dtype)}, the graph was captured for "
                               f"{_dt(static_in.dtype)}")
        if x.device != static_in.device:
            raise V.DeviceError(f"cuda_graph_inference: input is on {x.device}, the graph was captured on "
                                f"{static_in.device}")
        with torch.inference_mode():
            static_in.copy_(x)
        graph.replay()
        return static_out

    run.graph = graph  # type: ignore[attr-defined]
    run.static_input = static_in  # type: ignore[attr-defined]
    run.static_output = static_out  # type: ignore[attr-defined]
    return run
