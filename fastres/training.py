"""The one training step shared by ``examples/train.py`` and ``python -m fastres bench``.

:func:`make_train_step` builds ``step(x, y) -> loss``: forward under an optional
autocast context, ``zero_grad(set_to_none=True)``, backward (through a
``torch.amp.GradScaler`` when given: scale, step, update) and the optimizer step.
:func:`capture_train_step` records that whole step (forward, backward, optimizer) in a
``torch.cuda.CUDAGraph`` on static input/target tensors and returns a replaying step
with the same signature; it needs a CUDA device and an optimizer that can be captured
(SGD, or ``capturable=True`` for Adam/AdamW).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Step = Callable[[Tensor, Tensor], Tensor]

__all__ = ["make_train_step", "capture_train_step", "graph_capture"]


@contextlib.contextmanager
def graph_capture(graph: "torch.cuda.CUDAGraph", device: torch.device):
    """``torch.cuda.graph(graph)`` on a fresh stream of ``device``, with ``device`` current
    (torch's default capture stream belongs to whichever device was current when it was
    first used: with the tensors on another GPU the capture would miss their kernels)."""
    with torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device=device)):
        yield


def make_train_step(model: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, *,
                    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                    scaler: Optional["torch.amp.GradScaler"] = None,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Step:
    """``step(x, y)``: one forward/backward/optimizer step of ``model``; returns the loss
    (a tensor: reading it is the caller's host sync, not the step's).

    ``model`` may be the module or its ``torch.compile``d runner; ``autocast`` is a
    zero-argument factory of the autocast context (e.g.
    ``lambda: torch.autocast("cuda", torch.bfloat16)``).
    """

    def step(x: Tensor, y: Tensor) -> Tensor:
        with autocast():
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss

    return step


def capture_train_step(model: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer,
                       x: Tensor, y: Tensor, *, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       warmup: int = 3) -> Step:
    """A training step recorded once in a CUDA graph and replayed.

    ``warmup`` (>= 1) eager steps run first on a side stream (as ``torch.cuda.graph``
    requires; they *are* training steps: they update the parameters and running statistics).
    The returned ``step(x, y)`` copies ``x``/``y`` into the static tensors, replays the
    graph and returns the static loss tensor (overwritten by the next replay). No
    GradScaler: its skipped-step logic reads the overflow flag on the host.
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"fastres: capture_train_step needs warmup >= 1 eager steps before the capture "
                         f"(lazy initialisation, Triton's compilation and autotuning, cuBLAS workspaces must "
                         f"not happen inside it), got warmup={warmup!r}")
    if x.device.type != "cuda":
        raise RuntimeError(f"fastres: CUDA graphs need a CUDA device; the batch is on {x.device}")
    static_x, static_y = x.clone(), y.clone()
    eager = make_train_step(model, optimizer, loss_fn=loss_fn, autocast=autocast)
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            eager(static_x, static_y)
    torch.cuda.current_stream(x.device).wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the gradients are allocated from the graph's pool
    with graph_capture(graph, x.device):
        with autocast():
            static_loss = loss_fn(model(static_x), static_y)
        static_loss.backward()
        optimizer.step()

    def step(xb: Tensor, yb: Tensor) -> Tensor:
        if xb.data_ptr() != static_x.data_ptr():
            static_x.copy_(xb)
        if yb.data_ptr() != static_y.data_ptr():
            static_y.copy_(yb)
        graph.replay()
        return static_loss

    step.graph = graph  # type: ignore[attr-defined]
    step.static_input = static_x  # type: ignore[attr-defined]
    return step
