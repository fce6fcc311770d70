"""Shared helpers of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

Every case records in ``extra_info``: what ran (``impl``, ``backend``), the
``shape``, ``dtype``, ``layout``, ``device``, the ``bytes`` it must move at least and
the ``flops`` it does (either may be ``None`` where it means nothing), the number of
calls per timed round (``calls_per_round``), and — computed from the median round —
``ms_per_call``, ``GB/s`` and ``TFLOP/s``. On a GPU each round ends with
``torch.cuda.synchronize()`` so the wall clock is the GPU's time.

Triton's CPU interpreter is never benchmarked (it is a correctness tool).
``FASTRES_BENCH_ROUNDS`` overrides the number of timed rounds of the op cases (GPU 20,
CPU 10). On a shared CPU, ``OMP_NUM_THREADS=1`` gives far steadier figures than
oversubscribed threads; the thread count is part of ``device_name``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import pytest
import torch

import fastres
from fastres import backends as B

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
DEVICE = DEVICES[0]
ON_GPU = DEVICE == "cuda"

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def fastres_backends(device: str = DEVICE, include_torch: bool = True) -> List[str]:
    """Backends that can run (and are worth timing) on ``device``, as pytest params;
    unavailable ones are kept as skipped params so the report says why."""
    params = []
    compat = {"cpu": ("torch", "cpp", "triton"), "cuda": ("torch", "triton", "cuda")}[device]
    for b in compat:
        if b == "torch" and not include_torch:
            continue
        ok, why = B.available(b, device)
        if ok and b == "triton" and device == "cpu":
            ok, why = False, "Triton's CPU interpreter is a correctness tool; not benchmarked"
        marks = () if ok else (pytest.mark.skip(reason=f"fastres[{b}] unavailable on {device}: {why}"),)
        params.append(pytest.param(b, id=b, marks=marks))
    return params


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def run_benchmark(benchmark, fn: Callable[[], object], *, info: Dict[str, object], rounds: Optional[int] = None,
                  warmup: Optional[int] = None, calls: Optional[int] = None) -> None:
    """Time ``fn`` with fixed rounds (``pedantic``), then fill ``extra_info``."""
    calls = calls or (10 if ON_GPU else 1)
    rounds = rounds or env_int("FASTRES_BENCH_ROUNDS", 20 if ON_GPU else 10)
    warmup = warmup if warmup is not None else (3 if ON_GPU else 1)

    def target():
        for _ in range(calls):
            fn()
        sync()

    for _ in range(warmup):  # compile / autotune / allocator warm-up outside the timings
        target()
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
    info = dict(info)
    info.update(device=DEVICE, device_name=device_name(), calls_per_round=calls, torch=torch.__version__,
                fastres=fastres.__version__)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        per_call = stats.median / calls
        info["ms_per_call"] = per_call * 1e3
        if info.get("bytes"):
            info["GB/s"] = info["bytes"] / per_call / 1e9
        if info.get("flops"):
            info["TFLOP/s"] = info["flops"] / per_call / 1e12
        if info.get("images"):
            info["img/s"] = info["images"] / per_call
    benchmark.extra_info.update(info)


def device_name() -> str:
    from fastres.bench import device_name as dn
    return dn(torch.device(DEVICE))


def layout_of(x: torch.Tensor) -> str:
    return "NHWC" if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) else "NCHW"


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def reset_compile() -> None:
    torch._dynamo.reset()
