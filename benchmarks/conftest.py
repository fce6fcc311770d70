"""pytest configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

SIGTERM -- what ``timeout`` sends a benchmarks step of ``benchmarks/run_gpu.sh`` at its
limit -- becomes ``KeyboardInterrupt``: pytest then ends the session normally and
pytest-benchmark still writes ``--benchmark-json`` with every case timed so far, instead
of the process dying with nothing written (tests/run_control.py does the same for the
test steps).
"""
from __future__ import annotations

import signal
import threading


def pytest_configure(config):
    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
