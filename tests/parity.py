"""Parity helpers shared by the test files: tolerances per dtype and the
flash-attention rule for low precision (error ≤ 2× PyTorch's own error vs fp32)."""
from __future__ import annotations

import torch

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}
LOW = (torch.bfloat16, torch.float16)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_dtype(actual, expected, dtype, name="", ref_low=None, ref_hi=None):
    """fp64/fp32: assert_close with the dtype's tolerance. bf16/fp16: actual's error
    against the fp32 reference ``ref_hi`` must be ≤ 2× (+ a tiny floor) PyTorch's own
    low-precision result ``ref_low`` against the same reference."""
    if dtype in TOL:
        torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        return
    assert ref_low is not None and ref_hi is not None
    ours = max_err(actual, ref_hi)
    theirs = max_err(ref_low, ref_hi)
    floor = 1e-3 * max(1.0, ref_hi.double().abs().max().item() if ref_hi.numel() else 1.0)
    assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3g} > 2 x PyTorch's {theirs:.3g} (+{floor:.1g})"


def make_input(shape, dtype, layout, device="cpu", scale=1.0, offset=0.0):
    """layout: 'contiguous', 'channels_last' or 'noncontig' (a permuted view that is
    neither contiguous nor channels_last)."""
    n, c, h, w = shape
    if layout == "noncontig":
        base = torch.randn(n, h, c, w, dtype=torch.float64, device=device) * scale + offset
        x = base.to(dtype).permute(0, 2, 1, 3)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last) or h * w == 1 or c == 1
        return x
    x = (torch.randn(n, c, h, w, dtype=torch.float64, device=device) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x
