"""``fastres.convert(model)``: swap torchvision ResNet blocks for the fused ones, in place,
sharing every parameter and buffer tensor (no copies), so an optimizer built before
the call keeps training the converted model.

* every ``torchvision.models.resnet.BasicBlock`` / ``Bottleneck`` (exact class) in the
  tree becomes a ``fastres.BasicBlock`` / ``Bottleneck`` holding the *same* submodule
  objects (``conv1``, ``bn1``, …, ``downsample``), hooks and training flag;
* a ``torchvision.models.ResNet`` (exact class) gets the fused stem: its class
  becomes ``fastres.ResNet`` (same attributes; ``isinstance(m, torchvision ResNet)``
  no longer holds);
* everything else is left alone: subclasses of torchvision's blocks or ResNet (their
  forward may differ; their blocks of the exact classes are still converted), and
  the stems of other models.

``inplace=False`` converts a deep copy instead.
"""
from __future__ import annotations

import copy
from torch import nn

from .models.resnet import ResNet, name_blocks
from .nn.blocks import BasicBlock, Bottleneck

__all__ = ["convert"]

def _torchvision_classes():
    try:
        from torchvision.models import resnet as tv
    except Exception:  # torchvision absent: nothing of torchvision's can be in the tree
        return None
    return tv


def _convert_block(m: nn.Module, tv) -> nn.Module:
    cls = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck}[type(m)]
    new = cls.__new__(cls)
    # the same state: submodules (hence parameters and buffers), hooks (their handles
    # keep working), training flag and plain attributes
    new.__dict__.update(m.__dict__)
    new.shortcut = True
    return new


def convert(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace torchvision ResNet blocks (and a torchvision ResNet's stem) in ``model``
    by fused fastres ones sharing the same parameter and buffer tensors.

    Returns the converted model (``model`` itself, or a deep copy when
    ``inplace=False``). Unknown modules are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.convert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    tv = _torchvision_classes()
    if tv is None:
        return model
    blocks = (tv.BasicBlock, tv.Bottleneck)
    if type(model) in blocks:
        model = _convert_block(model, tv)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in blocks:
                parent._modules[name] = _convert_block(child, tv)
    if type(model) is tv.ResNet:
        model.__class__ = ResNet  # fused stem; same attributes, same forward otherwise
    name_blocks(model)
    return model
