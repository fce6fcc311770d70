"""Shared test set-up.

On a machine without a GPU, Triton kernels run under the interpreter
(TRITON_INTERPRET=1, set here before anything imports triton). Set
FASTRES_REQUIRE_BACKENDS=cpp,triton (CI does) to turn "backend unavailable" skips
into failures, so a broken build can never pass silently.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastres  # noqa: E402
from fastres import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _required():
    return {b.strip() for b in os.environ.get("FASTRES_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def require_backend(name: str, device: str = "cpu") -> None:
    """Skip (with the reason) when backend ``name`` cannot run on ``device``; fail instead
    when the environment says the backend is required."""
    ok, why = backends.available(name, device)
    if ok:
        return
    if name in _required() and device == "cpu":
        pytest.fail(f"backend {name!r} is required (FASTRES_REQUIRE_BACKENDS) but unavailable: {why}")
    pytest.skip(f"backend {name!r} unavailable on {device}: {why}")


REFERENCE_OPS = "reference_ops"


def backend_params(device: str = "cpu", include_torch: bool = True):
    """Backends to parametrize over. ``reference_ops`` is a test-only family: the aten
    reference wrapped in the same custom-op / fake / autograd machinery as the real
    kernels, so the dispatch path is checked independently of any kernel."""
    names = [b for b in backends.BACKENDS if b != "torch" or include_torch]
    compat = {"cpu": ("torch", "cpp", "triton"), "cuda": ("torch", "cuda", "triton")}[device]
    return [b for b in names if b in compat] + [REFERENCE_OPS]


@contextlib.contextmanager
def run_on(backend: str, device: str = "cpu"):
    """Run fastres ops on ``backend`` (skipping/failing as require_backend says)."""
    if backend == REFERENCE_OPS:
        orig = backends.backend_for
        backends.backend_for = lambda dev: REFERENCE_OPS
        try:
            yield
        finally:
            backends.backend_for = orig
        return
    require_backend(backend, device)
    with fastres.use_backend(backend):
        yield


@pytest.fixture(autouse=True)
def _reset_backend():
    prev = fastres.set_backend(None)
    yield
    fastres.set_backend(prev)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
