"""Triton 3.6's CPU interpreter with NumPy >= 2.4: a loop ``for i in range(n)`` over a
runtime ``n`` fails with "only 0-dimensional arrays can be converted to Python scalars",
because the interpreter turns a scalar into an int with ``int(handle.data)`` on a
1-element array (NumPy 2.4 made that an error). Triton 3.8 reads
``int(handle.data.squeeze())``. Under ``TRITON_INTERPRET=1`` on a Triton whose
interpreter still has the old conversion, :func:`apply` re-patches ``tensor.__index__``
the way 3.8 does, inside the interpreter's own patch scope (restored with it), so the
kernels keep their ``range`` loops: on a GPU those are the loops Triton software-pipelines.
Nothing changes on a GPU or on a Triton that is already fixed.
"""
from __future__ import annotations

import inspect
import os

_applied = []


def _index(self):
    return int(self.handle.data.squeeze())


def apply() -> bool:
    """Install the fix where it is needed; True when installed (now or before)."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        try:
            from triton.runtime import interpreter as I
            orig = getattr(I, "_patch_lang_tensor", None)
            src = inspect.getsource(orig) if orig is not None else ""
        except (ImportError, OSError, TypeError):
            orig, src = None, ""
        if orig is not None and "int(self.handle.data)" in src:

            def _patch_lang_tensor(tensor, scope, _orig=orig):
                _orig(tensor, scope)
                scope.set_attr(tensor, "__index__", _index)

            I._patch_lang_tensor = _patch_lang_tensor
            ok = True
    _applied.append(ok)
    return ok


apply()
