"""Compile every Triton kernel fastres launches for real GPUs, without a GPU.

    python tools/aot_compile.py [--arch 90 --arch 80] [--quick] [--kernel NAME] [--list] [--json FILE]
    python tools/aot_compile.py --mutations   # torch's wrap_triton mutation analysis of every launch

The interpreter (TRITON_INTERPRET=1, every CPU test) never runs Triton's compiler, so a
kernel that passes every test can still fail to compile for sm_90 (tl.dot operand
types, unsupported ops, constexpr misuse, a tiling over the shared-memory limit). This
tool runs Triton's whole pipeline (frontend, TTGIR passes, LLVM, PTX, ptxas -> cubin)
for sm_90 and sm_80 on exactly the launches fastres makes -- the pre-flight check
before a GPU session (docs/GPU.md):

1. **Record.** With TRITON_INTERPRET unset (the kernels are real ``JITFunction`` s, as on
   a GPU) every launcher of ``kernels/`` -- the BN(+residual)+ReLU passes of
   ``_launch.py``, the fused conv forward of ``_conv.py``, the dgrad/wgrad of
   ``_conv_bwd.py`` -- is called on CPU tensors over a matrix of its inputs
   (``SCENARIOS``: layouts, dtypes, residual / ReLU / prologue / statistics / bias flags,
   ResNet conv shapes). ``JITFunction.run`` is intercepted: each launch is recorded
   (arguments and constexprs exactly as the launcher passed them, in its GPU code path:
   no interpreter-only flags, the GPU tilings) and nothing runs. Autotuning runs as on a
   GPU with a stand-in timer, so every candidate tiling the tuner would compile is
   recorded too (``triton.autotune`` of ``_conv_bwd`` and ``_conv._pick_config``).
2. **Replay.** Each distinct launch goes through what ``JITFunction.run`` does before it
   compiles -- Triton's own binder and argument specialisation (``tt.divisibility`` 16 of
   pointers / integers, integers equal to 1 made constexpr), then ``ASTSource`` and
   ``triton.compile`` -- for ``GPUTarget("cuda", arch, 32)``. The compile set is thus
   derived from the launchers and cannot drift from them.
3. **Check** each cubin: it exists (ptxas passed); shared memory within the per-block
   limit (sm_90: 227 KiB of the 228 KiB per SM; sm_80: 163 KiB), registers per thread
   (<= 255) and per block (<= 64 Ki), spills (local memory) reported; and for the conv
   kernels with 16-bit tl.dot that Hopper gets wgmma (mma.sync for a dot of fewer than
   64 rows or fewer than 4 warps: wgmma needs a warp group) and Ampere mma.sync
   tensor-core instructions, with pipelined loads (cp.async) where num_stages > 1 and
   the channel counts allow 16-byte vectors (not C = 3, 4 per group, odd counts).

Autotuning candidates may fail to fit a device (the tuner skips a tiling that raises
OutOfResources / a compile error there): such a failure is a warning ("skip"), an error
only if no candidate of the tuning group compiles. Any other failure: exit status 1.
The full set (the default) is ~470 compilations per arch, 6-20 min per arch on 2 loaded
cores. ``--quick`` (CI's subset, ~100 compilations, 2-5 min) replays the scenarios marked
quick: for sm_90 the BN kernels (both layouts, bf16 and fp64, every flag) and the three
conv kernels with every flag on in bf16 (the default and the largest tiling), fp32 and
fp64 (default tiling); for sm_80 the bf16 conv kernels (default tiling). Must run with
TRITON_INTERPRET unset (it is cleared here).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

try:
    from triton import knobs  # Triton >= 3.4
except ImportError:  # pragma: no cover
    knobs = None

from kernels import _conv, _conv_bwd, _launch  # noqa: E402

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin,
# what Triton checks at load time): H100/H200 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}
MAX_REGS = 255
REGS_PER_BLOCK = 65536
CONV_KERNELS = ("_conv_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel")
DOT_M = {"_conv_fwd_kernel": "BLOCK_M", "_dgrad_kernel": "BLOCK_M", "_wgrad_kernel": "BLOCK_K"}  # rows of its tl.dot


# ----------------------------------------------------------------------------- recording
@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    scenario: str
    group: Optional[int] = None    # autotuning group (candidates), None: a launch that must compile
    index: int = 0                 # position in its group (0: the tuner's first = untimed default)


class Recorder:
    """Intercepts ``JITFunction.run`` (nothing is launched) and the autotuners' timers."""

    def __init__(self):
        self.launches: List[Launch] = []
        self.scenario = "?"
        self._tuning_now = False
        self._groups = 0

    def _tuning(self, call):
        """Stand-in timer: records the candidate's launch (inside ``call``), equal times."""
        self._tuning_now = True
        try:
            call()
        finally:
            self._tuning_now = False

    def _add(self, fn, args, kwargs):
        group, index = None, 0
        if self._tuning_now:  # consecutive candidates of one kernel: one tuning run
            last = self.launches[-1] if self.launches else None
            if last is not None and last.group is not None and last.fn is fn and last.scenario == self.scenario:
                group, index = last.group, last.index + 1
            else:
                self._groups += 1
                group = self._groups
        self.launches.append(Launch(fn, args, dict(kwargs), self.scenario, group, index))

    @contextlib.contextmanager
    def active(self):
        rec = self
        saved = (JITFunction.run, triton.testing.do_bench, Autotuner.__dict__.get("do_bench"))

        def run(fn, *args, grid, warmup, **kwargs):
            rec._add(fn, args, kwargs)
            return None

        def do_bench(call, *a, **k):  # kernels/_conv.py's own tuner: one float
            rec._tuning(call)
            return 1.0

        def bench(call, quantiles=None, *a, **k):  # triton.autotune: a list with quantiles
            rec._tuning(call)
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        JITFunction.run = run
        triton.testing.do_bench = do_bench
        Autotuner.do_bench = property(lambda self: bench)
        try:
            yield self
        finally:
            JITFunction.run, triton.testing.do_bench = saved[0], saved[1]
            if saved[2] is not None:
                Autotuner.do_bench = saved[2]
            else:
                del Autotuner.do_bench


# ----------------------------------------------------------------------------- scenarios
# Each scenario calls launchers on CPU tensors (never touched by a kernel: only shapes,
# dtypes, strides and alignment matter). Shapes are ResNet-like at a small batch whose
# N*H*W keeps the divisibility of a large batch (the JIT specialises on it).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _t(shape, dtype, cl=False):
    t = torch.empty(shape, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl and len(shape) == 4 else t


def _vec(c, dtype):
    return torch.empty((c,), dtype=dtype)


@dataclass
class Scenario:
    name: str
    run: Callable[[], None]
    quick: bool = False             # in CI's subset (--quick)
    candidates: str = "first"       # autotuning candidates compiled: "first" (the untimed default) or "all"
    quick_archs: tuple = (90,)      # the archs --quick compiles it for (the first: every kept candidate)
    aligned: bool = True            # channel counts multiples of 16 (16-byte vector loads: cp.async)


def _bn_scenarios(dtype_name: str) -> List[Scenario]:
    """The BN(+residual)+ReLU launchers, forward (stats, finalize, act passes) and
    backward (bwd pass, bwd finalize) of bn_act_train and affine_act: both layouts,
    three tilings; on the main shape sets of flags in which every flag is on and off at
    least once (each constexpr branch compiles; the flags are independent branches),
    on the others every flag on."""
    dt = DTYPES[dtype_name]
    acc = _launch._acc(dt)
    out = []
    # (N, C, H, W): a 64-channel 56x56 map, wide channels (channels-last tile [16, 256]),
    # odd sizes (masks everywhere, 1-wide tiles of tiny tensors)
    for shape, main in (((16, 64, 56, 56), True), ((16, 2048, 7, 7), False), ((2, 65, 7, 5), False)):
        for cl in (True, False):
            tag = f"{dtype_name} {'nhwc' if cl else 'nchw'} {'x'.join(map(str, shape))}"
            c = shape[1]

            def run(cl=cl, shape=shape, c=c, main=main):
                x = _t(shape, dt, cl)
                # bn_act_train: (residual, relu, affine) off / on; backward with and without grad_z
                for on in (False, True) if main else (True,):
                    w = _vec(c, dt) if on else None
                    r = _t(shape, dt, cl) if on else None
                    y, _, _ = _launch.bn_act_train(x, w, w, r, 1e-5, on)
                    _launch.bn_act_train_backward(_t(shape, dt, cl), x, y, w, _vec(c, acc), _vec(c, acc), 1e-5,
                                                  on, on)
                # affine_act: (scale, shift, residual, relu) none / all / partial; backward
                # (grad_z, param grads) none / both / one
                for has_s, has_t, res, relu, gz, pg in ((1, 1, 1, 1, 1, 1),) + (
                        ((0, 0, 0, 0, 0, 0), (1, 0, 0, 1, 0, 1), (0, 1, 1, 0, 1, 0)) if main else ()):
                    s = _vec(c, acc) if has_s else None
                    t = _vec(c, acc) if has_t else None
                    y = _launch.affine_act(x, s, t, _t(shape, dt, cl) if res else None, bool(relu))
                    _launch.affine_act_backward(_t(shape, dt, cl), x, y, s, bool(relu), bool(gz), bool(pg))

            out.append(Scenario(f"bn {tag}", run, quick=main and dtype_name in ("bf16", "fp64")))
    return out


# Conv problems: (N, C, H, W, K, R, S, stride, pad, dil, groups)
CONV_SHAPES = {
    "1x1": (16, 256, 14, 14, 1024, 1, 1, 1, 0, 1, 1),      # bottleneck conv3: a GEMM
    "1x1s2": (16, 512, 28, 28, 1024, 1, 1, 2, 0, 1, 1),    # downsample
    "3x3": (16, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1),       # conv2 (wide enough for every tiling)
    "3x3s2": (16, 128, 14, 14, 128, 3, 3, 2, 1, 1, 1),     # conv2 of a stage's first block
    "stem7x7s2": (4, 3, 64, 64, 64, 7, 7, 2, 3, 1, 1),     # C = 3
    "3x3g32": (16, 128, 14, 14, 128, 3, 3, 1, 1, 1, 32),   # ResNeXt (4 channels per group)
    "3x3d2odd": (2, 65, 9, 7, 33, 3, 3, 1, 2, 2, 1),       # dilation, odd sizes
}


def _aligned(sname: str) -> bool:
    """Channels per group and output channels multiples of 16: the operand rows are
    16-byte aligned vectors, which cp.async needs (C = 3, 4 per group, odd: not)."""
    n, c, h, w, k, r, s, st, pd, dl, g = CONV_SHAPES[sname]
    return (c // g) % 16 == 0 and k % 16 == 0

# Flag sets (bias, in_scale, in_shift, in_relu, residual, relu, stats): the training
# convs (stats; prologue = the previous BN + ReLU), the eval convs (folded bias,
# residual, ReLU), all on, partial prologues.
FWD_FLAGS = {
    "train": (False, False, False, False, False, False, True),
    "train+pro": (False, True, True, True, False, False, True),
    "eval": (True, False, False, False, False, True, False),
    "eval+res": (True, False, False, False, True, True, False),
    "all": (True, True, True, True, True, True, True),
    "scale-only": (True, True, False, False, False, False, False),
    "shift+relu": (False, False, True, True, True, False, True),
}

# (shape, flags, layout, dtypes, candidates, quick "dtype:arch,arch ..."): every conv
# kernel (forward, dgrad, wgrad) runs for each. "all" candidates: every tiling the
# tuner may compile (the all-flags problems, where registers and shared memory peak);
# the others compile the untimed default tiling.
CONV_PLAN = (
    ("3x3", "all", "nhwc", "bf16 fp32 fp64", "all", "bf16:90,80 fp32:90 fp64:90"),
    ("3x3", "all", "nhwc", "fp16", "first", ""),
    ("1x1", "all", "nhwc", "bf16 fp32", "all", ""),
    ("1x1", "train+pro", "nhwc", "bf16 fp16 fp32 fp64", "first", ""),
    ("1x1", "eval+res", "nhwc", "bf16 fp32", "first", ""),
    ("1x1s2", "train", "nhwc", "bf16 fp32", "first", ""),
    ("3x3", "eval", "nhwc", "bf16 fp32", "first", ""),
    ("3x3", "all", "nchw", "bf16 fp32 fp64", "first", ""),
    ("3x3s2", "scale-only", "nhwc", "bf16 fp32", "first", ""),
    ("stem7x7s2", "train", "nhwc", "bf16 fp16 fp32 fp64", "first", ""),
    ("stem7x7s2", "eval", "nchw", "bf16 fp32", "first", ""),
    ("3x3g32", "train+pro", "nhwc", "bf16 fp32 fp64", "first", ""),
    ("3x3d2odd", "shift+relu", "nhwc", "bf16 fp16 fp32 fp64", "first", ""),
)


def _conv_step(dtype_name: str, sname: str, fname: str, cl: bool) -> None:
    """One conv2d_act forward and its backward (dgrad through the prologue, wgrad)."""
    dt = DTYPES[dtype_name]
    acc = _launch._acc(dt)
    n, c, h, w, k, r, s, st, pd, dl, g = CONV_SHAPES[sname]
    bias, sc, sh, in_relu, res, relu, stats = FWD_FLAGS[fname]
    x = _t((n, c, h, w), dt, cl)
    wt = _t((k, c // g, r, s), dt, cl)
    scale = _vec(c, acc) if sc else None
    shift = _vec(c, acc) if sh else None
    p, q = _conv.out_size(h, w, r, s, (st, st), (pd, pd), (dl, dl))
    _conv.conv2d_act(x, wt, _vec(k, dt) if bias else None, scale, shift, _t((n, k, p, q), dt, cl) if res else None,
                     (st, st), (pd, pd), (dl, dl), g, in_relu, relu, stats)
    go = _t((n, k, p, q), dt, cl)
    _conv_bwd.conv2d_act_dgrad(go, wt, x, scale, shift, in_relu, st, pd, dl, g, sc or sh)
    _conv_bwd.conv2d_act_wgrad(go, x, scale, shift, in_relu, (k, c // g, r, s), st, pd, dl, g, bias)


def _conv_scenarios() -> List[Scenario]:
    out = []
    for sname, fname, lay, dtypes, cands, quick in CONV_PLAN:
        qarchs = {q.split(":")[0]: tuple(int(v) for v in q.split(":")[1].split(",")) for q in quick.split()}
        for d in dtypes.split():
            out.append(Scenario(f"conv {d} {lay} {sname} {fname}",
                                lambda d=d, s=sname, f=fname, cl=lay == "nhwc": _conv_step(d, s, f, cl),
                                quick=d in qarchs, candidates=cands, quick_archs=qarchs.get(d, (90,)),
                                aligned=_aligned(sname)))
    return out


def _untuned_scenarios() -> List[Scenario]:
    """The backward kernels' fixed tiling (FASTRES_CONV_BWD_AUTOTUNE=0) and the forward's
    untimed first candidate (FASTRES_CONV_AUTOTUNE=0): other launches than the tuned ones."""
    def run(dtype_name):
        saved = _conv_bwd.CONFIG["autotune"], os.environ.get("FASTRES_CONV_AUTOTUNE")
        _conv_bwd.CONFIG["autotune"] = False
        os.environ["FASTRES_CONV_AUTOTUNE"] = "0"
        try:
            _conv_step(dtype_name, "3x3", "train+pro", True)
        finally:
            _conv_bwd.CONFIG["autotune"] = saved[0]
            if saved[1] is None:
                os.environ.pop("FASTRES_CONV_AUTOTUNE", None)
            else:
                os.environ["FASTRES_CONV_AUTOTUNE"] = saved[1]
    return [Scenario(f"conv {d} nhwc 3x3 train+pro untuned", lambda d=d: run(d))
            for d in ("bf16", "fp16", "fp32")]


def scenarios() -> List[Scenario]:
    out: List[Scenario] = []
    for d in DTYPES:
        out += _bn_scenarios(d)
    return out + _conv_scenarios() + _untuned_scenarios()


# The wgrad split count depends on the SM count on CUDA (2 programs per SM); recorded
# on the CPU it would aim at 1024 programs: aim at the H200's 2 x 132 instead.
H200_WGRAD_TARGET = 2 * 132


def record(selected: List[Scenario]) -> List[Launch]:
    rec = Recorder()
    saved_target = _conv_bwd.CONFIG["wgrad_target"]
    _conv_bwd.CONFIG["wgrad_target"] = saved_target or H200_WGRAD_TARGET
    try:
        with rec.active():
            for sc in selected:
                rec.scenario = sc.name
                _conv._tuned.clear()  # each scenario runs the forward's tuner (every candidate)
                for t in _conv_bwd._TUNED.values():
                    t.cache.clear()
                sc.run()
    finally:
        _conv_bwd.CONFIG["wgrad_target"] = saved_target
    return rec.launches


def _volume(ln: Launch) -> int:
    """BLOCK_M * BLOCK_N * BLOCK_K * num_stages: the tiling's operand footprint, roughly."""
    v = 1
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v *= int(ln.kwargs.get(k, 1))
    return v * int(ln.kwargs.get("num_stages", 1))


def select(launches: List[Launch], by_name: Dict[str, Scenario], quick: bool, arch: int) -> List[Launch]:
    """The launches to compile for sm_<arch>: every launch outside autotuning; of a tuning
    group every candidate ("all"), or the first (the untimed default) -- and in --quick
    mode, for "all", the first and the largest tiling only."""
    groups: Dict[int, List[Launch]] = {}
    for ln in launches:
        if ln.group is not None:
            groups.setdefault(ln.group, []).append(ln)
    largest = {g: max(m, key=_volume) for g, m in groups.items()}
    out = []
    for ln in launches:
        sc = by_name[ln.scenario]
        if quick and arch not in sc.quick_archs:
            continue
        if ln.group is None or ln.index == 0:
            out.append(ln)
        elif sc.candidates == "all" and (not quick or (ln is largest[ln.group] and arch == sc.quick_archs[0])):
            out.append(ln)
    return out


# ----------------------------------------------------------------------------- replay
@dataclass
class Spec:
    """One distinct compilation: a kernel with Triton's specialisation of one launch."""
    key: str
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    groups: set = field(default_factory=set)       # autotuning groups it is a candidate of
    required: bool = False                         # launched outside autotuning
    aligned: bool = True                           # every scenario it comes from has aligned channels
    scenarios: List[str] = field(default_factory=list)


def _jit_kwargs(fn: JITFunction, kwargs: dict) -> dict:
    kw = dict(kwargs)
    debug = knobs.runtime.debug if knobs is not None else False
    kw["debug"] = kw.get("debug", fn.debug) or debug
    if knobs is not None and hasattr(knobs.compilation, "instrumentation_mode"):
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    return kw


def specialise(launch: Launch, arch: int, binders: dict):
    """What JITFunction.run computes before compiling, for target sm_<arch>."""
    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    if (fn, arch) not in binders:
        backend = make_backend(target)
        binders[(fn, arch)] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = binders[(fn, arch)]
    kw = _jit_kwargs(fn, launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kw)
    key = repr((fn.fn.__module__, fn.__name__, specialization, sorted(options.items())))
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
    return key, signature, constexprs, attrs, options


def distinct(launches: List[Launch], arch: int, by_name: Dict[str, Scenario]) -> List[Spec]:
    binders: dict = {}
    specs: Dict[str, Spec] = {}
    for ln in launches:
        key, sig, const, attrs, opts = specialise(ln, arch, binders)
        sp = specs.get(key)
        if sp is None:
            sp = specs[key] = Spec(key, ln.fn, sig, const, attrs, opts)
        if ln.group is None:
            sp.required = True
        else:
            sp.groups.add(ln.group)
        if ln.scenario not in sp.scenarios:
            sp.scenarios.append(ln.scenario)
            sp.aligned = sp.aligned and by_name[ln.scenario].aligned
    # a launch that repeats a tuning candidate (the tuner's pick) is that candidate
    for sp in specs.values():
        if sp.required and sp.groups:
            sp.required = False
    return list(specs.values())


def _tool(name: str) -> Optional[str]:
    import triton.backends.nvidia as nv  # Triton's own ptxas / cuobjdump live in its bin/
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else None


def resource_usage(cubin: bytes) -> dict:
    """Registers, static shared memory, stack (register spills) and local memory of the
    cubin's kernel (cuobjdump -res-usage)."""
    exe = _tool("cuobjdump")
    if exe is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([exe, "-res-usage", f.name], capture_output=True, text=True, timeout=120).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return {}
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), static_shared=int(m.group(3)), local=int(m.group(4)))


def _const(sp: Spec, name: str):
    names = list(sp.fn.arg_names)
    v = sp.constexprs.get((names.index(name),)) if name in names else None
    return getattr(v, "value", v)


def describe(sp: Spec) -> str:
    """Kernel, pointer dtype, constexpr flags that are on, tiling."""
    names = list(sp.fn.arg_names)
    ptr = next((t for t in sp.signature.values() if isinstance(t, str) and t.startswith("*")), "")
    flags, tile = [], []
    for (i,), v in sorted(sp.constexprs.items()):
        n, v = names[i], getattr(v, "value", v)
        if n.startswith("BLOCK_") or n in ("GROUP_M", "MIN_BM", "KH", "KW"):
            tile.append(f"{n.replace('BLOCK_', '')}={v}")
        elif v is True:
            flags.append(n)
    o = sp.options
    return (f"{sp.fn.__name__}[{ptr[1:]}] {' '.join(flags) or '-'} | {' '.join(tile)} "
            f"w{o.num_warps} s{o.num_stages}")


def check(sp: Spec, arch: int) -> dict:
    t0 = time.time()
    src = ASTSource(sp.fn, sp.signature, sp.constexprs, sp.attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=sp.options.__dict__)
    res = dict(seconds=round(time.time() - t0, 1), shared=int(ck.metadata.shared))
    res.update(resource_usage(ck.asm["cubin"]))
    problems, notes = [], []
    if res["shared"] > SMEM_LIMIT[arch]:
        problems.append(f"shared memory {res['shared']} B > {SMEM_LIMIT[arch]} B")
    regs = res.get("regs")
    if regs is None:
        notes.append("register count unknown (no cuobjdump)")
    else:
        threads = sp.options.num_warps * 32
        if regs > MAX_REGS or regs * threads > REGS_PER_BLOCK:
            problems.append(f"{regs} registers x {threads} threads")
        if res.get("stack") or res.get("local"):
            notes.append(f"spills: {res['stack']} B stack" + (f", {res['local']} B local" if res["local"] else ""))
    ptx = ck.asm["ptx"]
    ptr = next((t for t in sp.signature.values() if isinstance(t, str) and t.startswith("*")), "")
    sixteen = ptr in ("*bf16", "*fp16")
    if sp.fn.__name__ in CONV_KERNELS and sixteen and _const(sp, "DOT") and not (
            _const(sp, "DOT_UPCAST") or _const(sp, "DOT_F32")):
        # Hopper's wgmma (what Triton emits for a dot whose M is a multiple of 64, with
        # warp groups of 4 warps), else Ampere's mma.sync: a small tile gets the latter
        dot_m = _const(sp, DOT_M[sp.fn.__name__])
        wgmma = arch >= 90 and sp.options.num_warps % 4 == 0 and dot_m % 64 == 0
        mma = "wgmma" if wgmma else "mma.sync"
        res["mma"] = mma in ptx
        if mma not in ptx:
            problems.append(f"no {mma} instruction (16-bit tl.dot not on tensor cores)")
        elif arch >= 90 and not wgmma:
            notes.append(f"mma.sync, not wgmma (dot M {dot_m}, {sp.options.num_warps} warps)")
        if sp.options.num_stages > 1:
            res["cp_async"] = "cp.async" in ptx
            if "cp.async" not in ptx:
                if sp.aligned:
                    problems.append("loads not pipelined (no cp.async)")
                else:
                    notes.append("no cp.async (channels not 16-aligned)")
    res["problems"], res["notes"] = problems, notes
    return res


# ----------------------------------------------------------------------------- torch's mutation analysis
# What each kernel writes (its output pointers): torch.library.wrap_triton (the triton_op
# variant, fastres/_triton_ops.py) finds the written tensors by compiling the kernel to
# Triton IR; where that fails it warns and counts *every* tensor argument as written,
# which breaks AOTAutograd's partitioning (a backward input "mutated"). torch 2.11 marks
# every non-tensor argument constexpr for that compile, 2.12+ only the declared ones.
WRITES = {
    "_stats_kernel": {"pmean_ptr", "pm2_ptr", "pw_ptr", "psum_ptr"},
    "_stats_finalize": {"mean_ptr", "var_ptr", "scale_ptr"},
    "_act_kernel": {"y_ptr"},
    "_bwd_kernel": {"gx_ptr", "gz_ptr", "ps_dz_ptr", "ps_dzx_ptr"},
    "_bwd_finalize": {"gw_ptr", "gb_ptr", "coef_ptr"},
    "_conv_fwd_kernel": {"y_ptr", "pmean_ptr", "pm2_ptr"},
    "_dgrad_kernel": {"gx_ptr", "ps_dz_ptr", "ps_dzx_ptr"},
    "_wgrad_kernel": {"gw_ptr", "gb_ptr"},
}


class _DescribedDriver:
    """triton.runtime.driver's active driver for torch's TTIR generation without a GPU:
    only the target is asked for."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def mutations(launches: List[Launch]) -> int:
    """torch's identify_mutated_tensors on every distinct launch (kernel + constexprs +
    which pointers are given): no fallback, and the written set within WRITES."""
    import logging
    from torch._higher_order_ops import triton_kernel_wrap as W

    class Grab(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.n = 0

        def emit(self, record):
            msg = record.getMessage()
            self.n += "identify_mutated_tensors" in msg or "identify_accessed_tensors" in msg

    grab = Grab()
    log = logging.getLogger(W.__name__)
    log.addHandler(grab)
    cfg = triton.runtime.driver
    saved = cfg._active  # None without a GPU (reading .active would try to create a driver)
    cfg.set_active(_DescribedDriver(90))
    seen, failures, counts = set(), 0, {}
    try:
        for ln in launches:
            fn = ln.fn
            kwargs = dict(zip(fn.arg_names, ln.args))
            kwargs.update({k: v for k, v in ln.kwargs.items() if k in fn.arg_names})
            key = (fn.__name__, tuple(sorted((k, repr(v)) for k, v in kwargs.items()
                                             if not isinstance(v, torch.Tensor))))
            if key in seen:
                continue
            seen.add(key)
            before = grab.n
            tensors = {k for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            if hasattr(W, "identify_mutated_tensors"):  # torch <= 2.13
                written = set(W.identify_mutated_tensors(fn, kwargs, {}))
            else:  # torch 2.14: reads and writes
                acc = W.identify_accessed_tensors(fn, kwargs, {})
                written = {d.name for d in acc.read_writes.writes} & tensors
            problems = []
            if grab.n > before:
                problems.append("torch's analysis failed: every tensor counted as written")
            elif not written <= WRITES.get(fn.__name__, set()):
                problems.append(f"writes {sorted(written - WRITES.get(fn.__name__, set()))} beyond its outputs")
            elif not written:
                problems.append("writes nothing")
            counts[fn.__name__] = counts.get(fn.__name__, 0) + 1
            if problems:
                failures += 1
                print(f"FAIL mutations {fn.__name__} ({ln.scenario}): {'; '.join(problems)}; "
                      f"written {sorted(written)} of {sorted(tensors)}", flush=True)
    finally:
        log.removeHandler(grab)
        cfg._active = saved
    print(f"mutations: {sum(counts.values())} distinct launches "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), {failures} failure(s)")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="SM version(s), default 90 and 80")
    ap.add_argument("--quick", action="store_true", help="only the scenarios marked quick (CI's subset)")
    ap.add_argument("--kernel", action="append", help="only these kernels (function names)")
    ap.add_argument("--scenario", help="only scenarios whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the distinct compilations, compile nothing")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--mutations", action="store_true",
                    help="instead of compiling: torch's wrap_triton mutation analysis of every distinct launch "
                         "(the triton_op variant) must succeed and name only the kernel's outputs")
    a = ap.parse_args(argv)
    archs = a.arch or [90, 80]
    sel = [s for s in scenarios() if (s.quick or not a.quick) and (a.scenario is None or a.scenario in s.name)]
    t0 = time.time()
    launches = record(sel)
    if a.kernel:
        launches = [ln for ln in launches if ln.fn.__name__ in a.kernel]
    by_name = {s.name: s for s in sel}
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(sel)} scenarios, "
          f"{len(launches)} launches recorded in {time.time() - t0:.1f}s", flush=True)
    if a.mutations:
        bad = mutations(launches)
        print(f"{'FAILED' if bad else 'passed'}: {bad} failure(s) in {time.time() - t0:.0f}s")
        return 1 if bad else 0
    failures, results = 0, []
    for arch in archs:
        specs = distinct(select(launches, by_name, a.quick, arch), arch, by_name)
        print(f"== sm_{arch}: {len(specs)} distinct compilations", flush=True)
        group_ok: Dict[int, bool] = {}
        group_members: Dict[int, List[str]] = {}
        for sp in specs:
            what = describe(sp)
            if a.list:
                print(f"     {what}   <- {sp.scenarios[0]}" + (f" (+{len(sp.scenarios) - 1})"
                                                               if len(sp.scenarios) > 1 else ""))
                results.append(dict(arch=arch, kernel=sp.fn.__name__, what=what, scenarios=sp.scenarios,
                                    signature={k: str(v) for k, v in sp.signature.items()},
                                    required=sp.required, candidate=bool(sp.groups)))
                continue
            try:
                r = check(sp, arch)
                err = "; ".join(r["problems"])
            except Exception as e:  # noqa: BLE001 - report every failure
                r = dict(problems=[f"{type(e).__name__}: {str(e)[:3000]}"], notes=[])
                err = r["problems"][0]
            ok = not r["problems"]
            for gid in sp.groups:
                group_ok[gid] = group_ok.get(gid, False) or ok
                group_members.setdefault(gid, []).append(what)
            hard = not ok and sp.required
            failures += hard
            status = "ok  " if ok else ("FAIL" if hard else "skip")
            figs = (f"regs {r.get('regs', '?')}, smem {r.get('shared', '?')} B"
                    + (f", {r['seconds']}s" if "seconds" in r else ""))
            extra = "; ".join(([err] if err else []) + r["notes"])
            print(f"{status} sm_{arch} {what}: {figs}" + (f"; {extra}" if extra else "")
                  + ("" if ok or hard else " (autotuning candidate: not fatal while one of its tuning run passes)"), flush=True)
            results.append(dict(arch=arch, kernel=sp.fn.__name__, what=what, status=status.strip(),
                                scenarios=sp.scenarios, **{k: v for k, v in r.items()}))
        for gid, ok in sorted(group_ok.items()):
            if not ok:
                failures += 1
                print(f"FAIL sm_{arch}: no candidate of an autotuning group compiles: {group_members[gid]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, results=results), f, indent=1)
    if not a.list:
        print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s), {len(results)} compilations "
              f"in {time.time() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
