"""Higher-order autograd and torch.func over the fused ops (issue 9, "silent wrong results").

* Double backward: ``torch.autograd.gradgradcheck`` in float64 on ``BatchNormAct2d``
  (train/eval, residual + ReLU, affine on/off), on both blocks (train/eval) and on a
  small whole model, on every CPU backend; Hessian-vector products equal to
  ``nn.BatchNorm2d`` / torchvision's.
* Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``): jvp outputs equal
  to ``nn.BatchNorm2d`` / torchvision's.
* ``torch.func.vmap`` / ``grad`` / ``functional_call``: the same results as over
  torchvision's model where torchvision works, the same exception type where it raises.
* The first-order backward still runs the fused backward op (no extra work).

Triton runs under the interpreter here: its cases are kept tiny and use gradgradcheck's
fast mode (one random projection instead of the full second-order Jacobian).
"""
from __future__ import annotations


import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torchvision.models import resnet as tvr

import fastres
from fastres import _reference as ref_ops
from fastres import functional as FF
from fastres.nn import BatchNormAct2d
from conftest import backend_params, run_on
from parity import same_behaviour
from resnet_ref import RefCifar, randomize, twin

BACKENDS = backend_params("cpu")  # torch, triton, cpp, reference_ops (the custom-op machinery)
F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def _fast(backend: str) -> bool:
    """The interpreter is slow: a random projection of the second-order Jacobian."""
    return backend == "triton"


# ----------------------------------------------------------------------------- helpers
def _randomize_bn(bn: nn.BatchNorm2d, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=g, dtype=F64) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g, dtype=F64) * 0.3)
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=F64) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=F64) + 0.5)
    return bn


def _bn_pair(train: bool, affine: bool, c: int = 3):
    """(nn.BatchNorm2d, BatchNormAct2d) with equal parameters and buffers, float64."""
    ref = _randomize_bn(nn.BatchNorm2d(c, affine=affine, dtype=F64)).train(train)
    ours = BatchNormAct2d(c, affine=affine, dtype=F64, activation="relu")
    ours.load_state_dict(ref.state_dict())
    return ref, ours.train(train)


def _ref_bn_act(bn, x, r):
    return torch.relu(bn(x) + r)


def _param_names(m: nn.Module, names=None):
    return [n for n, _ in m.named_parameters()] if names is None else list(names)


def _params(model, names):
    return [dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names]


def _hvp(f, inputs, seed=1):
    """Hessian-vector product of loss = sum(sin(f(*inputs))) with a fixed random v."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in inputs]
    loss = f(*inputs).sin().sum()
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    dot = sum((gr * v).sum() for gr, v in zip(grads, vs))
    return grads, torch.autograd.grad(dot, inputs)




def _assert_all_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{what}[{i}]: {m}")


# ----------------------------------------------------------------------------- double backward: BN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_bn_act_gradgradcheck(backend, train, affine):
    _, bn = _bn_pair(train, affine)
    names = _param_names(bn)
    x = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)
    r = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)

    def f(x, r, *params):
        return functional_call(bn, dict(zip(names, params)), (x, r))
    with run_on(backend):
        assert torch.autograd.gradgradcheck(f, (x, r, *_params(bn, names)), fast_mode=_fast(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_no_act_no_residual_gradgradcheck(backend):
    _, bn = _bn_pair(True, True)
    bn.activation = "none"
    x = torch.randn(3, 3, 2, 2, dtype=F64, requires_grad=True)
    w, b = _params(bn, ["weight", "bias"])
    with run_on(backend):
        assert torch.autograd.gradgradcheck(lambda x, w, b: functional_call(bn, {"weight": w, "bias": b}, (x,)),
                                            (x, w, b), fast_mode=_fast(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bn_act_hvp_matches_batchnorm2d(backend, train, fmt):
    ref, ours = _bn_pair(train, True, c=5)
    x = torch.randn(3, 5, 4, 3, dtype=F64).contiguous(memory_format=fmt)
    r = torch.randn(3, 5, 4, 3, dtype=F64).contiguous(memory_format=fmt)
    names = ["weight", "bias"]

    def make(m, act):
        return lambda x, r, w, b: act(m, {"weight": w, "bias": b}, x, r)
    ref_f = make(ref, lambda m, p, x, r: torch.relu(functional_call(m, p, (x,)) + r))
    our_f = make(ours, lambda m, p, x, r: functional_call(m, p, (x, r)))
    inputs = lambda: [x.clone().requires_grad_(), r.clone().requires_grad_(), *_params(ref, names)]  # noqa: E731
    g_ref, h_ref = _hvp(ref_f, inputs())
    with run_on(backend):
        g_ours, h_ours = _hvp(our_f, inputs())
    _assert_all_close(g_ours, g_ref, "gradient")
    _assert_all_close(h_ours, h_ref, "Hessian-vector product")
    assert any(h.abs().max() > 1e-3 for h in h_ref)  # a real second derivative was compared
    if train:
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
        torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)


def test_double_backward_used_to_be_zero_is_not():
    """The symptom of the issue, directly: d/dx of a gradient penalty is not all zeros
    (before, the fused backward op had no derivative and gave zeros with a warning)."""
    _, bn = _bn_pair(True, True)
    x = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    for backend in ("cpp", "reference_ops"):
        with run_on(backend):
            (gx,) = torch.autograd.grad(bn(x).sin().sum(), x, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        assert ggx.abs().max() > 1e-3, backend


# ----------------------------------------------------------------------------- first order unchanged
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_first_order_backward_runs_the_fused_op(backend, monkeypatch):
    """An ordinary backward never calls the differentiable aten backward (the fused
    backward op runs, as before); create_graph=True does."""
    calls = []
    for name in ("bn_act_train_backward", "affine_act_backward"):
        orig = getattr(ref_ops, name)
        monkeypatch.setattr(ref_ops, name, lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    x = torch.randn(2, 3, 2, 2, dtype=F64, requires_grad=True)
    r = torch.randn(2, 3, 2, 2, dtype=F64, requires_grad=True)
    with run_on(backend):
        for train in (True, False):
            _, bn = _bn_pair(train, True)
            bn(x, r).sum().backward()
            assert calls == [], calls
            (gx,) = torch.autograd.grad(bn(x, r).sin().sum(), x, create_graph=True)
            assert calls == ["bn_act_train_backward" if train else "affine_act_backward"]
            calls.clear()


def test_transforms_active_only_under_transforms():
    x = torch.randn(2, 3)
    assert not FF.transforms_active()
    seen = []

    def probe(t):
        seen.append(FF.transforms_active())
        return t
    vmap(probe)(x)
    grad(lambda t: probe(t).sum())(x)
    jvp(probe, (x,), (x,))
    with fwAD.dual_level():
        seen.append(FF.transforms_active())
    assert seen == [True] * 4
    assert not FF.transforms_active()


# ----------------------------------------------------------------------------- double backward: blocks, model
def _block_pair(kind, train):
    if kind == "basic":
        ds = lambda: nn.Sequential(tvr.conv1x1(2, 4, 2), nn.BatchNorm2d(4))  # noqa: E731
        ref = tvr.BasicBlock(2, 4, stride=2, downsample=ds())
        make = lambda: fastres.BasicBlock(2, 4, stride=2, downsample=ds())  # noqa: E731
    else:
        ds = lambda: nn.Sequential(tvr.conv1x1(4, 8, 1), nn.BatchNorm2d(8))  # noqa: E731
        ref = tvr.Bottleneck(4, 2, downsample=ds())
        make = lambda: fastres.Bottleneck(4, 2, downsample=ds())  # noqa: E731
    ref = randomize(ref.to(F64), seed=3)
    ours = twin(ref, make, F64)
    return ref.train(train), ours.train(train)


BLOCK_PARAMS = {"basic": ["conv1.weight", "bn1.weight", "bn2.bias", "downsample.1.weight"],
                "bottleneck": ["conv2.weight", "bn1.bias", "bn3.weight", "downsample.1.bias"]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_block_gradgradcheck(backend, kind, train):
    _, ours = _block_pair(kind, train)
    cin = ours.conv1.in_channels
    names = BLOCK_PARAMS[kind][:2] if _fast(backend) else BLOCK_PARAMS[kind]  # a conv and a BN parameter
    x = torch.randn(2, cin, 4, 4, dtype=F64, requires_grad=True)

    def f(x, *params):
        # gradcheck perturbs through .data, which no version counter sees (fastres.fold's
        # documented exception): drop the eval fold cache at each call
        fastres.fold.invalidate(ours)
        return functional_call(ours, dict(zip(names, params)), (x,))
    with run_on(backend):
        # eval: the parameters require grad, so the cached fold's autograd function is on the path
        assert torch.autograd.gradgradcheck(f, (x, *_params(ours, names)), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_block_hvp_matches_torchvision(backend, kind, train):
    ref, ours = _block_pair(kind, train)
    names = _param_names(ref)  # every parameter: the eval fold's backward is differentiated too
    x = torch.randn(2, ref.conv1.in_channels, 5, 5, dtype=F64)

    def fn(m):
        return lambda x, *p: functional_call(m, dict(zip(names, p)), (x,))
    g_ref, h_ref = _hvp(fn(ref), [x.clone().requires_grad_(), *_params(ref, names)])
    with run_on(backend):
        g_ours, h_ours = _hvp(fn(ours), [x.clone().requires_grad_(), *_params(ref, names)])
    _assert_all_close(g_ours, g_ref, "gradient")
    _assert_all_close(h_ours, h_ref, "Hessian-vector product")


def _cifar_pair(train):
    ref = randomize(RefCifar(8, "B", num_classes=3).to(F64), seed=5)
    ours = twin(ref, lambda: fastres.cifar_resnet(8, "B", num_classes=3), F64)
    return ref.train(train), ours.train(train)


MODEL_PARAMS = ["conv1.weight", "layer2.0.bn2.weight", "layer3.0.downsample.1.bias", "fc.weight"]


def _model_fn(m):
    def f(x, *p):
        fastres.fold.invalidate(m)  # gradcheck perturbs through .data (see test_block_gradgradcheck)
        return functional_call(m, dict(zip(MODEL_PARAMS, p)), (x,))
    return f


# Triton is left out here only for time: one training forward of this 9-BN model costs
# ~10 s under the interpreter and gradgradcheck needs dozens. Triton's double backward is
# gradgradcheck'ed on BatchNormAct2d and both blocks above, and on this model by the
# Hessian-vector-product comparison below.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_gradgradcheck(backend, train):
    _, ours = _cifar_pair(train)
    x = torch.randn(2, 3, 6, 6, dtype=F64, requires_grad=True)
    with run_on(backend):
        assert torch.autograd.gradgradcheck(_model_fn(ours), (x, *_params(ours, MODEL_PARAMS)), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_hvp_matches_torchvision(backend, train):
    ref, ours = _cifar_pair(train)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    inputs = lambda: [x.clone().requires_grad_(), *_params(ref, MODEL_PARAMS)]  # noqa: E731
    with run_on(backend):
        g_ours, h_ours = _hvp(_model_fn(ours), inputs())
    g_ref, h_ref = _hvp(_model_fn(ref), inputs())
    _assert_all_close(g_ours, g_ref, "gradient")
    _assert_all_close(h_ours, h_ref, "Hessian-vector product")
    assert any(h.abs().max() > 1e-3 for h in h_ref)


# ----------------------------------------------------------------------------- forward-mode AD
MODES = [("train", True), ("train", False), ("eval", True)]
MODE_IDS = ["train", "train-nostats", "eval"]


def _drop_running_stats(*models):
    for m in models:
        torch.func.replace_all_batch_norm_modules_(m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,stats", MODES, ids=MODE_IDS)
def test_bn_act_jvp_matches_batchnorm2d(backend, mode, stats):
    train = mode == "train"
    ref, ours = _bn_pair(train, True, c=4)
    if not stats:
        _drop_running_stats(ref, ours)
    x, r, tx, tr = (torch.randn(2, 4, 3, 3, dtype=F64) for _ in range(4))
    w, b = _params(ref, ["weight", "bias"])
    tw, tb = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    ref_f = lambda x, r, w, b: torch.relu(functional_call(ref, {"weight": w, "bias": b}, (x,)) + r)  # noqa: E731
    our_f = lambda x, r, w, b: functional_call(ours, {"weight": w, "bias": b}, (x, r))  # noqa: E731
    primals, tangents = (x, r, w, b), (tx, tr, tw, tb)
    with run_on(backend):
        # torch.func.jvp: in training with running statistics, nn.BatchNorm2d's in-place
        # update of its captured buffers raises functorch's error, and so must ours
        ran = same_behaviour(lambda: jvp(ref_f, primals, tangents), lambda: jvp(our_f, primals, tangents),
                              lambda a, e: _assert_all_close(a, e, "jvp (primal, tangent)"))
        assert ran == (not (train and stats))
        with fwAD.dual_level():  # the forward_ad API, on the module directly: works in every mode
            dual = fwAD.unpack_dual(ours(fwAD.make_dual(x, tx), fwAD.make_dual(r, tr)))
    with fwAD.dual_level():
        y_ref = fwAD.unpack_dual(_ref_bn_act(ref, fwAD.make_dual(x, tx), fwAD.make_dual(r, tr)))
    _assert_all_close((dual.primal, dual.tangent), (y_ref.primal, y_ref.tangent), "forward_ad (primal, tangent)")
    if train and stats:  # the running statistics moved alike
        torch.testing.assert_close(fwAD.unpack_dual(ours.running_mean).primal,
                                   fwAD.unpack_dual(ref.running_mean).primal, **TOL)
        torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_forward_ad_gradcheck(backend):
    """gradcheck's forward-AD mode: the tangents equal the numerical Jacobian."""
    _, bn = _bn_pair(True, True)
    x = torch.randn(2, 3, 2, 2, dtype=F64, requires_grad=True)
    r = torch.randn(2, 3, 2, 2, dtype=F64, requires_grad=True)
    with run_on(backend):
        assert torch.autograd.gradcheck(lambda x, r: bn(x, r), (x, r), check_forward_ad=True,
                                        check_backward_ad=False, check_batched_grad=False, fast_mode=_fast(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,stats", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "model"])
def test_jvp_blocks_and_model_match_torchvision(backend, kind, mode, stats):
    train = mode == "train"
    if kind == "model":
        ref, ours = _cifar_pair(train)
        shape = (2, 3, 6, 6)
    else:
        ref, ours = _block_pair(kind, train)
        shape = (2, ref.conv1.in_channels, 5, 5)
    if not stats:
        _drop_running_stats(ref, ours)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    x, tx = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)

    def fn(m):
        return lambda p, x: functional_call(m, p, (x,))
    with run_on(backend):
        ran = same_behaviour(lambda: jvp(fn(ref), (params, x), (tangents, tx)),
                              lambda: jvp(fn(ours), (params, x), (tangents, tx)),
                              lambda a, e: _assert_all_close(a, e, "jvp (primal, tangent)"))
    assert ran == (not (train and stats))


# ----------------------------------------------------------------------------- vmap / grad / functional_call
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_grads_eval_model(backend):
    """vmap(grad(functional_call)) — per-sample gradients — over an eval-mode model."""
    ref, ours = _cifar_pair(False)
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    target = torch.tensor([0, 2, 1])

    def per_sample(model):
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def loss(p, b, xi, ti):
            out = functional_call(model, (p, b), (xi.unsqueeze(0),))
            return nn.functional.cross_entropy(out, ti.unsqueeze(0))
        return vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, target)
    expected = per_sample(ref)
    with run_on(backend):
        actual = per_sample(ours)
    assert actual.keys() == expected.keys()
    for n in expected:
        assert actual[n].shape[0] == 3
        torch.testing.assert_close(actual[n], expected[n], **TOL, msg=lambda m: f"{n}: {m}")
    # and one sample's row is that sample's ordinary gradient
    ours.zero_grad()
    with run_on(backend):
        nn.functional.cross_entropy(ours(x[1:2]), target[1:2]).backward()
    torch.testing.assert_close(actual["conv1.weight"][1], ours.conv1.weight.grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["model", "bn"])
def test_vmap_inference_matches_torchvision(backend, kind):
    """vmap over an eval-mode model (no gradient: the oneDNN inference path steps aside)."""
    if kind == "model":
        ref, ours = _cifar_pair(False)
        x = torch.randn(4, 2, 3, 6, 6, dtype=F64)
        expected = vmap(ref)(x)
        with run_on(backend), torch.no_grad():
            actual = vmap(ours)(x)
    else:
        ref, ours = _bn_pair(False, True)
        x, r = torch.randn(4, 2, 3, 2, 2, dtype=F64), torch.randn(4, 2, 3, 2, 2, dtype=F64)
        expected = vmap(lambda x, r: _ref_bn_act(ref, x, r))(x, r)
        with run_on(backend):
            actual = vmap(ours)(x, r)
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_training_with_running_stats_raises_like_torchvision(backend):
    """torchvision's BN under vmap in training, updating unbatched running stats, raises
    functorch's error; fastres raises the same (not a silent wrong result)."""
    ref, ours = _cifar_pair(True)
    x = torch.randn(2, 2, 3, 6, 6, dtype=F64)
    with pytest.raises(RuntimeError) as ref_err:
        vmap(ref)(x)
    with run_on(backend), pytest.raises(RuntimeError) as our_err:
        vmap(ours)(x)
    assert "running_mean" in str(ref_err.value)
    assert str(ref_err.value) in str(our_err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_training_without_running_stats(backend):
    """torch.func.replace_all_batch_norm_modules_ (no running stats): per-batch BN under
    vmap works on both, with equal outputs and per-sample gradients."""
    ref, ours = _cifar_pair(True)
    torch.func.replace_all_batch_norm_modules_(ref)
    torch.func.replace_all_batch_norm_modules_(ours)
    x = torch.randn(2, 3, 3, 6, 6, dtype=F64)

    def run(model):
        params = {n: p.detach() for n, p in model.named_parameters()}
        out = vmap(model)(x)
        g = vmap(grad(lambda p, xi: functional_call(model, p, (xi,)).square().sum()), in_dims=(None, 0))(params, x)
        return out, g
    out_ref, g_ref = run(ref)
    with run_on(backend):
        out, g = run(ours)
    torch.testing.assert_close(out, out_ref, **TOL)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], **TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_train_replaced_params_and_buffers(backend):
    """functional_call in training with replaced parameters and buffers: the same output,
    gradients and in-place running-stat updates of the *passed* buffers as torchvision;
    the module's own buffers untouched. (A block with a projection: three BNs.)"""
    ref, ours = _block_pair("basic", True)
    own = {n: b.clone() for n, b in ours.named_buffers()}

    def replaced(model):
        params = {n: (p.detach() * 1.1 + 0.01).requires_grad_() for n, p in model.named_parameters()}
        buffers = {n: b.clone() + (0.1 if b.is_floating_point() else 0) for n, b in model.named_buffers()}
        return params, buffers
    p_ref, b_ref = replaced(ref)
    p_ours, b_ours = replaced(ours)
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    y_ref = functional_call(ref, (p_ref, b_ref), (x,))
    y_ref.square().sum().backward()
    with run_on(backend):
        y = functional_call(ours, (p_ours, b_ours), (x,))
        y.square().sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    for n in p_ref:
        torch.testing.assert_close(p_ours[n].grad, p_ref[n].grad, **TOL, msg=lambda m: f"grad {n}: {m}")
    for n in b_ref:
        torch.testing.assert_close(b_ours[n], b_ref[n], **TOL, msg=lambda m: f"buffer {n}: {m}")
    for n, b in ours.named_buffers():
        assert torch.equal(b, own[n]), f"module buffer {n} changed"
    assert int(b_ours["bn1.num_batches_tracked"]) == int(own["bn1.num_batches_tracked"]) + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,stats", MODES, ids=MODE_IDS)
def test_torch_func_grad_model(backend, mode, stats):
    """torch.func.grad over a model: the same gradients as torchvision's; in training with
    running statistics (captured buffers updated in place) the same functorch error."""
    train = mode == "train"
    ref, ours = _cifar_pair(train)
    if not stats:
        _drop_running_stats(ref, ours)
    x = torch.randn(2, 3, 6, 6, dtype=F64)

    def g(model):
        params = {n: p.detach() for n, p in model.named_parameters()}
        return grad(lambda p: functional_call(model, p, (x,)).sin().sum())(params)

    def compare(actual, expected):
        for n in expected:
            torch.testing.assert_close(actual[n], expected[n], **TOL, msg=lambda m: f"{n}: {m}")
    with run_on(backend):
        assert same_behaviour(lambda: g(ref), lambda: g(ours), compare) == (not (train and stats))



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,stats", MODES[1:], ids=MODE_IDS[1:])
def test_jacrev_and_hessian_match_batchnorm2d(backend, mode, stats):
    """torch.func.jacrev and torch.func.hessian (forward-over-reverse) of a BN + residual +
    ReLU w.r.t. its input equal nn.BatchNorm2d's."""
    ref, ours = _bn_pair(mode == "train", True)
    if not stats:
        _drop_running_stats(ref, ours)
    x, r = torch.randn(2, 3, 2, 2, dtype=F64), torch.randn(2, 3, 2, 2, dtype=F64)
    ref_f = lambda x: _ref_bn_act(ref, x, r).sin().sum()  # noqa: E731
    our_f = lambda x: ours(x, r).sin().sum()  # noqa: E731
    with run_on(backend):
        actual = (torch.func.jacrev(our_f)(x), torch.func.hessian(our_f)(x))
    expected = (torch.func.jacrev(ref_f)(x), torch.func.hessian(ref_f)(x))
    _assert_all_close(actual, expected, "(jacrev, hessian)")
    assert expected[1].abs().max() > 1e-3
