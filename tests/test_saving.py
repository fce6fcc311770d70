"""Saving and export (issue #12): pickle, torch.save/torch.load of the state and of the
whole model, copy.deepcopy (with an independent eval fold cache), torch.export of an
eval model, ONNX (dynamo exporter) run by onnxruntime — each with outputs equal to eager."""
from __future__ import annotations

import copy
import importlib.util
import pickle

import pytest
import torch

import fastres
from fastres import fold
from fastres.nn import BatchNormAct2d
from resnet_ref import randomize


def _models():
    return {
        "resnet_basic": lambda: fastres.ResNet(fastres.BasicBlock, [1, 1, 1, 1], num_classes=5),
        "resnet_bottleneck": lambda: fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=5,
                                                    width_per_group=16),
        "cifar_resnet8": lambda: fastres.cifar_resnet(8),
    }


MODELS = _models()


def _model(name, train=False):
    torch.manual_seed(0)
    m = randomize(MODELS[name]())
    # one training step so running statistics and num_batches_tracked are not the defaults
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 16, 16))
    return m.train(train)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_pickle_and_torch_save_round_trip(name, tmp_path):
    m = _model(name)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
    # pickle of the whole model
    m2 = pickle.loads(pickle.dumps(m))
    assert type(m2) is type(m)
    _same_state(m, m2)
    # torch.save of the state_dict (weights_only load) into a fresh model
    path = tmp_path / "state.pt"
    torch.save(m.state_dict(), path)
    m3 = MODELS[name]()
    m3.load_state_dict(torch.load(path, weights_only=True), strict=True)
    m3.eval()
    # torch.save of the whole model (a pickle: weights_only=False)
    path = tmp_path / "model.pt"
    torch.save(m, path)
    m4 = torch.load(path, weights_only=False)
    for other in (m2, m3, m4):
        with torch.no_grad():
            assert torch.equal(other(x), want)
    # and they still train: one step changes the running statistics like the original's
    for other in (m, m4):
        other.train()
        with torch.no_grad():
            other(x)
    _same_state(m, m4)


def test_batchnormact_pickles_and_saves(tmp_path):
    bn = BatchNormAct2d(3, momentum=None)
    bn(torch.randn(4, 3, 2, 2))
    bn2 = pickle.loads(pickle.dumps(bn))
    assert bn2.activation == "relu" and bn2.momentum is None
    _same_state(bn, bn2)
    torch.save(bn, tmp_path / "bn.pt")
    bn3 = torch.load(tmp_path / "bn.pt", weights_only=False)
    x, r = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert torch.equal(bn3(x, residual=r), bn(x, residual=r))


@pytest.mark.parametrize("name", list(MODELS))
def test_deepcopy_has_its_own_fold_cache(name):
    m = _model(name)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = m(x)  # fills m's fold cache
    n_before = fold.cache_size(m)
    assert n_before > 0
    c = copy.deepcopy(m)
    assert fold.cache_size(c) == 0  # the copy shares no cache entry with the original
    for (a, pa), (_, pb) in zip(m.named_parameters(), c.named_parameters()):
        assert pa.data_ptr() != pb.data_ptr(), a
    with torch.no_grad():
        assert torch.equal(c(x), want)
        # changing the copy's weights (in place, seen by the cache) changes only the copy's output
        for mod in c.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.mul_(2.0)
        changed = c(x)
        assert not torch.equal(changed, want)
        assert torch.equal(m(x), want)
    assert fold.cache_size(m) == n_before


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_eval_matches_eager(name):
    m = _model(name)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
    ep = torch.export.export(m, (x,))
    # a portable program: torchvision's aten ops, no fastres op (it loads without fastres)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("fastres" in t for t in targets), targets
    assert any("conv" in t for t in targets), targets
    got = ep.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the program is self-contained: a different batch agrees too (shapes as exported)
    x2 = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), m(x2), rtol=1e-5, atol=1e-5)


def _missing(*mods):
    return [m for m in mods if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("name", ["resnet_basic", "cifar_resnet8"])
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    missing = _missing("onnx", "onnxscript", "onnxruntime")
    if missing:
        pytest.skip(f"ONNX export check needs {', '.join(missing)} (pip install onnx onnxscript onnxruntime)")
    import onnxruntime as ort
    m = _model(name)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = m(x)
    prog = torch.onnx.export(m, (x,), dynamo=True)
    path = tmp_path / f"{name}.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
    # the graph holds standard ONNX ops only (no fastres custom domain)
    domains = {n.domain for n in prog.model_proto.graph.node}
    assert not any("fastres" in d for d in domains), domains


def test_batchnormact_exports_portably():
    bn = BatchNormAct2d(3).eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ep = torch.export.export(bn, (x, r))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("fastres" in t for t in targets), targets
    torch.testing.assert_close(ep.module()(x, r), bn(x, r))
