"""Blocks with FASTRES_CONV=fused: the convs run through conv2d_act with the BN statistics
from the conv's epilogue and the BN+ReLU applied in the next conv's prologue
(fastres/nn/_fused_conv_block.py). fp64 parity against torchvision's blocks in training
(output, input and every parameter gradient, running stats, num_batches_tracked, two
steps) and eval (folded convs), with the conv family ``ops`` (the aten composition behind
the custom op: the block logic on any machine) and ``triton`` (the kernel, interpreted)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from fastres import conv_backend
from fastres import functional as FF
from conv_helpers import conv_family
from resnet_ref import check_parity, randomize


def _blocks(kind, dtype=torch.float64, momentum=0.1):
    if kind == "basic":
        args = dict(inplanes=8, planes=8, stride=1)
        ref = tvr.BasicBlock(**args)
        ours = fastres.BasicBlock(**args)
    else:  # grouped bottleneck with a stride-2 projection
        args = dict(inplanes=12, planes=4, stride=2, groups=2, base_width=64)
        ds = lambda: nn.Sequential(tvr.conv1x1(12, 16, 2), nn.BatchNorm2d(16, momentum=momentum))  # noqa: E731
        ref = tvr.Bottleneck(downsample=ds(), **args)
        ours = fastres.Bottleneck(downsample=ds(), **args)
    for m in (ref, ours):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = momentum
    randomize(ref)
    ref, ours = ref.to(dtype), ours.to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("family", ["ops", "triton"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fused_conv_block_parity_fp64(kind, family):
    ref, ours = _blocks(kind)
    cin = ref.conv1.in_channels
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64)
    with conv_family(family):
        check_parity(ref, ours, x.contiguous(memory_format=torch.channels_last), train=True, tol=1e-9, steps=2,
                     what=f"{kind} {family} train channels_last")
        check_parity(ref, ours, x, train=False, tol=1e-9, what=f"{kind} {family} eval")


@pytest.mark.parametrize("family", ["ops"])
def test_fused_conv_block_momentum_none_and_frozen_bn(family):
    """momentum=None (cumulative average via num_batches_tracked) and a training block
    whose bn2 is in eval (running statistics in the prologue), against torchvision."""
    ref, ours = _blocks("bottleneck", momentum=None)
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    with conv_family(family):
        check_parity(ref, ours, x, train=True, tol=1e-9, steps=3, what="momentum None")
        ref.train(), ours.train()
        ref.bn2.eval(), ours.bn2.eval()
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [ref(xs[0]), ours(xs[1])]
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-9, atol=1e-9)
        ys[0].sum().backward(), ys[1].sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-9)
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(ours.bn1.running_var, ref.bn1.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_conv_block_runs_conv2d_act_with_stats_and_prologue(monkeypatch, train):
    ref, ours = _blocks("bottleneck")
    ours.train(train)
    calls = []
    real = FF.conv2d_act

    def spy(x, w, *a, **k):
        calls.append(dict(k, weight=tuple(w.shape)))
        return real(x, w, *a, **k)

    monkeypatch.setattr(FF, "conv2d_act", spy)
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    with conv_family("ops"):
        ours(x)
    assert len(calls) == 4, calls  # conv1, conv2, conv3, downsample
    if train:
        assert all(c["stats"] == "moments" for c in calls)
        assert [c.get("in_scale") is not None for c in calls] == [False, True, True, False]
        assert [c.get("in_relu") for c in calls] == [False, True, True, False]
    else:  # folded: bias + (residual) + ReLU in the epilogue, no statistics
        assert all(c.get("stats", False) is False for c in calls)
        assert [c["activation"] for c in calls] == ["relu", "relu", "none", "relu"]
        assert calls[-1]["residual"] is not None


def test_aten_conv_keeps_the_usual_block_forward(monkeypatch):
    """FASTRES_CONV=aten: the usual forward -- each conv through conv2d_act (the conv step's
    one home) without prologue or statistics, then the fused BN op -- not the fused-conv
    block forward (prologue, statistics)."""
    ref, ours = _blocks("basic")
    calls = []
    real = FF.conv2d_act
    monkeypatch.setattr(FF, "conv2d_act", lambda *a, **k: calls.append(k) or real(*a, **k))
    with fastres.use_conv("aten"):
        ours(torch.randn(2, 8, 5, 5, dtype=torch.float64))
    assert len(calls) == len(ours._units()) + (ours.downsample is not None)
    assert all(k.get("in_scale") is None and not k.get("in_relu") and not k.get("stats") for k in calls)
    assert conv_backend.conv_for(torch.device("cpu")) == "aten"


# ----------------------------------------------------------------------------- whole models
def _model_pair(arch, dtype=torch.float64, fmt=torch.contiguous_format):
    import torchvision
    from resnet_ref import twin
    ref = getattr(torchvision.models, arch)(num_classes=10)
    ref = randomize(ref, margin=dtype != torch.float64).to(dtype).to(memory_format=fmt)
    return ref, twin(ref, lambda: getattr(fastres, arch)(num_classes=10), dtype, fmt)


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_fused_conv_model_fp64_train_and_eval(arch):
    ref, ours = _model_pair(arch)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with conv_family("ops"):
        check_parity(ref, ours, x, train=True, tol=1e-9, steps=2, what=f"{arch} fused-conv train")
        check_parity(ref, ours, x[:2], train=False, tol=1e-9, what=f"{arch} fused-conv eval")


def test_fused_conv_small_model_triton_interpreted():
    """A whole CIFAR ResNet-8 (option A shortcuts: PadShortcut identities) with every block
    conv in the Triton kernel (interpreted), fp64, training and eval, channels_last."""
    from resnet_ref import RefCifar, twin
    ref = randomize(RefCifar(8, "A")).double()
    ours = twin(ref, lambda: fastres.cifar_resnet(8), torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with conv_family("triton"):
        check_parity(ref, ours, x, train=True, tol=1e-9, steps=2, what="cifar8 triton train")
        check_parity(ref, ours, x, train=False, tol=1e-9, what="cifar8 triton eval")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fused_conv_bf16_autocast_within_2x_of_torchvision(train, monkeypatch):
    """Under torch.autocast(bfloat16) the fused blocks compute in bf16 (inputs and weights
    cast once): error against fp32 at most 2x torchvision's own bf16 error (+1e-3),
    running statistics too."""
    import copy
    from resnet_ref import rel_err
    ref, ours = _model_pair("resnet18", torch.float32, torch.channels_last)
    fp32 = copy.deepcopy(ref)
    for m in (ref, ours, fp32):
        m.train(train)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y32 = fp32(x)
    dtypes = []
    real = FF.conv2d_act
    monkeypatch.setattr(FF, "conv2d_act", lambda x, *a, **k: dtypes.append(x.dtype) or real(x, *a, **k))
    with conv_family("ops"), torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_ours = ref(x), ours(x)
    assert dtypes == [torch.bfloat16] * 20  # the stem and every block conv of resnet18 (1 + 16 + 3), in bf16
    assert y_ours.dtype == y_ref.dtype == torch.bfloat16
    theirs, mine = rel_err(y_ref, y32), rel_err(y_ours, y32)
    assert mine <= 2 * theirs + 1e-3, f"bf16 error {mine:.3g} > 2 x torchvision's {theirs:.3g}"
    if train:
        b32, bref = dict(fp32.named_buffers()), dict(ref.named_buffers())
        for n, b in ours.named_buffers():
            assert b.dtype == bref[n].dtype
            if b.is_floating_point():
                assert rel_err(b, b32[n]) <= 2 * rel_err(bref[n], b32[n]) + 1e-3, n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton conv compiled for it)")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gpu_fused_conv_resnet50_bf16_autocast(train, monkeypatch):
    """resnet50 on CUDA under bf16 autocast with every block conv in the Triton kernel:
    output within 2x torchvision's own bf16 error against fp32 (+1e-3), running stats too,
    and finite gradients; then fp64 parity of a training step on CUDA at 1e-9."""
    import copy
    from resnet_ref import rel_err
    monkeypatch.setenv("FASTRES_CONV_AUTOTUNE", "0")  # default tilings: few compiles
    monkeypatch.setenv("FASTRES_CONV_BWD_AUTOTUNE", "0")  # (the backward's, read per call)
    ref, ours = _model_pair("resnet50", torch.float32, torch.channels_last)
    ref, ours = ref.cuda(), ours.cuda()
    fp32 = copy.deepcopy(ref)
    for m in (ref, ours, fp32):
        m.train(train)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y32 = fp32(x)
    with fastres.use_conv("fused"), torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, y_ours = ref(x), ours(x)
    theirs, mine = rel_err(y_ref, y32), rel_err(y_ours, y32)
    assert mine <= 2 * theirs + 1e-3, f"bf16 error {mine:.3g} > 2 x torchvision's {theirs:.3g}"
    y_ours.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    if train:
        b32, bref = dict(fp32.named_buffers()), dict(ref.named_buffers())
        for n, b in ours.named_buffers():
            if b.is_floating_point():
                assert rel_err(b, b32[n]) <= 2 * rel_err(bref[n], b32[n]) + 1e-3, n
    ref64, ours64 = _model_pair("resnet50")
    with fastres.use_conv("fused"):
        check_parity(ref64.cuda(), ours64.cuda(), torch.randn(2, 3, 32, 32, dtype=torch.float64, device="cuda"),
                     train=train, tol=1e-9, what="resnet50 fp64 cuda fused conv")


@pytest.mark.parametrize("family", ["ops", "triton"])
def test_fused_conv_block_compile_fullgraph(family):
    """torch.compile(fullgraph=True) traces a fused Bottleneck (training: stats, running
    statistics update, prologues) without a graph break; output and gradients as eager."""
    import torch._dynamo
    ref, ours = _blocks("bottleneck")
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    with conv_family(family):
        torch._dynamo.reset()
        cmod = torch.compile(ours, fullgraph=True, backend="aot_eager")
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = cmod(x1)
        # the path lookups inside the traced forward are plain dict reads: Dynamo has no
        # "call to a functools.lru_cache-wrapped function ... silent incorrectness" to warn of
        dynamo = [str(w.message) for w in caught if "Dynamo" in str(w.message)]
        assert not dynamo, dynamo
        y_ref = ref(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        y.sum().backward(), y_ref.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.bn2.running_var, ref.bn2.running_var, rtol=1e-12, atol=1e-12)
        assert torch.equal(ours.bn1.num_batches_tracked, ref.bn1.num_batches_tracked)
