"""Drop-in torchvision ResNets (every depth) running the fused blocks.

Same constructor, same module names and ``state_dict`` keys, same initialisation as
``torchvision.models.resnet``; the forward runs the fused ops (stem included).
Builders take ``weights=`` as torchvision's do -- a torchvision weights enum
(``ResNet50_Weights.DEFAULT``) or its name, loaded through torchvision from torch.hub's
cache (downloaded into it only when not there, as torchvision does), and the legacy
``pretrained=`` -- and also a state_dict or a path to a saved one; always strictly.

Extension (keyword-only): ``shortcut`` = ``"B"`` (torchvision's, the default:
projection when dimensions grow), ``"A"`` (zero-padding identity, no parameters),
``"C"`` (projection in every block) or ``None`` (the plain net of He et al. Fig. 3:
same layers, no shortcut).

Scriptable (``torch.jit.script`` compiles torchvision's unfused forward) and traceable
(``torch.fx``: each block is one node running the fused forward; the stem is
torchvision's ``conv1 → bn1 → relu``, see :meth:`ResNet._stem_conv`).
"""
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Type, Union

import torch
from torch import nn

from .. import conv_backend, fold
from .. import functional as FF
from .._reference import memory_format_of
from ..nn import _fused_conv_block as FCB
from .eval_plan import eval_plan_forward
from ..nn.blocks import (BasicBlock, Bottleneck, PadShortcut, check_input, conv1x1, conv_bn_act,
                         make_norm, rename_error, unfused_requested)

Tensor = torch.Tensor

__all__ = ["ResNet", "ResNet50", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "normalize_shortcut", "load_weights"]

Block = Union[Type[BasicBlock], Type[Bottleneck]]
SHORTCUTS = ("A", "B", "C", None)


def normalize_shortcut(shortcut) -> Optional[str]:
    if isinstance(shortcut, str) and shortcut.upper() in ("A", "B", "C"):
        return shortcut.upper()
    if shortcut is None or (isinstance(shortcut, str) and shortcut.lower() in ("none", "plain")):
        return None
    raise ValueError(f"shortcut must be 'A', 'B', 'C' or None (plain), got {shortcut!r}")


def _fastres_block(block) -> Block:
    """Accept torchvision's block classes too (mapped to the fused ones)."""
    if block in (BasicBlock, Bottleneck):
        return block
    name = getattr(block, "__name__", "")
    mod = getattr(block, "__module__", "")
    if mod.startswith("torchvision.") and name in ("BasicBlock", "Bottleneck"):
        return BasicBlock if name == "BasicBlock" else Bottleneck
    if isinstance(block, type) and issubclass(block, (BasicBlock, Bottleneck)):
        return block
    raise TypeError(f"block must be fastres.BasicBlock or fastres.Bottleneck (or torchvision's), got {block!r}")


def name_blocks(model: nn.Module) -> None:
    """Record each fused block's qualified name (used in error messages)."""
    for name, m in model.named_modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            m._fastres_name = name


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with the fused stem and blocks."""

    shortcut: Optional[str] = "B"
    _fastres_name: Optional[str] = "stem"

    def __init__(self, block: Block, layers: List[int], num_classes: int = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, shortcut: Optional[str] = "B") -> None:
        super().__init__()
        block = _fastres_block(block)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.shortcut = normalize_shortcut(shortcut)
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm_layer, self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_weights(self, zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        layers = [block(self.inplanes, planes, stride, self._shortcut_module(block, planes, stride),
                        self.groups, self.base_width, previous_dilation, norm_layer,
                        shortcut=self.shortcut is not None)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, self._shortcut_module(block, planes, 1),
                                groups=self.groups, base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer, shortcut=self.shortcut is not None))
        return nn.Sequential(*layers)

    def _shortcut_module(self, block: Block, planes: int, stride: int) -> Optional[nn.Module]:
        out = planes * block.expansion
        grows = stride != 1 or self.inplanes != out
        if self.shortcut is None or (self.shortcut != "C" and not grows):
            return None
        if self.shortcut == "A":
            return PadShortcut(self.inplanes, out, stride)
        return nn.Sequential(conv1x1(self.inplanes, out, stride), make_norm(self._norm_layer, out))

    # ---------------------------------------------------------------- forward
    def _stem_conv(self, x: Tensor) -> Tensor:
        """conv1 → BN + ReLU, after the input checks.

        Training: conv1, then one fused BN + ReLU. Eval: torchvision's unfused
        ``relu(bn1(conv1(x)))`` — the stem is deliberately not folded, so the graph
        ``torch.fx`` records for the stem (its ``conv1``/``bn1``/``relu`` nodes, which
        a feature extractor can return) computes exactly what eager runs and the two
        agree bit for bit (the blocks are single fx nodes running the fused forward).
        TorchScript: torchvision's stem.

        With the fused convolution selected for conv1 (``FASTRES_CONV=fused``, or ``auto``
        where the measurements favour it, see :mod:`fastres.conv_backend`) the stem runs
        through :func:`fastres.functional.conv2d_act` instead: training — conv1 with the
        BN statistics in its epilogue, the BN as a per-channel scale/shift (running
        statistics updated as ``nn.BatchNorm2d`` does), then one fused scale/shift + ReLU
        (the max-pool that follows cannot take a prologue); eval — conv1 folded with bn1
        (cached), bias + ReLU in the conv's epilogue. Under ``torch.fx`` the stem stays
        torchvision's ops (so under ``FASTRES_CONV=fused`` the eval stem of an fx graph
        is the unfolded computation, equal to eager to rounding, not bit for bit)."""
        if torch.jit.is_scripting():
            return self.relu(self.bn1(self.conv1(x)))
        return self._fused_stem_conv(x)

    @torch.jit.unused
    def _fused_stem_conv(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
            return self.relu(self.bn1(self.conv1(x)))
        check_input(self, x, self.conv1)
        if unfused_requested(self.relu):
            return self.relu(self.bn1(self.conv1(x)))
        try:
            y = self._conv2d_act_stem(x)
        except (RuntimeError, ValueError, TypeError) as e:
            raise rename_error(self, e) from None
        if y is not None:
            return y
        folds = not self.bn1.training and getattr(self.bn1, "running_mean", None) is not None
        if folds:
            return self.relu(self.bn1(self.conv1(x)))
        try:
            return conv_bn_act(self.conv1, self.bn1, x, None, "relu")
        except (RuntimeError, ValueError, TypeError) as e:
            raise rename_error(self, e) from None

    @torch.jit.unused
    def _conv2d_act_stem(self, x: Tensor) -> Optional[Tensor]:
        """The stem through conv2d_act (see :meth:`_stem_conv`), or None when the fused
        conv is not selected for conv1 or conv1/bn1 are not the plain modules."""
        conv, bn = self.conv1, self.bn1
        if not conv_backend.may_fuse(x.device):
            return None
        from ..nn.blocks import _foldable_conv, _fusable_bn
        if not (_foldable_conv(conv) and _fusable_bn(bn)):
            return None
        dt = fold.compute_dtype(x, conv.weight)
        key = conv_backend.shape_key(dt, memory_format_of(x) == torch.channels_last, conv.weight.shape, conv.stride,
                                     conv.dilation, conv.groups)
        if conv_backend.convs_for(x.device, [key]) != "fused":
            return None
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dt)
            if not FCB._uses_batch_stats(bn):  # eval: folded conv, bias + ReLU epilogue
                return FCB._folded(conv, bn, xc, dt, None, True)
            y, scale, shift = FCB._conv_bn(conv, bn, xc, dt, None, None, in_relu=False)
            return FF.affine_act(y, scale, shift, None, "relu")

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self._stem_conv(x))

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            y = self._eval_plan(x)
            if y is not None:
                return y
        return self._forward_impl(x)

    @torch.jit.unused
    def _eval_plan(self, x: Tensor) -> Optional[Tensor]:
        """fp32 CPU inference: the cached whole-model plan (:func:`fastres.models.eval_plan.eval_plan_forward`),
        or ``None`` (training, grads, hooks, tracing, other dtypes/devices ...)."""
        if self.training or isinstance(x, torch.fx.Proxy):
            return None
        return eval_plan_forward(self, x)

    # ---------------------------------------------------------------- fold cache
    def _apply(self, *args, **kwargs):
        fold.invalidate(self)  # frees the old device's / dtype's folds at once
        return super()._apply(*args, **kwargs)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's initialisation; then the block names for error messages."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                nn.init.constant_(m.bn2.weight, 0)
    name_blocks(model)


# --------------------------------------------------------------------------- weights
def load_weights(model: nn.Module, weights) -> nn.Module:
    """Load ``weights`` (a state_dict, or a path to a ``torch.save``-d one) strictly."""
    if weights is None:
        return model
    sd = _read_weights(weights)
    model.load_state_dict(sd, strict=True)
    return model


def _read_weights(weights) -> Mapping:
    if isinstance(weights, (str, os.PathLike)):
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    elif isinstance(weights, Mapping):
        sd = weights
    else:
        raise TypeError("weights must be a state_dict, a path to a saved state_dict, or torchvision weights "
                        "(a torchvision.models weights enum such as ResNet50_Weights.DEFAULT, or its name), "
                        f"got {type(weights).__name__}")
    if not isinstance(sd, Mapping):
        raise TypeError(f"weights file holds a {type(sd).__name__}, expected a state_dict")
    return sd


def _torchvision_weights(name: str, weights, kwargs: dict):
    """torchvision's weights enum member for builder ``name`` when ``weights`` is one, or
    a string naming one ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2",
    as torchvision's builders accept), or when torchvision's legacy ``pretrained=`` is
    given (True: its IMAGENET1K_V1; either way torchvision's deprecation warning); else
    None. Pops ``pretrained`` from ``kwargs``."""
    pretrained = kwargs.pop("pretrained", None)
    if pretrained is None and not isinstance(weights, str) and type(weights).__module__.split(".")[0] != "torchvision":
        return None  # a state_dict, a path object or None: no torchvision lookup
    from torchvision.models import get_model_weights
    enum = get_model_weights(name)
    if pretrained is not None:
        if weights is not None:
            raise TypeError(f"{name}: give weights= or the deprecated pretrained=, not both "
                            f"(got weights={weights!r}, pretrained={pretrained!r})")
        warnings.warn("The parameter 'pretrained' is deprecated since 0.13 and may be removed in the future, "
                      "please use 'weights' instead.")
        return enum.IMAGENET1K_V1 if pretrained else None
    if isinstance(weights, str):
        key = weights.replace(enum.__name__ + ".", "")
        return enum[key] if key in enum.__members__ else None  # else a path
    return enum.verify(weights)  # torchvision's own TypeError for another model's weights


def _overwrite(kwargs: dict, param: str, value) -> None:
    """A builder's fixed argument (resnext's groups, wide_resnet's width_per_group, the
    weights' num_classes): set, or refused when given otherwise, in torchvision's words
    and exception type."""
    if kwargs.setdefault(param, value) != value:
        raise ValueError(f"The parameter '{param}' expected value {value} but got {kwargs[param]} instead.")


def _builder_weights(name: str, weights, kwargs: dict) -> Optional[Mapping]:
    """The state_dict ``weights`` stands for (None without), read before the model is
    built. torchvision weights (see :func:`_torchvision_weights`) load as torchvision's
    builders load them -- ``weights.get_state_dict(progress=..., check_hash=True)``:
    the file in torch.hub's cache, downloaded into it only when missing -- and fix
    ``num_classes`` to their categories; a state_dict or a path to one gives
    ``num_classes`` its fc's rows when not given."""
    progress = kwargs.pop("progress", True)
    tv = _torchvision_weights(name, weights, kwargs)
    if tv is not None:
        _overwrite(kwargs, "num_classes", len(tv.meta["categories"]))
        return tv.get_state_dict(progress=progress, check_hash=True)
    if weights is None:
        return None
    sd = _read_weights(weights)
    fc = sd.get("fc.weight")
    if "num_classes" not in kwargs and isinstance(fc, Tensor):
        kwargs["num_classes"] = fc.shape[0]
    return sd


def _build(name: str, block: Block, layers: List[int], weights, kwargs: dict, **fixed: Any) -> ResNet:
    """Builder ``name`` (torchvision's): ``fixed`` are the keyword arguments of
    :class:`ResNet` it sets (ResNeXt's ``groups`` and ``width_per_group``, the wide nets'
    ``width_per_group``), refused with torchvision's ValueError when given otherwise."""
    for k, v in fixed.items():
        _overwrite(kwargs, k, v)
    sd = _builder_weights(name, weights, kwargs)
    model = ResNet(block, layers, **kwargs)
    if sd is not None:
        model.load_state_dict(sd, strict=True)
    return model


def resnet18(*, weights=None, **kwargs: Any) -> ResNet:
    """ResNet-18. ``shortcut=None`` gives the plain-18 of He et al. Fig. 4."""
    return _build("resnet18", BasicBlock, [2, 2, 2, 2], weights, kwargs)


def resnet34(*, weights=None, **kwargs: Any) -> ResNet:
    """ResNet-34. ``shortcut=None`` gives the plain-34 of He et al. Fig. 4."""
    return _build("resnet34", BasicBlock, [3, 4, 6, 3], weights, kwargs)


def resnet50(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("resnet50", Bottleneck, [3, 4, 6, 3], weights, kwargs)


def resnet101(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("resnet101", Bottleneck, [3, 4, 23, 3], weights, kwargs)


def resnet152(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("resnet152", Bottleneck, [3, 8, 36, 3], weights, kwargs)


def resnext50_32x4d(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], weights, kwargs, groups=32, width_per_group=4)


def resnext101_32x8d(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], weights, kwargs, groups=32, width_per_group=8)


def resnext101_64x4d(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("resnext101_64x4d", Bottleneck, [3, 4, 23, 3], weights, kwargs, groups=64, width_per_group=4)


def wide_resnet50_2(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], weights, kwargs, width_per_group=64 * 2)


def wide_resnet101_2(*, weights=None, **kwargs: Any) -> ResNet:
    return _build("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], weights, kwargs, width_per_group=64 * 2)


class ResNet50(ResNet):
    """``fastres.ResNet50()``: a ResNet-50 (torchvision's, fused). Keyword arguments as
    for :func:`resnet50` (``weights=``, ``num_classes=``, ``zero_init_residual=``, ...)."""

    def __init__(self, *, weights=None, **kwargs: Any) -> None:
        sd = _builder_weights("resnet50", weights, kwargs)
        super().__init__(Bottleneck, [3, 4, 6, 3], **kwargs)
        if sd is not None:
            self.load_state_dict(sd, strict=True)
