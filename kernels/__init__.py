"""Triton kernels of fastres (installed as ``fastres.kernels``).

Plain launchers with the semantics and signatures of docs/DESIGN.md; ``fastres/ops.py``
wraps them in ``torch.library.custom_op`` as ``fastres::triton_*``
(``fastres/_triton_ops.py``: in ``torch.library.triton_op`` as ``fastres::tritonop_*``). On a machine without
a GPU they run on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from . import _interpreter_compat  # noqa: F401  (Triton 3.6 interpreter + NumPy >= 2.4)
from ._launch import affine_act, affine_act_backward, bn_act_train, bn_act_train_backward, launching

__all__ = ["bn_act_train", "bn_act_train_backward", "affine_act", "affine_act_backward", "launching"]
