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


# ============================================================================
# BEGIN hypothesis profiles for the fuzzed parity suite (issue #5, tests/test_fuzz.py)
#
#   FASTRES_FUZZ_PROFILE=ci    (default) fixed budget (300 examples in all, split over
#                              the backends by tests/test_fuzz.py), fixed seed
#   FASTRES_FUZZ_PROFILE=long  10x the budget, a fresh random seed on every run
#   FASTRES_FUZZ_SEED=<int>    use this seed (replays a failure: the seed is printed in
#                              the pytest header and in every fuzz failure message)
#
# The profiles are named fastres-ci / fastres-long so they never collide with
# Hypothesis's own built-in "ci" profile.
# ============================================================================
import random as _random  # noqa: E402

from hypothesis import HealthCheck as _HealthCheck  # noqa: E402
from hypothesis import settings as _hyp_settings  # noqa: E402

FUZZ_PROFILE = os.environ.get("FASTRES_FUZZ_PROFILE", "ci").strip().lower() or "ci"
if FUZZ_PROFILE not in ("ci", "long"):
    raise pytest.UsageError(f"FASTRES_FUZZ_PROFILE must be 'ci' or 'long', got {FUZZ_PROFILE!r}")
_FUZZ_SEED_ENV = os.environ.get("FASTRES_FUZZ_SEED", "").strip()
FUZZ_SEED = (int(_FUZZ_SEED_ENV) if _FUZZ_SEED_ENV
             else 5052024 if FUZZ_PROFILE == "ci"
             else _random.SystemRandom().randrange(2 ** 32))

_FUZZ_COMMON = dict(
    deadline=None,          # the Triton interpreter and first-call compilation are slow
    database=None,          # CI replays exactly the seeded examples, nothing from a local DB
    print_blob=True,        # a failure also prints @reproduce_failure(...)
    derandomize=False,      # the explicit @seed(FUZZ_SEED) of each fuzz test drives generation
    suppress_health_check=[_HealthCheck.too_slow, _HealthCheck.data_too_large],
)
_hyp_settings.register_profile("fastres-ci", max_examples=300, **_FUZZ_COMMON)
_hyp_settings.register_profile("fastres-long", max_examples=3000, **_FUZZ_COMMON)
_hyp_settings.load_profile(f"fastres-{FUZZ_PROFILE}")


def _fuzz_line() -> str:
    return (f"fastres fuzz: profile={FUZZ_PROFILE} ({_hyp_settings.default.max_examples} examples in all) "
            f"seed={FUZZ_SEED} -- replay with FASTRES_FUZZ_PROFILE={FUZZ_PROFILE} FASTRES_FUZZ_SEED={FUZZ_SEED}")


def pytest_report_header(config):
    return _fuzz_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # also under -q (which hides the header), when the fuzz suite ran
    if any("test_fuzz.py" in r.nodeid for rs in terminalreporter.stats.values() for r in rs
           if hasattr(r, "nodeid")):
        terminalreporter.write_line(_fuzz_line())
# END hypothesis profiles
# ============================================================================
