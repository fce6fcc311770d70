"""Eval-mode folding (fastres.fold): folded in fp32 (fp64 for fp64) then cast; cached
under no_grad / inference_mode and across train()/eval() switches (keyed by what the
fold depends on, so mode switches refold nothing); never stale — load_state_dict, an
optimizer step, any in-place change of a parameter or buffer, a swapped parameter, a
dtype / memory-format / device move each give the fresh result; differentiable when
gradients flow."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from fastres import fold
from resnet_ref import randomize, rel_err


def _pair():
    ds = nn.Sequential(tvr.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    ref = randomize(tvr.BasicBlock(8, 16, 2, ds)).double().eval()
    ours = fastres.BasicBlock(8, 16, 2, copy.deepcopy(ds)).double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _check_fresh(ref, ours, x, what):
    """ours (with whatever it has cached) equals torchvision run on ours' current state."""
    ref.load_state_dict(ours.state_dict())
    for a, b in zip(ref.modules(), ours.modules()):
        if isinstance(a, nn.BatchNorm2d):
            a.eps = b.eps  # not part of the state_dict
    ref.eval()
    with torch.no_grad():
        y_ref, y = ref(x), ours(x)
    assert rel_err(y, y_ref) < 1e-12, f"stale fold after {what}: {rel_err(y, y_ref):.3g}"


@pytest.fixture
def pair():
    ref, ours = _pair()
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        ours(x)  # fill the cache
    assert fold.cache_size(ours) == 3  # conv1+bn1, conv2+bn2, downsample
    return ref, ours, x


def test_cache_is_reused(pair, monkeypatch):
    ref, ours, x = pair
    n = []
    real = fold.fold_conv_bn
    monkeypatch.setattr(fold, "fold_conv_bn", lambda *a: n.append(1) or real(*a))
    with torch.no_grad():
        y1 = ours(x)
        y2 = ours(x)
    with torch.inference_mode():
        y3 = ours(x)
    assert n == [] and torch.equal(y1, y2) and torch.equal(y1, y3)
    _check_fresh(ref, ours, x, "nothing")


MUTATIONS = {
    "conv weight mul_": lambda m: m.conv1.weight.mul_(1.1),
    "bn weight add_": lambda m: m.bn1.weight.add_(0.1),
    "bn bias sub_": lambda m: m.bn2.bias.sub_(0.2),
    "running_mean add_": lambda m: m.bn2.running_mean.add_(0.3),
    "running_var mul_": lambda m: m.downsample[1].running_var.mul_(2.0),
    "downsample conv copy_": lambda m: m.downsample[0].weight.copy_(torch.randn_like(m.downsample[0].weight)),
    "param.data = new": lambda m: setattr(m.conv2.weight, "data", m.conv2.weight.detach() * 0.5),
    "new Parameter object": lambda m: setattr(m.conv1, "weight", nn.Parameter(m.conv1.weight.detach() * 0.7)),
    "eps changed": lambda m: setattr(m.bn1, "eps", 0.5),
    "running stats replaced": lambda m: m.bn1.register_buffer("running_var", m.bn1.running_var * 3),
}


@pytest.mark.parametrize("toggle", [False, True], ids=["eval", "eval-train-eval"])
@pytest.mark.parametrize("what", list(MUTATIONS))
def test_inplace_changes_invalidate(pair, what, toggle):
    ref, ours, x = pair
    if toggle:  # a mode switch between the cached forward and the change keeps the entries
        ours.train()
        assert fold.cache_size(ours) == 3
    with torch.no_grad():
        MUTATIONS[what](ours)
    if toggle:
        ours.eval()
    _check_fresh(ref, ours, x, what)


def _count_folds(monkeypatch):
    n = []
    real = fold.fold_conv_bn
    monkeypatch.setattr(fold, "fold_conv_bn", lambda *a: n.append(1) or real(*a))
    return n


def test_mode_switches_do_not_refold(pair, monkeypatch):
    """model.eval() before every forward (validation loops, servers) and train()/eval()
    toggles without a training step reuse the fold."""
    ref, ours, x = pair
    n = _count_folds(monkeypatch)
    with torch.no_grad():
        y0 = ours(x)
        for _ in range(3):
            ours.eval()
            assert torch.equal(ours(x), y0)
            ours.train()
            ours.eval()
            assert torch.equal(ours(x), y0)
    assert n == [] and fold.cache_size(ours) == 3
    ours.train()
    ours(x)  # a training forward moves every BN's running statistics in place
    ours.eval()
    with torch.no_grad():
        ours(x)
    assert len(n) == 3  # each conv+BN refolded once
    with torch.no_grad():
        ours.eval()
        ours(x)
    assert len(n) == 3
    _check_fresh(ref, ours, x, "a training forward between eval()s")


def test_mode_switches_keep_onednn_packed_weights(monkeypatch):
    ref, ours = _pair()
    ref.float(), ours.float()
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ours(x)
    packed = [e.packed for entries in fold._CACHE.values() for e in entries.values()]
    if not any(packed):
        pytest.skip("oneDNN's fused convolution is not available in this torch build")
    reorders = []
    real = torch._C._nn.mkldnn_reorder_conv2d_weight
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", lambda *a: reorders.append(1) or real(*a))
    with torch.no_grad():
        for _ in range(3):
            ours.train()
            ours.eval()
            assert rel_err(ours(x), ref(x)) < 1e-5
    assert reorders == []


@pytest.mark.parametrize("how", ["optimizer.step", "load_state_dict", "copy_", "no_grad mul_"])
def test_train_eval_loop_never_serves_a_stale_fold(pair, how):
    """Each in-place update kind, made in train mode between two eval() forwards."""
    ref, ours, x = pair
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(2):
        ours.train()
        if how == "optimizer.step":
            opt.zero_grad()
            ours(x).square().mean().backward()  # also moves the running statistics
            opt.step()
        elif how == "load_state_dict":
            sd = {k: (v * 1.5 if v.is_floating_point() else v) for k, v in ours.state_dict().items()}
            ours.load_state_dict(sd)
        elif how == "copy_":
            with torch.no_grad():
                ours.conv2.weight.copy_(torch.randn_like(ours.conv2.weight))
                ours.bn2.running_mean.copy_(torch.randn_like(ours.bn2.running_mean))
        else:
            with torch.no_grad():
                ours.conv1.weight.mul_(0.5)
                ours.downsample[1].weight.mul_(-1.0)
        ours.eval()
        _check_fresh(ref, ours, x, f"{how} (step {step})")


def test_load_state_dict_invalidates(pair):
    ref, ours, x = pair
    other = randomize(tvr.BasicBlock(8, 16, 2, nn.Sequential(tvr.conv1x1(8, 16, 2), nn.BatchNorm2d(16))),
                      seed=5).double()
    ours.load_state_dict(other.state_dict())
    _check_fresh(ref, ours, x, "load_state_dict")


def test_train_keeps_cache_and_training_step_is_seen(pair):
    ref, ours, x = pair
    ours.train()
    assert fold.cache_size(ours) == 3  # a mode switch drops nothing
    ours(x)  # running statistics move (in place)
    ours.eval()
    _check_fresh(ref, ours, x, "train() + a training forward")


def test_optimizer_step_invalidates(pair):
    ref, ours, x = pair
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # eval-mode fine-tuning (frozen statistics): the fold is differentiable
        opt.zero_grad()
        ours(x).square().mean().backward()
        opt.step()
        _check_fresh(ref, ours, x, "optimizer step")


def _moved_pair(ref, ours, x, **to):
    ours.to(**to)
    ref.to(**to)
    xm = x.to(device=to.get("device", x.device), dtype=to.get("dtype", x.dtype))
    if "memory_format" in to:
        xm = xm.contiguous(memory_format=to["memory_format"])
    with torch.no_grad():
        y, y_ref = ours(xm), ref(xm)
    return xm, y, y_ref


def test_dtype_and_memory_format_moves(pair, monkeypatch):
    """A real move of the parameters (new tensors: dtype, then memory format), after
    which the cache must serve the moved fold, not the old one."""
    ref, ours, x = pair
    with torch.no_grad():
        y64 = ours(x)
    n = _count_folds(monkeypatch)
    xm, y, y_ref = _moved_pair(ref, ours, x, dtype=torch.float32)
    assert y.dtype == torch.float32 and ours.conv1.weight.dtype == torch.float32
    assert len(n) == 3 and rel_err(y, y_ref) < 1e-5 and rel_err(y, y64) < 1e-5
    xm, y, y_ref = _moved_pair(ref, ours, xm, memory_format=torch.channels_last)
    assert ours.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(n) == 6 and rel_err(y, y_ref) < 1e-5
    assert y.is_contiguous(memory_format=torch.channels_last)
    for e in (e for m in ours.modules() for e in fold._CACHE.get(m, {}).values()):  # this model's folds
        assert e.weight.dtype == torch.float32
    xm, y, y_ref = _moved_pair(ref, ours, xm, dtype=torch.float64)  # back: folds again, nothing stale
    assert len(n) == 9 and rel_err(y, y_ref) < 1e-12


@pytest.mark.gpu
def test_device_move_cuda(pair):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (moves the model CPU -> CUDA -> CPU)")
    ref, ours, x = pair
    for dev in ("cuda", "cpu", "cuda"):
        xm, y, y_ref = _moved_pair(ref, ours, x, device=dev, dtype=torch.float32)
        assert y.device.type == dev and rel_err(y, y_ref) < 1e-5
        assert ours.conv1.weight.device.type == dev


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no_conv_bias", "conv_bias"])
def test_eval_with_grad_uses_the_cache_and_gives_every_gradient(conv_bias, monkeypatch):
    """Gradients flowing into the fold (eval-mode fine-tuning): the cached fold comes
    back through an autograd function whose backward is the fold's; every gradient
    (conv weight and bias, BN weight and bias, input) matches torchvision."""
    ref, ours = _pair()
    if conv_bias:
        for m in (ref, ours):
            m.conv2.bias = nn.Parameter(torch.linspace(-1, 1, 16, dtype=torch.float64))
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    ours(xo).square().sum().backward()
    assert fold.cache_size(ours) == 3
    assert rel_err(xo.grad, xr.grad) < 1e-12
    for (n, p), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, pr.grad) < 1e-12, n
    n = []
    real = fold.fold_conv_bn
    monkeypatch.setattr(fold, "fold_conv_bn", lambda *a: n.append(1) or real(*a))
    ours(xo).sum().backward()  # second forward: no refold
    assert n == []



def test_frozen_params_cached_and_input_grad_flows():
    """No parameter requires grad (a frozen backbone): the cache serves, and the input's
    gradient still flows through the cached folded weights — including ones cached
    under inference_mode."""
    ref, ours = _pair()
    for p in list(ours.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    with torch.inference_mode():
        ours(x)
    assert fold.cache_size(ours) == 3
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    ours(xo).sum().backward()
    assert rel_err(xo.grad, xr.grad) < 1e-12


def test_fold_is_fp32_then_cast():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    bn = randomize(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    conv_b, bn_b = copy.deepcopy(conv).bfloat16(), copy.deepcopy(bn).bfloat16()
    with torch.no_grad():
        w, b = fold.folded_conv_bn(conv_b, bn_b, torch.bfloat16)
        assert w.dtype == torch.bfloat16 and b.dtype == torch.float32
        s = bn_b.weight.float() / torch.sqrt(bn_b.running_var.float() + bn_b.eps)
        torch.testing.assert_close(w, (conv_b.weight.float() * s.view(-1, 1, 1, 1)).bfloat16(), rtol=0, atol=0)
        torch.testing.assert_close(b, bn_b.bias.float() - bn_b.running_mean.float() * s)


def test_autocast_dtype_is_part_of_the_key():
    ref, ours = _pair()
    ref.float(), ours.float()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        y32 = ours(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = ours(x)
        assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
        assert torch.equal(ours(x), y32)
    assert fold.cache_size(ours) == 6


def test_data_inplace_writes_need_invalidate(pair):
    """Documented limit: an in-place write through ``.data`` bypasses the version
    counter (``p.data`` has its own); ``fold.invalidate(model)`` (or of the conv)
    makes it visible. Mode switches no longer drop the cache."""
    ref, ours, x = pair
    ours.conv1.weight.data.mul_(3.0)
    fold.invalidate(ours)
    _check_fresh(ref, ours, x, ".data write + invalidate")
    ours.bn1.running_var.data.mul_(2.0)
    fold.invalidate(ours.conv1)  # entries live with the conv
    _check_fresh(ref, ours, x, ".data write + invalidate(conv)")


def test_cache_freed_with_model():
    import gc
    gc.collect()
    before = fold.cache_size()
    _, ours = _pair()
    with torch.no_grad():
        ours(torch.randn(1, 8, 6, 6, dtype=torch.float64))
    assert fold.cache_size() == before + 3
    del ours
    gc.collect()
    assert fold.cache_size() == before


def test_onednn_packed_weights_never_stale():
    """fp32 CPU inference runs one oneDNN primitive with a weight reordered once per
    input shape; it lives in the fold's cache entry, so it goes stale with it."""
    ref, ours = _pair()
    ref.float(), ours.float()
    assert fold.use_onednn()
    for shape in ((2, 8, 10, 10), (3, 8, 7, 9), (2, 8, 10, 10)):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            y = ours(x)
            assert rel_err(y, ref(x)) < 1e-5 and y.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ours.conv2.weight.mul_(-1.0)
        ours.bn2.running_var.mul_(4.0)
        x = torch.randn(2, 8, 10, 10)
        ref.load_state_dict(ours.state_dict())
        assert rel_err(ours(x), ref(x)) < 1e-5
