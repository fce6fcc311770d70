"""Higher-order autograd and torch.func over the fused convolution (issue 9 for issue 10's
``conv2d_act`` and the ``FASTRES_CONV=fused`` block path).

* Double backward: ``torch.autograd.gradgradcheck`` in float64 on ``conv2d_act`` (prologue
  on/off, residual, ReLU, the statistics outputs in the loss, stride 2, groups) for the
  ``ops`` family (``fastres::conv2d_act``: aten inside the custom-op machinery) and the
  ``triton`` family (the kernels, interpreted: tiny shapes, gradgradcheck's fast mode);
  Hessian-vector products equal to the plain aten composition's and, for fused-conv
  blocks, to torchvision's.
* The first-order backward still runs the fused backward op: the differentiable route
  is taken only when the backward is itself differentiated (``create_graph=True``).
* Forward-mode AD and torch.func: ``conv2d_act``'s tangents equal the numerical
  Jacobian; jvp of fused-conv blocks and per-sample gradients
  (``vmap(grad(functional_call))``) of an eval-mode fused-conv block equal torchvision's;
  where torchvision raises, the same exception type and message.
* ``torch.compile(fullgraph=True)`` still traces the fused op (no transform route).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torchvision.models import resnet as tvr

import fastres
from fastres import conv_ops
from fastres import functional as FF
from conv_helpers import conv_family
from parity import same_behaviour
from resnet_ref import randomize, twin

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
FAMILIES = ["ops", "triton"]


def _assert_all_close(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{what}[{i}]: {m}")


# ----------------------------------------------------------------------------- conv2d_act cases
# name -> (x shape, weight shape, conv kwargs, prologue, residual, relu, stats)
CASES = {
    "plain": ((2, 3, 4, 4), (2, 3, 3, 3), dict(padding=1), False, False, False, False),
    "prologue-residual-relu-moments": ((2, 3, 4, 4), (2, 3, 3, 3), dict(padding=1), True, True, True, "moments"),
    "stride2-groups-sums": ((2, 4, 3, 3), (2, 2, 3, 3), dict(stride=2, padding=1, groups=2), True, False, False,
                            "sums"),
    "nopro-relu-moments-1x1": ((2, 3, 3, 3), (4, 3, 1, 1), dict(), False, True, True, "moments"),
}


def _case_inputs(name, seed=0):
    """(function of the differentiable inputs, the inputs) for one case, float64."""
    xs, ws, kw, pro, res, relu, stats = CASES[name]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    x, w, b = rnd(*xs), rnd(*ws) * 0.5, rnd(ws[0]) * 0.3
    inputs = [x, w, b]
    if pro:
        inputs += [torch.rand(xs[1], generator=g, dtype=F64) + 0.5, rnd(xs[1]) * 0.3]
    probe = FF.conv2d_act(x, w, b, **kw)  # only the output's shape
    if res:
        inputs.append(rnd(*probe.shape))
    inputs = [t.requires_grad_() for t in inputs]

    def f(x, w, b, *rest):
        rest = list(rest)
        s, t = (rest.pop(0), rest.pop(0)) if pro else (None, None)
        r = rest.pop(0) if res else None
        return FF.conv2d_act(x, w, b, **kw, in_scale=s, in_shift=t, in_relu=pro, residual=r,
                             activation="relu" if relu else "none", stats=stats)
    return f, inputs


# The interpreter is slow (~1 s per kernel call here; gradgradcheck makes dozens): the
# triton family runs the two cases that together cover every feature (prologue with and
# without ReLU, residual, output ReLU, both statistics forms, stride 2, groups), with
# gradgradcheck's fast mode (one random projection), without its undefined-gradient pass
# (that path is the family-independent autograd code, checked on ``ops``) and with bias
# and in_shift held constant (fewer numerical evaluations; their gradients are plain
# sums, second-order-checked for triton by the Hessian-vector-product test below).
GRADGRAD = [("ops", c) for c in CASES] + [("triton", "prologue-residual-relu-moments"),
                                          ("triton", "stride2-groups-sums")]


@pytest.mark.parametrize("family,case", GRADGRAD, ids=[f"{c}-{f}" for f, c in GRADGRAD])
def test_conv2d_act_gradgradcheck(family, case):
    """Every output (y and, where asked, the statistics) twice differentiable in every
    input."""
    f, inputs = _case_inputs(case)
    triton = family == "triton"
    if triton:  # bias (2) and in_shift (4) constant
        inputs = [t.detach() if i in (2, 4) else t for i, t in enumerate(inputs)]
    with conv_family(family):
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=triton, check_undefined_grad=not triton)


def _loss(out):
    """A loss that uses every output non-linearly (statistics included)."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o.sin() * (i + 1)).sum() for i, o in enumerate(outs))


def _hvp(f, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in inputs]
    grads = torch.autograd.grad(_loss(f(*inputs)), inputs, create_graph=True)
    dot = sum((gr * v).sum() for gr, v in zip(grads, vs))
    return grads, torch.autograd.grad(dot, inputs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["prologue-residual-relu-moments", "stride2-groups-sums"])
def test_conv2d_act_hvp_matches_aten_composition(family, case):
    """Hessian-vector products through the fused op equal those of the plain aten
    composition (aten's own autograd); before the change they were zero."""
    f, inputs = _case_inputs(case)
    fresh = lambda: [t.detach().clone().requires_grad_() for t in inputs]  # noqa: E731
    with conv_family("torch"):
        g_ref, h_ref = _hvp(f, fresh())
    with conv_family(family):
        g, h = _hvp(f, fresh())
    _assert_all_close(g, g_ref, "gradient")
    _assert_all_close(h, h_ref, "Hessian-vector product")
    assert all(hh.abs().max() > 1e-3 for hh in h_ref[:2])  # real second derivatives in x and weight


@pytest.mark.parametrize("family", FAMILIES)
def test_first_order_backward_runs_the_fused_op(family, monkeypatch):
    """An ordinary backward never takes the differentiable route (the fused backward op
    runs, as before); a backward with create_graph=True does."""
    calls = []
    orig = conv_ops.conv2d_act_backward_differentiable
    monkeypatch.setattr(conv_ops, "conv2d_act_backward_differentiable",
                        lambda *a: calls.append(1) or orig(*a))
    f, inputs = _case_inputs("prologue-residual-relu-moments")
    with conv_family(family):
        _loss(f(*inputs)).backward()
        assert calls == []
        torch.autograd.grad(_loss(f(*inputs)), inputs, create_graph=True)
        assert calls == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_conv2d_act_forward_ad_gradcheck(family):
    """Forward-mode AD (dual tensors): the tangents of y and of the statistics equal the
    numerical Jacobian (before: NotImplementedError from the custom op)."""
    f, inputs = _case_inputs("prologue-residual-relu-moments")
    with conv_family(family):
        assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False,
                                        check_batched_grad=False, fast_mode=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_conv2d_act_vmap_and_jvp(family):
    """vmap over conv2d_act equals a loop of calls; torch.func.jvp equals the aten
    composition's."""
    f, inputs = _case_inputs("stride2-groups-sums")
    x = torch.randn(3, *inputs[0].shape, dtype=F64)
    rest = [t.detach() for t in inputs[1:]]
    tangents = [torch.randn_like(t) for t in inputs]
    primals = [t.detach() for t in inputs]
    with conv_family("torch"):
        expected = [f(xi, *rest) for xi in x]
        jvp_ref = jvp(f, tuple(primals), tuple(tangents))
    with conv_family(family):
        actual = vmap(lambda xi: f(xi, *rest))(x)
        jvp_ours = jvp(f, tuple(primals), tuple(tangents))
    for i, e in enumerate(expected):
        _assert_all_close([a[i] for a in actual], e, f"vmap sample {i}")
    _assert_all_close(jvp_ours[0] + jvp_ours[1], jvp_ref[0] + jvp_ref[1], "jvp (primals, tangents)")


def test_compile_fullgraph_traces_the_fused_op():
    """Under torch.compile the transform route is never taken: the custom op is traced."""
    import torch._dynamo
    f, inputs = _case_inputs("prologue-residual-relu-moments")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm
    with conv_family("ops"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend=backend)(*[t.detach() for t in inputs])
        expected = f(*[t.detach() for t in inputs])
    _assert_all_close(out, expected, "compiled")
    assert any("fastres.conv2d_act" in s for s in seen), seen


# ----------------------------------------------------------------------------- fused-conv blocks
def _block_pair(kind, train):
    if kind == "basic":
        ds = lambda: nn.Sequential(tvr.conv1x1(2, 4, 2), nn.BatchNorm2d(4))  # noqa: E731
        ref = tvr.BasicBlock(2, 4, stride=2, downsample=ds())
        make = lambda: fastres.BasicBlock(2, 4, stride=2, downsample=ds())  # noqa: E731
    else:  # grouped, with a projection
        ds = lambda: nn.Sequential(tvr.conv1x1(4, 8, 1), nn.BatchNorm2d(8))  # noqa: E731
        ref = tvr.Bottleneck(4, 2, groups=2, base_width=64, downsample=ds())
        make = lambda: fastres.Bottleneck(4, 2, groups=2, base_width=64, downsample=ds())  # noqa: E731
    ref = randomize(ref.to(F64), seed=3)
    ours = twin(ref, make, F64)
    return ref.train(train), ours.train(train)


@pytest.fixture
def conv2d_act_calls(monkeypatch):
    """Counts the block path's calls of fastres.functional.conv2d_act (proof that the
    fused-conv path, not the usual block forward, ran)."""
    calls = []
    orig = FF.conv2d_act
    monkeypatch.setattr(FF, "conv2d_act", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


def _fn(m, names):
    return lambda x, *p: functional_call(m, dict(zip(names, p)), (x,))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fused_conv_block_hvp_matches_torchvision(family, kind, train, conv2d_act_calls):
    if family == "triton" and kind == "bottleneck":
        pytest.skip("interpreter time: the triton family's block HVP is checked on the BasicBlock")
    ref, ours = _block_pair(kind, train)
    names = [n for n, _ in ref.named_parameters()]
    x = torch.randn(2, ref.conv1.in_channels, 4, 4, dtype=F64)
    inputs = lambda: [x.clone().requires_grad_(), *(p.detach().clone().requires_grad_()  # noqa: E731
                                                    for p in ref.parameters())]
    g_ref, h_ref = _hvp(_fn(ref, names), inputs())
    with conv_family(family):
        g, h = _hvp(_fn(ours, names), inputs())
    assert conv2d_act_calls, "the fused-conv block path did not run"
    _assert_all_close(g, g_ref, "gradient")
    _assert_all_close(h, h_ref, "Hessian-vector product")
    assert any(hh.abs().max() > 1e-3 for hh in h_ref)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_conv_block_gradgradcheck(train, conv2d_act_calls):
    _, ours = _block_pair("bottleneck", train)
    names = ["conv2.weight", "bn1.bias", "bn3.weight", "downsample.0.weight"]
    params = [dict(ours.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    x = torch.randn(2, 4, 3, 3, dtype=F64, requires_grad=True)

    def f(x, *p):
        fastres.fold.invalidate(ours)  # gradcheck perturbs through .data (see test_higher_order)
        return functional_call(ours, dict(zip(names, p)), (x,))
    with conv_family("ops"):
        assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)
    assert conv2d_act_calls




@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,stats", [("train", True), ("train", False), ("eval", True)],
                         ids=["train", "train-nostats", "eval"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fused_conv_block_jvp_matches_torchvision(family, kind, mode, stats, conv2d_act_calls):
    if family == "triton" and kind == "bottleneck":
        pytest.skip("interpreter time: the triton family's block jvp is checked on the BasicBlock")
    train = mode == "train"
    ref, ours = _block_pair(kind, train)
    if not stats:
        for m in (ref, ours):
            torch.func.replace_all_batch_norm_modules_(m)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    shape = (2, ref.conv1.in_channels, 4, 4)
    x, tx = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    fn = lambda m: lambda p, x: functional_call(m, p, (x,))  # noqa: E731
    with conv_family(family):
        ran = same_behaviour(lambda: jvp(fn(ref), (params, x), (tangents, tx)),
                              lambda: jvp(fn(ours), (params, x), (tangents, tx)),
                              lambda a, e: _assert_all_close(a, e, "jvp (primal, tangent)"))
    assert ran == (not (train and stats))
    if ran:  # (a running-statistics update under a transform takes the usual forward, which raises)
        assert conv2d_act_calls, "the fused-conv block path did not run"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fused_conv_block_per_sample_grads_eval(family, kind, conv2d_act_calls):
    """vmap(grad(functional_call)) over an eval-mode fused-conv block: per-sample
    gradients equal torchvision's, and a sample's row is its ordinary gradient."""
    if family == "triton" and kind == "bottleneck":
        pytest.skip("interpreter time: the triton family's per-sample grads are checked on the BasicBlock")
    ref, ours = _block_pair(kind, False)
    x = torch.randn(3, ref.conv1.in_channels, 4, 4, dtype=F64)

    def per_sample(model):
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def loss(p, b, xi):
            return functional_call(model, (p, b), (xi.unsqueeze(0),)).sin().sum()
        return vmap(grad(loss), in_dims=(None, None, 0))(params, buffers, x)
    expected = per_sample(ref)
    with conv_family(family):
        actual = per_sample(ours)
        assert conv2d_act_calls, "the fused-conv block path did not run"
        ours.zero_grad()
        ours(x[1:2]).sin().sum().backward()
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], **TOL, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(actual["conv1.weight"][1], ours.conv1.weight.grad, **TOL)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fused_conv_block_vmap_training_with_running_stats_raises_like_torchvision(kind):
    """torchvision's BN under vmap in training (unbatched running statistics updated in
    place) raises functorch's error; the fused-conv block raises the same."""
    ref, ours = _block_pair(kind, True)
    x = torch.randn(2, 2, ref.conv1.in_channels, 4, 4, dtype=F64)
    with pytest.raises(RuntimeError) as ref_err:
        vmap(ref)(x)
    with conv_family("ops"), pytest.raises(RuntimeError) as our_err:
        vmap(ours)(x)
    assert "running_mean" in str(ref_err.value)
    assert str(ref_err.value) in str(our_err.value)
