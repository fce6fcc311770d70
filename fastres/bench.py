"""``python -m fastres bench``: throughput of torchvision vs fastres, one run, same inputs.

Contenders (each in training — forward + backward + SGD step — and/or inference):

* ``torchvision``            eager torchvision model (the baseline of the speed-up column)
* ``torchvision+compile``    training: the same under ``torch.compile`` (default inductor mode)
* the strongest compiled alternative in inference: on the CPU
  ``torchvision+compile(freezing)`` (``torch._inductor.config.freezing = True`` under
  ``torch.no_grad``: BN folded, oneDNN weights prepacked, epilogues fused); on a GPU
  ``torchvision+compile(max-autotune)`` and ``torchvision+compile(reduce-overhead)``
  (CUDA graphs). ``--no-compile`` skips every compiled contender.
* ``fastres[<backend>]+cudagraph`` GPU inference: the fastres model replayed as one CUDA
  graph (:func:`fastres.cuda_graph_inference`)
* ``fastres[<backend>]``     the fastres model, one row per backend available on the device
  (Triton's CPU interpreter is left out: it is a correctness tool, not a fast path)
* ``fastres[<backend>]+compile`` with ``--compile-fastres``

Every contender starts from the same state_dict and sees the same input batch and
labels. Timing: ``warmup`` untimed iterations, then ``repeats`` × ``iters`` timed
iterations (CUDA events around each repeat on a GPU, ``perf_counter`` on the CPU,
synchronised), reported as the median ms/iteration over repeats with min–max. A
compiled contender's first call (compilation, freezing, CUDA-graph capture) is timed
on its own and reported as ``compile_s``, outside the timed region. Inference also
times every timed iteration on its own (CUDA events per iteration on a GPU): the
latency percentiles ``lat_p50_ms`` / ``lat_p90_ms`` (batch 1: the per-image latency).

Interleaving (default; ``--no-interleave`` runs each contender alone, one after
another): per mode, every contender is built (and compiled) first, then warmed up,
then the timed repeats run round-robin — round ``i`` times repeat ``i`` of every
contender in turn, the order rotated by one each round — so a load that changes
during the run hits every contender alike. Each row then also carries the median of
the per-round ratios against the baseline (``paired_vs_eager``) and against the
strongest alternative of the mode (``paired_vs_alt``; ``alt_contender``: the fastest
compiled torchvision contender that ran — ``+compile(freezing)`` in CPU inference,
``+compile(max-autotune)`` / ``(reduce-overhead)`` on a GPU, ``+compile`` in
training), next to the ratios of medians (``speedup_vs_eager``, ``speedup_vs_alt``);
the JSON rows keep each repeat's ms (``repeat_ms``).

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU (reset after warm-up), the
peak resident set size (VmHWM, reset through ``/proc/self/clear_refs``) on the CPU.
Interleaved, the other contenders are alive too, so each one's peak is taken in one
dedicated untimed iteration after its warm-up and reported as if it ran alone: the
memory held before any contender was built + its own growth over build and warm-up
+ the rise in that iteration (:func:`_alone_peak_mib`).

Load: the 1-min load average is sampled at the start, before every round (each repeat
with ``--no-interleave``) and at the end; the JSON (``meta.load``) and each row
(``load_min`` / ``load_max`` around its repeats) carry it, and a note says the machine
was busy when the other jobs' load exceeded half the cores (:func:`load_note`).

Outputs, in ``--out`` (default ``benchmarks/results/<device>``), named with the
model, dtype, batch, device and date: ``.txt`` (the table), ``.json`` (metadata +
rows), ``.csv`` (rows), ``.png`` (img/s bar chart).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

TV_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
             "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Embedded defaults per device type (``None`` in the CLI means "take these").
DEFAULTS = {
    "cuda": dict(model="resnet50", batch_size=256, image_size=224, dtype="bf16", channels_last=True,
                 compile=True, compile_modes="both", iters=20, repeats=5, warmup=10),
    "cpu": dict(model="resnet50", batch_size=8, image_size=128, dtype="fp32", channels_last=True,
                compile=True, compile_modes="both", iters=2, repeats=5, warmup=3),
}

# The compiled inference contenders per device type (``--infer-compile`` overrides):
# "freezing" is torch.compile with inductor freezing, "default" plain torch.compile,
# others are torch.compile modes.
INFER_COMPILE = {"cpu": ["freezing"], "cuda": ["max-autotune", "reduce-overhead"]}
INFER_COMPILE_CHOICES = ("freezing", "default", "max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs")

CSV_FIELDS = ("model", "contender", "backend", "compiled", "mode", "status", "img_per_s", "ms_per_iter",
              "ms_min", "ms_max", "spread_pct", "lat_p50_ms", "lat_p90_ms", "compile_s", "peak_mem_mib", "mem_kind", "speedup_vs_eager",
              "tflops", "device", "device_name", "dtype", "batch_size", "image_size", "channels_last",
              "iters", "repeats", "warmup", "date",
              # (appended: older readers keep their columns) the strongest alternative of the mode,
              # the speed-up against it (ratio of medians), the medians of the per-round ratios
              # (interleaved runs) and the 1-min load average around the timed repeats
              "alt_contender", "speedup_vs_alt", "paired_vs_eager", "paired_vs_alt", "interleaved",
              "load_min", "load_max")


# ============================================================================ models
def model_names() -> List[str]:
    return list(TV_MODELS) + [f"cifar_resnet{d}" for d in CIFAR_DEPTHS]


def parse_model(name: str) -> Tuple[str, object]:
    """("tv", name) for a torchvision ImageNet ResNet, ("cifar", depth) for cifar_resnetN."""
    if name in TV_MODELS:
        return "tv", name
    m = re.fullmatch(r"cifar_resnet(\d+)", name or "")
    if m:
        depth = int(m.group(1))
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        return "cifar", depth
    raise ValueError(f"unknown model {name!r}")


class Unavailable(Exception):
    """A contender that cannot run here (reported as 'skipped', not as an error)."""


def reference_builder(model: str, num_classes: int) -> Optional[Callable[[], torch.nn.Module]]:
    """The torchvision model of that name (None for the CIFAR nets, which torchvision lacks)."""
    kind, what = parse_model(model)
    if kind != "tv":
        return None
    import torchvision
    ctor = getattr(torchvision.models, what)
    return lambda: ctor(weights=None, num_classes=num_classes)


def fastres_builder(model: str, num_classes: int) -> Callable[[], torch.nn.Module]:
    """fastres's constructor (``fastres.resnet50`` …, ``fastres.cifar_resnet(depth, shortcut='A')``),
    or ``fastres.convert`` of the torchvision model; raises :class:`Unavailable`."""
    import fastres
    kind, what = parse_model(model)
    if kind == "cifar":
        ctor = getattr(fastres, "cifar_resnet", None)
        if ctor is None:
            raise Unavailable("fastres.cifar_resnet is not available in this fastres build")
        return lambda: ctor(what, shortcut="A", num_classes=num_classes)
    ctor = getattr(fastres, what, None)
    if ctor is not None:
        return lambda: ctor(num_classes=num_classes)
    conv = getattr(fastres, "convert", None)
    ref = reference_builder(model, num_classes)
    if conv is not None and ref is not None:
        return lambda: conv(ref())
    raise Unavailable(f"fastres.{what} (and fastres.convert) are not available in this fastres build")


# ============================================================================ config
@dataclass
class BenchConfig:
    model: str
    batch_size: int
    image_size: int
    dtype: str
    channels_last: bool
    modes: List[str]
    backends: str
    compile: bool
    compile_modes: List[str]
    compile_fastres: bool
    conv_paths: bool
    iters: int
    repeats: int
    warmup: int
    device: str
    num_classes: int
    seed: int = 0
    out: str = ""
    plot: bool = True
    progress: bool = True
    tag: str = ""
    notes: List[str] = field(default_factory=list)
    infer_compile: Optional[List[str]] = None  # None: the device's strongest (INFER_COMPILE)
    cuda_graphs: bool = False
    interleave: bool = True   # timed repeats round-robin over the contenders (False: one after another)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_slug(device: torch.device) -> str:
    """Folder name for results: ``cpu``, or the GPU's name (``h100-80gb-hbm3`` …)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def resolve_config(args) -> BenchConfig:
    """Fill the CLI's ``None`` options with the device's embedded defaults."""
    dev = torch.device(args.device or default_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastres bench: --device cuda requested but CUDA is not available")
    d = DEFAULTS.get(dev.type, DEFAULTS["cpu"])
    model = args.model or d["model"]
    kind, _ = parse_model(model)

    def pick(name):
        v = getattr(args, name, None)
        return v if v is not None else d[name]

    image_size = args.image_size if args.image_size is not None else (32 if kind == "cifar" else d["image_size"])
    num_classes = args.num_classes if args.num_classes is not None else (10 if kind == "cifar" else 1000)
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    compile_on = pick("compile")
    cm = getattr(args, "compile_modes", None) or d["compile_modes"]
    compile_modes = ["train", "infer"] if cm == "both" else [cm]
    out = args.out or os.path.join("benchmarks", "results", device_slug(dev))
    cfg = BenchConfig(model=model, batch_size=pick("batch_size"), image_size=image_size, dtype=pick("dtype"),
                      channels_last=pick("channels_last"), modes=modes, backends=args.backend,
                      compile=bool(compile_on), compile_modes=compile_modes,
                      compile_fastres=bool(getattr(args, "compile_fastres", False)),
                      conv_paths=bool(getattr(args, "conv_paths", False)),
                      iters=pick("iters"), repeats=pick("repeats"), warmup=pick("warmup"), device=str(dev),
                      num_classes=num_classes, seed=args.seed, out=out, plot=not args.no_plot,
                      progress=not args.no_progress, tag=args.tag or "",
                      infer_compile=getattr(args, "infer_compile", None),
                      interleave=getattr(args, "interleave", None) is not False)
    if getattr(args, "cuda_graphs", False):
        if dev.type != "cuda":
            raise SystemExit(f"fastres bench: --cuda-graphs needs a CUDA device, but the device is {dev} "
                             "(CUDA graphs do not exist on the CPU; use --device cuda on a GPU machine)")
        if cfg.dtype == "fp16" and "train" in modes:
            raise SystemExit("fastres bench: --cuda-graphs cannot capture an fp16 training step: "
                             "GradScaler reads its overflow flag on the host; use --dtype bf16/fp32 or --mode infer")
        cfg.cuda_graphs = True
    if cfg.dtype == "fp16" and dev.type == "cpu":
        cfg.notes.append("fp16 autocast on the CPU is slow in PyTorch; bf16 is the CPU's low precision")
    return cfg


# ============================================================================ contenders
@dataclass
class Contender:
    name: str                 # label in the table
    kind: str                 # "reference" | "fastres"
    backend: Optional[str]    # fastres backend (None for torchvision)
    compiled: bool
    skip: Optional[str] = None  # reason when it cannot run here
    modes: Optional[Tuple[str, ...]] = None  # the modes it runs in (None: every mode)
    compile_mode: Optional[str] = None  # torch.compile(mode=...)
    freezing: bool = False    # torch._inductor.config.freezing (CPU inference)
    cuda_graph: bool = False  # fastres.cuda_graph_inference (GPU inference)
    graphs: bool = False        # the step is captured in a CUDA graph and replayed
    alternative: bool = False   # a compiled torchvision contender: what a user could pick instead
    conv: Optional[str] = None  # the conv path while it runs (fastres.conv_backend.use_conv; None: the default)


def fastres_backends(cfg: BenchConfig) -> Tuple[List[str], List[str]]:
    """(backends to run, notes about the ones left out)."""
    import fastres
    from fastres import backends as B
    dev_type = torch.device(cfg.device).type
    spec = cfg.backends
    if spec == "none":
        return [], []
    if spec == "auto":
        return [fastres.backend_for(torch.device(cfg.device))], []
    wanted = list(B.BACKENDS) if spec == "all" else spec.split(",")
    run, notes = [], []
    for b in wanted:
        ok, why = B.available(b, dev_type)
        if ok and b == "triton" and dev_type == "cpu":
            ok, why = False, "Triton's CPU interpreter is a correctness tool; not benchmarked"
        if ok:
            run.append(b)
        elif spec != "all" or (b, dev_type) not in (("cuda", "cpu"), ("cpp", "cuda")):  # not for another device
            notes.append(f"fastres[{b}] not run: {why}")
    return run, notes


# --conv-paths: the fused convolution of each backend (issues 10 and 11) as contenders of their own
CONV_PATHS = {"triton": "fused", "cuda": "cudnn"}


def conv_path_unavailable(path: str, device: torch.device) -> Optional[str]:
    """Why ``FASTRES_CONV=path`` cannot run its fused convolution on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"the {path} conv path runs on CUDA GPUs only"
    if path == "cudnn":
        from fastres import cudnn
        ok, why = cudnn.available(device.type)
        return None if ok else why
    return None


def contenders(cfg: BenchConfig) -> Tuple[List[Contender], List[str]]:
    kind, _ = parse_model(cfg.model)
    ref_name = "torchvision" if kind == "tv" else "eager"
    on_gpu = torch.device(cfg.device).type == "cuda"
    notes: List[str] = []
    out = [Contender(ref_name, "reference", None, False)]
    if cfg.compile:
        out.append(Contender(ref_name + "+compile", "reference", None, True, modes=("train",), alternative=True))
        # the strongest compiled alternatives for inference: on a GPU max-autotune and CUDA graphs
        # (reduce-overhead), on the CPU freezing (BN folded, oneDNN weights prepacked, epilogues fused)
        wanted = cfg.infer_compile if cfg.infer_compile is not None else INFER_COMPILE["cuda" if on_gpu else "cpu"]
        if kind == "cifar" and cfg.infer_compile is None and wanted == ["freezing"]:
            # the CIFAR baseline is the fastres model: inductor's freezing passes fail on its
            # option-A shortcut (a scatter into the mkldnn fusion; torch 2.14), plain compile works
            wanted = ["default"]
            notes.append("CIFAR: the compiled inference contender is plain torch.compile (inductor's "
                         "freezing fails on the fastres model's option-A shortcut)")
        for m in wanted:
            out.append(Contender(f"{ref_name}+compile({m})", "reference", None, True, modes=("infer",),
                                 compile_mode=None if m in ("freezing", "default") else m, freezing=m == "freezing",
                                 alternative=True))
    run, more = fastres_backends(cfg)
    notes += more
    for b in run:
        out.append(Contender(f"fastres[{b}]", "fastres", b, False))
        if on_gpu and b != "torch":
            out.append(Contender(f"fastres[{b}]+cudagraph", "fastres", b, False, modes=("infer",), cuda_graph=True))
        if cfg.compile_fastres:
            out.append(Contender(f"fastres[{b}]+compile", "fastres", b, True))
        if cfg.conv_paths and b in CONV_PATHS:
            path = CONV_PATHS[b]
            why = conv_path_unavailable(path, torch.device(cfg.device))
            out.append(Contender(f"fastres[{b}]+conv({path})", "fastres", b, False, conv=path, skip=why))
    if cfg.cuda_graphs:  # each eager contender once more, captured in a CUDA graph
        out += [Contender(c.name + "+graphs", c.kind, c.backend, False, modes=c.modes, graphs=True)
                for c in list(out) if not c.compiled and not c.cuda_graph]
    if kind == "cifar":
        notes.append("torchvision has no CIFAR ResNet: the 'eager' baseline is the fastres model on the "
                     "'torch' backend (plain aten ops)")
    return out, notes


# ============================================================================ measurement helpers
def _autocast(cfg: BenchConfig, device: torch.device):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.dtype])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trim_host_memory() -> None:
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _reset_peak(device: torch.device) -> str:
    """Reset the peak-memory counter; returns the kind of figure that will be read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    _trim_host_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return "peak_rss"
    except OSError:
        return "peak_rss_process"  # cannot reset: the process-lifetime peak


def _proc_status_mib(key: str) -> Optional[float]:
    """A ``/proc/self/status`` figure (``VmHWM``, ``VmRSS``) in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _current_mib(device: torch.device) -> Optional[float]:
    """Memory held now: ``torch.cuda.memory_allocated`` on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mib("VmRSS")


def _read_peak_mib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 1024.0 if sys.platform != "darwin" else r / 2**20
    except Exception:
        return None


def forward_gflop_per_image(builder: Callable[[], torch.nn.Module], image_size: int) -> Optional[float]:
    """Forward GFLOP (2·MAC of convs and the fc) per image, counted on the meta device."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with torch.device("meta"):
            m = builder()
        x = torch.empty(1, 3, image_size, image_size, device="meta")
        m.eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x)
        return fc.get_total_flops() / 1e9
    except Exception:
        return None


def make_step(model: torch.nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, cfg: BenchConfig,
              device: torch.device, no_grad: bool = False, graphs: bool = False) -> Callable[[], None]:
    """One benchmark iteration: the training step of :mod:`fastres.training` (forward,
    backward, SGD) or an inference forward (under ``no_grad`` instead of inference_mode
    when asked); ``graphs``: captured in a CUDA graph and replayed."""
    from .training import capture_train_step, graph_capture, make_train_step
    autocast = functools.partial(_autocast, cfg, device)
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if graphs:
            replay = capture_train_step(model, opt, x, y, autocast=autocast)
            return lambda: replay(x, y)
        scaler = torch.amp.GradScaler(device.type) if (cfg.dtype == "fp16" and device.type == "cuda") else None
        train_step = make_train_step(model, opt, scaler=scaler, autocast=autocast)
        return lambda: train_step(x, y)

    model.eval()
    if no_grad:  # torch.compile's freezing folds parameters only under no_grad

        def infer_no_grad():
            with torch.no_grad(), autocast():
                model(x)
        return infer_no_grad

    def infer():
        with torch.inference_mode(), autocast():
            model(x)
    if not graphs:
        return infer
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            infer()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with graph_capture(graph, device):
        infer()
    return graph.replay


def first_call_s(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one synchronised call: a compiled contender's compilation (and
    freezing / CUDA-graph capture), kept out of the timed region."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The ``q``-quantile (0..1) of ``values``, linearly interpolated; None when empty."""
    v = sorted(values)
    if not v:
        return None
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def timed_repeat(step: Callable[[], None], cfg: BenchConfig, device: torch.device,
                 per_iter: Optional[List[float]] = None) -> float:
    """One timed block of ``cfg.iters`` iterations, synchronised: its ms/iteration. With
    ``per_iter`` (a list), every iteration's own ms are appended to it as well (latency
    percentiles): CUDA events around each iteration on a GPU (no extra synchronisation),
    ``perf_counter`` on the CPU."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)  # the device's own stream, whichever is current
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(cfg.iters + 1)]
        ev[0].record(stream)
        for i in range(cfg.iters):
            step()
            if per_iter is not None:
                ev[i + 1].record(stream)
        ev[-1].record(stream)
        ev[-1].synchronize()
        if per_iter is not None:
            per_iter.extend(ev[i].elapsed_time(ev[i + 1]) for i in range(cfg.iters))
        return ev[0].elapsed_time(ev[-1]) / cfg.iters
    _sync(device)
    t0 = t_prev = time.perf_counter()
    for _ in range(cfg.iters):
        step()
        if per_iter is not None:
            t = time.perf_counter()
            per_iter.append((t - t_prev) * 1e3)
            t_prev = t
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / cfg.iters


def time_step(step: Callable[[], None], cfg: BenchConfig, device: torch.device,
              tick: Callable[[int], None], per_iter: Optional[List[float]] = None,
              before_repeat: Optional[Callable[[], None]] = None
              ) -> Tuple[List[float], Optional[float], str]:
    """One contender alone (``--no-interleave``): warm up, then ``repeats`` timed blocks of
    ``iters`` iterations (:func:`timed_repeat`; ``before_repeat`` is called before each):
    (ms/iter of each repeat, peak memory MiB, memory kind)."""
    for _ in range(cfg.warmup):
        step()
        tick(1)
    _sync(device)
    mem_kind = _reset_peak(device)
    times = []
    for _ in range(cfg.repeats):
        if before_repeat is not None:
            before_repeat()
        times.append(timed_repeat(step, cfg, device, per_iter))
        tick(cfg.iters)
    _sync(device)
    return times, _read_peak_mib(device), mem_kind


def _runner(c: Contender, model: torch.nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor,
            cfg: BenchConfig, device: torch.device):
    """(the callable model, its step, compile seconds or None). A compiled contender
    (or a CUDA graph) is compiled/captured by one untimed first call."""
    if c.cuda_graph:
        import fastres
        model.eval()
        with _autocast(cfg, device):
            t0 = time.perf_counter()
            runner = fastres.cuda_graph_inference(model, x)
            _sync(device)
            compile_s = time.perf_counter() - t0

        def graph_step():
            runner(x)
        return runner, graph_step, compile_s
    if not c.compiled:
        return model, make_step(model, mode, x, y, cfg, device, graphs=c.graphs), None
    # (a compiled module shares the parameters: the optimizer steps the originals)
    runner = torch.compile(model, mode=c.compile_mode) if c.compile_mode else torch.compile(model)
    step = make_step(runner, mode, x, y, cfg, device, no_grad=mode == "infer")
    if c.freezing:
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True):
            compile_s = first_call_s(step, device)  # the graph is frozen at its first compilation
    else:
        compile_s = first_call_s(step, device)
    return runner, step, compile_s


# ============================================================================ the run
def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _versions() -> Dict[str, Optional[str]]:
    import fastres
    v = {"python": platform.python_version(), "torch": torch.__version__, "fastres": fastres.__version__,
         "cuda": torch.version.cuda, "cudnn": None, "torchvision": None, "triton": None}
    try:
        import torchvision
        v["torchvision"] = torchvision.__version__
    except Exception:
        pass
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception:
        pass
    if torch.backends.cudnn.is_available():
        v["cudnn"] = str(torch.backends.cudnn.version())
    return v


@dataclass
class _Job:
    """One contender in one mode: its result row and, while it runs, its model and step."""
    c: Contender
    mode: str
    row: Dict[str, object]
    model: object = None
    runner: object = None
    step: Optional[Callable[[], None]] = None
    times: List[Optional[float]] = field(default_factory=list)  # ms/iter of each repeat (None: missed)
    lat: Optional[List[float]] = None                          # ms of each timed iteration (infer)
    loads: List[Optional[float]] = field(default_factory=list)  # 1-min load averages around its repeats
    own_mib: Optional[float] = 0.0  # memory it holds after build and warm-up (interleaved peak)

    def ctx(self):
        import fastres
        from fastres import conv_backend
        stack = contextlib.ExitStack()
        if self.c.backend:
            stack.enter_context(fastres.use_backend(self.c.backend))
        if self.c.conv:
            stack.enter_context(conv_backend.use_conv(self.c.conv))
        return stack


def _new_row(c: Contender, mode: str, cfg: BenchConfig, device: torch.device, date: str) -> Dict[str, object]:
    return dict(model=cfg.model, contender=c.name, backend=c.backend or "", compiled=c.compiled, mode=mode,
                status="ok", img_per_s=None, ms_per_iter=None, ms_min=None, ms_max=None, spread_pct=None,
                lat_p50_ms=None, lat_p90_ms=None, compile_s=None,
                peak_mem_mib=None, mem_kind="", speedup_vs_eager=None, tflops=None,
                device=str(device), device_name=device_name(device), dtype=cfg.dtype,
                batch_size=cfg.batch_size, image_size=cfg.image_size, channels_last=cfg.channels_last,
                iters=cfg.iters, repeats=cfg.repeats, warmup=cfg.warmup, date=date,
                alt_contender="", speedup_vs_alt=None, paired_vs_eager=None, paired_vs_alt=None,
                interleaved=cfg.interleave, load_min=None, load_max=None, repeat_ms=[])


def _build_job(job: _Job, build: Callable[[], torch.nn.Module], state, x: torch.Tensor, y: torch.Tensor,
               cfg: BenchConfig, device: torch.device, fmt) -> None:
    """The contender's model from the shared state_dict, and its step; a compiled one is
    compiled by one untimed first call (``compile_s``)."""
    with job.ctx():
        model = build()
        model.load_state_dict(state, strict=True)
        job.model = model.to(device=device, memory_format=fmt)
        job.runner, job.step, job.row["compile_s"] = _runner(job.c, job.model, job.mode, x, y, cfg, device)
    job.lat = [] if job.mode == "infer" else None
    job.times = [None] * cfg.repeats


def _record_error(job: _Job, e: BaseException) -> None:
    """Mark the row failed (called inside ``except``: prints the traceback)."""
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    job.row["status"] = f"error: {msg}"
    print(f"\nfastres bench: {job.c.name} {job.mode} failed:\n{traceback.format_exc(limit=6)}", file=sys.stderr)


def _release(jobs: Sequence[_Job], device: torch.device, reset_dynamo: bool) -> None:
    """Drop the models and steps; ``reset_dynamo`` only once no compiled contender is left
    to run (a reset makes every live compiled model recompile at its next call)."""
    for job in jobs:
        job.model = job.runner = job.step = None
    if reset_dynamo and any(job.c.compiled for job in jobs):
        torch._dynamo.reset()
    _trim_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _finish_row(job: _Job, cfg: BenchConfig, gflop: Optional[float]) -> None:
    row = job.row
    times = [t for t in job.times if t is not None]
    med = statistics.median(times)
    if job.lat:
        row.update(lat_p50_ms=percentile(job.lat, 0.5), lat_p90_ms=percentile(job.lat, 0.9))
    row.update(ms_per_iter=med, ms_min=min(times), ms_max=max(times), repeat_ms=list(job.times),
               spread_pct=100.0 * (max(times) - min(times)) / med if med > 0 else None,
               img_per_s=cfg.batch_size * 1e3 / med if med > 0 else None)
    loads = [v for v in job.loads if v is not None]
    if loads:
        row.update(load_min=min(loads), load_max=max(loads))
    if gflop is not None and med > 0:
        flop_per_img = gflop * (3.0 if job.mode == "train" else 1.0)
        row["tflops"] = flop_per_img * cfg.batch_size / med  # GFLOP per ms = TFLOP/s


def _alone_peak_mib(base: Optional[float], own: Optional[float], at: Optional[float],
                    peak: Optional[float], kind: str) -> Optional[float]:
    """An interleaved contender's peak as if it ran alone: the memory held before any
    contender was built (inputs, libraries) + what this contender holds after its build and
    warm-up (weights, gradients, optimizer state, compiled code, graph pools) + the rise
    above the current usage in its dedicated untimed iteration."""
    if None in (base, own, at, peak) or kind == "peak_rss_process":  # no reset: the process peak
        return peak
    return base + max(own, 0.0) + max(peak - at, 0.0)


def paired_ratio(ref: Sequence[Optional[float]], times: Sequence[Optional[float]]) -> Optional[float]:
    """The median over rounds of ``ref[i] / times[i]`` (> 1: faster than ``ref``), over the
    rounds both have; robust to a load that drifts between rounds. None without a common round."""
    r = [a / b for a, b in zip(ref, times) if a is not None and b is not None and b > 0]
    return statistics.median(r) if r else None


def _run_sequential(jobs: Sequence[_Job], builders, state, x, y, cfg: BenchConfig, device: torch.device,
                    fmt, gflop, prog: "_Progress", sample_load: Callable[[], Optional[float]]) -> int:
    """``--no-interleave``: every contender alone, one after another (build, warm-up, repeats)."""
    failures = 0
    for job in jobs:
        if job.c.skip is not None:
            continue
        prog.describe(f"{job.c.name} {job.mode}")
        try:
            _build_job(job, builders[job.c.kind], state, x, y, cfg, device, fmt)
            with job.ctx():
                times, peak, mem_kind = time_step(job.step, cfg, device, prog.update, job.lat,
                                                  before_repeat=lambda: job.loads.append(sample_load()))
            job.loads.append(sample_load())
            job.times = list(times)
            job.row.update(peak_mem_mib=peak, mem_kind=mem_kind)
            _finish_row(job, cfg, gflop)
            prog.postfix(last=f"{job.row['img_per_s']:.1f} img/s")
        except Exception as e:  # record and go on with the next contender
            failures += 1
            _record_error(job, e)
        finally:
            _release([job], device, reset_dynamo=True)
    return failures


def _run_interleaved(jobs: Sequence[_Job], builders, state, x, y, cfg: BenchConfig, device: torch.device,
                     fmt, gflop, prog: "_Progress", sample_load: Callable[[], Optional[float]]) -> int:
    """Per mode: build every contender (compilation untimed), warm each up and measure its
    peak memory in one dedicated untimed iteration, then the timed repeats round-robin —
    round ``i`` runs repeat ``i`` of every contender in turn, the order rotated by one each
    round — so that each contender sees the same load."""
    failures = 0
    for mode in cfg.modes:
        group = [j for j in jobs if j.mode == mode and j.c.skip is None]
        live: List[_Job] = []
        try:
            _sync(device)
            _trim_host_memory()
            base_mib = _current_mib(device)
            for job in group:  # 1. build (and compile) every contender
                prog.describe(f"build {job.c.name} {mode}")
                try:
                    before = _current_mib(device)
                    _build_job(job, builders[job.c.kind], state, x, y, cfg, device, fmt)
                    _sync(device)
                    after = _current_mib(device)
                    job.own_mib = None if None in (before, after) else after - before
                    live.append(job)
                except Exception as e:
                    failures += 1
                    _record_error(job, e)
                    _release([job], device, reset_dynamo=False)
            for job in list(live):  # 2. warm-up, then the peak-memory iteration
                prog.describe(f"warm-up {job.c.name} {mode}")
                try:
                    with job.ctx():
                        before = _current_mib(device)
                        for _ in range(cfg.warmup):
                            job.step()
                            prog.update(1)
                        _sync(device)
                        after = _current_mib(device)
                        mem_kind = _reset_peak(device)
                        at = _current_mib(device)
                        job.step()
                        _sync(device)
                        peak = _read_peak_mib(device)
                    prog.update(1)
                    own = None if None in (job.own_mib, before, after) else job.own_mib + after - before
                    job.row.update(peak_mem_mib=_alone_peak_mib(base_mib, own, at, peak, mem_kind),
                                   mem_kind=mem_kind)
                except Exception as e:
                    failures += 1
                    _record_error(job, e)
                    live.remove(job)
                    _release([job], device, reset_dynamo=False)
            for i in range(cfg.repeats):  # 3. the timed rounds
                if not live:
                    break
                prog.describe(f"{mode} round {i + 1}/{cfg.repeats}")
                load = sample_load()
                k = i % len(live)
                for job in live[k:] + live[:k]:
                    job.loads.append(load)
                    try:
                        with job.ctx():
                            job.times[i] = timed_repeat(job.step, cfg, device, job.lat)
                        prog.update(cfg.iters)
                    except Exception as e:
                        failures += 1
                        _record_error(job, e)
                        live.remove(job)
                        _release([job], device, reset_dynamo=False)
            load = sample_load()
            for job in live:
                job.loads.append(load)
                _finish_row(job, cfg, gflop)
        finally:
            _release(group, device, reset_dynamo=True)
    return failures


def load_note(samples: Sequence[Optional[float]], cpu_count: int, threads: int) -> Dict[str, object]:
    """The load figures of a run: ``samples`` are the 1-min load averages at the start (before
    any contender ran), around each round / repeat, and at the end. This run itself adds up
    to ``min(threads, cpu_count)`` to the load while it times; the machine is called busy when
    the load of the other jobs — the start figure, and the later ones less this run's threads
    — exceeds half the cores."""
    vals = [v for v in samples if v is not None]
    own = min(threads, cpu_count)
    info: Dict[str, object] = dict(samples=list(samples), min=min(vals) if vals else None,
                                   max=max(vals) if vals else None, cpu_count=cpu_count, threads=threads,
                                   busy_threshold=0.5 * cpu_count, others_max=None, busy=None)
    if vals:
        others = [samples[0]] if samples[0] is not None else []
        others += [max(0.0, v - own) for v in samples[1:] if v is not None]
        info["others_max"] = round(max(others), 2)
        info["busy"] = info["others_max"] > info["busy_threshold"]
    return info


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="it", desc="fastres bench", file=sys.stderr,
                                dynamic_ncols=True, leave=True)
            except ImportError:
                print("(tqdm not installed: no progress bar)", file=sys.stderr)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            print(f"[bench] {text}", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cfg: BenchConfig) -> Dict[str, object]:
    """Run every contender in every mode; returns {"meta": ..., "rows": [...]}."""
    import fastres
    device = torch.device(cfg.device)
    date = _dt.date.today().isoformat()
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every contender picks its best conv algorithms
    kind, _ = parse_model(cfg.model)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format

    ref_build = reference_builder(cfg.model, cfg.num_classes)
    try:
        fr_build = fastres_builder(cfg.model, cfg.num_classes)
        fr_missing = None
    except Unavailable as e:
        fr_build, fr_missing = None, str(e)

    conts, notes = contenders(cfg)
    notes = list(cfg.notes) + notes
    load_samples: List[Optional[float]] = []

    def sample_load() -> Optional[float]:
        load_samples.append(_loadavg())
        return load_samples[-1]
    load_before = sample_load()
    if ref_build is None:  # CIFAR: the eager baseline is the fastres model on aten ops
        if fr_build is None:
            raise SystemExit(f"fastres bench: {fr_missing}")
        for c in conts:
            if c.kind == "reference":
                c.kind, c.backend = "fastres", "torch"
        ref_build = fr_build
    if fr_build is None:
        for c in conts:
            if c.kind == "fastres":
                c.skip = fr_missing

    # one set of weights and one input batch for everybody
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        state = {k: v.clone() for k, v in ref_build().state_dict().items()}
        x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
        y = torch.randint(0, cfg.num_classes, (cfg.batch_size,))
    x = x.to(device).contiguous(memory_format=fmt)
    y = y.to(device)
    gflop = forward_gflop_per_image(ref_build, cfg.image_size)

    per_run = cfg.warmup + cfg.repeats * cfg.iters + (1 if cfg.interleave else 0)
    jobs = [_Job(c, m, _new_row(c, m, cfg, device, date)) for c in conts for m in cfg.modes
            if not (c.compiled and m not in cfg.compile_modes) and (c.modes is None or m in c.modes)]
    for job in jobs:
        if job.c.skip is not None:
            job.row["status"] = f"skipped: {job.c.skip}"
    builders = {"fastres": fr_build, "reference": ref_build}
    prog = _Progress(total=per_run * sum(1 for j in jobs if j.c.skip is None), enabled=cfg.progress)
    try:
        failures = (_run_interleaved if cfg.interleave else _run_sequential)(
            jobs, builders, state, x, y, cfg, device, fmt, gflop, prog, sample_load)
    finally:
        prog.close()
    load_after = sample_load()
    rows = [j.row for j in jobs]

    # speed-ups: against the baseline and the strongest alternative of the mode (the fastest
    # compiled torchvision contender), as ratios of medians and, interleaved, as medians of the
    # per-round ratios
    alternatives: Dict[str, Optional[str]] = {}
    for mode in cfg.modes:
        ok = [j for j in jobs if j.mode == mode and j.row["status"] == "ok"]
        base = next((j for j in ok if j.c is conts[0]), None)
        alt = min((j for j in ok if j.c.alternative), key=lambda j: j.row["ms_per_iter"], default=None)
        alternatives[mode] = alt.c.name if alt is not None else None
        for j in ok:
            r = j.row
            if base is not None:
                r["speedup_vs_eager"] = base.row["ms_per_iter"] / r["ms_per_iter"]
                if cfg.interleave:
                    r["paired_vs_eager"] = paired_ratio(base.times, j.times)
            if alt is not None:
                r.update(alt_contender=alt.c.name, speedup_vs_alt=alt.row["ms_per_iter"] / r["ms_per_iter"])
                if cfg.interleave:
                    r["paired_vs_alt"] = paired_ratio(alt.times, j.times)

    threads = torch.get_num_threads()
    load = load_note(load_samples, os.cpu_count() or 1, threads if device.type == "cpu" else 1)
    if device.type == "cpu" and load["busy"]:
        notes.append(f"the machine was busy: 1-min load average {load['min']:.2f}-{load['max']:.2f} over the run "
                     f"(start {_fmt(load_before, '.2f')}, end {_fmt(load_after, '.2f')}) on {load['cpu_count']} "
                     f"cores, {threads} torch threads; the other jobs' load (the average less this run's "
                     f"threads) reached {load['others_max']:.2f} > {load['busy_threshold']:.1f} (half the cores): "
                     "CPU timings are noisy" + ("; the interleaved per-round ratios are the robust figures"
                                                 if cfg.interleave else ""))
    if cfg.interleave:
        timing = ("timed repeats interleaved: round i runs repeat i of every contender in turn (order rotated "
                  "each round); ")
        memory = ("; interleaved (every contender of the mode alive at once): each contender's figure as if "
                  "it ran alone, the memory held before any contender was built + its own growth over its build "
                  "and warm-up + the rise in one dedicated untimed iteration after the warm-up")
    else:
        timing = "every contender alone, one after another (--no-interleave); "
        memory = ""
    meta = dict(tool="python -m fastres bench", date=date,
                time=_dt.datetime.now().isoformat(timespec="seconds"),
                device=str(device), device_name=device_name(device), device_slug=device_slug(device),
                versions=_versions(), settings=asdict(cfg), baseline=conts[0].name,
                forward_gflop_per_image=gflop,
                timing=timing + ("CUDA events around each repeat" if device.type == "cuda" else
                                 "time.perf_counter around each repeat (CPU ops are synchronous)"),
                memory=("torch.cuda.max_memory_allocated after warm-up" if device.type == "cuda" else
                        "peak resident set size (VmHWM, reset after warm-up) of the whole process") + memory,
                interleave=cfg.interleave, strongest_alternative=alternatives,
                load_before=load_before, load_after=load_after, load=load,
                notes=notes, failures=failures, backend_info=fastres.backend_info())
    return {"meta": meta, "rows": rows}


# ============================================================================ output
def _fmt(v, spec, missing="—"):
    return missing if v is None else format(v, spec)


def _times(v) -> str:
    """A ratio as ``1.23x``; ``—`` when there is none."""
    return "—" if v is None else f"{v:.2f}x"


def format_table(result: Dict[str, object]) -> str:
    meta, rows = result["meta"], result["rows"]
    s = meta["settings"]
    v = meta["versions"]
    lines = [
        f"fastres bench — {s['model']}, batch {s['batch_size']}, {s['image_size']}x{s['image_size']}, "
        f"{s['dtype']}{' (autocast)' if s['dtype'] != 'fp32' else ''}, "
        f"{'channels_last' if s['channels_last'] else 'NCHW'}",
        f"device: {meta['device']} ({meta['device_name']})   date: {meta['time']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"timing: warm-up {s['warmup']}, {s['repeats']} repeats x {s['iters']} iters, median (min-max); "
        f"{meta['timing']}",
        f"memory: {meta['memory']}",
        "train = forward + backward + SGD(momentum) step; infer = forward under inference_mode "
        "(compiled: no_grad); p50/p90: latency of single timed iterations; compile s: the first call, untimed"
        + ("; cudnn.benchmark on" if meta["device"].startswith("cuda") else ""),
    ]
    if meta.get("forward_gflop_per_image"):
        lines.append(f"forward GFLOP/img: {meta['forward_gflop_per_image']:.2f} (train counted as 3x)")
    interleaved = bool(meta.get("interleave"))
    alts = {m: a for m, a in (meta.get("strongest_alternative") or {}).items() if a}
    lines.append(
        f"vs {meta['baseline']}: ratio of medians (> 1: faster); "
        + ("paired: median of the per-round ratios against it (interleaved rounds, robust to load drift); "
           if interleaved else "")
        + "vs alt: against the strongest alternative"
        + (f" ({', '.join(f'{m}: {a}' for m, a in alts.items())})" if alts else " (none ran)")
        + (", median of the per-round ratios" if interleaved else ", ratio of medians"))
    load = meta.get("load") or {}
    if load.get("min") is not None:
        lines.append(f"load: 1-min load average {load['min']:.2f}-{load['max']:.2f} over the run "
                     f"({load['cpu_count']} cores)")
    hdr = (f"{'contender':<34} {'mode':<6} {'img/s':>9} {'ms/iter':>9} {'(min-max)':>17} "
           f"{'p50 ms':>8} {'p90 ms':>8} {'peak MiB':>9} {'TFLOP/s':>8} {'vs ' + meta['baseline']:>16} "
           f"{'paired':>7} {'vs alt':>7} {'compile s':>9}")
    lines += ["", hdr, "-" * len(hdr)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['contender']:<34} {r['mode']:<6} {r['status']}")
            continue
        rng = f"({r['ms_min']:.2f}-{r['ms_max']:.2f})"
        lines.append(f"{r['contender']:<34} {r['mode']:<6} {_fmt(r['img_per_s'], '9.1f'):>9} "
                     f"{_fmt(r['ms_per_iter'], '9.2f'):>9} {rng:>17} {_fmt(r.get('lat_p50_ms'), '8.2f'):>8} "
                     f"{_fmt(r.get('lat_p90_ms'), '8.2f'):>8} {_fmt(r['peak_mem_mib'], '9.0f'):>9} "
                     f"{_fmt(r['tflops'], '8.3g'):>8} {_fmt(r['speedup_vs_eager'], '15.2f') + 'x':>16} "
                     f"{_times(r.get('paired_vs_eager')):>7} "
                     f"{_times(r.get('paired_vs_alt' if interleaved else 'speedup_vs_alt')):>7} "
                     f"{_fmt(r.get('compile_s'), '9.1f'):>9}")
    for n in meta.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def output_stem(result: Dict[str, object]) -> str:
    meta = result["meta"]
    s = meta["settings"]
    tag = f"_{s['tag']}" if s.get("tag") else ""
    return (f"bench_{s['model']}_{meta['device_slug']}_{s['dtype']}_b{s['batch_size']}_{s['image_size']}px"
            f"{'' if s['channels_last'] else '_nchw'}{tag}_{meta['date']}")


def write_outputs(result: Dict[str, object], out_dir: str, plot: bool = True) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, output_stem(result))
    paths = {"txt": stem + ".txt", "json": stem + ".json", "csv": stem + ".csv"}
    with open(paths["txt"], "w") as f:
        f.write(format_table(result) + "\n")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow(r)
    if plot:
        png = stem + ".png"
        meta = result["meta"]
        s = meta["settings"]
        title = (f"{s['model']} — {meta['device_name']}\n{s['dtype']}, batch {s['batch_size']}, "
                 f"{s['image_size']}px, {'channels_last' if s['channels_last'] else 'NCHW'}, {meta['date']}")
        err = plot_rows(result["rows"], png, title)
        if err is None:
            paths["png"] = png
        else:
            print(f"fastres bench: no PNG ({err})", file=sys.stderr)
    return paths


def plot_rows(rows: Sequence[Dict[str, object]], path: str, title: str) -> Optional[str]:
    """Grouped bar chart of img/s per contender (x) and mode (bars); returns an error
    string instead of raising when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return "matplotlib is not installed"

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    ok = [r for r in rows if str(r.get("status")) == "ok" and num(r.get("img_per_s"))]
    names = list(dict.fromkeys(str(r["contender"]) for r in ok))
    modes = list(dict.fromkeys(str(r["mode"]) for r in ok))
    if not ok:
        return "no successful rows to plot"
    fig = Figure(figsize=(max(6.0, 1.5 * len(names) + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(modes))
    colors = {"train": "#1f77b4", "infer": "#ff7f0e"}
    for i, mode in enumerate(modes):
        xs, hs, labels, lo, hi = [], [], [], [], []
        for j, n in enumerate(names):
            r = next((r for r in ok if r["contender"] == n and r["mode"] == mode), None)
            if r is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            hs.append(num(r["img_per_s"]))
            b, t_min, t_max = num(r.get("batch_size")), num(r.get("ms_min")), num(r.get("ms_max"))
            if b and t_min and t_max:  # min-max of the repeats as an error bar
                lo.append(max(0.0, hs[-1] - b * 1e3 / t_max))
                hi.append(max(0.0, b * 1e3 / t_min - hs[-1]))
            else:
                lo.append(0.0)
                hi.append(0.0)
            sp = num(r.get("speedup_vs_eager"))
            v = num(r["img_per_s"])
            labels.append((f"{v:.0f}" if v >= 100 else f"{v:.1f}") + (f"\n{sp:.2f}x" if sp else ""))
        bars = ax.bar(xs, hs, width=width, label=mode, color=colors.get(mode),
                      yerr=[lo, hi] if any(lo) or any(hi) else None, capsize=3, ecolor="#444444")
        for b, lab, up in zip(bars, labels, hi):
            ax.annotate(lab, (b.get_x() + b.get_width() / 2, b.get_height() + up), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("images / s  (error bars: min-max of repeats)", fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.18)
    fig.tight_layout()
    fig.savefig(path)
    return None


# ============================================================================ entry point
def main_from_args(args) -> int:
    cfg = resolve_config(args)
    t0 = time.perf_counter()
    result = run(cfg)
    result["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(format_table(result))
    paths = write_outputs(result, cfg.out, plot=cfg.plot)
    print(f"wall time {result['meta']['wall_s']} s; wrote " + ", ".join(paths.values()))
    rows = result["rows"]
    base_ok = any(r["contender"] == result["meta"]["baseline"] and r["status"] == "ok" for r in rows)
    return 0 if base_ok and result["meta"]["failures"] == 0 else 1
