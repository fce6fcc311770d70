"""The ``aten`` conv path's backends of :func:`fastres.functional.conv2d_act`.

:mod:`fastres.conv_backend` picks one per call (:func:`fastres.conv_backend.aten_impl`):

* ``onednn`` — CPU fp32 inference: ``act(conv(x, weight) + bias (+ residual))`` as one
  oneDNN primitive with the bias, the residual add and the ReLU as post-ops
  (``torch.ops.mkldnn._convolution_pointwise``, the kernel inductor uses for frozen CPU
  graphs), the weight reordered once per input shape into oneDNN's blocked layout
  (:func:`packed_weight`: only for weights whose owner offered a store with
  :func:`allow_prepack`, i.e. the fold cache's folded weights). Where the primitive has
  no answer (autograd, torch.compile, autocast, functorch transforms, empty input, a
  residual at a 1x1 output: see :func:`onednn_supports`) the next backend runs.
  :func:`onednn_conv2d_add_relu_` is the in-place variant (``relu(conv(x) + bias +
  other)`` written into ``other``) the whole-model eval plan uses.
* ``epilogue`` — aten's convolution (cuDNN, oneDNN, any device) followed by fastres's
  fused bias (+ residual) + ReLU op (``affine_act`` of the BN op family): fp32/fp64 put
  the bias into the convolution and run the epilogue only for a residual or a ReLU;
  bf16/fp16 run the convolution bias-free and add the fp32 bias in the epilogue (never
  rounded to 16 bits). Differentiable (the ops' registered autograd).
* ``composite`` — :func:`fastres.conv_ops.conv2d_act_reference` (a prologue or
  statistics are asked for).

Both functions here are the single implementation of their step: ``conv2d_act``'s
backend calls them, and the eval plan binds :func:`onednn_conv2d_act` /
:func:`onednn_conv2d_add_relu_` once when it is built (no per-conv dispatch).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import backends, ops
from ._reference import acc_dtype, conv2d, memory_format_of

Tensor = torch.Tensor

__all__ = ["onednn_conv_act", "onednn_available", "onednn_supports", "onednn_conv2d_act", "onednn_conv2d_add_relu_",
           "epilogue_conv2d_act", "allow_prepack", "packed_weight", "MAX_PACKED"]

# ----------------------------------------------------------------------------- oneDNN
_OPS: list = []  # [(conv_act, conv_binary, conv_binary_) overloads] or [None]


def _ops():
    """The oneDNN overloads, resolved once (calling an overload packet resolves it per call)."""
    if not _OPS:
        got = None
        try:
            if torch.backends.mkldnn.is_available():
                got = (torch.ops.mkldnn._convolution_pointwise.default,
                       torch.ops.mkldnn._convolution_pointwise.binary,
                       torch.ops.mkldnn._convolution_pointwise_.binary)
        except (AttributeError, RuntimeError):
            got = None
        _OPS.append(got)
    return _OPS[0]


def onednn_available() -> bool:
    """Whether this torch has oneDNN's fused convolution (``mkldnn._convolution_pointwise``)."""
    return _ops() is not None


def _transforms_active() -> bool:
    # fastres.functional.transforms_active, read here without importing the layer above:
    # the primitive has neither a batching rule nor a forward-AD formula
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


def _out_hw(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def onednn_supports(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int]) -> bool:
    """Whether :func:`onednn_conv2d_act` computes this call: fp32 CPU tensors outside
    autocast, torch.compile and functorch transforms, when no gradient is needed (the
    primitive has no autograd), a non-empty input and, with a residual, an output larger
    than 1x1 (a 1x1 output with the residual add fused in fails in torch 2.11's primitive,
    "could not create a memory", whenever it runs channels-last -- always with a packed
    weight, and with a channels-last-strided input; 2.14 works. Every version takes the
    ``epilogue`` backend there: a 1x1 map is tiny, and the unary primitive has no such
    failure)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or (bias is not None and bias.dtype != torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu") or x.numel() == 0 \
            or _transforms_active() or _ops() is None:
        return False
    if residual is not None:
        kh, kw = weight.shape[2], weight.shape[3]
        p = _out_hw(x.shape[2], kh, stride[0], padding[0], dilation[0])
        q = _out_hw(x.shape[3], kw, stride[1], padding[1], dilation[1])
        if tuple(residual.shape) != (x.shape[0], weight.shape[0], p, q) or residual.dtype != torch.float32 \
                or residual.device != x.device:
            return False  # (the validated paths raise the clear error)
        if p * q == 1:
            return False
    return True


def onednn_conv2d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                      stride: List[int], padding: List[int], dilation: List[int], groups: int, relu: bool,
                      packed: Optional[Tensor] = None) -> Tensor:
    """``act(conv2d(x, weight) + bias (+ residual))`` as one oneDNN primitive, where
    :func:`onednn_supports` says so. ``packed``: the weight in oneDNN's layout for x's
    shape (:func:`packed_weight`); looked up when not given."""
    conv_act, conv_binary, _ = _ops()
    w = packed if packed is not None else packed_weight(weight, x, padding, stride, dilation, groups)
    if residual is None:
        return conv_act(x, w, bias, padding, stride, dilation, groups, "relu" if relu else "none", [], "")
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        residual = residual.contiguous(memory_format=torch.channels_last)
    else:
        residual = residual.contiguous()
    # (the binary overload takes no unary "none": None is "no unary post-op")
    return conv_binary(x, residual, w, bias, padding, stride, dilation, groups, "add", 1.0, "relu" if relu else None,
                       [], "")


def onednn_conv2d_add_relu_(other: Tensor, x: Tensor, weight: Tensor, bias: Tensor, stride: List[int],
                            padding: List[int], dilation: List[int], groups: int,
                            packed: Optional[Tensor] = None) -> Tensor:
    """``relu(conv2d(x, weight) + bias + other)``, written into ``other`` (a buffer the
    caller owns, in x's layout) and returned. The caller has checked fp32 CPU inference.
    A 1x1 output takes the ``epilogue`` backend and returns a new tensor (the torch 2.11
    failure of :func:`onednn_supports`), computing what the per-block path computes."""
    if other.shape[2] * other.shape[3] == 1:
        return epilogue_conv2d_act(x, weight, bias, other, stride, padding, dilation, groups, True)
    w = packed if packed is not None else packed_weight(weight, x, padding, stride, dilation, groups)
    return _ops()[2](other, x, w, bias, padding, stride, dilation, groups, "add", 1.0, "relu", [], "")


def onednn_conv_act(conv, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    activation: Optional[str], bn=None) -> Optional[Tensor]:
    """The former ``fastres.fold.onednn_conv_act`` (still re-exported there): the
    ``onednn`` backend for the geometry of ``conv`` (an ``nn.Conv2d``), or ``None`` where
    it does not apply (:func:`fastres.conv_backend.use_onednn` off, or not
    :func:`onednn_supports`). ``bn`` is unused (the prepacked weight is found by weight)."""
    from . import conv_backend  # (it imports this module)
    pad, stride, dil = list(conv.padding), list(conv.stride), list(conv.dilation)
    if not conv_backend.use_onednn() or not onednn_supports(x, weight, bias, residual, stride, pad, dil):
        return None
    return onednn_conv2d_act(x, weight, bias, residual, stride, pad, dil, conv.groups, activation == "relu")


# ----------------------------------------------------------------------------- prepacked weights
MAX_PACKED = 4  # input shapes remembered per weight
# weight -> its owner's store {(input shape, padding, stride, dilation, groups): packed weight}.
# Weak: an entry lives exactly as long as the weight (the fold cache's folded weight is a new
# tensor whenever the fold is recomputed, so a packed weight goes stale exactly when the fold does).
_PREPACK: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def allow_prepack(weight: Tensor, store: Dict[tuple, Tensor]) -> None:
    """Let the oneDNN backend keep ``weight`` reordered for the input shapes it meets, in
    ``store`` (a dict the caller owns; at most :data:`MAX_PACKED` shapes). For weights that
    are never written in place while they are used (the fold cache's)."""
    _PREPACK[weight] = (store, weight._version)


def packed_weight(weight: Tensor, x: Tensor, padding: List[int], stride: List[int], dilation: List[int],
                  groups: int) -> Tensor:
    """``weight`` in oneDNN's blocked layout for x's shape, reordered once and kept in
    the store given to :func:`allow_prepack`; ``weight`` itself for any other weight (or
    one written in place since, or where the reorder is not available)."""
    got = _PREPACK.get(weight)
    if got is None:
        return weight
    store, version = got
    if weight._version != version:
        return weight
    key = (tuple(x.shape), tuple(padding), tuple(stride), tuple(dilation), groups)
    w = store.get(key)
    if w is None:
        try:
            with torch.inference_mode(False), torch.no_grad():
                w = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), list(padding), list(stride),
                                                              list(dilation), groups, list(x.shape))
        except (RuntimeError, AttributeError, NotImplementedError):
            return weight
        if len(store) >= MAX_PACKED:
            store.pop(next(iter(store)))
        store[key] = w
    return w


# ----------------------------------------------------------------------------- aten conv + fused epilogue
def epilogue_conv2d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                        stride: List[int], padding: List[int], dilation: List[int], groups: int,
                        relu: bool) -> Tensor:
    """aten's convolution, then fastres's fused bias (+ residual) + ReLU op: fp32/fp64 with
    the bias inside the convolution (free in oneDNN/cuDNN), bf16/fp16 with the bias added
    in fp32 by the epilogue. Any device; differentiable. ``y`` in x's memory format."""
    dtype = x.dtype
    if dtype in (torch.float32, torch.float64):
        y = conv2d(x, weight, None if bias is None else bias.to(dtype), stride, padding, dilation, groups)
        shift = None
        if residual is None and not relu:
            return _in_format(y, x)
    else:
        y = conv2d(x, weight, None, stride, padding, dilation, groups)
        shift = None if bias is None else bias.to(acc_dtype(dtype))
        if shift is None and residual is None and not relu:
            return _in_format(y, x)
    y = _in_format(y, x)
    name = "torch" if y.numel() == 0 else backends.backend_for(y.device)
    return ops.family(name).affine_act(y, None, shift, residual, relu)


def _in_format(y: Tensor, x: Tensor) -> Tensor:
    fmt = memory_format_of(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)
