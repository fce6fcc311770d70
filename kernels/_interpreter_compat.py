"""Triton 3.6's CPU interpreter with NumPy >= 2.4: a loop ``for i in range(n)`` over a
runtime ``n`` fails with "only 0-dimensional arrays can be converted to Python scalars",
because the interpreter turns a scalar into an int with ``int(handle.data)`` on a
1-element array (NumPy 2.4 made that an error). Triton 3.8 reads
``int(handle.data.squeeze())``. Under ``TRITON_INTERPRET=1`` on a Triton whose
interpreter still has the old conversion, :func:`apply` re-patches ``tensor.__index__``
the way 3.8 does, inside the interpreter's own patch scope (restored with it), so the
kernels keep their ``range`` loops: on a GPU those are the loops Triton software-pipelines.
Nothing changes on a GPU or on a Triton that is already fixed.

Second fix (Triton 3.6 and 3.8): a call of one ``@triton.jit`` function from another
(``InterpretedFunction.__call__``, e.g. ``tl.zeros`` or a reduction's combine function,
both in ``triton.language.standard``) patches ``triton.language`` for the interpreter
and never restores the patch: after the first kernel run ``triton.language.core`` stays
half-interpreted, and generating Triton IR in that process fails (torch's analysis of a
user kernel under ``torch.library.triton_op`` does that: fastres/_triton_ops.py).
:func:`apply` makes that call restore its patches when it returns.
"""
from __future__ import annotations

import inspect
import os

_applied = []


def _index(self):
    return int(self.handle.data.squeeze())


def _scoped_device_calls(I) -> None:
    """``InterpretedFunction.__call__`` restoring the patch scope it opens."""
    cls = getattr(I, "InterpretedFunction", None)
    try:
        src = inspect.getsource(cls.__call__) if cls is not None else ""
    except (OSError, TypeError):
        src = ""
    if "_patch_lang(self.fn)" not in src or "restore" in src:  # another layout, or already fixed
        return

    def __call__(self, *args, **kwargs):
        scope = I._patch_lang(self.fn)
        try:
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise I.InterpreterError(repr(e)) from e
        finally:
            if hasattr(scope, "restore"):
                scope.restore()

    cls.__call__ = __call__


class _NoScope:
    """The scope of a device-function call whose modules an enclosing scope has patched."""

    def restore(self) -> None:
        pass


_live: dict = {}  # id(module) -> how many open patch scopes patched it


def _patch_lang_once(I) -> None:
    """``_patch_lang`` that skips the modules an enclosing (still open) scope has patched.
    Each device-function call (``tl.zeros``, every reduction's combine function, a
    kernel's own ``@triton.jit`` helpers) patched ``triton.language`` again: walking each
    module with ``inspect.getmembers`` -- a quarter of the interpreter's time in this
    suite. Re-patching a patched module changes nothing (its builtins are already
    wrappers, which ``getmembers`` no longer sees as builtins), so the call gets a scope
    with nothing to restore, and the enclosing scope restores the module when it closes."""
    orig = getattr(I, "_patch_lang", None)
    tl = getattr(I, "tl", None)
    if orig is None or tl is None or getattr(orig, "_fastres_once", False):
        return

    def _patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and (v is tl or v is tl.core)}
        if langs and all(_live.get(m, 0) for m in langs):
            return _NoScope()
        scope = orig(fn)
        restore = scope.restore
        for m in langs:
            _live[m] = _live.get(m, 0) + 1

        def _restore():
            try:
                restore()
            finally:
                for m in langs:
                    _live[m] -= 1

        scope.restore = _restore
        return scope

    _patch_lang._fastres_once = True
    I._patch_lang = _patch_lang


def apply() -> bool:
    """Install the fixes where they are needed; True when the first is installed (now or before)."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        try:
            from triton.runtime import interpreter as I
            _scoped_device_calls(I)
            if getattr(I.InterpretedFunction.__call__, "__module__", "") == __name__:
                _patch_lang_once(I)  # only where device calls restore their scopes (above)
        except ImportError:
            pass
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
