"""fastres: fused conv + BatchNorm + ReLU + residual-add kernels behind drop-in ResNets."""
from . import _validate, backends, ops, functional, nn  # noqa: F401  (ops registers the custom ops)
from .backends import backend_info, set_backend, use_backend, backend_for  # noqa: F401

ops.preload()

from . import cudnn  # noqa: E402  (cuDNN fused-conv graphs: fakes + autograd of fastres::cudnn_*)
cudnn.register()

__version__ = "0.1.0"

__all__ = ["functional", "nn", "backend_info", "set_backend", "use_backend", "backend_for", "__version__",
           "cuda_graph_inference"]

# --- drop-in ResNets (issue #3): blocks, models, convert(), eval folding --------------
from . import fold, models  # noqa: E402,F401
from .nn.blocks import BasicBlock, Bottleneck  # noqa: E402,F401
from .models import (ResNet, ResNet50, resnet18, resnet34, resnet50, resnet101, resnet152,  # noqa: E402,F401
                     wide_resnet50_2, wide_resnet101_2, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d,
                     CifarResNet, cifar_resnet)
from .convert import convert  # noqa: E402,F401
from .inference import cuda_graph_inference  # noqa: E402,F401  (issue #13)
# the eval plan moved up to fastres.models (it walks blocks; fold never imports a layer above
# it): its former name fastres.fold.eval_plan_forward still works
fold.eval_plan_forward = models.eval_plan_forward

__all__ += ["fold", "models", "BasicBlock", "Bottleneck", "ResNet", "ResNet50", "resnet18", "resnet34",
            "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d",
            "resnext101_32x8d", "resnext101_64x4d", "CifarResNet", "cifar_resnet", "convert"]

# --- the fused convolution (issue 10): fastres.functional.conv2d_act, FASTRES_CONV ------
from . import conv_backend, conv_ops  # noqa: E402,F401
from .conv_backend import set_conv, use_conv  # noqa: E402,F401

conv_ops.preload()
__all__ += ["set_conv", "use_conv"]

# --- distributed: fused SyncBatchNorm (issue #12) ---------------------------------------
from .nn.syncbn import SyncBatchNormAct2d, convert_sync_batchnorm  # noqa: E402,F401

__all__ += ["SyncBatchNormAct2d", "convert_sync_batchnorm"]
