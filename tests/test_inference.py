"""Inference paths (issue #13): the fp32 CPU eval plan of a fastres ResNet, the
per-block eval path, autocast bf16, ``fastres.cuda_graph_inference``, and the bench's
inference contenders and latency fields.

Parity against torchvision in eval mode: float64 (the per-block path; the plan is
fp32/bf16 only), fp32 (the plan: error against torchvision fp64 at most 2x torchvision
fp32's own), bf16 autocast (the bf16 plan where oneDNN has bf16 kernels, and the module
path: 2x torchvision bf16's error against fp32). Batch 1 and 2,
32x32 inputs so the last stage is 1x1, channels_last and contiguous inputs. Nothing
here asserts on a timing.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

import fastres
from fastres import bench, cli, conv_backend, fold
from fastres.models import eval_plan
from fastres._validate import DeviceError

from conftest import GPU_MARKS
from resnet_ref import randomize

MODELS = ("resnet18", "resnet50")  # BasicBlock and Bottleneck


def _pair(name, dtype=torch.float32):
    torch.manual_seed(0)
    tv = randomize(getattr(torchvision.models, name)(num_classes=7), margin=True).eval()
    fr = getattr(fastres, name)(num_classes=7).eval()
    fr.load_state_dict(tv.state_dict(), strict=True)
    return tv.to(dtype), fr.to(dtype)


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@pytest.fixture
def plan_calls(monkeypatch):
    """How many residual tails the eval plan ran (0: the plan was not used)."""
    calls = [0]
    orig = eval_plan._PlanUnit.add_relu_into

    def counting(self, x, other):
        calls[0] += 1
        return orig(self, x, other)
    monkeypatch.setattr(eval_plan._PlanUnit, "add_relu_into", counting)
    return calls


def _blocks(model):
    return sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fp32_eval_plan_parity_with_torchvision(name, batch, layout, plan_calls):
    tv, fr = _pair(name)
    fmt = _fmt(layout)
    tv, fr = tv.to(memory_format=fmt), fr.to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)  # the last stage is 1x1
    with torch.no_grad():
        ref64 = tv.double()(x.double())
        tv.float()
        ref32 = tv(x)
        got = fr(x)
    assert plan_calls[0] == _blocks(fr), "the eval plan did not run"
    ours, theirs = (got.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    assert ours <= 2 * theirs + 1e-5 * max(1.0, ref64.abs().max().item()), (ours, theirs)
    # the plan computes exactly what the per-block eval path computes
    fold.use_eval_plan(False)
    try:
        with torch.no_grad():
            per_block = fr(x)
    finally:
        fold.use_eval_plan(True)
    assert torch.equal(got, per_block)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fp64_eval_parity_with_torchvision(name, layout, plan_calls):
    tv, fr = _pair(name, torch.float64)
    fmt = _fmt(layout)
    tv, fr = tv.to(memory_format=fmt), fr.to(memory_format=fmt)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(fr(x), tv(x), rtol=1e-9, atol=1e-9)
    assert plan_calls[0] == 0  # the plan is fp32-only


needs_bf16 = pytest.mark.skipif(not eval_plan._onednn_bf16(), reason="oneDNN has no bf16 kernels on this CPU: "
                                "bf16 autocast takes the module path (test_bf16_autocast_without_onednn_bf16)")


def _bf16_errors(tv, fr, x, stem=False):
    """(ours, torchvision bf16's) max error against torchvision fp32, under bf16 autocast."""
    with torch.no_grad():
        hi = tv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tv(x)
            got = fr(x)
    assert got.dtype == low.dtype == torch.bfloat16  # the logits' dtype, as torchvision's
    return got, (got.float() - hi).abs().max().item(), (low.float() - hi).abs().max().item(), hi


@needs_bf16
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_bf16_autocast_eval_plan_parity_with_torchvision(name, batch, layout, plan_calls):
    """bf16 autocast on a CPU with oneDNN bf16 kernels runs the bf16 eval plan (folded
    weights and biases rounded once to bf16, the fused oneDNN primitives): error against
    torchvision fp32 at most 2x torchvision bf16's own; the module path likewise."""
    tv, fr = _pair(name)
    fmt = _fmt(layout)
    tv, fr = tv.to(memory_format=fmt), fr.to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)  # the last stage is 1x1
    got, ours, theirs, hi = _bf16_errors(tv, fr, x)
    assert plan_calls[0] == _blocks(fr), "the bf16 eval plan did not run"
    assert eval_plan.plan_of(fr, torch.bfloat16).dtype == torch.bfloat16
    assert ours <= 2 * theirs + 1e-3 * max(1.0, hi.abs().max().item()), (ours, theirs)
    fold.use_eval_plan(False)
    try:
        _, ours_mod, theirs_mod, _ = _bf16_errors(tv, fr, x)
    finally:
        fold.use_eval_plan(True)
    assert plan_calls[0] == _blocks(fr)  # (the module path did not count)
    assert ours_mod <= 2 * theirs_mod + 1e-3 * max(1.0, hi.abs().max().item()), (ours_mod, theirs_mod)


@needs_bf16
def test_bf16_plan_with_folded_stem_and_bf16_input(plan_calls):
    tv, fr = _pair("resnet50")
    tv, fr = tv.to(memory_format=torch.channels_last), fr.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fold.fold_stem(True)
    try:
        got, ours, theirs, hi = _bf16_errors(tv, fr, x)
        assert eval_plan.plan_of(fr, torch.bfloat16).stem is not None
        assert ours <= 2 * theirs + 1e-3 * max(1.0, hi.abs().max().item()), (ours, theirs)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 input, as torchvision takes it
            torch.testing.assert_close(fr(x.bfloat16()), tv(x.bfloat16()), rtol=0.1, atol=0.1 * hi.abs().max().item())
    finally:
        fold.fold_stem(False)
    assert plan_calls[0] == 2 * _blocks(fr)


@needs_bf16
def test_fp32_and_bf16_plans_live_side_by_side(plan_calls):
    """Alternating fp32 and bf16-autocast calls reuse one plan per dtype; a parameter
    write drops both."""
    tv, fr = _pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y32 = fr(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = fr(x)
        p32, p16 = eval_plan.plan_of(fr), eval_plan.plan_of(fr, torch.bfloat16)
        assert p32 is not None and p16 is not None and p32 is not p16
        assert torch.equal(fr(x), y32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fr(x), y16)
        assert eval_plan.plan_of(fr) is p32 and eval_plan.plan_of(fr, torch.bfloat16) is p16
        fr.layer1[0].bn1.running_mean.add_(1.0)  # an in-place write: the stamp changes
        y32b = fr(x)
    assert eval_plan.plan_of(fr) is not p32 and eval_plan.plan_of(fr, torch.bfloat16) is None
    assert not torch.equal(y32b, y32)
    assert plan_calls[0] == 5 * _blocks(fr)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_without_onednn_bf16(name, plan_calls, monkeypatch):
    """Where oneDNN has no bf16 kernels, and under fp16 autocast, no plan runs: the module
    path, still within 2x torchvision's own error."""
    monkeypatch.setattr(eval_plan, "_BF16", [False])
    tv, fr = _pair(name)
    tv, fr = tv.to(memory_format=torch.channels_last), fr.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    got, ours, theirs, hi = _bf16_errors(tv, fr, x)
    assert plan_calls[0] == 0
    assert ours <= 2 * theirs + 1e-3 * max(1.0, hi.abs().max().item()), (ours, theirs)
    monkeypatch.setattr(eval_plan, "_BF16", [True])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        fr(x)
    assert plan_calls[0] == 0 and eval_plan.plan_of(fr, torch.float16) is None


def test_eval_plan_under_grad_mode():
    """Grad mode without trainable parameters: the plan; with them: the autograd path."""
    tv, fr = _pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    y = fr(x)  # parameters require grad: the module path, differentiable
    assert y.grad_fn is not None and eval_plan.plan_of(fr) is None  # no plan built
    y.sum().backward()
    assert fr.layer1[0].conv1.weight.grad is not None
    fr.requires_grad_(False)
    fold.clear_cache()
    with torch.no_grad():
        ref = tv(x)
    torch.testing.assert_close(fr(x), ref, rtol=1e-4, atol=1e-4)
    assert eval_plan.plan_of(fr) is not None


# ----------------------------------------------------------------------------- staleness
def test_eval_plan_is_never_stale(plan_calls):
    tv, fr = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fr(x), tv(x), rtol=1e-4, atol=1e-4)

    check()
    n = plan_calls[0]
    assert n > 0
    plan = eval_plan.plan_of(fr)
    check()
    assert eval_plan.plan_of(fr) is plan  # reused
    # load_state_dict (param.copy_), in-place writes to a weight and to the running stats
    tv2, _ = _pair("resnet18")
    randomize(tv2, seed=3, margin=True)
    tv.load_state_dict(tv2.state_dict())
    fr.load_state_dict(tv2.state_dict())
    check()
    with torch.no_grad():
        for m in (tv, fr):
            m.layer2[0].conv2.weight.mul_(1.5)
            m.layer3[1].bn1.running_var.mul_(2.0)
            m.layer4[0].downsample[1].running_mean.add_(0.1)
    check()
    # p.data = t (a new address)
    w = torch.randn_like(tv.layer1[1].conv1.weight)
    tv.layer1[1].conv1.weight.data = w.clone()
    fr.layer1[1].conv1.weight.data = w.clone()
    check()
    # a replaced submodule
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    tv.layer1[0].conv2 = conv
    fr.layer1[0].conv2 = conv
    check()
    # the module itself changed: train mode (batch statistics), then back to eval
    fr.train()
    tv.train()
    # error against fp64 by the 2x rule, on 64x64 images: at 32x32 the last stage's batch
    # statistics are over 2 values per channel, and the ill-conditioned normalisation makes
    # torchvision's own fp32 error swing 5x with the input or the thread count (fastres/
    # torchvision ratios up to 3.1 over 12 inputs on both torch 2.11 and 2.14; at 64x64 <= 1.8)
    x64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x64.double())
        ours, theirs = (fr(x64).double() - ref64).abs().max().item(), (tv(x64).double() - ref64).abs().max().item()
    assert ours <= 2 * theirs + 1e-5 * max(1.0, ref64.abs().max().item()), (ours, theirs)
    fr.eval()
    tv.eval()
    check()
    # .to() drops the plan and the folds; p.data.mul_ needs invalidate() (as the fold cache)
    fr.to(torch.float64)
    assert eval_plan.plan_of(fr) is None
    fr.float()
    check()
    fr.layer1[0].conv1.weight.data.mul_(2.0)
    with torch.no_grad():
        tv.layer1[0].conv1.weight.mul_(2.0)
    fold.invalidate(fr)
    assert eval_plan.plan_of(fr) is None
    check()


def test_hooks_disable_the_eval_plan(plan_calls):
    tv, fr = _pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    seen = []
    h = fr.layer2[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(fr(x), tv(x), rtol=1e-4, atol=1e-4)
    assert seen == [torch.Size([1, 128, 4, 4])] and plan_calls[0] == 0
    h.remove()
    with torch.no_grad():
        fr(x)
    assert plan_calls[0] == _blocks(fr)


def test_eval_plan_bad_input_errors_like_the_module_path():
    _, fr = _pair("resnet18")
    with torch.no_grad(), pytest.raises(ValueError, match="expected input with 3 channels"):
        fr(torch.randn(1, 4, 32, 32))
    with torch.no_grad(), pytest.raises(TypeError, match="dtype"):
        fr(torch.randn(1, 3, 32, 32, dtype=torch.float64))


# ----------------------------------------------------------------------------- CUDA graphs
def test_cuda_graph_inference_refuses_the_cpu():
    _, fr = _pair("resnet18")
    with pytest.raises(DeviceError, match="example is on cpu, expected a CUDA tensor"):
        fastres.cuda_graph_inference(fr, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="example must be a torch.Tensor"):
        fastres.cuda_graph_inference(fr, None)


def _fake_cuda_graphs(monkeypatch, phase):
    """torch.cuda's stream, device and graph API as no-ops on the CPU (``phase[0]`` becomes
    ``"capture"`` inside ``torch.cuda.graph``), and fastres.inference's device check passed."""
    import contextlib

    from fastres import inference

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, *args, **kwargs):
        phase[0] = "capture"
        try:
            yield
        finally:
            phase[0] = "after"

    monkeypatch.setattr(inference, "_is_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)


@pytest.mark.parametrize("amp", [True, False], ids=["autocast", "no-autocast"])
def test_cuda_graph_inference_captures_without_the_autocast_cache(monkeypatch, amp):
    """Under the caller's autocast, the warm-up and the capture run under the same
    autocast dtype with autocast's weight-cast cache OFF. With it on, the capture reuses
    the bf16/fp16 casts of the parameters (here nn.Linear's weight, as a ResNet's fc)
    that the warm-up made outside the graph's memory pool; the caller's autocast frees
    them when it exits and every replay then reads freed memory (GPU only: the CUDA
    graph API is faked here, the autocast state is what is checked)."""
    phase, seen = ["warmup"], []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            seen.append((phase[0], torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                         torch.is_autocast_cache_enabled()))
            return self.fc(x)

    _fake_cuda_graphs(monkeypatch, phase)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        run = fastres.cuda_graph_inference(Probe(), torch.randn(2, 4), warmup=2)
        assert torch.is_autocast_cache_enabled()  # the caller's own autocast is left as it was
    assert [p for p, *_ in seen] == ["warmup", "warmup", "capture"]
    for p, on, dt, cached in seen:
        assert on == amp, f"{p}: autocast {'off' if amp else 'on'}, expected the caller's"
        if amp:
            assert dt == torch.bfloat16, f"{p}: autocast dtype {dt}, expected the caller's bfloat16"
            assert not cached, f"{p}: autocast's weight-cast cache is on"
    assert run.static_output.dtype == (torch.bfloat16 if amp else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", MODELS)
@GPU_MARKS[0]
@GPU_MARKS[1]
def test_cuda_graph_inference_matches_eager(name, batch, dtype):
    tv, fr = _pair(name)
    tv, fr = tv.cuda().to(memory_format=torch.channels_last), fr.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with amp:
        run = fastres.cuda_graph_inference(fr, x)
    with torch.no_grad():
        hi = copy.deepcopy(tv).double()(x.double())  # fp64 truth (in fp32, tv(x) is the low-precision run)
        with amp:
            low = tv(x)
            eager = fr(x)
    for _ in range(2):
        x2 = torch.randn_like(x)
        got = run(x2).clone()
        with torch.no_grad(), amp:
            ref = fr(x2)
        torch.testing.assert_close(got, ref, rtol=1e-3 if dtype == torch.float32 else 2e-2,
                                   atol=1e-3 if dtype == torch.float32 else 2e-2)
    got = run(x)
    assert torch.equal(got, eager) or (got.float() - eager.float()).abs().max() < 1e-3
    ours, theirs = (got.float() - hi).abs().max().item(), (low.float() - hi).abs().max().item()
    assert ours <= 2 * theirs + (1e-3 if dtype != torch.float32 else 1e-5) * max(1.0, hi.abs().max().item())
    with pytest.raises(ValueError, match="captured for"):
        run(torch.randn(batch + 1, 3, 32, 32, device="cuda"))


# ----------------------------------------------------------------------------- the bench
def _cfg(device, compile_on=True):
    args = cli.build_parser().parse_args(["bench", "--device", "cpu", "--mode", "both"]
                                         + ([] if compile_on else ["--no-compile"]))
    cfg = bench.resolve_config(args)
    cfg.device = device
    return cfg


def test_bench_contenders_include_the_strongest_alternative():
    conts, _ = bench.contenders(_cfg("cpu"))
    by = {c.name: c for c in conts}
    assert by["torchvision+compile"].modes == ("train",)
    frz = by["torchvision+compile(freezing)"]
    assert frz.modes == ("infer",) and frz.freezing and frz.compiled
    conts, _ = bench.contenders(_cfg("cuda"))  # contenders() needs no device
    by = {c.name: c for c in conts}
    assert by["torchvision+compile(max-autotune)"].compile_mode == "max-autotune"
    assert by["torchvision+compile(reduce-overhead)"].compile_mode == "reduce-overhead"
    assert "torchvision+compile(freezing)" not in by
    for cfg in (_cfg("cpu", False), _cfg("cuda", False)):
        assert not any(c.compiled for c in bench.contenders(cfg)[0])


def test_percentile():
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    assert bench.percentile([], 0.5) is None


def test_bench_batch1_latency_fields(tmp_path, capsys):
    argv = ["bench", "--model", "resnet18", "--batch-size", "1", "--image-size", "32", "--iters", "3",
            "--warmup", "1", "--repeats", "2", "--no-compile", "--device", "cpu", "--mode", "infer",
            "--backend", "torch", "--threads", "1", "--no-progress", "--no-plot", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out and "p90 ms" in out and "compile s" in out
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [r["contender"] for r in rows] == ["torchvision", "fastres[torch]"]
    for r in rows:
        assert r["status"] == "ok"
        assert 0 < r["lat_p50_ms"] <= r["lat_p90_ms"]
        assert r["compile_s"] is None
    header = next(tmp_path.glob("*.csv")).read_text().splitlines()[0].split(",")
    assert {"lat_p50_ms", "lat_p90_ms", "compile_s"} <= set(header)


def test_fold_stem_option(plan_calls):
    """fold_stem(True): the stem's BN folded into conv1 in the plan (parity to fp32
    rounding); off (default): the plan's stem is the module path's, bit for bit."""
    tv, fr = _pair("resnet50")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref64 = tv.double()(x.double())
        tv.float()
        ref32 = tv(x)
        default = fr(x)
    assert eval_plan.plan_of(fr).stem is None
    assert not fold.fold_stem()
    try:
        assert fold.fold_stem(True)
        assert eval_plan.plan_of(fr) is None  # switching drops the plans
        with torch.no_grad():
            got = fr(x)
        assert eval_plan.plan_of(fr).stem is not None
    finally:
        fold.fold_stem(False)
    ours, theirs = (got.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    assert ours <= 2 * theirs + 1e-5 * max(1.0, ref64.abs().max().item()), (ours, theirs)
    assert not torch.equal(got, default)  # the stem really was folded (a different rounding)


def test_bench_infer_compile_option(capsys):
    args = cli.build_parser().parse_args(["bench", "--infer-compile", "default,reduce-overhead,default"])
    assert args.infer_compile == ["default", "reduce-overhead"]
    cfg = bench.resolve_config(cli.build_parser().parse_args(
        ["bench", "--device", "cpu", "--mode", "infer", "--infer-compile", "default,freezing"]))
    infer = [c for c in bench.contenders(cfg)[0] if c.compiled and c.modes == ("infer",)]
    assert [(c.name, c.compile_mode, c.freezing) for c in infer] == [
        ("torchvision+compile(default)", None, False), ("torchvision+compile(freezing)", None, True)]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--infer-compile", "turbo"])
    assert "unknown compile mode(s) turbo" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_eval_conv_has_at_most_one_epilogue(name, autocast, monkeypatch):
    """The module path's eval forward (what a GPU runs): with the BNs folded, every
    convolution of the blocks is followed by at most one op, the fused epilogue
    (bias (+ residual) + ReLU), and no op of the forward synchronises with the host
    (the whole forward is capturable in a CUDA graph)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(conv_backend, "_use_onednn", [False])  # the generic (GPU) path on the CPU
    _, fr = _pair(name)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fr(x)
        with Log() as log:
            fr(x)
    ops = log.ops
    body = ops[ops.index("max_pool2d_with_indices") + 1:ops.index("mean")]
    convs = [i for i, op in enumerate(body) if op == "convolution"]
    blocks = [b for layer in (fr.layer1, fr.layer2, fr.layer3, fr.layer4) for b in layer]
    assert len(convs) == sum(len(b._units()) + (b.downsample is not None) for b in blocks)
    for i, j in zip(convs, convs[1:] + [len(body)]):
        between = body[i + 1:j]
        assert between in ([], ["affine_act"]), body
    assert "item" not in ops and "_local_scalar_dense" not in ops


def test_cifar_resnet_eval_takes_the_module_path(plan_calls):
    """CifarResNet (no max-pool, option-A shortcut) is not planned; eval still works."""
    model = fastres.cifar_resnet(20, shortcut="A", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10) and plan_calls[0] == 0 and eval_plan.plan_of(model) is None
