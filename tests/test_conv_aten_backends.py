"""The ``aten`` conv path's backends of ``fastres.functional.conv2d_act`` (fastres/conv_aten.py)
and the conv step's one home: every convolution of a block, in training and eval, and
every convolution of the CPU eval plan, runs through them.

* ``onednn`` (CPU fp32 inference, one oneDNN primitive with bias + residual add + ReLU
  post-ops, prepacked weight) against F.conv2d (+ bias, + residual, ReLU) in float64:
  its fp32 error is at most 2x aten's own fp32 convolution's (+ a few ulps);
* where it does not apply (fp64, bf16, gradients wanted, a non-CPU device, autocast, a
  residual at a 1x1 output, the switch off) the ``epilogue`` backend runs instead;
  a prologue or statistics take the ``composite``;
* counting calls of the patched backend functions: a block's eval and training convs,
  and the eval plan's, reach them (a path that bypassed them would count 0).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres import conv_aten, conv_backend
from fastres.functional import conv2d_act
from fastres.models import eval_plan
from parity import max_err
from resnet_ref import randomize

needs_onednn = pytest.mark.skipif(not conv_aten.onednn_available(),
                                  reason="this torch has no oneDNN fused convolution "
                                         "(torch.ops.mkldnn._convolution_pointwise)")

# name: (x shape, weight shape, stride, padding)
SHAPES = {
    "c3to65_3x3s2": ((2, 3, 9, 9), (65, 3, 3, 3), 2, 1),
    "c65to3_1x1": ((2, 65, 5, 5), (3, 65, 1, 1), 1, 0),
    "b1_c65_3x3": ((1, 65, 6, 6), (17, 65, 3, 3), 1, 1),
    "1x1_output": ((1, 8, 3, 3), (16, 8, 3, 3), 1, 0),
    "1x1_output_s2": ((2, 8, 2, 2), (16, 8, 1, 1), 2, 0),
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture
def calls(monkeypatch):
    """Count the calls of each backend function (patched on the module, where callers look it up)."""
    counts = {"onednn": 0, "onednn_add_relu_": 0, "epilogue": 0}
    for key, name in (("onednn", "onednn_conv2d_act"), ("onednn_add_relu_", "onednn_conv2d_add_relu_"),
                      ("epilogue", "epilogue_conv2d_act")):
        real = getattr(conv_aten, name)

        def counting(*args, _real=real, _key=key, **kwargs):
            counts[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(conv_aten, name, counting)
    return counts


def _case(shape, layout, dtype=torch.float32, seed=0):
    xs, ws, stride, padding = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    w = (torch.randn(ws, generator=g, dtype=torch.float64) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(dtype)
    b = torch.randn(ws[0], generator=g, dtype=torch.float64).to(dtype)
    n, _, h, wd = xs
    p = (h + 2 * padding - ws[2]) // stride + 1
    q = (wd + 2 * padding - ws[3]) // stride + 1
    r = torch.randn(n, ws[0], p, q, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, r, stride, padding


def _ref(x, w, b, r, stride, padding, relu):
    y = F.conv2d(x, w, b, stride, padding)
    if r is not None:
        y = y + r
    return torch.relu(y) if relu else y


@needs_onednn
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias,residual,relu", [(True, False, False), (True, False, True), (True, True, True),
                                                (False, True, False), (False, False, True)])
def test_onednn_backend_parity_with_f_conv2d(shape, layout, bias, residual, relu, calls):
    x, w, b, r, stride, padding = _case(shape, layout)
    b = b if bias else None
    r = r if residual else None
    with torch.no_grad():
        y = conv2d_act(x, w, b, stride, padding, residual=r, activation="relu" if relu else None)
        aten32 = _ref(x, w, b, r, stride, padding, relu)
        hi = _ref(x.double(), w.double(), None if b is None else b.double(), None if r is None else r.double(),
                  stride, padding, relu)
    one_by_one = y.shape[2] * y.shape[3] == 1
    # a residual at a 1x1 output takes the epilogue backend (torch 2.11's primitive fails there)
    assert calls == {"onednn": 0 if residual and one_by_one else 1, "onednn_add_relu_": 0,
                     "epilogue": 1 if residual and one_by_one else 0}
    assert y.shape == hi.shape and y.dtype == torch.float32
    fmt = LAYOUTS[layout]
    assert y.is_contiguous(memory_format=fmt) or y.is_contiguous(), (layout, y.stride())
    # + a floor of fp32's rounding over a K-term dot product (random-walk: eps*sqrt(K)): with
    # one thread oneDNN's fused primitive and F.conv2d sum in different orders, and aten's own
    # error happened to be 3.6x smaller than the primitive's on b1_c65_3x3 (K = 585)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    ulp = 2 * torch.finfo(torch.float32).eps * k ** 0.5 * max(1.0, hi.abs().max().item())
    assert max_err(y, hi) <= 2 * max_err(aten32, hi) + ulp


@needs_onednn
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", ["c3to65_3x3s2", "b1_c65_3x3", "1x1_output"])
def test_onednn_in_place_add_relu(shape, layout, calls):
    """The in-place variant the eval plan uses: relu(conv + bias + other) into ``other``
    (a 1x1 output returns the epilogue backend's new tensor)."""
    x, w, b, r, stride, padding = _case(shape, layout)
    other = r.contiguous(memory_format=LAYOUTS[layout])
    expect = _ref(x, w, b, other, stride, padding, True)
    with torch.no_grad():
        y = conv_aten.onednn_conv2d_add_relu_(other, x, w, b, [stride] * 2, [padding] * 2, [1, 1], 1)
    assert (y is other) == (y.shape[2] * y.shape[3] != 1)
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("why", ["fp64", "bf16", "requires_grad", "meta", "autocast", "switched_off"])
def test_fallback_to_the_epilogue_backend(why, calls):
    x, w, b, r, stride, padding = _case("c3to65_3x3s2", "channels_last",
                                        dtype=torch.float64 if why == "fp64" else torch.float32)
    if why == "bf16":
        x, w, r = x.bfloat16(), w.bfloat16(), r.bfloat16()  # the fp32 bias stays fp32
    if why == "requires_grad":
        w.requires_grad_(True)
    if why == "meta":
        x, w, b, r = (t.to("meta") for t in (x, w, b, r))
    prev = conv_backend.use_onednn()
    conv_backend.use_onednn(why != "switched_off")
    try:
        args = (x, w, b, r, [stride] * 2, [padding] * 2, [1, 1])
        if why == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not conv_aten.onednn_supports(*args)
        elif why != "switched_off":
            assert not conv_aten.onednn_supports(*args)
        if why == "meta":  # a non-CPU device (conv2d_act itself does not run on meta: autocast has no meta)
            assert conv_backend.aten_impl(*args, False, False, relu=True) == "epilogue"
            y = conv_aten.epilogue_conv2d_act(*args, 1, True)
            assert y.device.type == "meta" and y.shape == r.shape
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=why == "autocast"):
            with torch.set_grad_enabled(why == "requires_grad"):
                y = conv2d_act(x, w, b, stride, padding, residual=r, activation="relu")
    finally:
        conv_backend.use_onednn(prev)
    assert calls == {"onednn": 0, "onednn_add_relu_": 0, "epilogue": 1}
    expect = _ref(x.double(), w.double(), b.double(), r.double(), stride, padding, True)
    tol = 3e-2 if y.dtype == torch.bfloat16 or why == "autocast" else 1e-5
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol)
    if why == "requires_grad":  # differentiable through the epilogue backend
        y.sum().backward()
        assert w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize("kind", ["prologue", "stats"])
def test_prologue_or_stats_take_the_composite(kind, calls):
    x, w, b, r, stride, padding = _case("b1_c65_3x3", "channels_last")
    with torch.no_grad():
        if kind == "prologue":
            conv2d_act(x, w, b, stride, padding, in_scale=torch.rand(65), in_relu=True)
        else:
            conv2d_act(x, w, b, stride, padding, stats=True)
    assert calls == {"onednn": 0, "onednn_add_relu_": 0, "epilogue": 0}
    assert conv_backend.aten_impl(x, w, b, None, [1, 1], [1, 1], [1, 1], kind == "prologue",
                                  kind == "stats", relu=False) == "composite"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bare_conv_is_atens_own(shape, layout, calls):
    """Nothing to fuse (a training-mode block conv under no_grad): aten's convolution,
    bit for bit what torchvision computes. (It took the oneDNN primitive, whose NCHW
    result on torch 2.11 is 3-6x further from float64 than aten's: the train-mode
    accuracy gap of test_inference.py::test_eval_plan_is_never_stale.)"""
    x, w, _, _, stride, padding = _case(shape, layout)
    with torch.no_grad():
        y = conv2d_act(x, w, None, stride, padding)
        expect = F.conv2d(x, w, None, stride, padding)
    assert calls == {"onednn": 0, "onednn_add_relu_": 0, "epilogue": 1}
    assert torch.equal(y, expect)
    assert conv_backend.aten_impl(x, w, None, None, [stride] * 2, [padding] * 2, [1, 1], False, False,
                                  relu=False) == "epilogue"


# ----------------------------------------------------------------------------- one home: blocks and the plan
def _block(cls=fastres.BasicBlock, planes=16, stride=2):
    torch.manual_seed(0)
    inplanes = 8
    ds = nn.Sequential(nn.Conv2d(inplanes, planes * cls.expansion, 1, stride, bias=False),
                       nn.BatchNorm2d(planes * cls.expansion))
    return randomize(cls(inplanes, planes, stride, ds))


@pytest.mark.parametrize("cls", [fastres.BasicBlock, fastres.Bottleneck], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "epilogue"])
def test_block_eval_convs_run_the_conv2d_act_backend(cls, onednn, calls, monkeypatch):
    """Every eval conv of a block is a call of fastres.functional.conv2d_act that reaches
    its backend (a block calling the oneDNN op, or F.conv2d, itself would count 0)."""
    from fastres import functional as FF
    blk = _block(cls).eval()
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    n_convs = len(blk._units()) + 1
    entry = []
    real = FF.conv2d_act
    monkeypatch.setattr(FF, "conv2d_act", lambda *a, **k: entry.append(1) or real(*a, **k))
    prev = conv_backend.use_onednn()
    conv_backend.use_onednn(onednn)
    try:
        with torch.no_grad():
            blk(x)
    finally:
        conv_backend.use_onednn(prev)
    assert len(entry) == n_convs
    if onednn and conv_aten.onednn_available():
        assert calls == {"onednn": n_convs, "onednn_add_relu_": 0, "epilogue": 0}
    else:
        assert calls == {"onednn": 0, "onednn_add_relu_": 0, "epilogue": n_convs}


def test_block_training_convs_run_the_conv2d_act_backend(calls):
    blk = _block().train()
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    blk(x).sum().backward()
    assert calls == {"onednn": 0, "onednn_add_relu_": 0, "epilogue": 3}
    assert x.grad is not None and blk.conv1.weight.grad is not None


@needs_onednn
def test_eval_plan_convs_run_the_onednn_backend(calls):
    """The plan binds the backend functions when it is built (patched here before): every
    conv of every block is one of their calls, the last conv of a block the in-place one."""
    torch.manual_seed(0)
    model = fastres.resnet18(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    assert eval_plan.plan_of(model) is not None
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    tails = len(blocks)
    others = sum(len(b._units()) - 1 + (b.downsample is not None) for b in blocks)
    assert calls == {"onednn": others, "onednn_add_relu_": tails, "epilogue": 0}


def test_backend_info_reports_the_aten_backends():
    info = fastres.backend_info()["devices"]["cpu"]["conv"]["aten_backends"]
    assert set(info) == {"onednn", "epilogue", "composite"}
    assert info["onednn"]["available"] == conv_aten.onednn_available()
    prev = conv_backend.use_onednn()
    conv_backend.use_onednn(False)
    try:
        assert fastres.backend_info()["devices"]["cpu"]["conv"]["aten_backends"]["onednn"]["available"] is False
    finally:
        conv_backend.use_onednn(prev)
    from fastres import cli
    assert "aten conv backends: onednn" in cli.format_info(fastres.backend_info())


@needs_onednn
def test_prepacked_weights_only_where_offered_and_never_stale():
    x, w, b, _, stride, padding = _case("c3to65_3x3s2", "channels_last")
    geo = ([padding] * 2, [stride] * 2, [1, 1], 1)
    assert conv_aten.packed_weight(w, x, *geo) is w  # not offered a store: the plain weight
    store = {}
    conv_aten.allow_prepack(w, store)
    p = conv_aten.packed_weight(w, x, *geo)
    assert p is not w and p.is_mkldnn and len(store) == 1
    assert conv_aten.packed_weight(w, x, *geo) is p  # reordered once
    with torch.no_grad():
        expect = conv2d_act(x, w, b, stride, padding, activation="relu")
        torch.testing.assert_close(conv_aten.onednn_conv2d_act(x, w, b, None, [stride] * 2, [padding] * 2, [1, 1],
                                                               1, True, p), expect)
        w.mul_(2.0)  # written in place: the reordered copy is stale, never served
        assert conv_aten.packed_weight(w, x, *geo) is w
        torch.testing.assert_close(conv2d_act(x, w, b, stride, padding, activation="relu"),
                                   torch.relu(F.conv2d(x, w, b, stride, padding)), rtol=1e-4, atol=1e-5)


def test_former_names_still_work():
    """The moved names, re-exported where they were (fold never imports the layer above:
    fastres/__init__ hands it the plan's entry point)."""
    assert fastres.fold.eval_plan_forward is eval_plan.eval_plan_forward
    assert fastres.fold.use_onednn is conv_backend.use_onednn
    assert fastres.fold.onednn_conv_act is conv_aten.onednn_conv_act
    assert fastres.models.eval_plan_forward is eval_plan.eval_plan_forward
