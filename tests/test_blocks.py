"""fastres.BasicBlock / Bottleneck against torchvision's blocks, on every available CPU
backend: torchvision's signature and state_dict, parity (fp64, eval and training,
contiguous and channels_last), the fused ops actually used, the fallbacks that keep
other norm layers and hooked modules correct, option A's shortcut."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from fastres import conv_aten, ops
from fastres import functional as FF
from fastres.nn import BatchNormAct2d, PadShortcut
from conftest import backend_params, run_on, targets
from resnet_ref import check_parity, randomize, rel_err

BACKENDS = backend_params("cpu")


def _blocks(kind, dtype=torch.float64):
    """(torchvision block, fastres block) with a stride-2 projection, loaded strictly."""
    if kind == "basic":
        args = dict(inplanes=8, planes=16, stride=2)
        ds = lambda: nn.Sequential(tvr.conv1x1(8, 16, 2), nn.BatchNorm2d(16))  # noqa: E731
        ref = tvr.BasicBlock(downsample=ds(), **args)
        ours = fastres.BasicBlock(downsample=ds(), **args)
    else:  # grouped bottleneck (ResNeXt-style), width = 16 * 32/64 * 2 = 16
        args = dict(inplanes=24, planes=8, stride=2, groups=2, base_width=32)
        ds = lambda: nn.Sequential(tvr.conv1x1(24, 32, 2), nn.BatchNorm2d(32))  # noqa: E731
        ref = tvr.Bottleneck(downsample=ds(), **args)
        ours = fastres.Bottleneck(downsample=ds(), **args)
    randomize(ref)
    ref, ours = ref.to(dtype), ours.to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_torchvision_signature_and_names():
    for ours, ref in ((fastres.BasicBlock, tvr.BasicBlock), (fastres.Bottleneck, tvr.Bottleneck)):
        p_ours = [p for p in inspect.signature(ours.__init__).parameters.values() if p.kind != p.KEYWORD_ONLY]
        p_ref = list(inspect.signature(ref.__init__).parameters.values())
        assert [(p.name, p.default) for p in p_ours] == [(p.name, p.default) for p in p_ref]
        assert ours.expansion == ref.expansion
    assert fastres.nn.BasicBlock is fastres.BasicBlock and fastres.nn.Bottleneck is fastres.Bottleneck
    ref, ours = _blocks("bottleneck")
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    assert all(type(m) is nn.BatchNorm2d for n, m in ours.named_modules() if "bn" in n or n == "downsample.1")


@pytest.mark.parametrize("backend,device", targets())  # the CPU backends; cuda, triton on CUDA (gpu)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_block_parity_each_backend(kind, backend, device):
    ref, ours = _blocks(kind)
    ref, ours = ref.to(device), ours.to(device)
    cin = ref.conv1.in_channels
    x = torch.randn(3, cin, 9, 10, dtype=torch.float64).to(device)
    with run_on(backend, device):  # (small: the triton backend runs under its interpreter on the CPU)
        check_parity(ref, ours, x.contiguous(memory_format=torch.channels_last), train=True, tol=1e-9, steps=2,
                     what=f"{kind} {backend} train channels_last")
        check_parity(ref, ours, x, train=True, tol=1e-9, what=f"{kind} {backend} train")
        check_parity(ref, ours, x, train=False, tol=1e-9, what=f"{kind} {backend} eval")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_forward_runs_the_fused_ops(monkeypatch, train):
    ref, ours = _blocks("basic")
    calls = []
    real_bn, real_aff = FF.batch_norm_act, FF.affine_act

    def bn(x, *a, **k):
        calls.append(("bn", k.get("residual") is not None, k.get("activation")))
        return real_bn(x, *a, **k)

    def aff(x, scale=None, shift=None, residual=None, activation="relu"):
        calls.append(("affine", residual is not None, activation))
        return real_aff(x, scale, shift, residual, activation)

    def no_unfused(*a, **k):
        raise AssertionError("nn.BatchNorm2d.forward must not run")

    real_epilogue, real_family = conv_aten.epilogue_conv2d_act, ops.family

    def epilogue(x, w, b, residual, stride, padding, dilation, groups, relu):
        calls.append(("conv+epilogue", residual is not None, "relu" if relu else None))
        return real_epilogue(x, w, b, residual, stride, padding, dilation, groups, relu)

    def family(name):  # the fused epilogue op itself (conv2d_act's epilogue backend calls the op family)
        fam = real_family(name)
        return fam._replace(affine_act=lambda *a: calls.append("affine op") or fam.affine_act(*a))

    monkeypatch.setattr(FF, "batch_norm_act", bn)
    monkeypatch.setattr(FF, "affine_act", aff)
    monkeypatch.setattr(conv_aten, "epilogue_conv2d_act", epilogue)
    monkeypatch.setattr(ops, "family", family)
    monkeypatch.setattr(nn.BatchNorm2d, "__call__", no_unfused)
    ours.train(train)
    with torch.no_grad():
        ours(torch.randn(2, 8, 8, 8, dtype=torch.float64))
    if train:  # conv1 → BN+ReLU; downsample BN (no act); conv2 → BN + add + ReLU
        assert [c for c in calls if c[0] == "bn"] == [("bn", False, "relu"), ("bn", False, None), ("bn", True, "relu")]
    else:  # folded convs through conv2d_act (fp64: aten conv + the fused epilogue op); the
        # downsample's folded conv needs no epilogue op at all (its bias rides in the conv)
        assert calls == [("conv+epilogue", False, "relu"), "affine op", ("conv+epilogue", False, None),
                         ("conv+epilogue", True, "relu"), "affine op"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_memory_format_is_kept(train):
    _, ours = _blocks("bottleneck", torch.float32)
    ours.train(train)
    x = torch.randn(2, 24, 8, 8).contiguous(memory_format=torch.channels_last)
    assert ours(x).is_contiguous(memory_format=torch.channels_last)
    assert ours(x.contiguous()).is_contiguous()


def test_bn_with_hook_falls_back_and_hook_runs():
    ref, ours = _blocks("basic")
    seen = []
    ours.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    for train in (True, False):
        check_parity(ref, ours, x, train=train, tol=1e-9, what="hooked")
    assert len(seen) == 2


@pytest.mark.parametrize("norm", ["groupnorm", "bnact", "sync"])
def test_other_norm_layers(norm):
    layer = {"groupnorm": lambda c: nn.GroupNorm(4, c),
             "bnact": lambda c: BatchNormAct2d(c, activation="relu"),  # the block decides the activation
             "sync": nn.SyncBatchNorm}[norm]
    ref = tvr.BasicBlock(8, 8, norm_layer=(lambda c: nn.GroupNorm(4, c)) if norm == "groupnorm" else None)
    randomize(ref)
    ref = ref.double()
    ours = fastres.BasicBlock(8, 8, norm_layer=layer).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    check_parity(ref, ours, x, train=False, tol=1e-9, what=norm)
    if norm == "bnact":  # also where the block falls back to calling the norm layer
        ours.bn2.register_forward_hook(lambda *a: None)
        check_parity(ref, ours, x, train=False, tol=1e-9, what=norm + " hooked")
    if norm != "sync":  # SyncBatchNorm trains only inside a process group
        check_parity(ref, ours, x, train=True, tol=1e-9, what=norm)


def test_pad_shortcut_option_a():
    sc = PadShortcut(4, 10, stride=2)
    assert not list(sc.parameters()) and not list(sc.buffers())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    y = sc(x)
    assert y.shape == (2, 10, 4, 4)
    torch.testing.assert_close(y[:, :4], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, 4:]) == 0
    y.sum().backward()
    expect = torch.zeros_like(x)
    expect[:, :, ::2, ::2] = 1
    torch.testing.assert_close(x.grad, expect, rtol=0, atol=0)
    xc = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    assert sc(xc).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError):
        PadShortcut(8, 4)


def test_plain_block():
    blk = fastres.BasicBlock(8, 8, shortcut=False).double().eval()
    nn.init.zeros_(blk.bn2.weight), nn.init.zeros_(blk.bn2.bias)
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    assert torch.count_nonzero(blk(x)) == 0  # no identity added
    with pytest.raises(ValueError, match="cannot have a downsample"):
        fastres.BasicBlock(8, 16, 2, nn.Conv2d(8, 16, 1, 2), shortcut=False)


def test_autocast_fp32_identity_into_bf16_branch():
    """A block fed fp32 under autocast: the bf16 branch plus the fp32 identity, like
    torchvision's `out += identity`."""
    ref = randomize(tvr.BasicBlock(8, 8))
    ours = fastres.BasicBlock(8, 8)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 8, 8)
    for train in (True, False):
        ref.train(train), ours.train(train)
        y32 = copy.deepcopy(ref)(x)  # a copy: its running-stat update must not reach ref
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ref, y_ours = ref(x), ours(x)
        assert y_ours.dtype == y_ref.dtype == torch.bfloat16
        assert rel_err(y_ours, y32) <= 2 * rel_err(y_ref, y32) + 1e-3


@pytest.fixture
def fx_torchvision_graph():
    from fastres.nn.blocks import fx_torchvision_graph
    assert fx_torchvision_graph() is False  # the default: blocks are fx leaves (tests/test_dropin.py)
    fx_torchvision_graph(True)
    yield
    fx_torchvision_graph(False)


def test_fx_feature_extraction_and_relu_hooks_see_torchvision_graph(fx_torchvision_graph):
    """With fx_torchvision_graph(True), torchvision's create_feature_extractor (torch.fx)
    traces the torchvision (unfused) forward, so the node names are torchvision's."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    torch.manual_seed(0)
    ref = randomize(tvr.resnet18(num_classes=4)).double().eval()
    ours = fastres.resnet18(num_classes=4).double().eval()
    ours.load_state_dict(ref.state_dict())
    assert get_graph_node_names(ours) == get_graph_node_names(ref)
    nodes = {"layer1.0.relu_1": "a", "layer3.1.add": "b", "layer4": "c"}
    fr, fv = create_feature_extractor(ours, nodes), create_feature_extractor(ref, nodes)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out_r, out_v = fr(x), fv(x)
    for k in "abc":
        assert rel_err(out_r[k], out_v[k]) < 1e-12
    seen = []
    ours.layer2[0].relu.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert rel_err(ours(x), ref(x)) < 1e-12
    assert len(seen) == 2  # called twice per block, as in torchvision
