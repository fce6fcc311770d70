"""``python -m fastres check``: parity self-check of every backend available here.

What a user runs right after installing. For each backend that can run on the device
(Triton's CPU interpreter: the op cases only — it is far too slow for whole networks),
each dtype the device supports (CPU: fp64, fp32, bf16; GPU: fp32, bf16, fp16) and each
case —

* ops:    ``fastres.functional.batch_norm_act`` (train, NCHW and NHWC, with residual;
          eval, NHWC) against ``F.batch_norm`` + add + ReLU: output, every gradient,
          running_mean / running_var;
* blocks: a BasicBlock (resnet18 ``layer2[0]``) and a Bottleneck (resnet50
          ``layer2[0]``), train and eval, against the torchvision block with the same
          state_dict: output, input and parameter gradients, running statistics;
* models: resnet50 in train and eval mode against torchvision's resnet50 with the
          same state_dict (channels_last),
* convs:  ``fastres.functional.conv2d_act`` for each conv family that runs here (``aten``:
          ``FASTRES_CONV=aten``; ``triton``: ``FASTRES_CONV=fused``, the Triton kernels —
          on the CPU only under ``TRITON_INTERPRET=1``, where its cases are tiny) on
          three shape classes — 1x1 with the BN+ReLU prologue, 3x3 stride 2 with prologue,
          bias and ReLU epilogue, the 7x7 stride-2 stem (C=3) — against ``F.conv2d`` and
          the prologue/epilogue as torch ops: output, per-channel mean / biased variance,
          the gradients of x, weight, bias, in_scale, in_shift (through y and the stats);
          the backend column names the conv family,

(in eval, blocks and models compare the output, the input gradient and the conv / fc
weight gradients, not the BN parameter gradients: fastres folds BN into the conv in
eval, so those come from a differently — and worse — conditioned sum over the folded
weight's gradient; the op cases check BN parameter gradients in eval directly)

— the worst relative error (normwise, ||ours - ref|| / ||ref||, per tensor, worst over
the tensors of a group: out, grad, stats) is measured against a float64 torch reference.
Tolerance: fp64 a fixed 1e-9; fp32 / bf16 / fp16 ``2 × torch's own error in that dtype
+ floor`` (floor 1e-5 for fp32, 1e-3 for bf16 / fp16), per group; the gradients of the
block / model cases get a floor of 1e-2 (fp32) / 5e-2 (bf16, fp16) instead, because a
deep net's gradients jump when a ReLU mask flips at rounding level (torch's own fp32
resnet50 input gradient moves by ~1e-2 under a 1e-7 input perturbation). bf16/fp16 run under
autocast with fp32 parameters, as in mixed-precision training. On a GPU the whole check
runs with TF32 off (cuDNN convolutions, cuBLAS matmuls; restored after), so torch's own
fp32 error, and with it the fp32 tolerance, is IEEE fp32's. Exit status 1 when any
case fails or errors.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = {"fp64": 1e-9, "fp32": 1e-5, "bf16": 1e-3, "fp16": 1e-3}
# Gradients through a deep net are ill-conditioned: a pre-activation that rounds to the
# other side of zero flips a ReLU mask, and every gradient below it moves. torch's own
# fp32 resnet50 input gradient moves by ~1e-2 under a 1e-7 relative input perturbation.
# So the gradient groups of block / model cases get this floor instead.
NET_GRAD_FLOOR = {"fp64": 1e-9, "fp32": 1e-2, "bf16": 5e-2, "fp16": 5e-2}
DEFAULT_DTYPES = {"cpu": ("fp64", "fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
CASE_KINDS = ("ops", "blocks", "models", "convs")

Result = Dict[str, torch.Tensor]


@dataclass
class Row:
    backend: str
    case: str
    dtype: str
    status: str                    # PASS | FAIL | SKIP | ERROR
    worst_rel_err: Optional[float] = None
    tolerance: Optional[float] = None
    where: str = ""                # the tensor group (and tensor) of the worst error / the reason
    seconds: float = 0.0


# ============================================================================ error metric
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ||a - b||_2 / ||b||_2 (inf on a shape or NaN/inf mismatch).

    Normwise rather than elementwise-max: a ReLU whose input rounds to the other side
    of zero flips one element of a gradient by its full value in any dtype, which
    says nothing about the kernels; a wrong kernel moves the norm."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    fin_a, fin_b = torch.isfinite(a64), torch.isfinite(b64)
    if not torch.equal(fin_a, fin_b):
        return math.inf
    if not fin_b.all() and not torch.equal(a64[~fin_b].nan_to_num(), b64[~fin_b].nan_to_num()):
        return math.inf
    a64, b64 = a64[fin_b], b64[fin_b]
    if a64.numel() == 0:
        return 0.0
    scale = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / scale if scale > 0 else diff


def group_of(name: str) -> str:
    return name.split(":", 1)[0]


def group_errors(res: Result, ref: Result) -> Dict[str, Tuple[float, str]]:
    """{group: (worst rel err, tensor name)} over the tensors of each group."""
    out: Dict[str, Tuple[float, str]] = {}
    missing = set(ref) ^ set(res)
    for name in sorted(set(ref) & set(res)):
        e = rel_err(res[name], ref[name])
        g = group_of(name)
        if g not in out or e > out[g][0]:
            out[g] = (e, name)
    for name in missing:
        out[group_of(name)] = (math.inf, f"{name} missing")
    return out


def judge(dtype: str, ours: Result, theirs: Optional[Result], hi: Result,
          net: bool = False) -> Tuple[bool, float, float, str]:
    """(passed, worst err, its tolerance, where). Per group: ours <= tol where
    tol = FLOOR (fp64) or 2*theirs + FLOOR; for the grad group of a block / model case
    (``net``) the floor is NET_GRAD_FLOOR."""
    e_ours = group_errors(ours, hi)
    e_theirs = group_errors(theirs, hi) if theirs is not None else {}
    worst = None  # (ratio, err, tol, where)
    passed = True
    for g, (e, name) in e_ours.items():
        floor = NET_GRAD_FLOOR[dtype] if (net and g == "grad") else FLOOR[dtype]
        tol = floor if dtype == "fp64" or g not in e_theirs else 2.0 * e_theirs[g][0] + floor
        if not math.isfinite(tol):
            tol = floor
        ok = e <= tol
        passed &= ok
        ratio = e / tol if tol > 0 else math.inf
        if worst is None or ratio > worst[0] or (not math.isfinite(ratio)):
            worst = (ratio, e, tol, name)
    if worst is None:
        return True, 0.0, FLOOR[dtype], ""
    return passed, worst[1], worst[2], worst[3]


# ============================================================================ implementations
@dataclass(frozen=True)
class Impl:
    """Who computes: ``torch`` in ``compute`` dtype (the reference), or fastres on ``backend``."""
    kind: str               # "torch" | "fastres"
    dtype: str              # the dtype being checked ("fp64" for the hi reference)
    backend: Optional[str] = None


def _ctx(impl: Impl, device: torch.device):
    import fastres
    stack = contextlib.ExitStack()
    if impl.kind == "fastres":
        stack.enter_context(fastres.use_backend(impl.backend))
    if impl.dtype in ("bf16", "fp16"):
        stack.enter_context(torch.autocast(device_type=device.type, dtype=DTYPES[impl.dtype]))
    return stack


def _param_dtype(dtype: str) -> torch.dtype:
    """Parameters / buffers: fp64 or fp32 (fp32 master copy under autocast)."""
    return torch.float64 if dtype == "fp64" else torch.float32


def _gen(shape, seed, device, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(device)


# ---------------------------------------------------------------------------- op cases
def _op_case(train: bool, layout: str, residual: bool, shape=(4, 65, 9, 11)):
    def run(impl: Impl, device: torch.device, seed: int) -> Result:
        from fastres import functional as FF
        n, c, h, w = shape
        act_dt = DTYPES[impl.dtype]
        p_dt = _param_dtype(impl.dtype)
        fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        x = _gen(shape, seed, device, 2.0, 0.5).to(act_dt).contiguous(memory_format=fmt).requires_grad_(True)
        z = (_gen(shape, seed + 1, device).to(act_dt).contiguous(memory_format=fmt).requires_grad_(True)
             if residual else None)
        wt = (_gen((c,), seed + 2, device, 0.3, 1.0)).to(p_dt).requires_grad_(True)
        bs = (_gen((c,), seed + 3, device, 0.3)).to(p_dt).requires_grad_(True)
        rm = _gen((c,), seed + 4, device, 0.2).to(p_dt)
        rv = (_gen((c,), seed + 5, device, 0.2).abs() + 0.5).to(p_dt)
        gy = _gen(shape, seed + 6, device).to(act_dt).contiguous(memory_format=fmt)
        if impl.kind == "torch":
            y = F.batch_norm(x, rm, rv, wt, bs, train, 0.1, 1e-5)
            if z is not None:
                y = y + z
            y = torch.relu(y)
        else:
            with _ctx(impl, device):
                y = FF.batch_norm_act(x, rm, rv, wt, bs, train, 0.1, 1e-5, residual=z, activation="relu")
        y.backward(gy)
        out = {"out:y": y, "grad:x": x.grad, "grad:weight": wt.grad, "grad:bias": bs.grad}
        if z is not None:
            out["grad:residual"] = z.grad
        if train:
            out["stats:running_mean"], out["stats:running_var"] = rm, rv
        if impl.kind == "fastres" and y.dtype != act_dt:
            out["out:dtype"] = torch.tensor(float("nan"))  # wrong output dtype: mark a mismatch
        if impl.kind == "fastres" and layout == "NHWC" and not y.is_contiguous(memory_format=torch.channels_last):
            out["out:memory_format"] = torch.tensor(float("nan"))
        return {k: v.detach() for k, v in out.items()}
    return run


# ---------------------------------------------------------------------------- conv2d_act cases
# name: (N, C, H, W, K, R, stride, padding, prologue, bias + ReLU epilogue)
CONV_CASES = {
    "1x1 prologue": (2, 24, 7, 9, 40, 1, 1, 0, True, False),
    "3x3 s2 prologue+bias+relu": (2, 16, 9, 8, 24, 3, 2, 1, True, True),
    "7x7 s2 stem C=3": (2, 3, 15, 13, 16, 7, 2, 3, False, False),
}
CONV_FAMILIES = ("aten", "triton")


def conv_families(device: torch.device) -> Tuple[List[str], List[str]]:
    """The conv families to check on ``device`` (aten always; triton where it runs)."""
    from . import backends as B
    ok, why = B.available("triton", device.type)
    return (["aten", "triton"], []) if ok else (["aten"], [f"conv family 'triton' not checked: {why}"])


def _conv_case(n, c, h, w, k, r, stride, pad, prologue, epilogue):
    def run(impl: Impl, device: torch.device, seed: int) -> Result:
        import fastres
        from fastres.functional import conv2d_act
        dt = DTYPES[impl.dtype]
        acc = torch.float64 if dt == torch.float64 else torch.float32
        cl = torch.channels_last
        x = _gen((n, c, h, w), seed, device, 1.0, 0.2).to(dt).contiguous(memory_format=cl).requires_grad_(True)
        wt = _gen((k, c, r, r), seed + 1, device, (c * r * r) ** -0.5).to(dt).requires_grad_(True)
        b = _gen((k,), seed + 2, device, 0.1).to(acc).requires_grad_(True) if epilogue else None
        sc = (_gen((c,), seed + 3, device, 0.3, 1.0).to(acc).requires_grad_(True)) if prologue else None
        sh = (_gen((c,), seed + 4, device, 0.3).to(acc).requires_grad_(True)) if prologue else None
        # The backward runs inside the conv choice too: conv2d_act's autograd picks its
        # backward kernels (the Triton dgrad/wgrad under "fused") when it runs.
        conv = contextlib.nullcontext() if impl.kind == "torch" else \
            fastres.use_conv("fused" if impl.backend == "triton" else "aten")
        with conv:
            if impl.kind == "torch":
                u = torch.relu(x.to(acc) * sc[None, :, None, None] + sh[None, :, None, None]).to(dt) if prologue else x
                z = F.conv2d(u, wt, None, stride, pad)
                if epilogue:
                    z = torch.relu(z.to(acc) + b[None, :, None, None]).to(dt)
                y = z.contiguous(memory_format=cl)
                var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), unbiased=False)
            else:
                y, mean, var = conv2d_act(x, wt, b, stride, pad, in_scale=sc, in_shift=sh, in_relu=prologue,
                                          activation="relu" if epilogue else "none", stats="moments")
            gy = _gen(tuple(y.shape), seed + 5, device).to(dt)
            gm = _gen((k,), seed + 6, device).to(acc)
            gv = _gen((k,), seed + 7, device).to(acc)
            ((y.to(acc) * gy.to(acc)).sum() + (mean * gm).sum() + (var * gv).sum()).backward()
        out = {"out:y": y, "stats:mean": mean, "stats:var": var, "grad:x": x.grad, "grad:weight": wt.grad}
        for name, t in (("bias", b), ("in_scale", sc), ("in_shift", sh)):
            if t is not None:
                out[f"grad:{name}"] = t.grad
        if impl.kind == "fastres" and (y.dtype != dt or not y.is_contiguous(memory_format=cl)):
            out["out:dtype_or_format"] = torch.tensor(float("nan"))  # wrong dtype / memory format: a mismatch
        return {key: v.detach().cpu() for key, v in out.items()}
    return run


# ---------------------------------------------------------------------------- block / model cases
class _Nets:
    """Builds (and caches) the torchvision nets, with randomised BN state, and their
    fastres twins loaded from the same state_dict."""

    def __init__(self):
        self._state: Dict[str, Dict[str, torch.Tensor]] = {}
        self._bn: Dict[str, set] = {}

    def bn_params(self, arch: str) -> set:
        """Names of the BatchNorm parameters (identical in the fastres twin)."""
        self.state(arch)
        return self._bn[arch]

    def state(self, arch: str) -> Dict[str, torch.Tensor]:
        if arch not in self._state:
            import torchvision
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                m = getattr(torchvision.models, arch)(weights=None)
                with torch.no_grad():
                    for mod in m.modules():
                        if isinstance(mod, torch.nn.BatchNorm2d):
                            c = mod.num_features
                            mod.weight.copy_(torch.rand(c) * 0.5 + 0.75)
                            mod.bias.copy_(torch.randn(c) * 0.1)
                            mod.running_mean.copy_(torch.randn(c) * 0.1)
                            mod.running_var.copy_(torch.rand(c) * 0.5 + 0.75)
                            mod.num_batches_tracked.fill_(5)
            self._bn[arch] = {f"{mn}.{pn}" for mn, mod in m.named_modules()
                              if isinstance(mod, torch.nn.BatchNorm2d) for pn, _ in mod.named_parameters()}
            self._state[arch] = {k: v.clone() for k, v in m.state_dict().items()}
        return self._state[arch]

    def build(self, arch: str, fastres_model: bool) -> torch.nn.Module:
        if fastres_model:
            from .bench import fastres_builder
            m = fastres_builder(arch, 1000)()
        else:
            import torchvision
            m = getattr(torchvision.models, arch)(weights=None)
        m.load_state_dict(self.state(arch), strict=True)
        return m


def _net_case(nets: _Nets, arch: str, sub: Optional[str], train: bool, in_shape: Tuple[int, ...]):
    """sub: None (the whole model) or a dotted path such as 'layer2.0' (a block)."""

    def run(impl: Impl, device: torch.device, seed: int) -> Result:
        full = nets.build(arch, impl.kind == "fastres")
        net = full.get_submodule(sub) if sub else full
        net = net.to(device=device, dtype=_param_dtype(impl.dtype), memory_format=torch.channels_last)
        net.train(train)
        x = _gen(in_shape, seed, device).to(_param_dtype(impl.dtype))
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with _ctx(impl, device):
            y = net(x)
        gy = _gen(tuple(y.shape), seed + 1, device).to(y.dtype)
        y.backward(gy)
        out = {"out:y": y, "grad:input": x.grad}
        prefix = f"{sub}." if sub else ""
        skip = set() if train else {n[len(prefix):] for n in nets.bn_params(arch) if n.startswith(prefix)}
        for name, p in net.named_parameters():
            if name in skip:  # eval: fastres folds BN into the conv; see the module docstring
                continue
            out[f"grad:{name}"] = p.grad if p.grad is not None else torch.full((1,), float("nan"))
        if train:
            for name, b in net.named_buffers():
                if name.endswith("num_batches_tracked"):
                    out[f"stats:{name}"] = b.double()
                elif name.endswith(("running_mean", "running_var")):
                    out[f"stats:{name}"] = b
        return {k: v.detach().cpu() for k, v in out.items()}
    return run


def build_cases(device: torch.device, kinds) -> List[Tuple[str, str, Callable]]:
    """[(kind, name, run)]."""
    cases = []
    if "ops" in kinds:
        cases += [("ops", "op bn+add+relu train NCHW", _op_case(True, "NCHW", True)),
                  ("ops", "op bn+add+relu train NHWC", _op_case(True, "NHWC", True)),
                  ("ops", "op bn+relu eval NHWC", _op_case(False, "NHWC", False))]
    nets = _Nets()
    big = device.type == "cuda"
    if "blocks" in kinds:
        bshape = (8, 64, 28, 28) if big else (4, 64, 16, 16)
        kshape = (8, 256, 28, 28) if big else (4, 256, 16, 16)
        cases += [("blocks", "block basic train (resnet18 layer2.0)", _net_case(nets, "resnet18", "layer2.0", True, bshape)),
                  ("blocks", "block basic eval (resnet18 layer2.0)", _net_case(nets, "resnet18", "layer2.0", False, bshape)),
                  ("blocks", "block bottleneck train (resnet50 layer2.0)", _net_case(nets, "resnet50", "layer2.0", True, kshape)),
                  ("blocks", "block bottleneck eval (resnet50 layer2.0)", _net_case(nets, "resnet50", "layer2.0", False, kshape))]
    if "models" in kinds:
        mshape = (8, 3, 96, 96) if big else (4, 3, 64, 64)
        cases += [("models", f"resnet50 train {mshape[0]}x{mshape[2]}px", _net_case(nets, "resnet50", None, True, mshape)),
                  ("models", f"resnet50 eval {mshape[0]}x{mshape[2]}px", _net_case(nets, "resnet50", None, False, mshape))]
    if "convs" in kinds:
        cases += [("convs", f"conv2d_act {name}", _conv_case(*shape)) for name, shape in CONV_CASES.items()]
    return cases


# ============================================================================ driver
def backends_to_check(spec: str, device: torch.device) -> Tuple[List[str], List[str]]:
    import fastres
    from . import backends as B
    if spec == "auto":
        return [fastres.backend_for(device)], []
    wanted = list(B.BACKENDS) if spec in ("all", "none") else spec.split(",")
    run, notes = [], []
    for b in wanted:
        ok, why = B.available(b, device.type)
        if ok:
            run.append(b)
        else:
            notes.append(f"backend {b!r} not checked: {why}")
    return run, notes


def _fastres_models_missing() -> Optional[str]:
    from .bench import Unavailable, fastres_builder
    try:
        fastres_builder("resnet50", 1000)
        fastres_builder("resnet18", 1000)
    except Unavailable as e:
        return str(e)
    return None


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """fp32 as IEEE fp32 on a CUDA device: TF32 off for cuDNN convolutions (on by default
    in torch) and cuBLAS matmuls while the check runs, restored after. With TF32, torch's
    own "fp32" error is TF32's (~1e-3), and the fp32 tolerance (2x that + 1e-5) would pass
    a fastres kernel three orders of magnitude less accurate than fp32."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def run_check(device: torch.device, backends_spec: str = "all", kinds=CASE_KINDS, dtypes=None, seed: int = 0,
              verbose: bool = False, log=print) -> Tuple[List[Row], List[str]]:
    with _ieee_fp32(device):
        rows, notes = _run_check(device, backends_spec, kinds, dtypes, seed, verbose, log)
    if device.type == "cuda":
        notes.append("TF32 was off for cuDNN and cuBLAS during the check: fp32 is IEEE fp32, torch's reference too")
    return rows, notes


def _run_check(device: torch.device, backends_spec: str, kinds, dtypes, seed: int, verbose: bool,
               log) -> Tuple[List[Row], List[str]]:
    from . import backends as B
    dtypes = list(dtypes or DEFAULT_DTYPES.get(device.type, ("fp32",)))
    run_b, notes = backends_to_check(backends_spec, device)
    cases = build_cases(device, kinds)
    conv_fams, conv_notes = conv_families(device) if "convs" in kinds else ([], [])
    notes += conv_notes
    missing = _fastres_models_missing() if any(k != "ops" for k, _, _ in cases) else None
    interp = device.type == "cpu" and B.triton_interpret()
    rows: List[Row] = []
    hi_cache: Dict[str, Result] = {}
    theirs_cache: Dict[Tuple[str, str], Result] = {}

    def hi(name, fn):
        if name not in hi_cache:
            try:
                hi_cache[name] = fn(Impl("torch", "fp64"), device, seed)
            except (RuntimeError, TypeError) as e:  # no fp64 on this device: fp64 on the CPU
                if device.type == "cpu":
                    raise
                notes.append(f"{name}: float64 reference on the CPU ({type(e).__name__})")
                hi_cache[name] = fn(Impl("torch", "fp64"), torch.device("cpu"), seed)
        return hi_cache[name]

    # the BN backends run the ops / blocks / models cases; the conv families the conv cases
    plan = [(b, [c for c in cases if c[0] != "convs"]) for b in run_b]
    plan += [(f, [c for c in cases if c[0] == "convs"]) for f in conv_fams]
    for b, b_cases in plan:
        for kind, name, fn in b_cases:
            for dt in dtypes:
                t0 = time.perf_counter()
                if kind not in ("ops", "convs") and missing:
                    rows.append(Row(b, name, dt, "SKIP", where=missing))
                    continue
                if kind not in ("ops", "convs") and b == "triton" and interp:
                    rows.append(Row(b, name, dt, "SKIP", where="Triton CPU interpreter: op cases only"))
                    continue
                try:
                    ref = hi(name, fn)
                    theirs = None
                    if dt != "fp64":
                        if (name, dt) not in theirs_cache:
                            theirs_cache[(name, dt)] = fn(Impl("torch", dt), device, seed)
                        theirs = theirs_cache[(name, dt)]
                    ours = fn(Impl("fastres", dt, b), device, seed)
                    ok, err, tol, where = judge(dt, ours, theirs, ref, net=kind not in ("ops", "convs"))
                    row = Row(b, name, dt, "PASS" if ok else "FAIL", err, tol, where)
                except Exception as e:  # a crash is a failure of that case, not of the tool
                    msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    row = Row(b, name, dt, "ERROR", where=msg)
                    if verbose:
                        traceback.print_exc()
                row.seconds = time.perf_counter() - t0
                rows.append(row)
                if verbose:
                    log(format_row(row))
    return rows, notes


def format_row(r: Row) -> str:
    err = "—" if r.worst_rel_err is None else f"{r.worst_rel_err:.2e}"
    tol = "—" if r.tolerance is None else f"{r.tolerance:.2e}"
    return f"{r.backend:<7} {r.case:<44} {r.dtype:<5} {r.status:<5} {err:>10} {tol:>10}  {r.where}"


def format_table(rows: List[Row], notes: List[str], device: torch.device) -> str:
    import fastres
    from .bench import device_name
    lines = [f"fastres check — device {device} ({device_name(device)}); fastres {fastres.__version__}, "
             f"torch {torch.__version__}",
             "worst rel err = ||ours - ref|| / ||ref|| (per tensor, worst of out/grad/stats) against a float64 torch reference; "
             "tolerance: fp64 1e-9, else 2x torch's own error in that dtype + floor (1e-5 fp32, 1e-3 bf16/fp16; "
             "gradients of blocks/models: 1e-2 fp32, 5e-2 bf16/fp16 — ReLU mask flips at rounding level)",
             "",
             f"{'backend':<7} {'case':<44} {'dtype':<5} {'result':<5} {'worst err':>10} {'tolerance':>10}  where",
             "-" * 100]
    lines += [format_row(r) for r in rows]
    n = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    lines.append("")
    for note in notes:
        lines.append(f"note: {note}")
    verdict = "OK" if n["FAIL"] == 0 and n["ERROR"] == 0 else "FAILED"
    lines.append(f"{verdict}: {n['PASS']} passed, {n['FAIL'] + n['ERROR']} failed, {n['SKIP']} skipped")
    return "\n".join(lines)


def main_from_args(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kinds = [k.strip() for k in args.cases.split(",") if k.strip()]
    bad = [k for k in kinds if k not in CASE_KINDS]
    if bad:
        print(f"fastres check: unknown case kind(s) {bad}; use {', '.join(CASE_KINDS)}", file=sys.stderr)
        return 2
    dtypes = None
    if args.dtype:
        dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            print(f"fastres check: unknown dtype(s) {bad}; use {', '.join(DTYPES)}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    rows, notes = run_check(device, args.backend, kinds, dtypes, args.seed, args.verbose)
    print(format_table(rows, notes, device))
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": str(device), "rows": [asdict(r) for r in rows], "notes": notes}, f, indent=2)
    if not rows:
        print("fastres check: nothing was checked", file=sys.stderr)
        return 1
    return 0 if all(r.status in ("PASS", "SKIP") for r in rows) else 1
