"""Bounds checking for Triton kernels run under the interpreter (TRITON_INTERPRET=1).

Under the interpreter a Triton load or store is a raw host-memory access: a kernel that
reads or writes past the tensors it was given corrupts the test process's heap
(``free(): invalid size`` an op later, or a silently wrong number) instead of failing
where the bug is, and on a GPU the same bug is an illegal-address fault or, worse, a
write into a neighbouring allocation. :func:`install` makes every load, store and
atomic of an interpreted kernel check that each address its mask leaves on lies inside
the storage of one of the kernel's tensor arguments, and raise :class:`OutOfBounds`
(naming the kernel, the access, and how far out it is) before the access happens.

conftest.py installs it for the whole suite wherever Triton runs interpreted
(FASTRES_TRITON_BOUNDS=0 turns it off, e.g. to time the interpreter itself).
"""
from __future__ import annotations

import functools
import threading

import numpy as np

_state = threading.local()


class OutOfBounds(AssertionError):
    """An interpreted Triton kernel touched memory outside its tensor arguments."""


def _ranges(args) -> list:
    """[(start, end, name)] byte ranges of the storages of the tensor arguments."""
    out = []

    def visit(name, a):
        if isinstance(a, (tuple, list)):
            for i, b in enumerate(a):
                visit(f"{name}[{i}]", b)
            return
        base = getattr(a, "base", None)  # a TensorDescriptor: its base tensor
        if not hasattr(a, "untyped_storage") and base is not None and hasattr(base, "untyped_storage"):
            a = base
        if hasattr(a, "untyped_storage"):
            st = a.untyped_storage()
            if st.nbytes():
                out.append((st.data_ptr(), st.data_ptr() + st.nbytes(), name))

    for name, a in args:
        visit(name, a)
    return out


def _check(kind: str, ptrs, mask, itemsize: int) -> None:
    frames = getattr(_state, "frames", None)
    if not frames:
        return
    kernel, ranges = frames[-1]
    p = np.asarray(ptrs)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, dtype=bool), p.shape)
        p = p[m]
    p = p.reshape(-1).astype(np.uint64, copy=False)
    if p.size == 0:
        return
    lo, hi = int(p.min()), int(p.max()) + itemsize
    for start, end, _ in ranges:
        if start <= lo and hi <= end:
            return  # the common case: the whole access inside one argument
    inside = np.zeros(p.shape, dtype=bool)
    for start, end, _ in ranges:
        inside |= (p >= start) & (p + itemsize <= end)
    if inside.all():
        return
    bad = int(p[~inside][0])
    near = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1]))) if ranges else None
    where = "no tensor arguments"
    if near is not None:
        start, end, name = near
        off = bad - start
        where = (f"{off} bytes from the start of {name!r} ({end - start} bytes)" if off >= 0
                 else f"{-off} bytes before {name!r}")
    raise OutOfBounds(f"Triton kernel {kernel}: {kind} of {int((~inside).sum())} of {p.size} active "
                      f"address(es) outside every tensor argument; first at {where}")


def install() -> bool:
    """Patch Triton's interpreter (idempotent). False where there is no interpreter to patch."""
    try:
        from triton.runtime import interpreter as it
    except Exception:
        return False
    B, G = it.InterpreterBuilder, it.GridExecutor
    if getattr(B, "_fastres_bounds", False):
        return True
    if not all(hasattr(B, n) for n in ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                                       "create_atomic_cas")) or not hasattr(G, "_init_args_hst"):
        return False  # another layout of the interpreter: run unchecked rather than break

    init_args, call = G._init_args_hst, G.__call__

    @functools.wraps(init_args)
    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        names = list(getattr(self, "arg_names", None) or [])[:len(args_hst)]
        names += [f"arg{i}" for i in range(len(names), len(args_hst))]
        pairs = list(zip(names, args_hst)) + list(kwargs_hst.items())
        frames = getattr(_state, "pending", None)
        if frames is not None:
            frames.append((getattr(self.fn, "__name__", repr(self.fn)), _ranges(pairs)))
        return args_hst, kwargs_hst

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        if not hasattr(_state, "frames"):
            _state.frames = []
        _state.pending = _state.frames
        depth = len(_state.frames)
        try:
            return call(self, *args, **kwargs)
        finally:
            del _state.frames[depth:]

    load, store = B.create_masked_load, B.create_masked_store
    rmw, cas = B.create_atomic_rmw, B.create_atomic_cas

    def ptr_size(ptrs):
        try:
            return int(ptrs.get_element_ty().primitive_bitwidth) // 8
        except Exception:
            return 1

    @functools.wraps(load)
    def create_masked_load(self, ptrs, mask, *a, **k):
        _check("load", ptrs.data, mask.data, ptr_size(ptrs))
        return load(self, ptrs, mask, *a, **k)

    @functools.wraps(store)
    def create_masked_store(self, ptrs, value, mask, *a, **k):
        _check("store", ptrs.data, mask.data, ptr_size(ptrs))
        return store(self, ptrs, value, mask, *a, **k)

    @functools.wraps(rmw)
    def create_atomic_rmw(self, op, ptr, val, mask, *a, **k):
        _check("atomic", ptr.data, mask.data, ptr_size(ptr))
        return rmw(self, op, ptr, val, mask, *a, **k)

    @functools.wraps(cas)
    def create_atomic_cas(self, ptr, cmp, val, *a, **k):
        _check("atomic_cas", ptr.data, None, ptr_size(ptr))
        return cas(self, ptr, cmp, val, *a, **k)

    G._init_args_hst, G.__call__ = _init_args_hst, __call__
    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    B.create_atomic_rmw, B.create_atomic_cas = create_atomic_rmw, create_atomic_cas
    B._fastres_bounds = True
    return True
