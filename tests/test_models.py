"""fastres ResNets against torchvision's (and against independent torchvision-block
references for the paper's CIFAR and plain nets): strict state_dict loading, then
output, input gradient, every parameter gradient and the running statistics after
several training steps, in eval and in training; fp64 (≤ 1e-9 relative), fp32
(≤ 1e-4) with contiguous and channels_last inputs, bf16 autocast (error ≤ 2× of
torchvision's own bf16 error against fp32). Runs on the default backend.

Sizes are kept small for CI (2 cores): 32×32 images, batch 2 in eval and batch 4 in
training. (The deepest maps are 1×1: with batch 2 a training BN would normalise two
values per channel, whose output is ±1 whatever the input — its input gradient is
zero analytically and rounding noise numerically, which no tolerance can compare.)
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from conftest import run_on, targets
from resnet_ref import RefCifar, TOL, check_parity, randomize, ref_plain_imagenet, rel_err, twin

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
         "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"]


def _pair(arch, dtype=torch.float64, fmt=torch.contiguous_format, **kw):
    ref = getattr(torchvision.models, arch)(num_classes=10, **kw)
    ref = randomize(ref, margin=dtype != torch.float64).to(dtype).to(memory_format=fmt)
    ours = twin(ref, lambda: getattr(fastres, arch)(num_classes=10, **kw), dtype, fmt)
    return ref, ours


# ----------------------------------------------------------------------------- every depth, fp64
@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_arch_fp64_eval_and_train(arch):
    ref, ours = _pair(arch)
    assert type(ours) is fastres.ResNet
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    check_parity(ref, ours, x[:2], train=False, tol=TOL[torch.float64], what=f"{arch} eval")
    steps = 2 if arch in ("resnet18", "resnet34", "resnet50", "resnext50_32x4d") else 1
    check_parity(ref, ours, x, train=True, tol=TOL[torch.float64], steps=steps, what=f"{arch} train")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_fp32_layouts(arch, fmt):
    """fp32: within 1e-4 of torchvision; where torchvision's own fp32 result is further
    than that from fp64 (see check_parity), within 2x its error of the fp64 truth.

    Kinks: BN statistics keep pre-activations away from the ReLU kinks
    (``randomize(margin=True)``), and the stem's max-pool — torch's own, not fused by
    fastres — is an average pool in both nets here: a max-pool's choice between two
    values 1e-7 apart is decided by rounding, and one such flip moves the input gradient
    by ~1e-2. The fp64 tests run the real max-pool and kinks everywhere."""
    ref, ours = _pair(arch, torch.float32, fmt)
    ref.maxpool = nn.AvgPool2d(3, 2, 1)
    ours.maxpool = nn.AvgPool2d(3, 2, 1)
    truth = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    check_parity(ref, ours, x[:, :, :32, :32], train=False, tol=TOL[torch.float32], what=f"{arch} eval", truth=truth)
    check_parity(ref, ours, x, train=True, tol=TOL[torch.float32], steps=2, what=f"{arch} train", truth=truth)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "conv+epilogue"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_fp32_inference_no_grad(fmt, onednn):
    """Inference (no_grad / inference_mode): cached folds, and on the CPU the folded conv
    as one oneDNN primitive with bias, residual add and ReLU fused (or, switched off,
    conv + the fused epilogue op). Every block kind: basic, bottleneck, grouped,
    dilated, option A / B / C shortcuts."""
    from resnet_ref import RefCifar
    prev = fastres.fold.use_onednn()
    fastres.fold.use_onednn(onednn)
    try:
        cases = [_pair(a, torch.float32, fmt) for a in ("resnet18", "resnet50", "resnext50_32x4d")]
        cases.append(_pair("resnet50", torch.float32, fmt, replace_stride_with_dilation=[False, False, True]))
        for sc in ("A", "C"):
            ref = randomize(RefCifar(8, sc), margin=True).to(memory_format=fmt)
            cases.append((ref, twin(ref, lambda: fastres.cifar_resnet(8, sc), torch.float32, fmt)))
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
        for ref, ours in cases:
            ref.eval(), ours.eval()
            with torch.no_grad():
                y_ref = ref(x)
                y, y_again = ours(x), ours(x)
            with torch.inference_mode():
                y_inf = ours(x)
            assert rel_err(y, y_ref) <= 1e-4 and torch.equal(y, y_again) and torch.equal(y, y_inf)
            assert fastres.fold.cache_size(ours) > 0
    finally:
        fastres.fold.use_onednn(prev)


def test_channels_last_input_contiguous_model_fp64():
    """Mixed layouts: a contiguous model fed channels_last input (and the reverse)."""
    ref, ours = _pair("resnet50")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    check_parity(ref, ours, x, train=True, tol=TOL[torch.float64], what="cl input")
    ref, ours = _pair("resnet18", fmt=torch.channels_last)
    check_parity(ref, ours, x.contiguous(), train=False, tol=TOL[torch.float64], what="cl model")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_bf16_autocast_within_2x_of_torchvision(arch, train):
    """Under torch.autocast(bfloat16): fastres's error against the fp32 result is at
    most 2x torchvision's own bf16 error (+1e-3); also for the running statistics."""
    ref, ours = _pair(arch, torch.float32, torch.channels_last)
    fp32 = copy.deepcopy(ref)
    for m in (ref, ours, fp32):
        m.train(train)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y32 = fp32(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = ref(x)
        y_ours = ours(x)
    assert y_ours.dtype == y_ref.dtype == torch.bfloat16
    theirs, mine = rel_err(y_ref, y32), rel_err(y_ours, y32)
    assert mine <= 2 * theirs + 1e-3, f"bf16 error {mine:.3g} > 2 x torchvision's {theirs:.3g}"
    if train:  # running statistics stay fp32, as close to the fp32 run's as torchvision's are
        b32, bref = dict(fp32.named_buffers()), dict(ref.named_buffers())
        for n, b in ours.named_buffers():
            assert b.dtype == bref[n].dtype
            if b.is_floating_point():
                assert rel_err(b, b32[n]) <= 2 * rel_err(bref[n], b32[n]) + 1e-3, n


def test_dilation_and_zero_init_residual():
    ref, ours = _pair("resnet50", replace_stride_with_dilation=[False, True, True], zero_init_residual=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    check_parity(ref, ours, x, train=False, tol=1e-9, what="dilated eval")
    check_parity(ref, ours, x, train=True, tol=1e-9, what="dilated train")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_same_init_as_torchvision(arch):
    torch.manual_seed(3)
    ref = getattr(torchvision.models, arch)(zero_init_residual=True)
    torch.manual_seed(3)
    ours = getattr(fastres, arch)(zero_init_residual=True)
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(sr) == list(so)
    for k in sr:
        assert torch.equal(sr[k], so[k]), k


@pytest.mark.parametrize("norm", ["groupnorm", "frozen"])
def test_other_norm_layers_fall_back_correctly(norm):
    from torchvision.ops.misc import FrozenBatchNorm2d
    layer = (lambda c: nn.GroupNorm(8, c)) if norm == "groupnorm" else FrozenBatchNorm2d
    torch.manual_seed(0)
    ref = tvr.resnet18(num_classes=10, norm_layer=layer).double()
    if norm == "frozen":
        for m in ref.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.7, 1.3), m.bias.normal_(0, 0.2), m.running_var.uniform_(0.7, 1.3)
    ours = twin(ref, lambda: fastres.resnet18(num_classes=10, norm_layer=layer), torch.float64)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    check_parity(ref, ours, x, train=True, tol=1e-9, what=norm)
    check_parity(ref, ours, x, train=False, tol=1e-9, what=norm)


# ----------------------------------------------------------------------------- API
def test_resnet50_class_and_weights(tmp_path):
    m = fastres.ResNet50()
    assert isinstance(m, fastres.ResNet) and m.fc.out_features == 1000
    assert sum(p.numel() for p in m.parameters()) == 25557032  # torchvision's num_params
    ref = randomize(tvr.resnet50(num_classes=7))
    m = fastres.ResNet50(weights=ref.state_dict())  # num_classes taken from the state_dict
    assert m.fc.out_features == 7
    path = tmp_path / "r50.pt"
    torch.save(ref.state_dict(), path)
    for ours in (fastres.resnet50(weights=str(path)), fastres.ResNet50(weights=path, num_classes=7)):
        for k, v in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
    bad = dict(ref.state_dict())
    bad.pop("layer1.0.bn1.running_var")
    with pytest.raises(RuntimeError, match="Missing key"):
        fastres.resnet50(weights=bad)
    with pytest.raises(TypeError, match="state_dict, a path"):
        fastres.resnet50(weights=3)


def _hub_cache(tmp_path, monkeypatch, builder: str, weights_enum, *members: str):
    """torch.hub's cache under tmp_path (TORCH_HOME) holding, for each weights member,
    the file torchvision would download (a randomised torchvision model's state_dict, so
    nothing is downloaded); returns {member: state_dict}."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    out = {}
    for i, member in enumerate(members):
        torch.manual_seed(i)
        sd = randomize(getattr(tvr, builder)()).state_dict()
        path = ckpt / os.path.basename(weights_enum[member].url)
        torch.save(sd, path)
        assert torch.hub.get_dir() == str(tmp_path / "hub") and path.exists()
        out[member] = sd
    return out


def test_torchvision_weights_enum_name_and_pretrained(tmp_path, monkeypatch):
    """torchvision's weights arguments, loaded the way torchvision's builders load them
    (from torch.hub's cache, here pre-filled): the enum, its name, the qualified name and
    the legacy ``pretrained=True`` give exactly the state torchvision's resnet50 gets."""
    W = tvr.ResNet50_Weights
    sds = _hub_cache(tmp_path, monkeypatch, "resnet50", W, "IMAGENET1K_V1", "IMAGENET1K_V2")
    assert W.DEFAULT is W.IMAGENET1K_V2
    x = torch.randn(2, 3, 64, 64)
    for arg, member in ((W.DEFAULT, "IMAGENET1K_V2"), ("DEFAULT", "IMAGENET1K_V2"),
                        ("ResNet50_Weights.IMAGENET1K_V1", "IMAGENET1K_V1"), (W.IMAGENET1K_V1, "IMAGENET1K_V1")):
        theirs = tvr.resnet50(weights=arg).eval()
        for ours in (fastres.resnet50(weights=arg), fastres.ResNet50(weights=arg, progress=False)):
            assert ours.fc.out_features == 1000
            for k, v in sds[member].items():
                assert torch.equal(ours.state_dict()[k], v), (arg, k)
            with torch.no_grad():
                torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        m = fastres.resnet50(pretrained=True)
    assert torch.equal(m.fc.weight, sds["IMAGENET1K_V1"]["fc.weight"])
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        m = fastres.resnet50(pretrained=False, num_classes=10)
    assert m.fc.out_features == 10
    # torchvision's refusals, in its exception types and words
    for build in (tvr.resnet50, fastres.resnet50):
        with pytest.raises(ValueError, match="'num_classes' expected value 1000 but got 10"):
            build(weights=W.DEFAULT, num_classes=10)
        with pytest.raises(TypeError, match="expected ResNet50_Weights but received ResNet18_Weights"):
            build(weights=tvr.ResNet18_Weights.DEFAULT)
    with pytest.raises(TypeError, match="not both"):
        fastres.resnet50(weights=W.DEFAULT, pretrained=True)
    with pytest.raises(FileNotFoundError):  # not a member's name: a path, as before
        fastres.resnet50(weights=str(tmp_path / "IMAGENET1K_V3"))


@pytest.mark.parametrize("builder,param,value", [("resnext50_32x4d", "groups", 16),
                                                 ("resnext101_64x4d", "width_per_group", 8),
                                                 ("wide_resnet50_2", "width_per_group", 64)])
def test_builder_fixed_arguments_refused_like_torchvision(builder, param, value):
    for build in (getattr(tvr, builder), getattr(fastres, builder)):
        with pytest.raises(ValueError, match=f"The parameter '{param}' expected value .* but got {value} instead"):
            build(**{param: value})


def test_builders_accept_torchvision_block_classes_and_kwargs():
    m = fastres.ResNet(tvr.Bottleneck, [1, 1, 1, 1], num_classes=3, groups=2, width_per_group=32)
    assert isinstance(m.layer1[0], fastres.Bottleneck)
    with pytest.raises(ValueError, match="BasicBlock only supports"):
        fastres.resnet18(groups=2)
    with pytest.raises(ValueError, match="shortcut"):
        fastres.resnet18(shortcut="D")


# ----------------------------------------------------------------------------- the paper's models
TABLE6 = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("depth", sorted(TABLE6))
def test_cifar_param_counts_table6(depth):
    m = fastres.cifar_resnet(depth)
    n = _nparams(m)
    assert abs(n - TABLE6[depth]) / TABLE6[depth] < 0.03, (depth, n)
    # option A adds no parameters: exactly the plain net's count; B adds projections at the 2 transitions
    assert n == _nparams(fastres.cifar_resnet(depth, shortcut=None))
    if depth <= 56:
        nb = _nparams(fastres.cifar_resnet(depth, shortcut="B"))
        assert nb == n + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


@pytest.mark.parametrize("shortcut", ["A", "B", "C", None], ids=["A", "B", "C", "plain"])
def test_cifar_structure_and_output_shape(shortcut):
    m = fastres.cifar_resnet(20, shortcut=shortcut, num_classes=7)
    blocks = [b for b in m.modules() if isinstance(b, fastres.BasicBlock)]
    assert len(blocks) == 9 and sum(isinstance(x, nn.Conv2d) for x in m.modules()) - (
        sum(b.downsample is not None and isinstance(b.downsample, nn.Sequential) for b in blocks)) == 19
    assert [m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels, m.layer3[0].conv1.out_channels] == \
        [16, 32, 64]
    downs = [b.downsample for b in blocks]
    if shortcut == "A":
        assert [type(d).__name__ for d in downs if d is not None] == ["PadShortcut", "PadShortcut"]
        assert all(not list(d.parameters()) for d in downs if d is not None)
    elif shortcut == "B":
        assert sum(d is not None for d in downs) == 2
    elif shortcut == "C":
        assert all(isinstance(d, nn.Sequential) for d in downs)
    else:
        assert all(d is None for d in downs) and not any(b.shortcut for b in blocks)
    x = torch.randn(2, 3, 32, 32)
    feats = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(m, name).register_forward_hook(lambda mod, i, o, name=name: feats.__setitem__(name, o.shape))
    assert m(x).shape == (2, 7)
    assert feats == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}


@pytest.mark.parametrize("shortcut", ["A", "B", "C", None], ids=["A", "B", "C", "plain"])
def test_cifar_parity_fp64(shortcut):
    ref = randomize(RefCifar(20, shortcut)).double()
    ours = twin(ref, lambda: fastres.cifar_resnet(20, shortcut), torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_parity(ref, ours, x, train=False, tol=1e-9, what=f"cifar20-{shortcut} eval")
    check_parity(ref, ours, x, train=True, tol=1e-9, steps=2, what=f"cifar20-{shortcut} train")


@pytest.mark.parametrize("backend,device", targets())  # the CPU backends; cuda, triton on CUDA (gpu)
def test_small_resnet_each_backend(backend, device):
    """A whole (small) net on every available backend: option-A CIFAR ResNet-8 and its
    reference, fp64, training (with running statistics) and eval; channels_last."""
    ref = randomize(RefCifar(8, "A")).double()
    ours = twin(ref, lambda: fastres.cifar_resnet(8), torch.float64)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last).to(device)
    with run_on(backend, device):
        check_parity(ref, ours, x, train=True, tol=1e-9, steps=2, what=f"{backend} train")
        check_parity(ref, ours, x, train=False, tol=1e-9, what=f"{backend} eval")


def test_cifar_option_a_fp32_channels_last_and_bf16():
    ref = randomize(RefCifar(20, "A"), margin=True).to(memory_format=torch.channels_last)
    ours = twin(ref, lambda: fastres.cifar_resnet(20), torch.float32, torch.channels_last)
    truth = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    check_parity(ref, ours, x, train=False, tol=1e-4, what="A eval", truth=truth)
    check_parity(ref, ours, x, train=True, tol=1e-4, steps=2, what="A train", truth=truth)
    y32 = copy.deepcopy(ref)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_ours = ref(x), ours(x)
    assert rel_err(y_ours, y32) <= 2 * rel_err(y_ref, y32) + 1e-3


def test_plain_has_no_shortcut():
    """With every residual branch's last BN zeroed, a residual net passes its input
    through (identity shortcuts) while the plain net outputs relu(0) = 0 everywhere."""
    x = torch.randn(2, 3, 32, 32)
    for shortcut in ("A", None):
        m = fastres.cifar_resnet(20, shortcut=shortcut).eval()
        for b in m.modules():
            if isinstance(b, fastres.BasicBlock):
                nn.init.zeros_(b.bn2.weight), nn.init.zeros_(b.bn2.bias)
        feats = m.layer1(m.relu(m.bn1(m.conv1(x))))
        stem = torch.relu(m.bn1(m.conv1(x)))
        if shortcut is None:
            assert torch.count_nonzero(feats) == 0
        else:
            torch.testing.assert_close(feats, stem)


@pytest.mark.parametrize("arch,layers", [("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])])
def test_plain_imagenet_twins(arch, layers):
    plain = getattr(fastres, arch)(shortcut=None)
    res = getattr(fastres, arch)()
    proj = sum(p.numel() for n, p in res.named_parameters() if "downsample" in n)
    assert _nparams(plain) == _nparams(res) - proj
    assert not any("downsample" in k for k in plain.state_dict())
    ref = randomize(ref_plain_imagenet(layers, num_classes=10)).double()
    ours = twin(ref, lambda: getattr(fastres, arch)(shortcut=None, num_classes=10), torch.float64)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    check_parity(ref, ours, x, train=False, tol=1e-9, what=f"plain {arch} eval")
    if arch == "resnet18":
        check_parity(ref, ours, x, train=True, tol=1e-9, what=f"plain {arch} train")


def test_cifar_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        fastres.cifar_resnet(21)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return fastres.resnet18(num_classes=4)


def test_bad_input_wrong_channels(small):
    small.eval()
    with pytest.raises(ValueError, match=r"stem.*expected input with 3 channels, got 4") as e:
        small(torch.randn(2, 4, 32, 32))
    assert isinstance(e.value, RuntimeError)  # what torchvision's conv raises, too
    with pytest.raises(RuntimeError, match=r"layer2\.0 \(BasicBlock\).*64 channels"):
        small.layer2[0](torch.randn(2, 32, 8, 8))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 2, 3, 32, 32), (32,)])
def test_bad_input_wrong_rank(small, shape):
    with pytest.raises(ValueError, match=r"stem.*expected 4D input"):
        small(torch.randn(shape))


def test_bad_input_dtypes(small):
    small.eval()
    with pytest.raises(TypeError, match=r"stem.*floating-point.*int64") as e:
        small(torch.zeros(2, 3, 32, 32, dtype=torch.long))
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(TypeError, match=r"stem.*float64 does not match the parameters' dtype float32"):
        small(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"layer1\.0.*float64"):
        small.layer1[0](torch.randn(2, 64, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        small([[1.0]])


def test_bad_input_one_value_per_channel_in_training(small):
    small.train()
    with pytest.raises(ValueError, match=r"layer4\.0 \(BasicBlock\).*Expected more than 1 value per channel"):
        small(torch.randn(1, 3, 32, 32))
    # torchvision raises the same type for the same input
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        tvr.resnet18(num_classes=4).train()(torch.randn(1, 3, 32, 32))
    small.eval()
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 4)  # fine in eval


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the fused blocks (training, with running
    statistics, and eval, where the fold is traced inline) without a graph break."""
    import torch._dynamo
    torch._dynamo.reset()
    ref = randomize(RefCifar(8, "A"))
    ours = twin(ref, lambda: fastres.cifar_resnet(8), torch.float32)
    eager = copy.deepcopy(ours)
    x = torch.randn(2, 3, 16, 16)
    eager(x)  # first use outside dynamo registers the backend's op family (fastres.ops.family)
    eager.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for train in (True, False):
        ours.train(train), eager.train(train)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yc, ye = compiled(xc), eager(xe)
        yc.sum().backward(), ye.sum().backward()
        assert rel_err(yc, ye) < 1e-5 and rel_err(xc.grad, xe.grad) < 1e-5
        for (n, b), (_, be) in zip(ours.named_buffers(), eager.named_buffers()):
            assert rel_err(b, be) < 1e-5 if b.is_floating_point() else torch.equal(b, be), n


BUILDERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
            "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


@pytest.mark.parametrize("builder", BUILDERS)
def test_every_builder_finds_its_torchvision_weights(builder):
    """Each builder looks its weights up under its own torchvision name (nothing loaded here)."""
    from fastres.models.resnet import _torchvision_weights
    enum = torchvision.models.get_model_weights(builder)
    assert _torchvision_weights(builder, "DEFAULT", {}) is enum.DEFAULT
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        assert _torchvision_weights(builder, None, {"pretrained": True}) is enum.IMAGENET1K_V1
    assert _torchvision_weights(builder, {"fc.weight": torch.zeros(1)}, {}) is None
    with pytest.raises(TypeError, match=f"expected {enum.__name__}"):
        getattr(fastres, builder)(weights=torchvision.models.get_model_weights(
            "resnet18" if builder != "resnet18" else "resnet34").DEFAULT)
