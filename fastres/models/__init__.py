"""fastres models: torchvision's ResNets (every depth) and He et al.'s CIFAR family."""
from .resnet import (ResNet, ResNet50, resnet18, resnet34, resnet50, resnet101, resnet152,  # noqa: F401
                     wide_resnet50_2, wide_resnet101_2, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d)
from .cifar import CifarResNet, cifar_resnet  # noqa: F401
from .eval_plan import eval_plan_forward  # noqa: F401

__all__ = ["ResNet", "ResNet50", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "CifarResNet", "cifar_resnet", "eval_plan_forward"]
