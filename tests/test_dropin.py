"""Drop-in behaviour beyond forward/backward parity (issue 9): TorchScript and
torch.jit.trace, torch.fx agreeing with eager exactly (torchvision's own test
tolerances), BatchNormAct2d's full nn.BatchNorm2d constructor and identity, and
PyTorch's exception types."""
from __future__ import annotations

import copy
import os
import inspect
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from fastres import functional as FF
from fastres.nn import BatchNormAct2d
from resnet_ref import randomize, rel_err


@pytest.fixture(autouse=True)
def _quiet_jit():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _model(name, **kw):
    torch.manual_seed(0)
    if name == "cifar20_A":
        return randomize(fastres.cifar_resnet(20, "A")).double()
    return randomize(getattr(fastres, name)(num_classes=7, **kw)).double()


def _run_pair(a, b, x, train):
    """Outputs of two models that start from the same state, in the same mode."""
    a.train(train), b.train(train)
    return a(x), b(x)


# ----------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "cifar20_A"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_script_matches_eager(name, train):
    model = _model(name)
    scripted = torch.jit.script(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y, ys = _run_pair(model, scripted, x, train)
    # (training mode: batch statistics of 2x1x1 maps deep in the net amplify fp64 rounding)
    assert rel_err(ys, y) < (1e-7 if train else 1e-10)
    if train:  # the scripted (unfused) forward updated the running statistics the same way
        for (n, a), b in zip(model.state_dict().items(), scripted.state_dict().values()):
            assert (rel_err(a, b) < 1e-7) if a.is_floating_point() else torch.equal(a, b), n
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    again = torch.jit.load(buf)
    again.eval(), model.eval()
    assert rel_err(again(x), model(x)) < 1e-10


def test_script_fp32_and_block_with_batchnormact_norm_layer():
    model = randomize(fastres.resnet18(num_classes=5, norm_layer=BatchNormAct2d)).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)


def test_script_converted_model_and_its_fx_graph():
    tv = randomize(tvr.resnet18(num_classes=5)).double().eval()
    model = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    scripted = torch.jit.script(model)
    gm = torch.fx.symbolic_trace(model)
    scripted_gm = torch.jit.script(gm)
    for m in (scripted, gm, scripted_gm):
        assert rel_err(m(x), tv(x)) < 1e-10


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_script_batchnormact2d(activation, momentum):
    torch.manual_seed(0)
    bn = BatchNormAct2d(6, momentum=momentum, activation=activation).double()
    scripted = torch.jit.script(copy.deepcopy(bn))
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    r = torch.randn_like(x)
    for train in (True, True, False):
        y, ys = bn.train(train)(x, r), scripted.train(train)(x, r)
        assert rel_err(ys, y) < 1e-12
    for (n, a), b in zip(bn.state_dict().items(), scripted.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0), n


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_trace_matches_eager_and_is_portable(train):
    model = _model("resnet18")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(copy.deepcopy(model).train(train), x, check_trace=False)
    # no Python control flow of fastres's baked into the trace
    # (fastres's own files only: a checkout named "fastres" holds its .venv, torch included)
    ours = (os.path.dirname(os.path.abspath(fastres.__file__)) + os.sep,
            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastres.__file__))), "kernels") + os.sep)
    baked = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen
             if os.path.abspath(w.filename).startswith(ours) and issubclass(w.category, torch.jit.TracerWarning)]
    assert not baked, "\n".join(baked[:5])
    assert "fastres::" not in str(traced.inlined_graph)  # aten only: runs and saves without fastres
    y, yt = _run_pair(model, traced, x, train)
    assert rel_err(yt, y) < 1e-10
    if not train:  # (a trace bakes the mode in, as torchvision's does)
        x2 = torch.randn(3, 3, 24, 40, dtype=torch.float64)  # another shape through the same trace
        assert rel_err(traced(x2), model(x2)) < 1e-10


# ----------------------------------------------------------------------------- torch.fx
def test_fx_symbolic_trace_agrees_with_eager_bit_for_bit():
    """torchvision's _check_fx_compatible asserts torch.testing.assert_close(eager,
    fx); fastres's fx graph runs the eager (fused, folded) forward, so it is exact."""
    torch.manual_seed(0)
    model = randomize(fastres.resnet50(num_classes=10)).eval()
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][:6] == \
        ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1.1"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    # training mode at run time: the blocks run the eager forward; the stem is
    # torchvision's conv1 -> bn1 -> relu nodes, eager fuses its BN + ReLU (equal to rounding)
    model.double()
    gm = torch.fx.symbolic_trace(model)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    before = [model.bn1.num_batches_tracked.item(), model.layer4[2].bn3.num_batches_tracked.item()]
    y_gm = gm.train()(x)
    assert [model.bn1.num_batches_tracked.item(), model.layer4[2].bn3.num_batches_tracked.item()] == \
        [b + 1 for b in before]  # the graph updates the model's running statistics
    assert rel_err(y_gm, model.train()(x)) < 1e-10


@pytest.mark.parametrize("name", ["resnet101", "resnet152"])
def test_fx_deep_nets_agree_with_eager(name):
    """The deep nets where the unfused fx graph differed by 6e-5 (relative) from eager."""
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    model = getattr(fastres, name)(num_classes=50).eval()
    x = torch.rand(1, 3, 96, 96)
    feats = {}
    for i in range(1, 5):
        getattr(model, f"layer{i}").register_forward_hook(lambda m, inp, out, i=i: feats.__setitem__(i, out))
    extractor = create_feature_extractor(model, {"layer1": "1", "layer2": "2", "layer3": "3", "layer4": "4",
                                                 "fc": "fc"})
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        y = model(x)  # (after tracing: the hooks also saw the tracer's proxies)
        fx = extractor(x)
        gm_out = gm(x)
    torch.testing.assert_close(gm_out, y)  # torchvision's test_models tolerance (assert_close defaults)
    assert torch.equal(fx["fc"], y)
    for i in range(1, 5):
        assert torch.equal(fx[str(i)], feats[i])


def test_feature_extraction_methods_equivalence():
    """torchvision's own test (test_backbone_utils): IntermediateLayerGetter (eager) and
    create_feature_extractor (fx) give *equal* features on resnet18 in eval."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.feature_extraction import create_feature_extractor
    model = fastres.resnet18().eval()
    return_layers = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
    ilg_model = IntermediateLayerGetter(model, return_layers).eval()
    fx_model = create_feature_extractor(model, return_layers)
    for (n1, p1), (n2, p2) in zip(ilg_model.named_parameters(), fx_model.named_parameters()):
        assert n1 == n2 and p1.equal(p2)
    inp = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        ilg_out = ilg_model(inp)
        fgn_out = fx_model(inp)
    assert list(ilg_out) == list(fgn_out)
    for k in ilg_out:
        assert ilg_out[k].equal(fgn_out[k]), k


def test_feature_extractor_scripts_and_trains():
    """torchvision's test_jit_forward_backward: a scripted train-mode feature extractor
    runs forward and backward; and switching the extractor to eval follows the model."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    torch.manual_seed(0)
    model = fastres.resnet18(num_classes=4).train()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert "layer2.1" in train_nodes and train_nodes == eval_nodes
    fx_model = create_feature_extractor(model, {"layer2.1": "a", "fc": "b"})
    scripted = torch.jit.script(fx_model)
    x = torch.rand(2, 3, 32, 32)
    out = scripted(x)
    (out["a"].mean() + out["b"].mean()).backward()
    assert all(p.grad is not None for p in model.layer1.parameters())
    fx_model.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fx_model(x)["b"], model(x))


def test_fx_batchnormact2d_is_a_leaf():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = BatchNormAct2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    net = randomize(Net()).eval()
    gm = torch.fx.symbolic_trace(net)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "bn"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))


# ----------------------------------------------------------------------------- BatchNormAct2d constructor
def _bn_params():
    return [p for p in inspect.signature(nn.BatchNorm2d.__init__).parameters.values() if p.name != "self"]


def test_batchnormact2d_takes_every_batchnorm2d_argument():
    """Every argument of the installed nn.BatchNorm2d (torch 2.14: keyword-only bias=;
    torch 2.11: none) is accepted with the same meaning."""
    values = {"num_features": 5, "eps": 1e-3, "momentum": None, "affine": True, "track_running_stats": False,
              "device": "cpu", "dtype": torch.float64, "bias": False}
    kwargs = {p.name: values[p.name] for p in _bn_params()}
    ours, ref = BatchNormAct2d(**kwargs), nn.BatchNorm2d(**kwargs)
    assert ours.extra_repr().startswith(ref.extra_repr())
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    positional = [values[p.name] for p in _bn_params() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert BatchNormAct2d(*positional).eps == nn.BatchNorm2d(*positional).eps
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        BatchNormAct2d(5, colour=1)
    with pytest.raises(TypeError):
        nn.BatchNorm2d(5, colour=1)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
                    reason="this torch's nn.BatchNorm2d has no bias= argument (added in torch 2.14)")
def test_batchnormact2d_bias_false():
    ours = BatchNormAct2d(4, bias=False, activation="none").double()
    ref = nn.BatchNorm2d(4, bias=False).double()
    assert ours.bias is None and ours.weight is not None and repr(ours)[len("BatchNormAct2d"):] == \
        repr(ref)[len("BatchNorm2d"):]
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for train in (True, False):
        assert rel_err(ours.train(train)(x), ref.train(train)(x)) < 1e-12


def test_batchnormact2d_none_is_a_batchnorm2d():
    torch.manual_seed(0)
    ref = randomize(nn.Sequential(nn.BatchNorm2d(6)))[0].double()
    ours = BatchNormAct2d(6, activation="none").double()
    assert isinstance(ours, nn.BatchNorm2d) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert ours.extra_repr() == ref.extra_repr()
    assert repr(ours) == repr(ref).replace("BatchNorm2d", "BatchNormAct2d", 1)
    ours.load_state_dict(ref.state_dict())
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in ref.state_dict().items()}
    assert ours.state_dict()._metadata[""]["version"] == ref.state_dict()._metadata[""]["version"]
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    for train in (True, False):
        assert rel_err(ours.train(train)(x), ref.train(train)(x)) < 1e-12
    for (n, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0), n
    # an old checkpoint (version 1: no num_batches_tracked) loads as into nn.BatchNorm2d
    old = {k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"}
    old = type(ref.state_dict())(old)
    old._metadata = {"": {"version": 1}}
    a, b = BatchNormAct2d(6, activation="none").double(), nn.BatchNorm2d(6).double()
    a.load_state_dict(old), b.load_state_dict(old)
    assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 0
    assert a.num_batches_tracked.dtype == torch.long
    with pytest.raises(RuntimeError, match="num_batches_tracked"):  # strict, version 2: missing key
        old2 = type(old)(old)
        old2._metadata = {"": {"version": 2}}
        BatchNormAct2d(6, activation="none").double().load_state_dict(old2)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        nn.BatchNorm2d(6).double().load_state_dict(old2)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_zero_batch_channels_last_stays_channels_last(train, activation):
    bn = BatchNormAct2d(4, activation=activation).train(train)
    ref = nn.BatchNorm2d(4).train(train)
    x = torch.randn(0, 4, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    for y in (bn(x), bn(x, torch.zeros_like(x))):
        assert y.shape == x.shape and y.stride() == ref(x).stride() == x.stride()
        y.sum().backward()


# ----------------------------------------------------------------------------- exception types
def _raises_like_torch(fn_ours, fn_torch, *types, match):
    """fastres raises (a subclass of) every type PyTorch raises for the same mistake,
    with its own clear message."""
    with pytest.raises(Exception) as ref:
        fn_torch()
    with pytest.raises(Exception) as got:
        fn_ours()
    for t in (type(ref.value),) + types:
        assert isinstance(got.value, t), (type(got.value).__mro__, t)
    assert "fastres" in str(got.value) or "BasicBlock" in str(got.value) or "stem" in str(got.value)
    for m in match:
        assert m in str(got.value), str(got.value)


def test_exception_types_of_batchnormact2d():
    for act in ("relu", "none"):
        bn, ref = BatchNormAct2d(3, activation=act), nn.BatchNorm2d(3)
        x = torch.randn(2, 3, 4, 4)
        _raises_like_torch(lambda: bn(torch.randn(2, 4, 4, 4)), lambda: ref(torch.randn(2, 4, 4, 4)),
                           RuntimeError, ValueError, match=["4 channels", "num_features=3"])
        _raises_like_torch(lambda: bn(x.long()), lambda: ref(x.long()), NotImplementedError, RuntimeError,
                           TypeError, match=["int64"])
        _raises_like_torch(lambda: bn(x.double()), lambda: ref(x.double()), RuntimeError, TypeError,
                           match=["weight", "float32", "float64"])
        for name in ("weight", "running_mean", "running_var"):
            bad, bad_ref = copy.deepcopy(bn).eval(), copy.deepcopy(ref).eval()
            for m in (bad, bad_ref):
                t = torch.ones(5)
                if name == "weight":
                    m.weight = nn.Parameter(t)
                else:
                    setattr(m, name, t)
            _raises_like_torch(lambda: bad(x), lambda: bad_ref(x), RuntimeError, ValueError,
                               match=[name, "(3,)", "(5,)"])


def test_exception_types_of_functional():
    x = torch.randn(2, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    _raises_like_torch(lambda: FF.batch_norm_act(x, rm, rv, torch.ones(4), None, True),
                       lambda: F.batch_norm(x, rm, rv, torch.ones(4), None, True),
                       RuntimeError, ValueError, match=["weight", "(3,)", "(4,)"])
    _raises_like_torch(lambda: FF.batch_norm_act(x.int(), rm, rv), lambda: F.batch_norm(x.int(), rm, rv),
                       NotImplementedError, match=["int32"])


def test_exception_types_of_models():
    model, ref = fastres.resnet18(), tvr.resnet18()
    x = torch.randn(1, 3, 32, 32)
    _raises_like_torch(lambda: model(torch.randn(1, 4, 32, 32)), lambda: ref(torch.randn(1, 4, 32, 32)),
                       ValueError, match=["3 channels", "4 channels"])
    _raises_like_torch(lambda: model(x.double()), lambda: ref(x.double()), TypeError,
                       match=["float64", "float32"])
    _raises_like_torch(lambda: model(x.long()), lambda: ref(x.long()), NotImplementedError, TypeError,
                       match=["int64"])
    blk, ref_blk = fastres.BasicBlock(8, 8), tvr.BasicBlock(8, 8)
    _raises_like_torch(lambda: blk(torch.randn(1, 5, 4, 4)), lambda: ref_blk(torch.randn(1, 5, 4, 4)),
                       ValueError, match=["8 channels", "5 channels"])
