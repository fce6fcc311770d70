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
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import pytest
import torch

import fastres
from fastres import backends as B

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
DEVICE = DEVICES[0]
ON_GPU = DEVICE == "cuda"
if ON_GPU:
    # aten's convolutions as a training loop runs them (fastres.bench sets the same): cuDNN's
    # algorithm search on a shape's first call (in the warm-up rounds), not its heuristic pick
    torch.backends.cudnn.benchmark = True

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


_TV_STATE: Dict[str, dict] = {}


def same_weights_model(arch: str, torchvision_impl: bool) -> torch.nn.Module:
    """torchvision's ``arch`` (``torchvision_impl``) or fastres's (skips the test where this
    build lacks it), both with the state_dict of torchvision's ``arch`` built under seed 0
    (made once per arch), on the CPU."""
    import torchvision
    if arch not in _TV_STATE:
        torch.manual_seed(0)
        _TV_STATE[arch] = getattr(torchvision.models, arch)(weights=None).state_dict()
    if torchvision_impl:
        m = getattr(torchvision.models, arch)(weights=None)
    else:
        ctor = getattr(fastres, arch, None)
        if ctor is None:
            pytest.skip(f"fastres.{arch} is not available in this build")
        m = ctor()
    m.load_state_dict(_TV_STATE[arch], strict=True)
    return m


# ----------------------------------------------------------------------------- ResNet-50 convolutions
CONV_BATCH = 256
# name: (C_in, H_in, K_out, R, stride, padding) -- every distinct ResNet-50 convolution
# (benchmarks/test_bench_conv.py, test_bench_conv_bwd.py, test_bench_cudnn_conv.py)
RESNET50_CONVS = {
    "stem-7x7s2": (3, 224, 64, 7, 2, 3),
    "l1-1x1-64-64": (64, 56, 64, 1, 1, 0),
    "l1-3x3-64": (64, 56, 64, 3, 1, 1),
    "l1-1x1-64-256": (64, 56, 256, 1, 1, 0),
    "l1-1x1-256-64": (256, 56, 64, 1, 1, 0),
    "l2-1x1-256-128": (256, 56, 128, 1, 1, 0),
    "l2-3x3s2-128": (128, 56, 128, 3, 2, 1),
    "l2-ds-1x1s2-256-512": (256, 56, 512, 1, 2, 0),
    "l2-1x1-128-512": (128, 28, 512, 1, 1, 0),
    "l2-1x1-512-128": (512, 28, 128, 1, 1, 0),
    "l2-3x3-128": (128, 28, 128, 3, 1, 1),
    "l3-1x1-512-256": (512, 28, 256, 1, 1, 0),
    "l3-3x3s2-256": (256, 28, 256, 3, 2, 1),
    "l3-ds-1x1s2-512-1024": (512, 28, 1024, 1, 2, 0),
    "l3-1x1-256-1024": (256, 14, 1024, 1, 1, 0),
    "l3-1x1-1024-256": (1024, 14, 256, 1, 1, 0),
    "l3-3x3-256": (256, 14, 256, 3, 1, 1),
    "l4-1x1-1024-512": (1024, 14, 512, 1, 1, 0),
    "l4-3x3s2-512": (512, 14, 512, 3, 2, 1),
    "l4-ds-1x1s2-1024-2048": (1024, 14, 2048, 1, 2, 0),
    "l4-1x1-512-2048": (512, 7, 2048, 1, 1, 0),
    "l4-1x1-2048-512": (2048, 7, 512, 1, 1, 0),
    "l4-3x3-512": (512, 7, 512, 3, 1, 1),
}


def conv_case(name: str, dtype: torch.dtype = torch.bfloat16, batch: int = CONV_BATCH) -> SimpleNamespace:
    """The tensors of one ResNet-50 convolution benchmark, for a conv that follows a
    BatchNorm + ReLU: ``x``, ``w`` (NHWC, ``dtype``), the previous BN folded to ``s``, ``t``
    (fp32), ``a = relu(x*s + t)`` in ``dtype``, ``go`` (a gradient of the output, NHWC),
    ``b`` (a bias, fp32); ``c, h, k, r, stride, pad`` of :data:`RESNET50_CONVS` and the
    output size ``p``. Seeded: every file times the same data."""
    c, h, k, r, stride, pad = RESNET50_CONVS[name]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(batch, c, h, h, generator=g, device=DEVICE, dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(k, c, r, r, generator=g, device=DEVICE, dtype=dtype) * 0.05).contiguous(memory_format=cl)
    s = torch.rand(c, generator=g, device=DEVICE) + 0.5
    t = torch.randn(c, generator=g, device=DEVICE) * 0.1
    p = (h + 2 * pad - r) // stride + 1
    go = torch.randn(batch, k, p, p, generator=g, device=DEVICE, dtype=dtype).contiguous(memory_format=cl)
    b = torch.randn(k, generator=g, device=DEVICE) * 0.1
    a = torch.relu(x.float() * s[None, :, None, None] + t[None, :, None, None]).to(dtype)
    return SimpleNamespace(x=x, w=w, s=s, t=t, a=a, go=go, b=b, c=c, h=h, k=k, r=r, stride=stride, pad=pad, p=p,
                           flops=2 * batch * p * p * k * c * r * r)


def require_fused_conv() -> None:
    """Skip (with the reason) unless ``FASTRES_CONV=fused`` really runs the Triton conv
    here: under ``fastres.use_conv("fused")`` an unavailable fused conv falls back to
    aten with a warning, and its rows would be timed and read as fused ones."""
    from fastres import conv_backend
    with fastres.use_conv("fused"):
        path = conv_backend.conv_for(torch.device(DEVICE))
    if path != "fused":
        pytest.skip(f"the fused Triton conv does not run on {DEVICE} (conv path {path!r})")


def cudnn_refusals_since(before) -> List[str]:
    """The reasons of the cuDNN graphs refused (and run by the aten fallback) since the keys
    ``before`` (a snapshot of ``fastres.cudnn._no_engine``)."""
    from fastres import cudnn
    return [why for k, why in cudnn._no_engine.items() if k not in before]


def eager_prologue_backward(da: torch.Tensor, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """The unfused backward of ``a = relu(x*s + t)``: (grad_x, Σ dv·x, Σ dv)."""
    z = x.float() * s[None, :, None, None] + t[None, :, None, None]
    d = torch.where(z > 0, da.float(), 0.0)
    return (d * s[None, :, None, None]).to(x.dtype), (d * x.float()).sum((0, 2, 3)), d.sum((0, 2, 3))


def conv_info(name: str, case: SimpleNamespace, mode: str) -> Dict[str, object]:
    """The ``conv`` entry of ``extra_info`` (benchmarks/conv_choice.py reads it)."""
    return dict(name=name, mode=mode, cin=case.c, cout=case.k, kernel=[case.r, case.r],
                stride=[case.stride, case.stride], padding=[case.pad, case.pad], dilation=[1, 1], groups=1)
