"""fastres modules: fused BatchNorm(+add)+ReLU and the drop-in ResNet blocks."""
from .batchnorm import BatchNormAct2d

__all__ = ["BatchNormAct2d"]

# --- drop-in ResNet blocks (issue #3) ---------------------------------------------------
from .blocks import BasicBlock, Bottleneck, PadShortcut, conv_bn_act  # noqa: E402,F401

__all__ += ["BasicBlock", "Bottleneck", "PadShortcut", "conv_bn_act"]

# --- fused SyncBatchNorm for DistributedDataParallel (issue #12) -----------------------
from .syncbn import SyncBatchNormAct2d, convert_sync_batchnorm  # noqa: E402,F401

__all__ += ["SyncBatchNormAct2d", "convert_sync_batchnorm"]
