"""argparse value types shared by the command lines (``python -m fastres bench|check|
paper``): each parses one value or raises ``argparse.ArgumentTypeError`` naming what
it expected and what it got, so argparse prints ``argument --x: expected ..., got ...``."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An integer >= ``low``, else ``expected WHAT, got ...``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (``nan``, ``inf``, ``0`` and words are refused)."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v
