"""Distributed training (issue 12): the fused SyncBatchNorm and DistributedDataParallel.

Two processes (torch.multiprocessing, gloo on 127.0.0.1), each holding part of a batch,
must give the outputs, gradients and running statistics of one process holding the
whole batch — halves (4+4), uneven parts (3+5) and a rank with no sample (0+8) — for
``SyncBatchNormAct2d`` (residual + ReLU), a block and resnet18; a DDP step of fastres's
resnet18 equals torchvision's. ``examples/train.py`` runs under torchrun. The CUDA cases
(gloo with CUDA tensors against torch's own ``nn.SyncBatchNorm``; NCCL) carry the
``gpu`` marker.

torch's ``nn.SyncBatchNorm`` refuses CPU tensors (its statistics ops have no CPU
kernel), so on the CPU the synchronised reference is the mathematically identical one:
torchvision's model on the whole batch in one process.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastres
from fastres import backends
from fastres.nn import BatchNormAct2d, SyncBatchNormAct2d, convert_sync_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")


# ============================================================================ process plumbing
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ERRORS: list = []  # a worker's failed checks: recorded, not raised, so the ranks' collectives stay in step


def _expect(ok, msg):
    if not ok:
        _ERRORS.append(msg)


def _entry(rank, world, port, backend, device, fn, args):
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(0 if backend == "gloo" else rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a desync fails instead of hanging
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args, world=2, backend="gloo", device="cpu"):
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes (ProcessRaisedException
    carries a failing rank's traceback)."""
    ctx = mp.spawn(_entry, args=(world, _free_port(), backend, device, fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + 900
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:  # a guard against a hang, not a timing assertion
            for p in ctx.processes:
                p.kill()
            raise RuntimeError("distributed workers did not finish")


def _raise_errors():
    if _ERRORS:
        errs, _ERRORS[:] = list(_ERRORS), []
        raise AssertionError("\n".join(errs))


def _part(parts, rank):
    lo = sum(parts[:rank])
    return slice(lo, lo + parts[rank])


def _close(actual, expected, name, tol=1e-9):
    """Record (see _ERRORS) whether ``actual`` matches ``expected`` to ``tol`` (relative to max |expected|, >= 1)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        _ERRORS.append(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
        return
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
    _expect(err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:g} x {scale:.3g}")


def _summed(t):
    """The sum over the ranks (a local parameter gradient → the whole batch's)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _cpu_backends():
    return [b for b in ("torch", "cpp", "triton") if backends.available(b, "cpu")[0]] + ["reference_ops"]


def _use(backend):
    from conftest import run_on  # the test-only reference_ops family needs conftest's patching
    return run_on(backend)


# ============================================================================ SyncBatchNormAct2d
def _bn_act_cases(rank, world, backend_names, device):
    torch.manual_seed(0)
    n, c, h, w = 8, 5, 3, 4
    for backend in backend_names:
        for parts in ((4, 4), (3, 5), (0, 8)):
            for momentum, layout in ((0.1, torch.contiguous_format), (None, torch.channels_last)):
                with _use(backend):
                    _one_bn_act_case(rank, parts, momentum, layout, device, (n, c, h, w), f"{backend} {parts} "
                                     f"momentum={momentum} {layout}")


def _one_bn_act_case(rank, parts, momentum, layout, device, shape, tag):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(1)
    ref = nn.BatchNorm2d(c, momentum=momentum, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(c, generator=g, dtype=F64) + 0.5)
        ref.bias.copy_(torch.randn(c, generator=g, dtype=F64))
        ref.running_mean.copy_(torch.randn(c, generator=g, dtype=F64))
        ref.running_var.copy_(torch.rand(c, generator=g, dtype=F64) + 0.5)
    ref = ref.to(device)
    ours = convert_sync_batchnorm(BatchNormAct2d.from_batchnorm(copy.deepcopy(ref), "relu"))
    _expect(type(ours) is SyncBatchNormAct2d and ours.activation == "relu", f"{tag}: converted to {ours!r}")
    sl = _part(parts, rank)
    for step in range(2):  # two steps: running statistics (and momentum=None's average) carry over
        x = (torch.randn(n, c, h, w, generator=g, dtype=F64) * 3 + 5).to(device, memory_format=layout)
        res = torch.randn(n, c, h, w, generator=g, dtype=F64).to(device)
        gy = torch.randn(n, c, h, w, generator=g, dtype=F64).to(device)
        xf, rf = x.clone().requires_grad_(), res.clone().requires_grad_()
        yf = torch.relu(ref(xf) + rf)
        (yf * gy).sum().backward()
        xr, rr = x[sl].clone().requires_grad_(), res[sl].clone().requires_grad_()
        y = ours(xr, rr)
        (y * gy[sl]).sum().backward()
        t = f"{tag} step {step}"
        _close(y, yf[sl], f"{t}: output")
        _close(xr.grad, xf.grad[sl], f"{t}: grad input")
        _close(rr.grad, rf.grad[sl], f"{t}: grad residual")
        _close(_summed(ours.weight.grad), ref.weight.grad, f"{t}: grad weight (summed over ranks)")
        _close(_summed(ours.bias.grad), ref.bias.grad, f"{t}: grad bias (summed over ranks)")
        _close(ours.running_mean, ref.running_mean, f"{t}: running_mean")
        _close(ours.running_var, ref.running_var, f"{t}: running_var (unbiased, global count)")
        _expect(ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1,
                f"{t}: num_batches_tracked {ours.num_batches_tracked.item()}")
        ours.weight.grad = ours.bias.grad = None
        ref.weight.grad = ref.bias.grad = None


def _low_precision_cases(rank, world, backend_names):
    """bf16 input (fp32 parameters, as under autocast), 3+5: error against the fp64 whole
    batch <= 2x that of PyTorch's own bf16 BatchNorm (+ a floor), tests/parity.py's rule."""
    from parity import assert_close_dtype
    g = torch.Generator().manual_seed(7)
    n, c, h, w = 8, 6, 5, 3
    parts = (3, 5)
    sl = _part(parts, rank)
    x64 = torch.randn(n, c, h, w, generator=g, dtype=F64) * 2 + 1
    res64 = torch.randn(n, c, h, w, generator=g, dtype=F64)
    gy64 = torch.randn(n, c, h, w, generator=g, dtype=F64)
    results = {}
    for dtype, label in ((torch.float64, "hi"), (torch.bfloat16, "low")):  # PyTorch's own, whole batch
        bn = nn.BatchNorm2d(c, dtype=F64 if dtype == F64 else torch.float32)
        xf, rf = x64.to(dtype).clone().requires_grad_(), res64.to(dtype).clone().requires_grad_()
        y = torch.relu(bn(xf) + rf)
        (y * gy64.to(dtype)).sum().backward()
        results[label] = dict(y=y[sl], gx=xf.grad[sl], gr=rf.grad[sl], gw=bn.weight.grad, gb=bn.bias.grad,
                              rv=bn.running_var, rm=bn.running_mean)
    for backend in backend_names:
        with _use(backend):
            ours = SyncBatchNormAct2d(c)
            xr, rr = x64[sl].to(torch.bfloat16).requires_grad_(), res64[sl].to(torch.bfloat16).requires_grad_()
            y = ours(xr, rr)
            (y * gy64[sl].to(torch.bfloat16)).sum().backward()
            got = dict(y=y, gx=xr.grad, gr=rr.grad, gw=_summed(ours.weight.grad), gb=_summed(ours.bias.grad),
                       rv=ours.running_var, rm=ours.running_mean)
            for k, v in got.items():
                try:
                    assert_close_dtype(v, None, torch.bfloat16, f"bf16 {backend}: {k}",
                                       ref_low=results["low"][k], ref_hi=results["hi"][k])
                except AssertionError as e:
                    _ERRORS.append(str(e))


def test_sync_bn_act_bf16(dist_results):
    _check(dist_results, "bf16")


def _compile_case(rank, world):
    """torch.compile(fullgraph=True, aot_eager) of a converted block traces the collectives
    and gives the eager results."""
    torch.manual_seed(0)
    m = convert_sync_batchnorm(fastres.BasicBlock(4, 4)).train().to(F64)
    m2 = copy.deepcopy(m)
    x = torch.randn(2 + rank, 4, 6, 6, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = m(xa)
    ya.sum().backward()
    try:
        yb = torch.compile(m2, backend="aot_eager", fullgraph=True)(xb)
        yb.sum().backward()
    except Exception:  # noqa: BLE001
        _ERRORS.append("torch.compile(fullgraph=True) failed:\n" + traceback.format_exc()[-2000:])
        return
    _close(yb, ya, "compiled output")
    _close(xb.grad, xa.grad, "compiled grad input")
    for (k, a), b in zip(m.named_buffers(), m2.buffers()):
        _close(b, a, f"compiled {k}")


def test_sync_bn_compiles_fullgraph(dist_results):
    _check(dist_results, "compile")


def test_sync_bn_act_matches_whole_batch(dist_results):
    """SyncBatchNormAct2d (+residual, ReLU) on 4+4, 3+5 and 0+8 samples, every CPU backend,
    NCHW and channels_last, momentum 0.1 and None: outputs, input/residual/weight/bias
    gradients and running statistics of nn.BatchNorm2d on the whole batch."""
    _check(dist_results, "bn_act")


def _subgroup_case(rank, world):
    """A process group of one rank (and none at all) behaves as BatchNormAct2d."""
    groups = [dist.new_group([r], backend="gloo") for r in range(world)]  # every rank creates every group
    torch.manual_seed(rank)
    plain = BatchNormAct2d(3, dtype=F64)
    ours = SyncBatchNormAct2d.from_batchnorm(copy.deepcopy(plain), "relu", process_group=groups[rank])
    x = torch.randn(2 + rank, 3, 4, 4, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), ours(xb)
    ya.sum().backward()
    yb.sum().backward()
    _close(yb, ya, "output", 0.0)
    _close(xb.grad, xa.grad, "grad input", 0.0)
    _close(ours.running_var, plain.running_var, "running_var", 0.0)
    # eval mode without running statistics normalises with the local batch, unsynchronised (nn.SyncBatchNorm's rule)
    local = BatchNormAct2d(3, track_running_stats=False, dtype=F64).eval()
    world_bn = SyncBatchNormAct2d.from_batchnorm(copy.deepcopy(local), "relu").eval()
    _close(world_bn(x), local(x), "eval without running stats", 0.0)


def test_single_rank_group_is_batch_norm_act(dist_results):
    _check(dist_results, "subgroup")


def _collectives_case(rank, world):
    """The issue's budget: per training forward ONE collective (count, mean and M2 of
    every channel), per backward ONE (the two gradient reductions), on every CPU backend,
    also on a rank with no sample."""
    names = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor",
             "all_to_all_single")
    orig = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    calls = []

    def counting(n):
        def f(*args, **kwargs):
            calls.append(n)
            return orig[n](*args, **kwargs)
        return f

    for n in orig:
        setattr(dist, n, counting(n))
    try:
        for backend in _cpu_backends():
            for parts in ((4, 4), (0, 8)):
                with _use(backend):
                    m = convert_sync_batchnorm(BatchNormAct2d(3, activation="relu", dtype=F64))
                    g = torch.Generator().manual_seed(5)
                    sl = _part(parts, rank)
                    x = torch.randn(8, 3, 4, 4, generator=g, dtype=F64)[sl].requires_grad_()
                    r = torch.randn(8, 3, 4, 4, generator=g, dtype=F64)[sl].requires_grad_()
                    calls.clear()
                    y = m(x, r)
                    _expect(len(calls) == 1, f"{backend} {parts}: the forward ran {len(calls)} collectives {calls}")
                    calls.clear()
                    (y * y).sum().backward()
                    _expect(len(calls) == 1, f"{backend} {parts}: the backward ran {len(calls)} collectives {calls}")
    finally:
        for n, f in orig.items():
            setattr(dist, n, f)


def test_one_collective_per_forward_and_backward(dist_results):
    _check(dist_results, "collectives")


# ============================================================================ block and resnet18
def _model_cases(rank, world):
    import torchvision
    from resnet_ref import randomize
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    block = fastres.BasicBlock(4, 8, stride=2, downsample=nn.Sequential(
        nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8)))
    net = fastres.resnet18(num_classes=10)
    tv = torchvision.models.resnet18(num_classes=10)
    randomize(net, seed=3)
    tv.load_state_dict(net.state_dict())
    cases = [("BasicBlock", block, (8, 4, 6, 6), 1e-9), ("resnet18", net, (8, 3, 32, 32), 1e-8)]
    for name, model, shape, tol in cases:
        model = model.to(F64)
        ref = tv.to(F64) if name == "resnet18" else copy.deepcopy(model)  # resnet18: torchvision's, whole batch
        ours = convert_sync_batchnorm(copy.deepcopy(model))
        _expect(all(type(m) is SyncBatchNormAct2d for m in ours.modules() if isinstance(m, nn.BatchNorm2d)),
                f"{name}: not every BN converted")
        for parts in ((4, 4), (3, 5), (0, 8)):
            ref_s, ours_s = copy.deepcopy(ref).train(), copy.deepcopy(ours).train()
            x = torch.randn(*shape, generator=g, dtype=F64)
            yf = ref_s(x.clone().requires_grad_())
            gy = torch.randn(yf.shape, generator=g, dtype=F64)
            xf = x.clone().requires_grad_()
            yf = ref_s(xf)  # second forward: both models' statistics advance twice
            (yf * gy).sum().backward()
            sl = _part(parts, rank)
            ours_s(x[sl].clone())
            xr = x[sl].clone().requires_grad_()
            y = ours_s(xr)
            (y * gy[sl]).sum().backward()
            t = f"{name} {parts}"
            _close(y, yf[sl], f"{t}: output", tol)
            _close(xr.grad, xf.grad[sl], f"{t}: grad input", tol)
            ref_p = dict(ref_s.named_parameters())
            for k, p in ours_s.named_parameters():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)  # an empty rank may see none
                _close(_summed(grad), ref_p[k].grad, f"{t}: grad {k}", tol)
            ref_b = dict(ref_s.named_buffers())
            for k, b in ours_s.named_buffers():
                _close(b.double(), ref_b[k].double(), f"{t}: buffer {k}", tol)


def test_block_and_resnet18_match_whole_batch(dist_results):
    """A converted BasicBlock (with a strided projection shortcut) and resnet18 (32px) on
    4+4, 3+5 and 0+8 samples: output, input gradient, every parameter gradient and every
    buffer of the whole batch in one process (resnet18: torchvision's)."""
    _check(dist_results, "models")


# ============================================================================ DDP step
def _ddp_case(rank, world, parts):
    import torchvision
    from torch.nn.parallel import DistributedDataParallel as DDP
    from resnet_ref import randomize
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    tv = torchvision.models.resnet18(num_classes=10).to(F64)
    randomize(tv, seed=5)
    fr = fastres.resnet18(num_classes=10).to(F64)
    fr.load_state_dict(tv.state_dict())
    n = sum(parts)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=F64)
    target = torch.randint(0, 10, (n,), generator=g)
    sl = _part(parts, rank)

    def step(model, xs, ts, scale):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xs), ts, reduction="sum") * scale
            loss.backward()
            opt.step()
        return model.module if isinstance(model, DDP) else model

    # fastres + convert_sync_batchnorm under DDP == the whole batch in one process. DDP
    # averages gradients over the ranks, hence the loss scale world/n.
    ref = step(copy.deepcopy(tv), x, target, 1.0 / n)
    ours = step(DDP(convert_sync_batchnorm(copy.deepcopy(fr))), x[sl], target[sl], world / n)
    ref_state = ref.state_dict()
    for k, v in ours.state_dict().items():
        _close(v.double(), ref_state[k].double(), f"sync-BN DDP {parts}: {k}", 1e-8)
    # fastres under DDP == torchvision under DDP (per-rank BN statistics), equal halves
    if parts[0] == parts[1]:
        a = step(DDP(copy.deepcopy(tv)), x[sl], target[sl], 1.0 / parts[rank])
        b = step(DDP(copy.deepcopy(fr)), x[sl], target[sl], 1.0 / parts[rank])
        a_state = a.state_dict()
        for k, v in b.state_dict().items():
            _close(v.double(), a_state[k].double(), f"plain DDP: {k}", 1e-8)


@pytest.mark.parametrize("parts", ["4+4", "3+5"])
def test_ddp_step_matches_torchvision(dist_results, parts):
    """Two SGD steps of resnet18 under DistributedDataParallel (gloo, float64): fastres +
    convert_sync_batchnorm gives torchvision's whole-batch result; without SyncBN, fastres
    under DDP gives torchvision under DDP. Every parameter and buffer compared."""
    _check(dist_results, "ddp " + parts)


# ============================================================================ one spawn for all the CPU cases
_CASES = {
    "bn_act": lambda rank, world: _bn_act_cases(rank, world, _cpu_backends(), "cpu"),
    "bf16": lambda rank, world: _low_precision_cases(rank, world, [b for b in _cpu_backends()
                                                                   if b != "reference_ops"]),
    "compile": _compile_case,
    "subgroup": _subgroup_case,
    "collectives": _collectives_case,
    "models": _model_cases,
    "ddp 4+4": lambda rank, world: _ddp_case(rank, world, (4, 4)),
    "ddp 3+5": lambda rank, world: _ddp_case(rank, world, (3, 5)),
}


def _all_cases(rank, world, out_dir):
    """Every CPU case in one pair of processes (starting processes is the slow part);
    the failed checks of each case go to out_dir/rank<r>.json."""
    results = {}
    for name, fn in _CASES.items():
        _ERRORS[:] = []
        try:
            fn(rank, world)
        except Exception:  # noqa: BLE001  (a crash is a failure of this case; the ranks may now be out of step)
            _ERRORS.append(traceback.format_exc())
        results[name] = list(_ERRORS)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    failure = None
    try:
        _spawn(_all_cases, str(out))
    except Exception as e:  # noqa: BLE001
        failure = f"the workers failed: {e}"
    results = {}
    for rank in range(2):
        path = out / f"rank{rank}.json"
        got = json.loads(path.read_text()) if path.exists() else {}
        for name in _CASES:
            errs = got.get(name, [failure or "not run"])
            results.setdefault(name, []).extend(f"rank {rank}: {e}" for e in errs)
    return results


def _check(results, name):
    errs = results[name]
    assert not errs, f"{len(errs)} failed check(s):\n" + "\n".join(errs[:20])


# ============================================================================ in-process checks
def test_convert_shares_state_and_keeps_fusion():
    import torchvision
    model = fastres.resnet18(num_classes=10)
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    extra = nn.Sequential(model, nn.BatchNorm1d(10), BatchNormAct2d(3, activation="relu"))
    conv = convert_sync_batchnorm(extra, process_group=None)
    assert conv is extra
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)  # same keys, same order
    assert all(after[k] is before[k] for k in before)  # the very same tensors: nothing copied
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(type(m) is SyncBatchNormAct2d and m.activation == "none" for m in bns)
    assert type(extra[1]) is nn.SyncBatchNorm  # not a 2-d BN: torch's own converter
    assert type(extra[2]) is SyncBatchNormAct2d and extra[2].activation == "relu"
    tvm = convert_sync_batchnorm(torchvision.models.resnet18(num_classes=10))
    assert sum(type(m) is SyncBatchNormAct2d for m in tvm.modules()) == 20
    single = convert_sync_batchnorm(nn.BatchNorm2d(4))  # a BN itself: a new module, same tensors
    assert type(single) is SyncBatchNormAct2d


def test_blocks_keep_the_fused_path(monkeypatch):
    """Every BN of a converted fastres resnet18 runs through the synchronised fused op
    (not the unfused fallback the blocks use for foreign norm layers)."""
    model = convert_sync_batchnorm(fastres.resnet18(num_classes=10)).train()
    calls = []
    orig = SyncBatchNormAct2d._fused_batch_norm_act

    def spy(self, *a, **k):
        calls.append((self, k.get("activation")))
        return orig(self, *a, **k)

    monkeypatch.setattr(SyncBatchNormAct2d, "_fused_batch_norm_act", spy)
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 20 and len({id(m) for m, _ in calls}) == 20
    assert sum(a == "relu" for _, a in calls) == 17  # stem + 2 per block (the add + ReLU fused) - 3 projections


def test_no_process_group_is_batch_norm_act():
    """Without an initialised process group the module is BatchNormAct2d (nn.SyncBatchNorm's
    rule): bitwise the same outputs, gradients and running statistics."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    a = fastres.resnet18(num_classes=10).double()
    b = convert_sync_batchnorm(copy.deepcopy(a))
    x = torch.randn(3, 3, 32, 32, dtype=F64)
    ya, yb = a(x), b(x)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    pa = dict(a.named_parameters())
    for k, p in b.named_parameters():
        torch.testing.assert_close(p.grad, pa[k].grad, rtol=0, atol=0, msg=k)
    ba = dict(a.named_buffers())
    for k, v in b.named_buffers():
        torch.testing.assert_close(v, ba[k], rtol=0, atol=0, msg=k)


def test_state_dict_interchangeable_with_batchnorm():
    import torchvision
    tvm = torchvision.models.resnet18(num_classes=10)
    synced = convert_sync_batchnorm(fastres.resnet18(num_classes=10))
    synced.load_state_dict(tvm.state_dict(), strict=True)
    tvm.load_state_dict(synced.state_dict(), strict=True)


# ============================================================================ examples/train.py under torchrun
def test_train_example_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 examples/train.py --sync-bn`` on a tiny ImageFolder:
    the DistributedSampler splits 8 images into 2 steps of 2 per rank; rank 0 alone logs
    and saves."""
    Image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        d = tmp_path / "data" / cls
        d.mkdir(parents=True)
        for i in range(4):
            arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"{i}.png")
    ck = tmp_path / "ck.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.join(ROOT, "examples", "train.py"), "--data", str(tmp_path / "data"), "--arch", "resnet18",
           "--batch-size", "2", "--image-size", "16", "--workers", "0", "--device", "cpu", "--no-progress",
           "--log-every", "1", "--sync-bn", "--checkpoint", str(ck)]
    out = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("done: 2 steps, 8 images") == 1, out.stdout  # 2 ranks x 2 steps x 2 images, one log
    assert "world size 2" in out.stdout and "sync-bn" in out.stdout
    state = torch.load(ck, weights_only=False)
    assert state["global_step"] == 2
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped model's keys


# ============================================================================ GPU
def _cuda_vs_torch_syncbn(rank, world, parts, backend):
    """On CUDA: fastres's fused SyncBN (+ add + ReLU) against torch's nn.SyncBatchNorm."""
    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(1)
    c = 7
    ref = nn.SyncBatchNorm(c, dtype=torch.float32).to(dev)
    ours = convert_sync_batchnorm(BatchNormAct2d.from_batchnorm(nn.BatchNorm2d(c).to(dev), "relu"))
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(8, c, 5, 6, generator=g) * 2 + 3).to(dev)
    res = torch.randn(8, c, 5, 6, generator=g).to(dev)
    gy = torch.randn(8, c, 5, 6, generator=g).to(dev)
    sl = _part(parts, rank)
    xa, ra = x[sl].clone().requires_grad_(), res[sl].clone().requires_grad_()
    xb, rb = x[sl].clone().requires_grad_(), res[sl].clone().requires_grad_()
    ya = torch.relu(ref(xa) + ra)
    (ya * gy[sl]).sum().backward()
    yb = ours(xb, rb)
    (yb * gy[sl]).sum().backward()
    for name, a, b in (("output", yb, ya), ("grad input", xb.grad, xa.grad), ("grad residual", rb.grad, ra.grad),
                       ("grad weight", ours.weight.grad, ref.weight.grad), ("grad bias", ours.bias.grad, ref.bias.grad),
                       ("running_mean", ours.running_mean, ref.running_mean),
                       ("running_var", ours.running_var, ref.running_var)):
        _close(a, b, f"{backend} {parts}: {name}", 1e-4)
    _raise_errors()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("parts", [(4, 4), (3, 5)])
def test_gloo_cuda_tensors_match_torch_syncbn(parts):
    """gloo with CUDA tensors (two ranks may share one GPU): fastres == nn.SyncBatchNorm."""
    _spawn(_cuda_vs_torch_syncbn, parts, "gloo", backend="gloo", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
                    reason="NCCL needs two CUDA devices (one per rank)")
@pytest.mark.parametrize("parts", [(4, 4), (3, 5), (0, 8)])
def test_nccl_matches_torch_syncbn(parts):
    _spawn(_cuda_vs_torch_syncbn, parts, "nccl", backend="nccl", device="cuda")
