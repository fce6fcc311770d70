"""Drop-in torchvision ResNet blocks whose forward runs the fused ops.

``BasicBlock`` and ``Bottleneck`` have torchvision's constructor and real
``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules under torchvision's names, so
``load_state_dict(torchvision_block.state_dict(), strict=True)`` works and an
optimizer sees the same parameters. Only the forward differs:

* training: conv → fused BN+ReLU; the last conv → one fused BN + residual add + ReLU;
  the downsample's BN is fused (no activation).
* eval: each BN is folded into its conv (:mod:`fastres.fold`, cached, never stale)
  and the conv runs with the bias (+ residual) + ReLU in its epilogue.

Every convolution of a block, in training and eval, is
:func:`fastres.functional.conv2d_act` (the conv step's one home; see docs/DESIGN.md).

A norm layer that is not a plain ``nn.BatchNorm2d`` (GroupNorm, FrozenBatchNorm2d,
SyncBatchNorm, a subclass with its own forward) or a module with hooks falls back to
the unfused ``bn(conv(x)) (+ residual) → relu``, so the block stays correct. With
hooks on the block's ``relu`` module the block runs torchvision's own forward.

Tracers and compilers:

* ``torch.fx`` symbolic tracing (``create_feature_extractor``): each block is one
  ``call_module`` node (a leaf), so the traced graph runs exactly the eager forward
  and agrees with it bit for bit. :func:`fx_torchvision_graph` (``True``) traces
  torchvision's fine-grained graph instead (node names ``layer1.0.relu_2`` …, FX
  quantization), which runs unfused and so agrees with eager only to rounding.
* ``torch.jit.script``: the scripted forward is torchvision's (unfused); the fused
  path is ``@torch.jit.unused``.
* ``torch.jit.trace``: records torchvision's unfused forward (a trace that runs and
  saves without fastres).
"""
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .. import _validate as V
from .. import fold
from .. import functional as FF
from .._reference import memory_format_of
from .batchnorm import BatchNormAct2d, batch_norm_act_module, portable_trace
from . import _fused_conv_block

Tensor = torch.Tensor

__all__ = ["BasicBlock", "Bottleneck", "PadShortcut", "conv_bn_act", "conv3x3", "conv1x1",
           "InputShapeError", "InputDTypeError", "unfused_requested", "fx_torchvision_graph"]

# Wrong rank / channel count: a ValueError that is also the RuntimeError torchvision's
# convolution raises for the same mistake. Input/parameter dtype mismatch: a TypeError
# that is also a RuntimeError; integer input additionally a NotImplementedError.
InputShapeError = V.ShapeError
InputDTypeError = V.DTypeError


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def make_norm(norm_layer: Callable[..., nn.Module], num_features: int) -> nn.Module:
    """``norm_layer(num_features)``; a :class:`BatchNormAct2d` gets ``activation="none"``:
    the block owns the activations (relevant where the block falls back to calling it)."""
    m = norm_layer(num_features)
    if isinstance(m, BatchNormAct2d):
        m.activation = "none"
    return m


# ----------------------------------------------------------------------------- fusion rules
def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or getattr(_module, "_global_backward_pre_hooks", None))


_BN_FORWARDS = (nn.BatchNorm2d.forward, BatchNormAct2d.forward)


def _fusable_bn(bn: nn.Module) -> bool:
    """A BatchNorm2d with nn.BatchNorm2d's semantics (BatchNormAct2d counts: the block
    decides the activation) and nothing that calling it would run besides."""
    return (isinstance(bn, nn.BatchNorm2d) and type(bn).forward in _BN_FORWARDS
            and not _has_hooks(bn) and not _global_hooks())


def _foldable_conv(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not _has_hooks(conv))


def _unfused(conv: nn.Module, bn: nn.Module, x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def conv_bn_act(conv: nn.Module, bn: nn.Module, x: Tensor, residual: Optional[Tensor] = None,
                activation: Optional[str] = "relu") -> Tensor:
    """``act(bn(conv(x)) + residual)`` with the fused ops, for a conv module and its BN.

    Every convolution of a plain ``nn.Conv2d`` runs :func:`fastres.functional.conv2d_act`
    (the conv step's one home; its backend is chosen by :mod:`fastres.conv_backend`).
    Training (or a BN without running statistics): the conv, then one fused
    BN(+add)(+ReLU) that updates the running statistics exactly as ``nn.BatchNorm2d``.
    Eval: the folded conv with the bias (+ residual) (+ ReLU) in its epilogue -- on the
    CPU in fp32 inference one oneDNN primitive, else aten's conv + the fused epilogue op
    (:mod:`fastres.conv_aten`). Anything else (a norm layer other than BatchNorm2d, a
    conv with hooks or its own forward, hooks): the modules themselves, unfused.
    """
    if activation == "none":
        activation = None
    if not _fusable_bn(bn):
        return _unfused(conv, bn, x, residual, activation == "relu")
    if not _foldable_conv(conv):
        return batch_norm_act_module(bn, conv(x), residual, activation)
    if not bn.training and bn.running_mean is not None and bn.running_var is not None:
        weight, bias = fold.folded_conv_bn(conv, bn, fold.compute_dtype(x, conv.weight))
        return FF.conv2d_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                             residual=residual, activation=activation)
    y = FF.conv2d_act(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return batch_norm_act_module(bn, y, residual, activation)


def unfused_requested(relu: nn.Module) -> bool:
    """Run torchvision's own (unfused) forward instead: when the ``relu`` module the
    fused forward never calls has hooks, under ``torch.jit.trace`` or ``torch.export``
    (a portable program of aten ops), or under torch.fx symbolic tracing when
    :func:`fx_torchvision_graph` is on."""
    return _has_hooks(relu) or portable_trace() or (_FX_TORCHVISION[0] and _is_fx_tracing())


def _is_fx_tracing() -> bool:
    st = torch.fx._symbolic_trace
    fn = getattr(st, "is_fx_symbolic_tracing", None)  # fx.symbolic_trace only, not export/compile
    return fn() if fn is not None else st._get_is_fx_tracing()


_FX_TORCHVISION = [False]


def fx_torchvision_graph(enabled: Optional[bool] = None) -> bool:
    """Get (or set) what ``torch.fx`` symbolic tracing records for a fused block.

    ``False`` (default): the block is one ``call_module`` node running the fused eager
    forward, so the graph (``symbolic_trace``, ``create_feature_extractor``) agrees
    with the eager model bit for bit; node names stop at the block (``layer1.0``).
    ``True``: torchvision's fine-grained unfused graph (``layer1.0.conv1`` …
    ``layer1.0.relu_2``, what FX quantization needs), equal to eager up to the
    rounding of the folded convolutions. Returns the setting."""
    if enabled is not None:
        _FX_TORCHVISION[0] = bool(enabled)
    return _FX_TORCHVISION[0]


def fx_leaf(module: nn.Module, x) -> Optional[Tensor]:
    """Under torch.fx symbolic tracing (``x`` is a Proxy): a ``call_module`` node for
    ``module`` itself, so the traced graph calls the module's eager (fused) forward.
    ``None`` otherwise, and for the traced root (a node cannot call its own graph) or
    a module the tracer cannot name."""
    if not isinstance(x, torch.fx.Proxy) or _FX_TORCHVISION[0]:
        return None
    tracer = x.tracer
    try:
        path = tracer.path_of_module(module)
    except (NameError, AttributeError):
        return None
    if not path:
        return None
    return tracer.create_proxy("call_module", path, (x,), {})


# ----------------------------------------------------------------------------- input checks / names
def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def block_name(m: nn.Module) -> str:
    name = getattr(m, "_fastres_name", None)
    return f"{name} ({type(m).__name__})" if name else type(m).__name__


def check_input(owner: nn.Module, x, conv: nn.Module) -> None:
    """What torchvision would reject, rejected before any work, naming ``owner``."""
    where = block_name(owner)
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputShapeError(f"{where}: expected 4D input (N, C, H, W) (got {x.dim()}D input of shape "
                              f"{tuple(x.shape)})")
    if not x.is_floating_point():
        raise V.UnsupportedDTypeError(f"{where}: input must be a floating-point tensor (float64, float32, bfloat16 or "
                              f"float16), got {_dt(x.dtype)}")
    w = getattr(conv, "weight", None)
    if isinstance(w, Tensor):
        cin = w.shape[1] * getattr(conv, "groups", 1)
        if x.shape[1] != cin:
            raise InputShapeError(f"{where}: expected input with {cin} channels, got {x.shape[1]} channels "
                                  f"(input shape {tuple(x.shape)})")
        if x.dtype != w.dtype and not (x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)):
            raise InputDTypeError(f"{where}: input dtype {_dt(x.dtype)} does not match the parameters' dtype "
                                  f"{_dt(w.dtype)}; convert the model (.to({_dt(x.dtype)})) or the input, "
                                  f"or run under torch.autocast")
        if x.device != w.device:
            raise V.DeviceError(f"{where}: input is on {x.device} but the parameters are on {w.device}")


def rename_error(owner: nn.Module, e: BaseException) -> BaseException:
    """The same exception type with the block's name in front of the message (exact
    built-in types only; others get a note)."""
    if getattr(e, "_fastres_named", False):
        return e
    where = block_name(owner)
    if type(e) in (RuntimeError, ValueError, TypeError, NotImplementedError) + V.ERRORS and len(e.args) <= 1:
        msg = str(e)
        new = type(e)(msg if msg.startswith(where) else f"{where}: {msg}")
        new = new.with_traceback(e.__traceback__)
    else:
        e.add_note(f"(in fastres {where})")
        new = e
    new._fastres_named = True  # type: ignore[attr-defined]
    return new


# ----------------------------------------------------------------------------- option A shortcut
class PadShortcut(nn.Module):
    """Option A shortcut of He et al. §3.3: identity, subsampled by ``stride``
    (``x[:, :, ::s, ::s]``) and zero-padded with ``out_planes - in_planes`` extra
    channels at the end (as fb.resnet.torch). No parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"PadShortcut: out_planes ({out_planes}) < in_planes ({in_planes})")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # the same values (memory format aside)
            if self.stride != 1:
                x = x[:, :, ::self.stride, ::self.stride]
            return F.pad(x, [0, 0, 0, 0, 0, self.out_planes - x.shape[1]])
        return self._pad(x)

    @torch.jit.unused
    def _pad(self, x: Tensor) -> Tensor:
        fmt = memory_format_of(x)  # the block's conv output follows x's memory format
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        extra = self.out_planes - x.shape[1]
        if extra == 0:
            return x
        n, c, h, w = x.shape
        # one buffer in the conv output's memory format: zeros, then the identity into its first c channels
        out = torch.empty((n, self.out_planes, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        out[:, c:].zero_()
        out[:, :c].copy_(x)
        return out


# ----------------------------------------------------------------------------- blocks
class _FusedBlock(nn.Module):
    """Shared forward machinery of the fused blocks: a subclass lists its
    ``(conv, bn)`` pairs in :meth:`_units` (the last one takes the identity)."""

    expansion: int = 1
    shortcut: bool = True
    _fastres_name: Optional[str] = None

    def _units(self) -> List[Tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def _identity(self, x: Tensor) -> Optional[Tensor]:
        if not self.shortcut:
            return None
        ds = self.downsample
        if ds is None:
            return x
        if type(ds) is nn.Sequential and len(ds) == 2 and not _has_hooks(ds):
            return conv_bn_act(ds[0], ds[1], x, None, None)
        return ds(x)

    def _finish(self, conv: nn.Module, bn: nn.Module, out: Tensor, x: Tensor) -> Tensor:
        """relu(bn(conv(out)) + identity(x)): one fused BN + add + ReLU."""
        identity = self._identity(x)
        if identity is not None and isinstance(getattr(conv, "weight", None), Tensor) \
                and identity.dtype != fold.compute_dtype(out, conv.weight):
            # autocast with an fp32 identity (a block fed fp32): torchvision's
            # `out += identity` adds in fp32 and rounds once into the branch's dtype
            y = conv_bn_act(conv, bn, out, None, None)
            return torch.relu(y.add_(identity))
        return conv_bn_act(conv, bn, out, identity, "relu")

    def _forward(self, x: Tensor) -> Tensor:
        """The fused forward: conv → BN → ReLU for every unit but the last, then the
        fused tail (:meth:`_finish`)."""
        units = self._units()
        out = x
        for conv, bn in units[:-1]:
            out = conv_bn_act(conv, bn, out, None, "relu")
        conv, bn = units[-1]
        return self._finish(conv, bn, out, x)

    def _reference_tail(self, out: Tensor, x: Tensor) -> Tensor:
        """torchvision's ``out += identity; relu(out)`` (scriptable)."""
        if self.shortcut:
            identity = x
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
        return self.relu(out)

    def _reference_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: torchvision's (unfused) forward
            return self._reference_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        leaf = fx_leaf(self, x)
        if leaf is not None:
            return leaf
        if unfused_requested(self.relu) or isinstance(x, torch.fx.Proxy):
            return self._reference_forward(x)
        check_input(self, x, self.conv1)
        try:
            fused = _fused_conv_block.forward(self, x)  # FASTRES_CONV=fused: conv2d_act (issue 10)
            return fused if fused is not None else self._forward(x)
        except (RuntimeError, ValueError, TypeError) as e:
            raise rename_error(self, e) from None

    def _apply(self, *args, **kwargs):
        fold.invalidate(self)  # frees the old device's / dtype's folds at once
        return super()._apply(*args, **kwargs)


def _check_shortcut(shortcut: bool, downsample: Optional[nn.Module]) -> bool:
    if not isinstance(shortcut, bool):
        raise TypeError(f"shortcut must be True or False, got {shortcut!r}")
    if not shortcut and downsample is not None:
        raise ValueError("a block without shortcut (shortcut=False) cannot have a downsample")
    return shortcut


class BasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock`` (two 3x3 convs), fused. ``shortcut=False`` (keyword)
    gives the plain block of He et al. Fig. 3 middle (no identity add)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, shortcut: bool = True) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = make_norm(norm_layer, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = make_norm(norm_layer, planes)
        self.downsample = downsample
        self.stride = stride
        self.shortcut = _check_shortcut(shortcut, downsample)

    @torch.jit.unused
    def _units(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def _reference_forward(self, x: Tensor) -> Tensor:
        """torchvision's BasicBlock.forward, unfused."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self._reference_tail(self.bn2(self.conv2(out)), x)


class Bottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` (1x1 → 3x3 with the stride, "v1.5" → 1x1, expansion 4),
    fused. ``shortcut=False`` (keyword) drops the identity add."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, shortcut: bool = True) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = make_norm(norm_layer, width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = make_norm(norm_layer, width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = make_norm(norm_layer, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.shortcut = _check_shortcut(shortcut, downsample)

    @torch.jit.unused
    def _units(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]

    def _reference_forward(self, x: Tensor) -> Tensor:
        """torchvision's Bottleneck.forward, unfused."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._reference_tail(self.bn3(self.conv3(out)), x)
