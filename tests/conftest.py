"""Shared test set-up.

On a machine without a GPU, Triton kernels run under the interpreter
(TRITON_INTERPRET=1, set here before anything imports triton). Set
FASTRES_REQUIRE_BACKENDS=cpp,triton (CI does) to turn "backend unavailable" skips
into failures, so a broken build can never pass silently.

Devices: tests that run fastres's kernels take ``backend, device`` from
:func:`targets`: the CPU backends on ``"cpu"``, and the ``cuda`` and ``triton``
backends on ``"cuda"``. Every CUDA case carries the ``gpu`` marker (``pytest -m gpu``
selects exactly the cases that run CUDA / Triton kernels on the device; it is what
benchmarks/run_gpu.sh runs) and skips with the one reason ``NO_CUDA`` where no CUDA
device is present. On a machine with one, a missing ``cuda`` or ``triton`` backend
FAILS (a GPU run must never pass by skipping its kernels).

benchmarks/run_gpu.sh's test steps: FASTRES_RESULT_LOG (a JSON line per test outcome, as
it happens), FASTRES_SHARD=I/N (this process's shard, cheap tests first) and
FASTRES_TEST_TIMEOUT (a watchdog that dumps a slow test's stacks): tests/run_control.py.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastres  # noqa: E402
from fastres import backends  # noqa: E402

import run_control  # noqa: E402  (tests/ is on sys.path, as for parity.py)
import triton_bounds  # noqa: E402

# Every load/store of an interpreted Triton kernel is checked against its tensor
# arguments' storages (tests/triton_bounds.py): an out-of-bounds access fails the test
# that made it instead of corrupting the heap (FASTRES_TRITON_BOUNDS=0: unchecked).
TRITON_BOUNDS = (os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FASTRES_TRITON_BOUNDS", "1") != "0"
                 and triton_bounds.install())

HAS_CUDA = torch.cuda.is_available()
_JIT = {"n": 0, "s": 0.0}
if HAS_CUDA:
    # fp32 convolutions (blocks, models, the compile test) must be fp32 on the GPU too:
    # cuDNN's default TF32 differs from fp32 by ~1e-3, beyond the fp32 tolerances.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:  # count the Triton JIT's compilations and their time (reported at the end)
        import time as _time

        import triton.compiler as _tc

        _compile = _tc.compile

        def _timed_compile(*args, **kwargs):
            t0 = _time.perf_counter()
            try:
                return _compile(*args, **kwargs)
            finally:
                _JIT["n"] += 1
                _JIT["s"] += _time.perf_counter() - t0

        _tc.compile = _timed_compile
    except Exception:  # no triton, or another layout of it: nothing to report
        pass
NO_CUDA = "no CUDA device"  # the one skip reason of every gpu-marked case on a CPU machine
GPU_BACKENDS = ("cuda", "triton")  # what runs fastres's own kernels on a CUDA device
GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA))


def _required():
    return {b.strip() for b in os.environ.get("FASTRES_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def require_backend(name: str, device: str = "cpu") -> None:
    """Skip (with the reason) when backend ``name`` cannot run on ``device``; fail instead
    when the environment says the backend is required: on the CPU through
    FASTRES_REQUIRE_BACKENDS, on a CUDA device always for ``cuda`` and ``triton`` (a GPU
    machine that cannot run fastres's kernels is a broken build, not a skip)."""
    dev = torch.device(device).type
    ok, why = backends.available(name, dev)
    if ok:
        return
    if dev == "cpu" and name in _required():
        pytest.fail(f"backend {name!r} is required (FASTRES_REQUIRE_BACKENDS) but unavailable: {why}")
    if dev == "cuda" and HAS_CUDA and name in GPU_BACKENDS:
        pytest.fail(f"backend {name!r} is unavailable on this CUDA machine: {why}")
    if dev == "cuda" and not HAS_CUDA:
        pytest.skip(NO_CUDA)
    pytest.skip(f"backend {name!r} unavailable on {device}: {why}")


def gpu_param(*values, id: str):
    """One CUDA case: the ``gpu`` marker, skipped with ``NO_CUDA`` where there is no device."""
    return pytest.param(*values, marks=GPU_MARKS, id=id)


def targets(cpu=None, gpu=GPU_BACKENDS):
    """``(backend, device)`` parameters: ``cpu`` (default: every CPU backend, see
    :func:`backend_params`) on the CPU, with the backend name as id (as before), then
    each of ``gpu`` on ``"cuda"`` with id ``gpu-<backend>`` and the gpu marks."""
    cpu = backend_params("cpu") if cpu is None else list(cpu)
    return ([pytest.param(b, "cpu", id=b) for b in cpu]
            + [gpu_param(b, "cuda", id=f"gpu-{b}") for b in gpu])


def pytest_configure(config):
    run_control.configure(config)  # off unless FASTRES_RESULT_LOG / _SHARD / _TEST_TIMEOUT is set


def pytest_collection_modifyitems(config, items):
    """A case parametrized on a CUDA device must carry the gpu marker (else ``-m gpu``
    would miss it and a CPU run would report it as something other than NO_CUDA)."""
    bad = [it.nodeid for it in items
           if getattr(it, "callspec", None) is not None
           and str(it.callspec.params.get("device", "")).startswith("cuda")
           and it.get_closest_marker("gpu") is None]
    if bad:
        raise pytest.UsageError("CUDA cases without the gpu marker: " + ", ".join(bad[:5]))


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
    if _JIT["n"]:  # on a GPU: what the Triton JIT cost (the gpu selection's largest share)
        terminalreporter.write_line(f"fastres: Triton JIT compiled {_JIT['n']} kernel specializations "
                                    f"in {_JIT['s']:.1f} s (cold cache: ~every distinct shape/dtype/flags)")
# END hypothesis profiles
# ============================================================================
