"""tests/triton_bounds.py: every load/store of an interpreted Triton kernel is checked
against the storages of the kernel's tensor arguments (conftest installs it for the
whole suite), so an out-of-bounds access fails the test that made it instead of
corrupting the test process's heap."""
from __future__ import annotations

import os

import pytest
import torch

import conftest
import triton_bounds

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRETED, reason="Triton runs compiled here (no interpreter to check)")

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _copy(src, dst, n_load, n_store, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n_load, other=0.0)
    tl.store(dst + offs, v, mask=offs < n_store)


@triton.jit
def _add_at(dst, idx, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(dst + idx + offs, 1.0, mask=offs < BLOCK)


def test_installed_for_the_suite():
    # on every Triton the suite runs with (3.8 here, 3.6 in the gpustack leg): a check
    # that silently failed to install would leave the whole suite unchecked
    if os.environ.get("FASTRES_TRITON_BOUNDS", "1") == "0":
        pytest.skip("FASTRES_TRITON_BOUNDS=0: unchecked on request")
    assert conftest.TRITON_BOUNDS, f"tests/triton_bounds.py could not patch triton {triton.__version__}'s interpreter"
    assert triton_bounds.install()


def test_in_bounds_accesses_pass():
    a, b = torch.arange(8.0), torch.zeros(8)
    _copy[(1,)](a, b, 7, 7, BLOCK=8)
    assert torch.equal(b[:7], a[:7]) and b[7] == 0
    big = torch.zeros(16)
    _copy[(1,)](a, big[:8], 8, 9, BLOCK=16)  # one past the view, inside its storage: not a heap overrun
    assert torch.equal(big[:8], a) and big[8] == 0


@pytest.mark.parametrize("n_load,n_store,what,arg", [(9, 8, "load", "src"), (8, 9, "store", "dst")])
def test_out_of_bounds_is_an_error_before_the_access(n_load, n_store, what, arg):
    a = torch.arange(8.0)
    b = torch.full((8,), -1.0)
    with pytest.raises(Exception, match=rf"_copy: {what} of 1 of \d+ active address\(es\) outside every tensor "
                                        rf"argument; first at 32 bytes from the start of '{arg}' \(32 bytes\)"):
        _copy[(1,)](a, b, n_load, n_store, BLOCK=16)
    if what == "load":
        assert torch.equal(b, torch.full((8,), -1.0))  # refused before the store too


def test_atomics_are_checked():
    d = torch.zeros(8)
    _add_at[(1,)](d, 0, BLOCK=8)
    assert torch.equal(d, torch.ones(8))
    with pytest.raises(Exception, match="atomic of 4 of 8 active"):
        _add_at[(1,)](d, 4, BLOCK=8)
