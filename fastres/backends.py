"""Backend choice: which implementation of the fused ops runs on which device.

Backends: ``torch`` (aten composition, the oracle and last fallback), ``triton``
(``fastres.kernels``; on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1``),
``cpp`` (``fastres._C`` CPU kernels) and ``cuda`` (``fastres._C`` CUDA kernels).

The choice is, in order: :func:`set_backend` / :func:`use_backend`, the environment
variable ``FASTRES_BACKEND`` (``auto|torch|triton|cpp|cuda``), then ``auto``:
cpu → cpp → torch; cuda → triton → cuda → torch. When the requested backend cannot
run on a device, the next of the auto order is used and one warning says so.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")
_CHOICES = ("auto",) + BACKENDS
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}

_override: Optional[str] = None
_warned: set = set()


def _check_name(name: str) -> str:
    name = (name or "auto").strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"fastres: unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    return name


def set_backend(name: Optional[str]) -> Optional[str]:
    """Force a backend for every device (``None`` or ``"auto"`` restores the default).

    Returns the previous override so callers can restore it.
    """
    global _override
    prev = _override
    _override = None if name is None else _check_name(name)
    return prev


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    prev = set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def requested_backend() -> str:
    if _override is not None:
        return _override
    return _check_name(os.environ.get("FASTRES_BACKEND", "auto"))


# --------------------------------------------------------------------------- availability
# What was built and what imports is probed once, when this module is imported, and kept
# in plain module globals. The lookups that run inside a traced forward (backend_for ->
# _resolve -> available) then only read constants: torch.compile(fullgraph=True) never
# traces a probe (Dynamo ignores lru_cache wrappers and traces the function body, and
# torch 2.11's Dynamo cannot trace importlib.util.find_spec or the imports).
def _probe_C() -> Tuple[bool, bool, str]:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fastres.*)
    except Exception as e:  # ImportError, or an ABI mismatch (undefined symbol)
        return False, False, f"fastres._C not loaded: {type(e).__name__}: {e}"
    has_cuda = bool(getattr(_C, "WITH_CUDA", False))
    return True, bool(has_cuda), "fastres._C loaded" + (" with CUDA kernels" if has_cuda else " (CPU kernels only)")


def _probe_triton() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - broken install
        return False, f"triton failed to import: {e}"
    try:
        from . import kernels  # noqa: F401  (fastres.kernels, the top-level kernels/ folder)
    except Exception as e:
        return False, f"fastres.kernels failed to import ({type(e).__name__}: {e}); install with pip install -e ."
    return True, f"triton {triton.__version__}"


_C_STATE: Optional[Tuple[bool, bool, str]] = None
_TRITON_STATE: Optional[Tuple[bool, str]] = None


def _C_status() -> Tuple[bool, bool, str]:
    """(loaded, cuda_kernels_compiled, message)."""
    global _C_STATE
    if _C_STATE is None:
        _C_STATE = _probe_C()
    return _C_STATE


def _triton_installed() -> Tuple[bool, str]:
    """(importable, message): triton and fastres.kernels import."""
    global _TRITON_STATE
    if _TRITON_STATE is None:
        _TRITON_STATE = _probe_triton()
    return _TRITON_STATE


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(name: str, device_type: str) -> Tuple[bool, str]:
    """Can backend ``name`` run on a device of type ``device_type``? (ok, reason)."""
    if name == "torch":
        return True, "aten reference"
    if name == "cpp":
        if device_type != "cpu":
            return False, "cpp runs on the CPU only"
        ok, _, msg = _C_status()
        return ok, msg
    if name == "cuda":
        if device_type != "cuda":
            return False, "cuda runs on CUDA devices only"
        ok, has_cuda, msg = _C_status()
        if not ok:
            return False, msg
        if not has_cuda:
            return False, "fastres._C was built without CUDA kernels"
        return True, msg
    if name == "triton":
        ok, msg = _triton_installed()
        if not ok:
            return False, msg
        if device_type == "cuda":
            return True, msg
        if device_type == "cpu":
            if triton_interpret():
                return True, msg + " (interpreter, TRITON_INTERPRET=1)"
            return False, "triton on the CPU needs TRITON_INTERPRET=1"
        return False, f"triton does not run on {device_type}"
    raise ValueError(f"fastres: unknown backend {name!r}")


_RESOLVED: Dict[Tuple[str, str], Tuple[str, Optional[str]]] = {}


def remembered(cache: dict, key, compute):
    """``cache[key]``, from ``compute()`` on a miss (kept, except while Dynamo traces). A
    plain dict, not ``functools.lru_cache``: the lookups run inside compiled forwards, and
    Dynamo ignores an lru_cache wrapper, traces the function body and warns about it."""
    hit = cache.get(key)
    if hit is None:
        hit = compute()
        if not torch.compiler.is_compiling():
            cache[key] = hit
    return hit


def _resolve(requested: str, device_type: str) -> Tuple[str, Optional[str]]:
    """(backend, fallback warning or None), remembered per (requested, device type)."""
    return remembered(_RESOLVED, (requested, device_type), lambda: _resolve_uncached(requested, device_type))


def _resolve_uncached(requested: str, device_type: str) -> Tuple[str, Optional[str]]:
    order = _AUTO_ORDER.get(device_type, ("torch",))
    if requested == "auto":
        for name in order:
            if available(name, device_type)[0]:
                return name, None
        return "torch", None
    ok, why = available(requested, device_type)
    if ok:
        return requested, None
    for name in order:
        if available(name, device_type)[0]:
            return name, (f"fastres: backend {requested!r} is unavailable on {device_type} ({why}); "
                          f"using {name!r} instead")
    return "torch", f"fastres: backend {requested!r} is unavailable on {device_type} ({why}); using 'torch'"


def backend_for(device: torch.device) -> str:
    """The backend the fused ops use for tensors on ``device`` (warns once on a fallback)."""
    name, warning = _resolve(requested_backend(), device.type)
    if warning is not None and (warning not in _warned):
        _warned.add(warning)
        if not torch.compiler.is_compiling():
            warnings.warn(warning, RuntimeWarning, stacklevel=3)
    return name


def backend_info() -> Dict[str, object]:
    """What was built, what can run, and which backend each op uses on each device."""
    loaded, has_cuda, c_msg = _C_status()
    t_ok, t_msg = _triton_installed()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    per_device = {}
    for dev in devices:
        name, warning = _resolve(requested_backend(), dev)
        per_device[dev] = {
            "backend": name,
            "ops": {"bn_act_train": name, "bn_act_train_backward": name, "affine_act": name,
                    "affine_act_backward": name, "update_running_stats": "torch"},
            "available": {b: available(b, dev)[0] for b in BACKENDS},
            "fallback_warning": warning,
        }
    from . import cudnn  # the cuDNN fused-conv graphs (issue 11)
    for dev in devices:
        per_device[dev]["cudnn_conv"] = cudnn.info(dev)
    from . import _triton_ops  # which variant the Triton family is (FASTRES_TRITON_OP), issue 12
    from .conv_backend import conv_info  # the conv path (FASTRES_CONV), issue 10
    for dev in per_device:
        per_device[dev]["conv"] = conv_info(dev)
    return {
        "requested": requested_backend(),
        "built": {"_C": loaded, "_C_cuda_kernels": has_cuda, "_C_message": c_msg,
                  "triton": t_ok, "triton_message": t_msg,
                  "triton_interpret": triton_interpret(), "_C_cudnn": cudnn.built()[0]},
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "triton_op": _triton_ops.info(),
        "devices": per_device,
    }


# Probe now (see "availability" above), not on a first call that may be under torch.compile.
_C_status()
_triton_installed()
