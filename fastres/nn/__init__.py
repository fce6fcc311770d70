"""fastres modules: fused BatchNorm(+add)+ReLU and the drop-in ResNet blocks."""
from .batchnorm import BatchNormAct2d

__all__ = ["BatchNormAct2d"]
