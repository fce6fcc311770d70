"""fastres: fused conv + BatchNorm + ReLU + residual-add kernels behind drop-in ResNets."""
from . import _validate, backends, ops, functional, nn  # noqa: F401  (ops registers the custom ops)
from .backends import backend_info, set_backend, use_backend, backend_for  # noqa: F401

__version__ = "0.1.0"

__all__ = ["functional", "nn", "backend_info", "set_backend", "use_backend", "backend_for", "__version__"]
