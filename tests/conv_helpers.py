"""Test helper shared by the conv2d_act test files: run conv2d_act on one op family."""
from __future__ import annotations

import contextlib

import pytest

from fastres import backends, conv_backend, conv_ops


@contextlib.contextmanager
def conv_family(name: str):
    """``torch``: FASTRES_CONV=aten (the aten path: the plain aten composition with a
    prologue or statistics, its ``epilogue`` / ``onednn`` backends without); ``ops``: FASTRES_CONV=fused
    with ``fastres::conv2d_act`` (aten inside the custom-op machinery: fakes, autograd);
    ``triton``: FASTRES_CONV=fused with the Triton kernel (skipped, with the reason, where
    Triton cannot run)."""
    if name == "triton":
        ok, why = backends.available("triton", "cpu")
        if not ok:
            pytest.skip(f"triton unavailable on cpu: {why}")
    orig = conv_ops.family
    prev = conv_backend.set_conv("aten" if name == "torch" else "fused")
    if name == "ops":
        conv_ops.family = lambda n: orig("ops")
    try:
        yield
    finally:
        conv_ops.family = orig
        conv_backend.set_conv(prev)
