"""Test-run control for the lent GPU machine (benchmarks/run_gpu.sh), without pytest-xdist
or pytest-timeout. Registered by tests/conftest.py (or ``pytest -p run_control`` with
tests/ on sys.path); every part is off unless its environment variable is set, so a
plain ``pytest`` run is unchanged.

``FASTRES_RESULT_LOG=PATH`` — :class:`ResultLog`: one JSON line per event, appended and
flushed as it happens, so a run killed from outside still leaves every finished test's
outcome (``benchmarks/gpu_summary.py`` summarises it). Events (``"ev"``):

* ``session`` — pid, shard, the selected node ids (after ``-m``/``-k`` and sharding);
* ``start``   — a test begins (a ``start`` with no outcome after it = the test that was
  running when the process died);
* ``report``  — one per test phase worth keeping: every ``call``, a ``setup``/``teardown``
  that failed or skipped; ``outcome`` passed|failed|skipped|xfailed|xpassed, ``duration``,
  ``repr`` for failures (exception + message, the last frames: at most ~2 KB),
  ``reason`` for skips;
* ``collect`` — a collection error (with its repr);
* ``interrupted`` / ``finish`` — SIGTERM or Ctrl-C / the session's exit status.

``FASTRES_SHARD=I/N`` — :func:`select_shard`: keep shard ``I`` (0-based) of ``N``. The
selected items are put in cost order (:func:`cost_tier`: op and kernel tests first,
blocks next, whole models and torch.compile last — a step cut short loses the least
informative part) and dealt round-robin, so the shards are disjoint, their union is the
whole selection, and the expensive tests are spread evenly. Every process collects the
same items (same arguments), so the deal is the same in each; the ``session`` event
carries a digest of the whole selection for the summary to compare. ``0/1`` orders only.

``FASTRES_TEST_TIMEOUT=SECONDS`` — :class:`Watchdog`: ``faulthandler.dump_traceback_later``
around each test (setup to teardown): a test that runs longer dumps every thread's stack
to stderr (the step's log) and keeps running; it is not killed.

``SIGTERM`` (what ``timeout`` sends first) is turned into ``KeyboardInterrupt`` when any of
these is set: pytest then stops, prints its summary and writes its junit xml before the
``timeout --kill-after`` SIGKILL. The stacks at that moment go to stderr first (also when
the main thread is stuck in C code and never sees the exception).
"""
from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import signal
import sys
import threading
import time
from typing import List, Optional, Tuple

import pytest

RESULT_LOG_ENV = "FASTRES_RESULT_LOG"
SHARD_ENV = "FASTRES_SHARD"
TIMEOUT_ENV = "FASTRES_TEST_TIMEOUT"
REPR_LIMIT = 2000  # characters of a failure's repr in the log

# ----------------------------------------------------------------------------- cost order
# Lower tiers run first. Whole models, compile, CUDA graphs and training loops cost the
# most (a resnet50 forward + backward, minutes of JIT on a cold cache) and say the least
# that the op and kernel tests have not said already.
_MODEL_WORDS = ("resnet50", "resnet101", "resnet152", "resnext", "wide_resnet", "resnet18", "resnet34",
                "cifar_resnet", "model")
_LAST_FILES = ("test_models.py", "test_compile_models.py", "test_inference.py", "test_training.py",
               "test_cuda_graphs.py", "test_distributed.py", "test_amp.py", "test_determinism.py",
               "test_checkpointing.py", "test_saving.py", "test_paper.py", "test_cli.py")
_BLOCK_WORDS = ("block", "bottleneck", "basic", "stem", "compile")


def cost_tier(nodeid: str) -> int:
    """0: ops and kernels, 1: blocks / stems / compile of one op, 2: whole models."""
    path, _, name = nodeid.partition("::")
    low = name.lower()
    if os.path.basename(path) in _LAST_FILES or any(w in low for w in _MODEL_WORDS):
        return 2
    if any(w in low for w in _BLOCK_WORDS):
        return 1
    return 0


def parse_shard(text: str) -> Tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; a clear error otherwise."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise pytest.UsageError(f"{SHARD_ENV} must be I/N (0 <= I < N), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise pytest.UsageError(f"{SHARD_ENV} must be I/N (0 <= I < N), got {text!r}")
    return i, n


def select_shard(items: list, index: int, count: int) -> Tuple[list, list]:
    """(kept, dropped): the items in cost order, dealt round-robin over ``count`` shards."""
    ordered = sorted(items, key=lambda it: cost_tier(it.nodeid))  # stable: file order within a tier
    kept = [it for k, it in enumerate(ordered) if k % count == index]
    dropped = [it for k, it in enumerate(ordered) if k % count != index]
    return kept, dropped


def selection_digest(nodeids: List[str]) -> str:
    return hashlib.sha1("\n".join(sorted(nodeids)).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- reprs
def short_repr(report, limit: int = REPR_LIMIT) -> str:
    """Exception + message and where, the last frames' locations, then the tail of
    pytest's own text of the failure: at most ``limit`` characters."""
    lr = report.longrepr
    head = ""
    crash = getattr(lr, "reprcrash", None)
    if crash is not None:
        head = f"{crash.message.strip()[:600]}\n  at {crash.path}:{crash.lineno}\n"
    tb = getattr(lr, "reprtraceback", None)
    frames = [f"{e.reprfileloc.path}:{e.reprfileloc.lineno}"
              for e in (getattr(tb, "reprentries", None) or [])[-6:] if getattr(e, "reprfileloc", None)]
    if frames:
        head += "  frames (innermost first): " + " <- ".join(reversed(frames)) + "\n"
    head = head[:limit // 2]
    text = report.longreprtext or ""
    room = limit - len(head)
    return head + (text if len(text) <= room else "..." + text[-(room - 3):])


def skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        reason = str(lr[2])
    else:
        reason = str(getattr(report, "wasxfail", "") or report.longreprtext or "")
    return reason.removeprefix("Skipped: ")[:500]


# ----------------------------------------------------------------------------- plugins
class ResultLog:
    """Appends one JSON line per event to ``path``, flushed at once (see the module doc)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a", buffering=1, encoding="utf-8")
        self.t0 = time.time()
        self.lock = threading.Lock()  # the watchdog's thread writes too

    def write(self, ev: str, **fields) -> None:
        rec = {"ev": ev, "t": round(time.time() - self.t0, 3), **fields}
        with self.lock:
            if not self.f.closed:
                self.f.write(json.dumps(rec, default=str) + "\n")
                self.f.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        ids = [it.nodeid for it in session.items]
        cfg = session.config
        self.write("session", pid=os.getpid(), shard=os.environ.get(SHARD_ENV, ""),
                   selected=getattr(cfg, "_fastres_selected", len(ids)),
                   digest=getattr(cfg, "_fastres_digest", selection_digest(ids)), n=len(ids), items=ids)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        # under pytest-xdist the controller collects nothing: the first worker's ids instead
        if not getattr(self, "_xdist_session", False):
            self._xdist_session = True
            self.write("session", pid=os.getpid(), shard="xdist", selected=len(ids),
                       digest=selection_digest(list(ids)), n=len(ids), items=list(ids))

    def pytest_collectreport(self, report):
        if report.failed:
            self.write("collect", nodeid=report.nodeid, outcome="error", repr=short_repr(report))

    def pytest_runtest_logstart(self, nodeid, location):
        self.write("start", nodeid=nodeid)

    def pytest_runtest_logreport(self, report):
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        if report.when != "call" and outcome == "passed":
            return  # a setup/teardown that passed: nothing to say
        rec = dict(nodeid=report.nodeid, phase=report.when, outcome=outcome, duration=round(report.duration, 3))
        if report.failed:
            rec["repr"] = short_repr(report)
        elif report.skipped:
            rec["reason"] = skip_reason(report)
        self.write("report", **rec)

    def pytest_keyboard_interrupt(self, excinfo):
        self.write("interrupted", what=f"{excinfo.typename}: {str(excinfo.value)[:200]}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        self.write("finish", exitstatus=int(exitstatus))
        with self.lock:
            self.f.close()


class Shard:
    """Cost order + this process's shard of the selection (after -m / -k deselection)."""

    def __init__(self, index: int, count: int):
        self.index, self.count = index, count

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        config._fastres_selected = len(items)
        config._fastres_digest = selection_digest([it.nodeid for it in items])
        kept, dropped = select_shard(items, self.index, self.count)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept


class Watchdog:
    """A test (setup to teardown) running past ``seconds``: its node id and every thread's
    stack go to ``file``; the test keeps running. A timer thread writes them (and a
    ``watchdog`` event into the result log); ``faulthandler.dump_traceback_later`` a few
    seconds later is the fallback for a main thread that holds the GIL in C code."""

    def __init__(self, seconds: float, file, log: Optional[ResultLog]):
        self.seconds, self.file, self.log = seconds, file, log

    def _fire(self, nodeid: str) -> None:
        print(f"\n[watchdog] {nodeid} has run {self.seconds:g} s (FASTRES_TEST_TIMEOUT); it keeps running. "
              "Stacks, most recent call first:", file=self.file, flush=True)
        faulthandler.dump_traceback(file=self.file, all_threads=True)
        faulthandler.cancel_dump_traceback_later()
        if self.log is not None:
            self.log.write("watchdog", nodeid=nodeid, seconds=self.seconds)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        timer = threading.Timer(self.seconds, self._fire, args=(item.nodeid,))
        timer.daemon = True
        faulthandler.dump_traceback_later(self.seconds + 5, repeat=False, file=self.file)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            faulthandler.cancel_dump_traceback_later()


def _stderr_dup():
    """A file on the original stderr (pytest redirects fd 2 while it captures)."""
    try:
        return os.fdopen(os.dup(sys.__stderr__.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__


def configure(config) -> None:
    """Register what the environment asks for (called from tests/conftest.py)."""
    path = os.environ.get(RESULT_LOG_ENV, "").strip()
    shard = os.environ.get(SHARD_ENV, "").strip()
    tmo = os.environ.get(TIMEOUT_ENV, "").strip()
    if not (path or shard or tmo) or getattr(config, "_fastres_run_control", False):
        return
    config._fastres_run_control = True
    xdist_worker = hasattr(config, "workerinput")
    if shard:  # (in xdist workers too: each must order its items the same way)
        config.pluginmanager.register(Shard(*parse_shard(shard)), "fastres-shard")
    log = None
    if path and not xdist_worker:  # under xdist the controller gets every worker's reports
        log = ResultLog(path)
        config.pluginmanager.register(log, "fastres-result-log")
    err = _stderr_dup()
    config._fastres_err = err  # keep the file (and its fd) open for faulthandler
    if tmo:
        try:
            secs = float(tmo)
        except ValueError:
            raise pytest.UsageError(f"{TIMEOUT_ENV} must be seconds, got {tmo!r}") from None
        if secs > 0:
            config.pluginmanager.register(Watchdog(secs, err, log), "fastres-watchdog")
    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
        # SIGTERM -> KeyboardInterrupt (pytest prints its summary, writes the junit xml);
        # faulthandler dumps the stacks first and chains to it
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        faulthandler.register(signal.SIGTERM, file=err, all_threads=True, chain=True)


def pytest_configure(config):  # as a plugin of its own: pytest -p run_control (tests/ on sys.path)
    configure(config)
