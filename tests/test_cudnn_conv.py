"""cuDNN fused-convolution graphs (issue 11): ``fastres/cudnn.py`` + ``csrc/cudnn/``.

CPU part (always runs): the forward and backward pattern tables, availability / fallback
reporting in ``backend_info``, the aten fallback's parity with F.conv2d + BatchNorm
semantics, the backward wiring (the ``cudnn`` family's autograd around the dgrad/wgrad
graphs, emulated on the CPU with the path reported available; per-part run-time
fallbacks), the blocks taking the cudnn path, the fake kernels (FakeTensorMode / meta
tensors) and the op schemas.

GPU part (``gpu`` marker; skipped with the reason without a CUDA device or without the
cuDNN graphs in ``fastres._C``): every pattern against F.conv2d + nn.BatchNorm2d + ReLU
(+ add) — outputs, every gradient, running statistics — in fp32 and bf16/fp16
(error <= 2x PyTorch's own low-precision error against the fp32/fp64 reference), the
dgrad + dReLU + dBN and scale-shift-ReLU wgrad graphs, conv2d_act's training step through
all of them, a Bottleneck and resnet50 (training and eval) against torchvision with
FASTRES_CONV=cudnn, and CUDA-graph capture + replay of the forward and of training steps.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fastres
from fastres import cudnn

from parity import assert_close_dtype, make_input

if torch.cuda.is_available():  # on a GPU a missing or broken extension is a failure, not a skip
    import fastres._C as C_ext  # noqa: F401
else:
    C_ext = pytest.importorskip("fastres._C", reason="fastres._C is not built")
OPS = torch.ops.fastres

SCHEMAS = {
    "cudnn_conv_bias_act": "fastres::cudnn_conv_bias_act(Tensor x, Tensor w, Tensor? bias, Tensor? residual, "
                           "int[] stride, int[] padding, int[] dilation, int groups, bool relu) -> Tensor",
    "cudnn_conv_act_stats": "fastres::cudnn_conv_act_stats(Tensor x, Tensor w, Tensor? scale, Tensor? shift, "
                            "int[] stride, int[] padding, int[] dilation, int groups, bool in_relu) "
                            "-> (Tensor y, Tensor sum, Tensor sumsq)",
    "cudnn_dgrad_drelu_dbn": "fastres::cudnn_dgrad_drelu_dbn(Tensor dy, Tensor w, Tensor x, Tensor scale, "
                             "Tensor shift, int[] stride, int[] padding, int[] dilation, int groups) "
                             "-> (Tensor dv, Tensor dscale, Tensor dshift)",
    "cudnn_wgrad_scale_shift_relu": "fastres::cudnn_wgrad_scale_shift_relu(Tensor dy, Tensor x, Tensor? scale, "
                                    "Tensor? shift, int[] weight_size, int[] stride, int[] padding, "
                                    "int[] dilation, int groups, bool in_relu) -> Tensor dw",
}


# ============================================================================ CPU: Python side
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema(name):
    assert str(getattr(OPS, name).default._schema) == SCHEMAS[name]
    assert cudnn.register()


def _pat(dtype=torch.bfloat16, c=64, k=64, groups=1, cap=(9, 0), **kw):
    flags = dict(prologue=False, residual=False, bias=False, relu=False, stats=False)
    flags.update(kw)
    return cudnn.pattern_for(dtype, c, k, groups, capability=cap, **flags)


def test_pattern_table():
    # inference: conv + bias + add + relu, any of the three dtypes
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert _pat(dt, bias=True, residual=True, relu=True)[0] == "conv_bias_add_relu"
    assert _pat(c=3, bias=True, relu=True)[0] == "conv_bias_add_relu"  # cuDNN decides; run-time fallback
    assert _pat(torch.float64, bias=True)[0] is None
    assert _pat(prologue=True)[0] is None  # no inference pattern with an input prologue
    # training forward: genstats, with or without the prologue
    assert _pat(stats=True)[0] == "conv_genstats"
    assert _pat(stats=True, prologue=True)[0] == "scale_shift_relu_conv_genstats"
    assert _pat(torch.float16, cap=(8, 0), stats=True, prologue=True)[0] == "scale_shift_relu_conv_genstats"
    # unsupported -> fallback, with the reason
    for kw, words in [(dict(dtype=torch.float32), "fp16/bf16"), (dict(cap=(7, 0)), "sm_80/sm_90"),
                      (dict(cap=(10, 0)), "sm_80/sm_90"), (dict(groups=2), "grouped"),
                      (dict(c=3), "multiples of 8"), (dict(k=65), "multiples of 8"),
                      (dict(residual=True), "residual"), (dict(bias=True), "bias"), (dict(relu=True), "ReLU")]:
        p, why = _pat(stats=True, **kw)
        assert p is None and words in why, (kw, why)


def _bpat(part, dtype=torch.bfloat16, c=64, k=64, groups=1, cap=(9, 0), version=90800, **kw):
    flags = dict(scale=True, shift=True, in_relu=True)
    flags.update(kw)
    return cudnn.backward_pattern_for(part, dtype, c, k, groups, capability=cap, cudnn_version=version, **flags)


def test_backward_pattern_table():
    for dt in (torch.bfloat16, torch.float16):
        for cap in ((8, 0), (9, 0)):
            assert _bpat("wgrad", dt, cap=cap)[0] == "scale_shift_relu_wgrad"
        assert _bpat("dgrad", torch.float16, cap=cap)[0] == "dgrad_drelu_dbn"
    # bf16 dgrad: not in cuDNN's documented support -> the fallback up front, said so
    for cap in ((8, 0), (9, 0)):
        p, why = _bpat("dgrad", torch.bfloat16, cap=cap)
        assert p is None and why == cudnn.BF16_DGRAD_WHY and "fp16" in why
    # the wgrad pattern is older (cuDNN 8.8) than the dgrad + dReLU + dBN one (9.8)
    assert _bpat("wgrad", version=90000)[0] == "scale_shift_relu_wgrad"
    p, why = _bpat("dgrad", torch.float16, version=90700)
    assert p is None and "cuDNN >= 90800" in why
    for part in ("dgrad", "wgrad"):
        base = dict(dtype=torch.float16)
        for kw, words in [(dict(dtype=torch.float32), "fp16/bf16"), (dict(dtype=torch.float64), "fp16/bf16"),
                          (dict(cap=(7, 5)), "sm_80/sm_90"), (dict(cap=(10, 0)), "sm_80/sm_90"),
                          (dict(cap=None), "sm_80/sm_90"), (dict(groups=4), "grouped"),
                          (dict(c=3), "multiples of 8"), (dict(k=60), "multiples of 8"),
                          (dict(in_relu=False), "prologue"), (dict(scale=False), "prologue"),
                          (dict(shift=False), "prologue"), (dict(version=None), "cuDNN >=")]:
            p, why = _bpat(part, **{**base, **kw})
            assert p is None and words in why, (part, kw, why)
    with pytest.raises(ValueError, match="dgrad"):
        _bpat("fprop")


def test_unavailable_on_cpu_and_reported():
    ok, why = cudnn.available("cpu")
    assert not ok and "CUDA devices only" in why
    info = fastres.backend_info()
    ci = info["devices"]["cpu"]["cudnn_conv"]
    assert ci["available"] is False and ci["patterns"] == [] and ci["fallback"] == "aten"
    assert ci["built"] == bool(C_ext.WITH_CUDNN) and ci["reason"] and ci["backward"] == {}
    # the documented dtype table and the bf16 dgrad decision are reported on every device
    assert ci["documented_dtypes"]["dgrad_drelu_dbn"] == ["fp16"]
    assert ci["bf16_dgrad"].startswith("fallback: ") and "DgradDreluBNBwdWeight" in ci["bf16_dgrad"]
    assert info["built"]["_C_cudnn"] == bool(C_ext.WITH_CUDNN)
    if not torch.cuda.is_available():
        ok, why = cudnn.available("cuda")
        assert not ok and why


def test_choose_falls_back_on_cpu():
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(8, 8, 3, 3)
    p, why = cudnn.choose(x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, False, True, False)
    assert p is None and "CUDA devices only" in why


def _reference64(x, w, bias, scale, shift, residual, stride, padding, in_relu, relu, groups=1):
    """F.conv2d (+ bias, + residual, ReLU) in float64, with the prologue as the
    previous BatchNorm's folded scale/shift + ReLU."""
    u = x.double()
    if scale is not None:
        u = u * scale.double().view(1, -1, 1, 1)
    if shift is not None:
        u = u + shift.double().view(1, -1, 1, 1)
    if in_relu:
        u = u.relu()
    y = F.conv2d(u, w.double(), None if bias is None else bias.double(), stride, padding, 1, groups)
    if residual is not None:
        y = y + residual.double()
    return y.relu() if relu else y


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_fallback_forward_parity_cpu(layout):
    """The aten fallback used where no cuDNN graph applies (here: the CPU), float64."""
    torch.manual_seed(0)
    x = make_input((2, 5, 7, 6), torch.float64, layout)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    s = torch.rand(5, dtype=torch.float64) + 0.5
    t = torch.randn(5, dtype=torch.float64)
    r = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    y = cudnn.conv_bias_act(x, w, b, r, stride=2, padding=1, relu=True)
    torch.testing.assert_close(y, _reference64(x, w, b, None, None, r, 2, 1, False, True))
    y, mean, var = cudnn.conv_act_stats(x, w, s, t, stride=1, padding=1, in_relu=True)
    ref = _reference64(x, w, None, s, t, None, 1, 1, True, False)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(mean, ref.mean((0, 2, 3)))
    torch.testing.assert_close(var, ref.var((0, 2, 3), unbiased=False))
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


class _Ctx:
    """A stand-in for autograd's ctx: the registered backward formulas run on the CPU
    (float64) against autograd of the reference composition."""

    def __init__(self, saved, conf, needs, **extra):
        self.saved_tensors = saved
        self.conf = conf
        self.needs_input_grad = needs
        self.__dict__.update(extra)


@pytest.mark.parametrize("prologue", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_act_stats_backward_formula_cpu(prologue, layout):
    """The backward registered for cudnn_conv_act_stats (genstats terms -> aten
    convolution_backward on the recomputed prologue -> fused affine_act_backward)."""
    torch.manual_seed(1)
    x = make_input((2, 6, 7, 7), torch.float64, layout).requires_grad_()
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(6, dtype=torch.float64).requires_grad_()
    sc, sh = (s, t) if prologue else (None, None)
    y = _reference64(x, w, None, sc, sh, None, [2, 2], [1, 1], prologue, False)
    leaves = [x, w] + ([s, t] if prologue else [])
    gy, gsum, gsq = torch.randn_like(y), torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    expect = torch.autograd.grad((y * gy).sum() + (y.sum((0, 2, 3)) * gsum).sum()
                                 + (y.square().sum((0, 2, 3)) * gsq).sum(), leaves)
    ctx = _Ctx((x.detach(), w.detach(), None if sc is None else s.detach(), None if sh is None else t.detach(),
                y.detach()), ([2, 2], [1, 1], [1, 1], 1, prologue), (True, True, prologue, prologue),
               dtypes=(torch.float64, torch.float64))
    got = cudnn._backward_act_stats(ctx, gy, gsum, gsq)
    got = [g for g in got[:4] if g is not None]
    assert len(got) == len(expect)
    for a, e in zip(got, expect):
        torch.testing.assert_close(a, e)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("variant", ["bias_add_relu", "bias", "relu", "plain"])
def test_bias_act_backward_formula_cpu(variant):
    """The backward registered for cudnn_conv_bias_act (fused ReLU mask + bias/residual
    grads, then aten convolution_backward)."""
    torch.manual_seed(2)
    use_b, use_r, relu = "bias" in variant, "add" in variant, "relu" in variant
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    y = _reference64(x, w, b if use_b else None, None, None, r if use_r else None, [1, 1], [0, 0], False, relu)
    leaves = [x, w] + ([b] if use_b else []) + ([r] if use_r else [])
    gy = torch.randn_like(y)
    expect = torch.autograd.grad(y, leaves, gy)
    ctx = _Ctx((x.detach(), w.detach(), y.detach() if relu else None), ([1, 1], [0, 0], [1, 1], 1, relu),
               (True, True, use_b, use_r), bias_dtype=torch.float64)
    got = [g for g in cudnn._backward_bias_act(ctx, gy)[:4] if g is not None]
    assert len(got) == len(expect)
    for a, e in zip(got, expect):
        torch.testing.assert_close(a, e)


def _graphs_as(monkeypatch, run_graph):
    """cuDNN graphs "available" on an sm_90 device, each forward graph call running
    ``run_graph(pattern, *args)``; the refused-graph memory and the warnings empty."""
    monkeypatch.setattr(cudnn, "available", lambda dev: (True, "test"))
    monkeypatch.setattr(cudnn, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cudnn, "_run_graph", run_graph)
    monkeypatch.setattr(cudnn, "_no_engine", {})
    monkeypatch.setattr(cudnn, "_warned", set())


def test_no_engine_falls_back_once(monkeypatch):
    """cuDNN finding no engine for a graph at run time: one warning, the aten fallback
    (same result), the key remembered (the graph is not tried again) and reported in
    backend_info; any other error propagates."""
    calls = []

    def no_engine(pattern, *args):
        calls.append(pattern)
        raise RuntimeError(cudnn.NO_ENGINE + " (conv_bias_add_relu graph, cuDNN 92400): no usable engine config: "
                           "CUDNN_HEUR_MODE_A: 0 engine configs; CUDNN_HEUR_MODE_FALLBACK: 0 engine configs; ")

    _graphs_as(monkeypatch, no_engine)
    torch.manual_seed(3)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="refused the conv_bias_add_relu graph"):
        y = cudnn.conv2d_act_forward(x.float(), w.float(), b.float(), None, None, None, [1, 1], [1, 1], [1, 1], 1,
                                     False, True, False)[0]
    torch.testing.assert_close(y.double(), _reference64(x, w, b, None, None, None, 1, 1, False, True),
                               rtol=1e-5, atol=1e-5)
    assert calls == ["conv_bias_add_relu"]
    y2 = cudnn.conv2d_act_forward(x.float(), w.float(), b.float(), None, None, None, [1, 1], [1, 1], [1, 1], 1,
                                  False, True, False)[0]
    assert calls == ["conv_bias_add_relu"] and torch.equal(y, y2)  # remembered: not tried again
    refused = cudnn.info("cpu")["no_engine"]
    assert len(refused) == 1 and "CUDNN_HEUR_MODE_FALLBACK: 0 engine configs" in refused[0], refused
    assert "conv_bias_add_relu" in refused[0] and "'bias'" in refused[0] and "'relu'" in refused[0]
    p, why = cudnn.choose(x.float(), w.float(), b.float(), None, None, None, [1, 1], [1, 1], [1, 1], 1, False, True,
                          False)
    assert p is None and "refused this graph earlier" in why and "0 engine configs" in why
    # keyed by the optional operands present: the same conv without bias is another graph (tried)
    cudnn.conv2d_act_forward(x.float(), w.float(), None, None, None, None, [1, 1], [1, 1], [1, 1], 1, False, True,
                             False)
    assert calls == ["conv_bias_add_relu"] * 2
    # ... and by the deterministic mode (another engine filter: tried again)
    with _deterministic():
        cudnn.conv2d_act_forward(x.float(), w.float(), b.float(), None, None, None, [1, 1], [1, 1], [1, 1], 1,
                                 False, True, False)
    assert calls == ["conv_bias_add_relu"] * 3
    # a plan that failed after having run once is a real error: propagated, not remembered
    monkeypatch.setattr(cudnn, "_run_graph", lambda *a: (_ for _ in ()).throw(RuntimeError(
        "fastres cudnn: the conv_bias_add_relu plan failed after it had run successfully before: "
        "cudnnBackendExecute(...): CUDNN_STATUS_EXECUTION_FAILED")))
    with pytest.raises(RuntimeError, match="after it had run successfully before"):
        cudnn.conv2d_act_forward(x.float(), w.float(), None, None, None, x.float().new_zeros(2, 16, 5, 5), [1, 1],
                                 [1, 1], [1, 1], 1, False, True, False)
    assert len(cudnn._no_engine) == 3
    # another graph (bf16 genstats) is tried; an unrelated error is not swallowed
    monkeypatch.setattr(cudnn, "_run_graph", lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error: boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cudnn.conv_act_stats(x.bfloat16(), w.bfloat16())


class _deterministic:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


def test_refused_key_modes():
    """The refused-graph key holds the engine filters the C++ plan key holds
    (deterministic mode, TF32 for fp32) and which optional operands are present."""
    x, w = torch.randn(2, 8, 5, 5), torch.randn(8, 8, 3, 3)
    k = cudnn._key(x, w, [1, 1], [1, 1], [1, 1], 1, "conv_bias_add_relu", ("bias", "relu"))
    assert k != cudnn._key(x, w, [1, 1], [1, 1], [1, 1], 1, "conv_bias_add_relu", ("bias",))
    assert k == cudnn._key(x, w, [1, 1], [1, 1], [1, 1], 1, "conv_bias_add_relu", ("relu", "bias"))
    with _deterministic():
        assert k != cudnn._key(x, w, [1, 1], [1, 1], [1, 1], 1, "conv_bias_add_relu", ("bias", "relu"))
    prev = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = not prev
        assert k != cudnn._key(x, w, [1, 1], [1, 1], [1, 1], 1, "conv_bias_add_relu", ("bias", "relu"))
        # TF32 does not concern 16-bit graphs
        kb = cudnn._key(x.bfloat16(), w.bfloat16(), [1, 1], [1, 1], [1, 1], 1, "conv_genstats")
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    assert kb == cudnn._key(x.bfloat16(), w.bfloat16(), [1, 1], [1, 1], [1, 1], 1, "conv_genstats")
    assert cudnn._fwd_operands(1, None, 1, None, True, False) == ("bias", "shift", "in_relu")
    assert cudnn._bwd_operands(1, 1, True) == ("scale", "shift", "in_relu")


# ============================================================================ CPU: deviceless cuDNN check
def _need_deviceless():
    ok, why = cudnn.deviceless_available()
    if not ok:
        pytest.skip(f"deviceless cuDNN check unavailable: {why}")


def test_deviceless_check_finds_an_engine():
    """A conv + bias + ReLU graph in fp16 for sm_90 (a pre-compiled ConvBiasAct engine)
    without a GPU: heuristics return configs and a plan finalizes."""
    _need_deviceless()
    r = cudnn.graph_check("conv_bias_add_relu", torch.float16, "sm_90", operands=("bias", "relu"))
    assert r["ok"] and r["configs"] > 0 and r["plans"] == 1, r


def test_deviceless_check_failure_names_the_descriptor():
    """A device description cuDNN rejects: ok False, the detail names the descriptor and
    cuDNN's status and message (the missing JSON field)."""
    _need_deviceless()
    ok, detail, configs, plans, _ = torch.ops.fastres_cudnn.graph_check(
        "conv_genstats", "float16", "{}", [2, 64, 8, 8], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], [], False, True)
    assert not ok and configs == plans == 0
    assert "CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR" in detail and "CUDNN_STATUS_BAD_PARAM" in detail, detail
    assert "maxGridSize" in detail, detail
    with pytest.raises(RuntimeError, match="unknown pattern 'conv_fancy'"):
        torch.ops.fastres_cudnn.graph_check("conv_fancy", "float16", "{}", [2, 64, 8, 8], [64, 64, 3, 3], [1, 1],
                                            [1, 1], [1, 1], [], False, True)
    with pytest.raises(RuntimeError, match="unknown option 'bias2'"):
        torch.ops.fastres_cudnn.graph_check("conv_bias_add_relu", "float16", "{}", [2, 64, 8, 8], [64, 64, 3, 3],
                                            [1, 1], [1, 1], [1, 1], ["bias2"], False, True)


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_deviceless_eval_graphs_have_engines(target):
    """Every graph a folded eval block builds -- conv + bias + ReLU (conv1, conv2, the
    stem), conv + bias (the projection), conv + residual + bias + ReLU (conv3) -- has a
    pre-compiled cuDNN engine (ConvBiasAct) in fp16, bf16 and fp32 on ``target``, found
    without a GPU. The residual is added before the bias (the ConvBiasAct order
    act(conv + z + bias)): with the bias first cuDNN had no pre-compiled engine for
    conv3's graph in any dtype."""
    _need_deviceless()
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for ops in (("bias", "relu"), ("bias",), ("bias", "residual", "relu")):
            r = cudnn.graph_check("conv_bias_add_relu", dt, target, x_shape=(8, 128, 28, 28),
                                  w_shape=(512, 128, 1, 1), padding=(0, 0), operands=ops)
            assert r["ok"] and r["configs"] > 0, (dt, ops, r)
        r = cudnn.graph_check("conv_bias_add_relu", dt, target, x_shape=(8, 3, 64, 64), w_shape=(64, 3, 7, 7),
                              stride=(2, 2), padding=(3, 3), operands=("bias", "relu"))
        assert r["ok"], ("stem", dt, r)


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_deviceless_table_backs_the_pattern_tables(target):
    """Every training graph the pattern tables choose for fp16 on ``target`` has a
    pre-compiled cuDNN engine (found without a GPU, also under deterministic mode), and
    the bf16 dgrad graph sent to the fallback up front has none (docs/DESIGN.md records
    the whole table). A C=3 stem graph has none either (pattern_for never asks)."""
    _need_deviceless()
    cap = (int(target[3]), 0)
    for pattern, ops in cudnn.CHECKED_GRAPHS:
        if pattern == "conv_bias_add_relu":
            continue  # inference: runtime fusion decides for most operand sets (recorded in the doc)
        if pattern in cudnn.FWD_PATTERNS:
            chosen = _pat(torch.float16, cap=cap, stats=True, prologue=bool(ops))[0]
        else:
            chosen = _bpat("dgrad" if pattern.startswith("dgrad") else "wgrad", torch.float16, cap=cap)[0]
        assert chosen == pattern
        for det in (False, True):
            r = cudnn.graph_check(pattern, torch.float16, target, operands=ops, deterministic=det)
            assert r["ok"], (pattern, target, det, r)
    r = cudnn.graph_check("dgrad_drelu_dbn", torch.bfloat16, target)
    if r["runtime_compiled"]:
        pytest.skip("runtime-compiled engines were considered here (a CUDA driver is present): the bf16 dgrad "
                    f"result ({r['ok']}) is not the pre-compiled-only one this test pins")
    assert not r["ok"] and "0 engine configs" in r["detail"], r
    r = cudnn.graph_check("conv_genstats", torch.float16, target, x_shape=(8, 3, 32, 32), w_shape=(64, 3, 7, 7),
                          stride=(2, 2), padding=(3, 3))
    assert not r["ok"], r


def test_conv_backend_cudnn_on_cpu_falls_back():
    """FASTRES_CONV=cudnn on the CPU: aten's conv with one warning, same results; the
    ``cudnn`` conv family (fastres::cudnn_conv2d_act, the graphs' forward with the aten
    fallback inside) matches the aten family, gradients included, and passes opcheck."""
    from fastres import conv_backend, conv_ops, functional as Fn
    torch.manual_seed(4)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(8, dtype=torch.float64, requires_grad=True)
    ref = Fn.conv2d_act(x, w, None, 1, 1, in_scale=s, in_shift=t, in_relu=True, stats="moments")
    conv_backend._warned.clear()
    with conv_backend.use_conv("cudnn"):
        assert conv_backend.conv_info("cpu")["path"] == "aten"
        with pytest.warns(RuntimeWarning, match="cuDNN conv graphs are unavailable on cpu"):
            out = Fn.conv2d_act(x, w, None, 1, 1, in_scale=s, in_shift=t, in_relu=True, stats="moments")
    for a, e in zip(out, ref):
        torch.testing.assert_close(a, e)
    fam = conv_ops.family("cudnn")
    y, m, v = fam.conv2d_act(x, w, None, s, t, None, [1, 1], [1, 1], [1, 1], 1, True, False, True)
    for a, e in zip((y, m, v), ref):
        torch.testing.assert_close(a, e)
    g = torch.autograd.grad(y.sum() + m.sum() + v.square().sum(), [x, w, s, t])
    g_ref = torch.autograd.grad(ref[0].sum() + ref[1].sum() + ref[2].square().sum(), [x, w, s, t])
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e)
    torch.library.opcheck(torch.ops.fastres.cudnn_conv2d_act.default,
                          (x.detach(), w.detach(), None, s.detach(), t.detach(), None, [1, 1], [1, 1], [1, 1], 1,
                           True, False, True))


def test_fake_kernels():
    assert cudnn.register()
    with FakeTensorMode():
        x = torch.empty(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
        w = torch.empty(32, 16, 3, 3)
        y = OPS.cudnn_conv_bias_act(x, w, None, None, [2, 2], [1, 1], [1, 1], 1, True)
        assert y.shape == (2, 32, 5, 5) and y.is_contiguous(memory_format=torch.channels_last)
        y, s, sq = OPS.cudnn_conv_act_stats(x.contiguous(), w, None, None, [1, 1], [0, 0], [1, 1], 1, False)
        assert y.shape == (2, 32, 7, 7) and y.is_contiguous()
        assert s.shape == sq.shape == (32,) and s.dtype == sq.dtype == torch.float32


def test_meta_tensors_and_compile_trace():
    """Meta tensors dispatch to the fake kernels; torch.compile traces the op into one
    graph (fullgraph) without running it (the aot_eager backend on meta inputs)."""
    assert cudnn.register()
    x = torch.empty(2, 8, 6, 6, device="meta", dtype=torch.bfloat16)
    w = torch.empty(8, 8, 1, 1, device="meta", dtype=torch.bfloat16)
    y, s, sq = OPS.cudnn_conv_act_stats(x, w, None, None, [1, 1], [0, 0], [1, 1], 1, True)
    assert y.device.type == "meta" and y.shape == (2, 8, 6, 6) and s.shape == (8,)
    y = OPS.cudnn_conv_bias_act(x, w, None, x, [1, 1], [0, 0], [1, 1], 1, True)
    assert y.shape == x.shape and y.dtype == torch.bfloat16


def test_bad_input_messages_without_cuda():
    if C_ext.WITH_CUDNN:
        # the CUDA kernel exists but the CPU has none: dispatch names the op
        with pytest.raises(NotImplementedError, match="cudnn_conv_bias_act"):
            OPS.cudnn_conv_bias_act(torch.randn(1, 8, 4, 4), torch.randn(8, 8, 1, 1), None, None,
                                    [1, 1], [0, 0], [1, 1], 1, True)
    else:
        with pytest.raises(NotImplementedError):
            OPS.cudnn_conv_bias_act(torch.randn(1, 8, 4, 4), torch.randn(8, 8, 1, 1), None, None,
                                    [1, 1], [0, 0], [1, 1], 1, True)


def _emulated_bwd_graph(calls):
    """A CPU stand-in for the two C++ backward ops with their documented semantics
    (aten in the input's dtype), recording which pattern ran."""
    def run(pattern, dz, x, w, scale, shift, in_relu, stride, padding, dilation, groups):
        calls.append(pattern)
        v = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if pattern == "dgrad_drelu_dbn":
            gu = torch.ops.aten.convolution_backward(dz, x, w, None, stride, padding, dilation, False, [0, 0],
                                                     groups, [True, False, False])[0]
            dv = torch.where(v > 0, gu, torch.zeros_like(gu))
            return dv, (dv * x).sum((0, 2, 3)), dv.sum((0, 2, 3))
        u = v.relu() if in_relu else v
        return torch.ops.aten.convolution_backward(dz, u, w, None, stride, padding, dilation, False, [0, 0],
                                                   groups, [False, True, False])[1]
    return run


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """The cuDNN path reported available on the CPU for every dtype (the pattern gates
    are tested in test_backward_pattern_table), the forward graphs absent (aten
    fallback) and the backward graphs emulated: checks the Python wiring of the
    backward around the graph outputs."""
    calls = []
    monkeypatch.setattr(cudnn, "available", lambda dev: (True, "test"))
    monkeypatch.setattr(cudnn, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cudnn, "_cudnn_version", lambda: 90800)
    monkeypatch.setattr(cudnn, "pattern_for", lambda *a, **k: (None, "test: forward graphs absent"))
    real = cudnn.backward_pattern_for
    monkeypatch.setattr(cudnn, "backward_pattern_for",
                        lambda part, dtype, *a, **k: real(part, torch.float16, *a, **k))
    monkeypatch.setattr(cudnn, "register", lambda: True)
    monkeypatch.setattr(cudnn, "_run_bwd_graph", _emulated_bwd_graph(calls))
    monkeypatch.setattr(cudnn, "_no_engine", {})
    monkeypatch.setattr(cudnn, "_warned", set())
    return calls


def _conv2d_act_case(layout="channels_last", seed=5):
    torch.manual_seed(seed)
    x = make_input((2, 8, 7, 7), torch.float64, layout).requires_grad_()
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    return x, w, b, s, t, r


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_family_backward_uses_the_graphs(graphs_on_cpu, layout):
    """conv2d_act through the ``cudnn`` family (FASTRES_CONV=cudnn's op): with the
    backward graphs chosen, every gradient (x, weight, bias, scale, shift, residual; the
    statistics' and the output ReLU's terms too) matches autograd of F.conv2d in float64,
    and both graphs ran once per backward."""
    from fastres import conv_ops
    x, w, b, s, t, r = _conv2d_act_case(layout)
    fam = conv_ops.family("cudnn")
    y, m, v = fam.conv2d_act(x, w, b, s, t, r, [2, 2], [1, 1], [1, 1], 1, True, True, True)
    ref = _reference64(x, w, b, s, t, r, [2, 2], [1, 1], True, True)
    torch.testing.assert_close(y, ref)
    leaves = [x, w, b, s, t, r]
    gy = torch.randn_like(y)
    loss = (y * gy).sum() + m.square().sum() + v.sum()
    loss_ref = (ref * gy).sum() + ref.mean((0, 2, 3)).square().sum() + ref.var((0, 2, 3), unbiased=False).sum()
    got, expect = torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_ref, leaves)
    assert graphs_on_cpu == ["dgrad_drelu_dbn", "scale_shift_relu_wgrad"]
    for name, a, e in zip("x w b s t r".split(), got, expect):
        torch.testing.assert_close(a, e, msg=lambda msg: f"grad {name}: {msg}")
    assert got[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    # only what is needed: no graph for a weight-only backward's dgrad
    graphs_on_cpu.clear()
    y, _, _ = fam.conv2d_act(x.detach(), w, None, s.detach(), t.detach(), None, [1, 1], [1, 1], [1, 1], 1, True,
                             False, False)
    torch.autograd.grad(y.sum(), [w])
    assert graphs_on_cpu == ["scale_shift_relu_wgrad"]


def test_family_backward_without_prologue_is_aten(graphs_on_cpu):
    """No input prologue: nothing to fuse into dgrad/wgrad, aten's convolution_backward
    (no graph call), same gradients."""
    from fastres import conv_ops
    x, w, b, _, _, r = _conv2d_act_case("contiguous")
    y, _, _ = conv_ops.family("cudnn").conv2d_act(x, w, b, None, None, r, [2, 2], [1, 1], [1, 1], 1, False, True,
                                                  False)
    ref = _reference64(x, w, b, None, None, r, [2, 2], [1, 1], False, True)
    got, expect = torch.autograd.grad(y.sum(), [x, w, b, r]), torch.autograd.grad(ref.sum(), [x, w, b, r])
    assert graphs_on_cpu == []
    for a, e in zip(got, expect):
        torch.testing.assert_close(a, e)


def test_capture_and_out_of_memory_are_not_remembered(monkeypatch):
    """A graph first met inside a CUDA graph capture (the C++ op builds no plan there:
    NOT_IN_CAPTURE) runs the aten fallback for that call, warned once, and is tried
    again on the next call (nothing remembered). Out of memory while running a graph is
    torch.OutOfMemoryError for the caller (batch-size searches catch it), never a graph
    remembered as refused."""
    calls = []
    errors = [RuntimeError(cudnn.NOT_IN_CAPTURE + " (conv_bias_add_relu graph): run the model once outside the "
                           "capture first"),
              torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]

    def failing(pattern, *args):
        calls.append(pattern)
        raise errors[min(len(calls), len(errors)) - 1]

    _graphs_as(monkeypatch, failing)
    torch.manual_seed(4)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64)
    args = (x.float(), w.float(), b.float(), None, None, None, [1, 1], [1, 1], [1, 1], 1, False, True, False)
    with pytest.warns(RuntimeWarning, match="first called inside a CUDA graph capture"):
        y = cudnn.conv2d_act_forward(*args)[0]
    torch.testing.assert_close(y.double(), _reference64(x, w, b, None, None, None, 1, 1, False, True),
                               rtol=1e-5, atol=1e-5)
    assert calls == ["conv_bias_add_relu"] and cudnn._no_engine == {}
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        cudnn.conv2d_act_forward(*args)  # tried again (not remembered), and OOM propagates
    assert calls == ["conv_bias_add_relu"] * 2 and cudnn._no_engine == {}
    p, _ = cudnn.choose(*args)
    assert p == "conv_bias_add_relu"


def test_backward_no_engine_falls_back_per_part(graphs_on_cpu, monkeypatch):
    """cuDNN refusing the dgrad graph at run time: one warning, that part
    on aten + the fused elementwise kernels (same gradients), the wgrad graph still
    used, the key remembered (not tried again) and reported by backend_info."""
    from fastres import conv_ops
    emulated = cudnn._run_bwd_graph

    def no_dgrad(pattern, *a):
        if pattern == "dgrad_drelu_dbn":
            graphs_on_cpu.append("refused")
            raise RuntimeError(cudnn.NO_ENGINE + " (conv_bias_add_relu graph, cuDNN 92400): no usable engine config: "
                           "CUDNN_HEUR_MODE_A: 0 engine configs; CUDNN_HEUR_MODE_FALLBACK: 0 engine configs; ")
        return emulated(pattern, *a)

    monkeypatch.setattr(cudnn, "_run_bwd_graph", no_dgrad)
    x, w, b, s, t, r = _conv2d_act_case("contiguous")
    leaves = [x, w, s, t]
    ref = _reference64(x, w, None, s, t, None, [1, 1], [1, 1], True, False)
    expect = torch.autograd.grad(ref.square().sum(), leaves)
    fam = conv_ops.family("cudnn")
    for i in range(2):
        y, _, _ = fam.conv2d_act(x, w, None, s, t, None, [1, 1], [1, 1], [1, 1], 1, True, False, False)
        if i == 0:
            with pytest.warns(RuntimeWarning, match="refused the dgrad_drelu_dbn graph"):
                got = torch.autograd.grad(y.square().sum(), leaves)
        else:
            got = torch.autograd.grad(y.square().sum(), leaves)
        for a, e in zip(got, expect):
            torch.testing.assert_close(a, e)
    assert graphs_on_cpu == ["refused", "scale_shift_relu_wgrad", "scale_shift_relu_wgrad"]
    assert any("dgrad_drelu_dbn" in m for m in cudnn.info("cpu")["no_engine"])
    # any other error is not swallowed
    monkeypatch.setattr(cudnn, "_run_bwd_graph", lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error: boom")))
    y, _, _ = fam.conv2d_act(x, w, None, s, t, None, [1, 1], [1, 1], [1, 1], 1, True, False, False)
    with pytest.raises(RuntimeError, match="boom"):
        torch.autograd.grad(y.sum(), [w])


def test_backend_info_reports_the_backward_choice(graphs_on_cpu, monkeypatch):
    monkeypatch.setattr(cudnn, "_cudnn_version", lambda: 90500)
    ci = cudnn.info("cpu")
    assert ci["available"] and set(ci["patterns"]) == set(cudnn.PATTERNS)
    for dt in ("bf16", "fp16"):
        assert ci["backward"][dt]["wgrad"] == "scale_shift_relu_wgrad"
        assert ci["backward"][dt]["dgrad"].startswith("fallback:") and "90800" in ci["backward"][dt]["dgrad"]


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_blocks_take_the_cudnn_path(graphs_on_cpu, kind, monkeypatch):
    """FASTRES_CONV=cudnn with the graphs available: the blocks run through conv2d_act
    (stats + prologue in training, folded epilogue in eval) on the ``cudnn`` family, the
    backward through the graphs; float64 parity with torchvision in training (two steps:
    outputs, every gradient, running stats) and eval."""
    from torchvision.models import resnet as tvr
    from resnet_ref import check_parity, randomize
    from fastres import conv_backend, conv_ops
    if kind == "basic":
        ref, ours = tvr.BasicBlock(8, 8), fastres.BasicBlock(8, 8)
    else:
        ds = lambda: torch.nn.Sequential(tvr.conv1x1(16, 32, 2), torch.nn.BatchNorm2d(32))  # noqa: E731
        ref, ours = tvr.Bottleneck(16, 8, 2, ds()), fastres.Bottleneck(16, 8, 2, ds())
    randomize(ref)
    ref, ours = ref.double(), ours.double()
    ours.load_state_dict(ref.state_dict())
    families = []
    real = conv_ops.family
    monkeypatch.setattr(conv_ops, "family", lambda n: families.append(n) or real(n))
    conv_backend._clear_resolved()
    x = torch.randn(2, ref.conv1.in_channels, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    try:
        with conv_backend.use_conv("cudnn"):
            assert conv_backend.conv_for(x.device) == "cudnn"
            check_parity(ref, ours, x, train=True, tol=1e-9, steps=2, what=f"{kind} cudnn train")
            n_convs = 2 if kind == "basic" else 4
            assert families and set(families) == {"cudnn"} and len(families) == 2 * n_convs
            n_prologue = 1 if kind == "basic" else 2  # conv2 (, conv3): the convs after a BN + ReLU
            assert len(graphs_on_cpu) == 2 * 2 * n_prologue  # dgrad + wgrad of each, two steps
            families.clear()
            check_parity(ref, ours, x, train=False, tol=1e-9, what=f"{kind} cudnn eval")
            assert families == ["cudnn"] * n_convs
    finally:
        conv_backend._clear_resolved()


def test_fake_kernels_backward_ops():
    assert cudnn.register()
    with FakeTensorMode():
        x = torch.empty(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
        w = torch.empty(32, 16, 3, 3)
        dy = torch.empty(2, 32, 5, 5)
        c = torch.empty(16)
        dv, ds, dt = OPS.cudnn_dgrad_drelu_dbn(dy, w, x, c, c, [2, 2], [1, 1], [1, 1], 1)
        assert dv.shape == x.shape and dv.is_contiguous(memory_format=torch.channels_last)
        assert ds.shape == dt.shape == (16,) and ds.dtype == torch.float32
        dw = OPS.cudnn_wgrad_scale_shift_relu(dy, x, c, c, [32, 16, 3, 3], [2, 2], [1, 1], [1, 1], 1, True)
        assert dw.shape == (32, 16, 3, 3) and dw.is_contiguous() and dw.dtype == x.dtype


# ============================================================================ GPU
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fresh_graph_memory(monkeypatch):
    """Each test starts with no graph remembered as refused and no warning given: the
    process-wide memory of fastres.cudnn would otherwise carry one test's refusal (a
    tolerated fallback there) into another test's "nothing refused" assertion."""
    monkeypatch.setattr(cudnn, "_no_engine", {})
    monkeypatch.setattr(cudnn, "_warned", set())


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 parity against float64: no TF32 in cuDNN (restored after the test)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the cuDNN graphs run on GPUs only)")
    ok, why = cudnn.available("cuda")
    if not ok:
        pytest.fail(f"a CUDA device exists but the cuDNN graphs are unavailable: {why}")


# (N, C, H, K, R, stride, padding): ResNet-like, odd spatial sizes, 1x1/3x3, stride 2
SHAPES = [(2, 64, 14, 64, 3, 1, 1), (4, 256, 7, 64, 1, 1, 0), (2, 64, 15, 128, 3, 2, 1), (1, 32, 9, 32, 1, 2, 0)]
LOW_DT = [torch.bfloat16, torch.float16]


def _data(shape, dtype, layout="channels_last", seed=0):
    n, c, h, k, r, stride, pad = shape
    torch.manual_seed(seed)
    x = make_input((n, c, h, h), torch.float32, layout, device="cuda")
    w = torch.randn(k, c, r, r, device="cuda") * (2.0 / (c * r * r)) ** 0.5
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(k, device="cuda") * 0.1
    p = (h + 2 * pad - r) // stride + 1
    res = make_input((n, k, p, p), torch.float32, layout, device="cuda")
    s = torch.rand(c, device="cuda") + 0.5
    t = torch.randn(c, device="cuda") * 0.2
    return x, w, b, res, s, t, [stride, stride], [pad, pad]


def _grads(out, inputs, gy):
    return torch.autograd.grad(out, inputs, gy, allow_unused=True)


# each distinct graph builds a plan (runtime-compiled kernels: ~1 s each), so the
# grid is kept small: every variant and every shape once, per dtype
BIAS_ACT_CASES = [(SHAPES[0], "bias_add_relu"), (SHAPES[1], "bias_relu"), (SHAPES[2], "bias_add_relu"),
                  (SHAPES[3], "plain")]
STATS_CASES = [(SHAPES[0], True), (SHAPES[1], False), (SHAPES[2], True)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_DT)
@pytest.mark.parametrize("shape,variant", BIAS_ACT_CASES)
def test_conv_bias_act_parity(shape, dtype, variant, no_tf32):
    """conv + bias (+ residual) + ReLU through the graph (or its run-time fallback for
    fp32 where cuDNN has no fused engine), outputs and every gradient."""
    _need_gpu()
    x32, w32, b32, r32, _, _, stride, pad = _data(shape, torch.float32)
    use_b = variant != "plain"
    use_r = variant == "bias_add_relu"
    relu = variant != "plain"
    leaves = [t.to(dtype).detach().requires_grad_() for t in (x32, w32, b32, r32)]
    x, w, b, r = leaves
    b_in = b if use_b else None
    r_in = r if use_r else None
    if dtype in LOW_DT:
        # the graph itself (not a fallback) must run for 16-bit NHWC with C, K % 8 == 0
        y = OPS.cudnn_conv_bias_act(x, w, b_in, r_in, stride, pad, [1, 1], 1, relu)
    else:
        y = cudnn.conv_bias_act(x, w, b_in, r_in, stride, pad, relu=relu)
    gy = torch.randn_like(y)
    g = _grads(y, [t for t, u in zip(leaves, (True, True, use_b, use_r)) if u], gy)
    # fp64 reference and PyTorch's own result in `dtype`
    hi = [t.double().detach().requires_grad_() for t in (x32, w32, b32, r32)]
    y_hi = _reference64(hi[0], hi[1], hi[2] if use_b else None, None, None, hi[3] if use_r else None, stride, pad,
                        False, relu)
    g_hi = _grads(y_hi, [t for t, u in zip(hi, (True, True, use_b, use_r)) if u], gy.double())
    lo = [t.to(dtype).detach().requires_grad_() for t in (x32, w32, b32, r32)]
    y_lo = F.conv2d(lo[0], lo[1], lo[2] if use_b else None, stride, pad)
    if use_r:
        y_lo = y_lo + lo[3]
    if relu:
        y_lo = y_lo.relu()
    g_lo = _grads(y_lo, [t for t, u in zip(lo, (True, True, use_b, use_r)) if u], gy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y.double(), y_hi, **tol)
        for a, e in zip(g, g_hi):
            torch.testing.assert_close(a.double(), e, **tol)
    else:
        assert_close_dtype(y, None, dtype, "y", ref_low=y_lo, ref_hi=y_hi)
        for i, (a, lo_, e) in enumerate(zip(g, g_lo, g_hi)):
            assert_close_dtype(a, None, dtype, f"grad {i}", ref_low=lo_, ref_hi=e)


@gpu
@pytest.mark.parametrize("dtype", LOW_DT)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_conv_bias_act_layout(dtype, layout):
    """NCHW input: y comes back NCHW with the same values as the NHWC call."""
    _need_gpu()
    x, w, b, r, _, _, stride, pad = _data(SHAPES[0], torch.float32, layout)
    x, w, b, r = (t.to(dtype) for t in (x, w, b, r))
    y = OPS.cudnn_conv_bias_act(x, w, b, r, stride, pad, [1, 1], 1, True)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    cl = torch.channels_last
    y2 = OPS.cudnn_conv_bias_act(x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), b,
                                 r.contiguous(memory_format=cl), stride, pad, [1, 1], 1, True)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


def _bn_train_reference(x, w, s, t, stride, pad, in_relu, gamma, beta, rm, rv, eps, momentum):
    """prologue (scale, shift, ReLU) -> F.conv2d -> BatchNorm2d (training, F.batch_norm:
    nn.BatchNorm2d's own call, updating rm/rv) -> ReLU."""
    u = x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
    if in_relu:
        u = u.relu()
    y = F.conv2d(u.to(x.dtype), w, None, stride, pad)
    return F.batch_norm(y, rm, rv, gamma, beta, True, momentum, eps).relu()


@gpu
@pytest.mark.parametrize("dtype", LOW_DT)
@pytest.mark.parametrize("shape,prologue", STATS_CASES)
def test_conv_act_stats_bn_parity(shape, dtype, prologue):
    """Training forward: [scale, shift, ReLU] -> conv -> genstats, then the BN finalize
    (mean, biased var for the normalisation, unbiased var for the running stats) and
    BN + ReLU: against F.conv2d + nn.BatchNorm2d + ReLU, outputs, every gradient
    (x, weight, scale, shift, gamma, beta) and the running statistics."""
    _need_gpu()
    x32, w32, _, _, s32, t32, stride, pad = _data(shape, torch.float32)
    k = w32.shape[0]
    gamma32 = torch.rand(k, device="cuda") + 0.5
    beta32 = torch.randn(k, device="cuda") * 0.1
    eps, momentum = 1e-5, 0.1

    def run(mode, cast):
        xs = [cast(t).detach().requires_grad_() for t in (x32, w32)]
        ps = [t.double().detach().requires_grad_() if mode == "hi" else t.detach().clone().requires_grad_()
              for t in (s32, t32, gamma32, beta32)]
        x, w = xs
        s, t, gamma, beta = ps
        rm = torch.zeros(k, device="cuda", dtype=torch.float64 if mode == "hi" else torch.float32)
        rv = torch.ones_like(rm)
        if mode == "ours":
            y, mean, var = cudnn.conv_act_stats(x, w, s if prologue else None, t if prologue else None, stride, pad,
                                                in_relu=prologue)
            assert cudnn.choose(x, w, None, s if prologue else None, t if prologue else None, None, stride, pad,
                                [1, 1], 1, prologue, False, True)[0] is not None, "the genstats graph must apply"
            m = y.shape[0] * y.shape[2] * y.shape[3]
            with torch.no_grad():
                rm.mul_(1 - momentum).add_(momentum * mean)
                rv.mul_(1 - momentum).add_(momentum * var * m / (m - 1))
            out = ((y.float() - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + eps)
                   * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)).relu().to(dtype)
        else:
            # fp32 params/stats under 16-bit input, as nn.BatchNorm2d after .to(dtype) of the input only
            if prologue:
                out = _bn_train_reference(x, w, s, t, stride, pad, True, gamma, beta, rm, rv, eps, momentum)
            else:
                ones, zeros = torch.ones_like(s), torch.zeros_like(t)
                out = _bn_train_reference(x, w, ones, zeros, stride, pad, False, gamma, beta, rm, rv, eps,
                                          momentum)
        gy = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        leaves = [x, w, gamma, beta] + ([s, t] if prologue else [])
        grads = torch.autograd.grad(out, leaves, gy.to(out.dtype))
        return out, grads, rm, rv

    out, g, rm, rv = run("ours", lambda t: t.to(dtype))
    out_hi, g_hi, rm_hi, rv_hi = run("hi", lambda t: t.double())
    out_lo, g_lo, rm_lo, rv_lo = run("lo", lambda t: t.to(dtype))
    assert_close_dtype(out, None, dtype, "out", ref_low=out_lo, ref_hi=out_hi)
    names = ["x", "weight", "gamma", "beta", "scale", "shift"]
    for name, a, lo, hi in zip(names, g, g_lo, g_hi):
        assert_close_dtype(a, None, dtype, f"grad {name}", ref_low=lo, ref_hi=hi)
    assert_close_dtype(rm, None, dtype, "running_mean", ref_low=rm_lo, ref_hi=rm_hi)
    assert_close_dtype(rv, None, dtype, "running_var", ref_low=rv_lo, ref_hi=rv_hi)


@gpu
def test_conv_act_stats_fp32_falls_back_with_parity(no_tf32):
    """fp32 has no genstats engine in the table: the aten fallback, exact semantics."""
    _need_gpu()
    x, w, _, _, s, t, stride, pad = _data(SHAPES[0], torch.float32)
    assert cudnn.choose(x, w, None, s, t, None, stride, pad, [1, 1], 1, True, False, True)[0] is None
    y, mean, var = cudnn.conv_act_stats(x, w, s, t, stride, pad, in_relu=True)
    ref = _reference64(x, w, None, s, t, None, stride, pad, True, False)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype", LOW_DT)
def test_cuda_graph_capture_and_replay(dtype):
    """Both ops captured in a CUDA graph after a warm-up call (which builds the plans),
    replayed on new input data: same results as eager calls."""
    _need_gpu()
    x, w, b, r, s, t, stride, pad = (v.to(dtype) if isinstance(v, torch.Tensor) else v
                                     for v in _data(SHAPES[0], torch.float32))
    dil = [1, 1]
    OPS.cudnn_conv_bias_act(x, w, b, r, stride, pad, dil, 1, True)
    OPS.cudnn_conv_act_stats(x, w, s, t, stride, pad, dil, 1, True)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y1 = OPS.cudnn_conv_bias_act(x, w, b, r, stride, pad, dil, 1, True)
        y2, s2, sq2 = OPS.cudnn_conv_act_stats(x, w, s, t, stride, pad, dil, 1, True)
    for seed in (3, 4):
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        e1 = OPS.cudnn_conv_bias_act(x, w, b, r, stride, pad, dil, 1, True)
        e2, es2, esq2 = OPS.cudnn_conv_act_stats(x, w, s, t, stride, pad, dil, 1, True)
        torch.testing.assert_close(y1, e1, rtol=0, atol=0)
        torch.testing.assert_close(y2, e2, rtol=0, atol=0)
        torch.testing.assert_close(s2, es2, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(sq2, esq2, rtol=1e-5, atol=1e-3)


def _capture_and_replay(step, x):
    """Warm ``step`` up on a side stream (plans built), capture it in a CUDA graph, put new
    data in ``x``, replay; returns (the replay's outputs, an eager step's outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    return out, step()


@gpu
def test_cuda_graph_training_step():
    """A whole training step (stats forward + BN + ReLU + backward) captured and replayed."""
    _need_gpu()
    dtype = torch.bfloat16
    x0, w0, _, _, s0, t0, stride, pad = _data(SHAPES[0], torch.float32)
    x = x0.to(dtype)
    w = w0.to(dtype).requires_grad_()
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()

    def step():
        y, mean, var = cudnn.conv_act_stats(x, w, s, t, stride, pad, in_relu=True)
        out = ((y.float() - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + 1e-5)).relu()
        return torch.autograd.grad(out.square().mean(), [w, s, t])

    grads, eager = _capture_and_replay(step, x)
    for a, e in zip(grads, eager):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-4)


@gpu
def test_conv2d_act_with_the_cudnn_conv_backend():
    """FASTRES_CONV=cudnn on a GPU: conv2d_act's training forward (prologue + stats) and
    inference epilogue run through the graphs, matching the aten conv path."""
    _need_gpu()
    from fastres import conv_backend, functional as Fn
    x, w, b, r, s, t, stride, pad = _data(SHAPES[0], torch.float32)
    x, w, b, r = (v.to(torch.bfloat16) for v in (x, w, b, r))
    with conv_backend.use_conv("cudnn"):
        assert conv_backend.conv_info("cuda")["path"] == "cudnn"
        got_t = Fn.conv2d_act(x, w, None, stride, pad, in_scale=s, in_shift=t, in_relu=True, stats="moments")
        got_i = Fn.conv2d_act(x, w, b, stride, pad, residual=r, activation="relu")
    with conv_backend.use_conv("aten"):
        ref_t = Fn.conv2d_act(x, w, None, stride, pad, in_scale=s, in_shift=t, in_relu=True, stats="moments")
        ref_i = Fn.conv2d_act(x, w, b, stride, pad, residual=r, activation="relu")
    for a, e in zip(list(got_t) + [got_i], list(ref_t) + [ref_i]):
        torch.testing.assert_close(a.float(), e.float(), rtol=3e-2, atol=3e-2)
    assert not cudnn._no_engine, cudnn._no_engine


@gpu
def test_backend_info_on_gpu():
    _need_gpu()
    ci = fastres.backend_info()["devices"]["cuda"]["cudnn_conv"]
    assert ci["available"] and ci["built"] and set(ci["patterns"]) == set(cudnn.PATTERNS)
    assert set(ci["backward"]) == {"bf16", "fp16"}
    assert ci["capability"] == torch.cuda.get_device_capability()


# ----------------------------------------------------------------------------- GPU: training backward
BWD_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[2]]


def _fail_if_no_engine(fn, what):
    """Run a graph op directly: cuDNN refusing a graph that backward_pattern_for
    promises for this device is a wrong table (docs/DESIGN.md), reported as such."""
    try:
        return fn()
    except RuntimeError as e:
        if cudnn.NO_ENGINE not in str(e):
            raise
        pytest.fail(f"{what}: cuDNN {torch.backends.cudnn.version()} has no engine on "
                    f"sm_{''.join(map(str, torch.cuda.get_device_capability()))} although backward_pattern_for "
                    f"chooses it: correct the table (fastres/cudnn.py, docs/DESIGN.md): {e}")


@gpu
@pytest.mark.parametrize("dtype", LOW_DT)
@pytest.mark.parametrize("shape", BWD_SHAPES)
def test_backward_graphs_parity(shape, dtype):
    """The dgrad + dReLU + dBN-weight graph (dv, Σdv·x, Σdv) and the scale-shift-ReLU
    wgrad graph against aten's convolution_backward on the prologue output: float64
    truth, PyTorch's own result in ``dtype`` for the 2x rule."""
    _need_gpu()
    x32, w32, _, _, s, t, stride, pad = _data(shape, torch.float32)
    x, w = x32.to(dtype), w32.to(dtype)
    p = (x.shape[2] + 2 * pad[0] - w.shape[2]) // stride[0] + 1
    dz = make_input((x.shape[0], w.shape[0], p, p), torch.float32, "channels_last", device="cuda").to(dtype)
    chosen = {part: cudnn.backward_pattern_for(part, dtype, x.shape[1], w.shape[0], 1, scale=True, shift=True,
                                               in_relu=True, capability=torch.cuda.get_device_capability(),
                                               cudnn_version=torch.backends.cudnn.version())
              for part in ("dgrad", "wgrad")}
    if chosen["wgrad"][0] is None:
        pytest.skip(f"no wgrad graph on this GPU/cuDNN: {chosen['wgrad'][1]}")
    if chosen["dgrad"][0] is None and chosen["dgrad"][1] != cudnn.BF16_DGRAD_WHY:
        pytest.skip(f"no dgrad graph on this GPU/cuDNN: {chosen['dgrad'][1]}")
    if chosen["dgrad"][0] is None:
        # bf16 dgrad: the fallback is chosen up front; the raw op either refuses cleanly
        # (the no-engine error, as the deviceless check predicts) or computes correctly
        try:
            dv, ds, dt = OPS.cudnn_dgrad_drelu_dbn(dz, w, x, s, t, stride, pad, [1, 1], 1)
        except RuntimeError as e:
            assert cudnn.NO_ENGINE in str(e), str(e)
            print(f"bf16 dgrad_drelu_dbn refused as predicted: {e}")
            dv = ds = dt = None
    else:
        dv, ds, dt = _fail_if_no_engine(
            lambda: OPS.cudnn_dgrad_drelu_dbn(dz, w, x, s, t, stride, pad, [1, 1], 1), "dgrad_drelu_dbn")
    dw = _fail_if_no_engine(
        lambda: OPS.cudnn_wgrad_scale_shift_relu(dz, x, s, t, list(w.shape), stride, pad, [1, 1], 1, True),
        "scale_shift_relu_wgrad")
    assert dw.dtype == dtype and dw.shape == w.shape
    assert dv is None or (dv.dtype == dtype and dv.shape == x.shape)

    def reference(xr, wr, dzr, acc):
        v = xr.to(acc) * s.to(acc).view(1, -1, 1, 1) + t.to(acc).view(1, -1, 1, 1)
        u = v.relu().to(xr.dtype)
        gu, gw, _ = torch.ops.aten.convolution_backward(dzr, u, wr, None, stride, pad, [1, 1], False, [0, 0], 1,
                                                        [True, True, False])
        dvr = torch.where(v > 0, gu.to(acc), torch.zeros((), dtype=acc, device="cuda"))
        return dvr.to(xr.dtype), (dvr * xr.to(acc)).sum((0, 2, 3)), dvr.sum((0, 2, 3)), gw

    hi = reference(x.double(), w.double(), dz.double(), torch.float64)
    lo = reference(x, w, dz, torch.float32)
    for name, a, l_, h in zip(["dv", "dscale", "dshift", "dw"], (dv, ds, dt, dw), lo, hi):
        if a is not None:
            assert_close_dtype(a, None, dtype, name, ref_low=l_, ref_hi=h)


@gpu
def test_graphs_repeat_and_autotune_keeps_the_sums(monkeypatch):
    """The statistics outputs are zero-filled before a graph runs (an engine may
    accumulate into them): the genstats forward and the dgrad + dBN graph give the same
    outputs on a second call (to the last bits an atomic reduction may change). With FASTRES_CUDNN_AUTOTUNE=1 the first call times
    its candidates on the op's own buffers: its sums must still equal the second call's
    (the buffers are zeroed again before the chosen plan runs). fp16 (pre-compiled
    engines on sm_80/sm_90); shapes no other test uses, so the plans are built here."""
    _need_gpu()
    dt = torch.float16
    g = torch.Generator(device="cuda").manual_seed(5)

    def data(c, k, h):
        x = torch.randn(2, c, h, h, generator=g, device="cuda").to(dt).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(k, c, 3, 3, generator=g, device="cuda") * 0.05).to(dt).contiguous(
            memory_format=torch.channels_last)
        s = torch.rand(c, generator=g, device="cuda") + 0.5
        t = torch.randn(c, generator=g, device="cuda") * 0.2
        dz = torch.randn(2, k, h, h, generator=g, device="cuda").to(dt).contiguous(memory_format=torch.channels_last)
        return x, w, s, t, dz

    def both(x, w, s, t, dz):
        fwd = _fail_if_no_engine(lambda: OPS.cudnn_conv_act_stats(x, w, s, t, [1, 1], [1, 1], [1, 1], 1, True),
                                 "scale_shift_relu_conv_genstats")
        bwd = _fail_if_no_engine(lambda: OPS.cudnn_dgrad_drelu_dbn(dz, w, x, s, t, [1, 1], [1, 1], [1, 1], 1),
                                 "dgrad_drelu_dbn")
        return [*fwd, *bwd]

    names = ["y", "sum", "sumsq", "dv", "dscale", "dshift"]

    def same(a, b, what):
        # an engine may reduce with atomics outside deterministic mode (last bits); sums
        # accumulated into unzeroed buffers are off by a factor >= 2
        for n, u, v in zip(names, a, b):
            torch.testing.assert_close(u.float(), v.float(), rtol=1e-3, atol=1e-3, msg=lambda m: f"{n} {what}: {m}")

    monkeypatch.delenv("FASTRES_CUDNN_AUTOTUNE", raising=False)
    case = data(40, 56, 11)
    same(both(*case), both(*case), "differs between two calls of the same plan")
    monkeypatch.setenv("FASTRES_CUDNN_AUTOTUNE", "1")
    case = data(40, 72, 11)  # a new key: this plan is built (and timed) by the first call
    same(both(*case), both(*case), "of the autotuned first call differs from the second (accumulated sums?)")


def _spy_graphs(monkeypatch):
    """Count the forward and backward graph calls (the fused path, not a fallback)."""
    calls = []
    fwd, bwd = cudnn._run_graph, cudnn._run_bwd_graph
    monkeypatch.setattr(cudnn, "_run_graph", lambda p, *a: calls.append(p) or fwd(p, *a))
    monkeypatch.setattr(cudnn, "_run_bwd_graph", lambda p, *a: calls.append(p) or bwd(p, *a))
    return calls


@gpu
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_DT)
def test_conv2d_act_training_step_through_the_graphs(dtype, monkeypatch, no_tf32):
    """FASTRES_CONV=cudnn: conv2d_act with the BN+ReLU prologue and the statistics
    (training forward genstats graph; dgrad + dReLU + dBN and scale-shift-ReLU wgrad graphs
    in the backward; fp32: the fallbacks) — y, mean, var and the gradients of x, weight,
    scale, shift against F.conv2d (float64 truth, PyTorch in ``dtype`` for the 2x rule)."""
    _need_gpu()
    from fastres import conv_backend, functional as Fn
    calls = _spy_graphs(monkeypatch)
    x32, w32, _, _, s32, t32, stride, pad = _data(SHAPES[0], torch.float32)
    gen = torch.Generator("cuda").manual_seed(7)

    def run(mode):
        cast = torch.float64 if mode == "hi" else dtype
        x, w = (v.to(cast).detach().requires_grad_() for v in (x32, w32))
        s, t = (v.to(torch.float64 if mode == "hi" else torch.float32).detach().requires_grad_() for v in (s32, t32))
        if mode == "ours":
            with conv_backend.use_conv("cudnn"):
                y, mean, var = Fn.conv2d_act(x, w, None, stride, pad, in_scale=s, in_shift=t, in_relu=True,
                                             stats="moments")
        else:
            acc = torch.float64 if mode == "hi" else torch.float32
            u = (x.to(acc) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)).relu().to(cast)
            y = F.conv2d(u, w, None, stride, pad)
            mean, var = y.to(acc).mean((0, 2, 3)), y.to(acc).var((0, 2, 3), unbiased=False)
        gy = torch.randn(y.shape, device="cuda", generator=gen.manual_seed(7)).to(y.dtype)
        loss = (y * gy).float().sum() + mean.float().square().sum() + var.float().sum()
        return [y, mean, var] + list(torch.autograd.grad(loss, [x, w, s, t]))

    ours, hi = run("ours"), run("hi")
    names = ["y", "mean", "var", "grad x", "grad weight", "grad scale", "grad shift"]
    if dtype == torch.float32:
        assert calls == []  # fp32: no pattern, the fallbacks
        for n, a, h in zip(names, ours, hi):
            torch.testing.assert_close(a.double(), h, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")
        return
    expect = ["scale_shift_relu_conv_genstats", "dgrad_drelu_dbn", "scale_shift_relu_wgrad"]
    if dtype == torch.bfloat16:
        expect.remove("dgrad_drelu_dbn")  # the fallback up front (cudnn.BF16_DGRAD_WHY)
    assert calls == expect, calls
    assert not cudnn._no_engine, cudnn._no_engine
    lo = run("lo")
    for n, a, l_, h in zip(names, ours, lo, hi):
        assert_close_dtype(a, None, dtype, n, ref_low=l_, ref_hi=h)


def _tv_pair(make_ref, make_ours, dtype, fmt=torch.channels_last):
    from resnet_ref import randomize
    ref = randomize(make_ref())
    ours = make_ours()
    ours.load_state_dict(ref.state_dict())
    return (ref.to(dtype).to(memory_format=fmt).cuda(), ours.to(dtype).to(memory_format=fmt).cuda(),
            copy.deepcopy(ref).double().cuda())


@gpu
@pytest.mark.parametrize("dtype", LOW_DT)
def test_blocks_with_cudnn_vs_torchvision(dtype, monkeypatch):
    """A Bottleneck with a stride-2 projection (every conv C, K % 8 == 0) in ``dtype``
    under FASTRES_CONV=cudnn against torchvision's in ``dtype``, with a float64 copy as the
    truth (2x rule): two training steps (outputs, input and every parameter gradient,
    running statistics) and eval (folded conv + bias + add + ReLU graphs)."""
    _need_gpu()
    from torchvision.models import resnet as tvr
    from resnet_ref import check_parity
    calls = _spy_graphs(monkeypatch)

    def ds():
        return torch.nn.Sequential(tvr.conv1x1(64, 128, 2), torch.nn.BatchNorm2d(128))

    ref, ours, truth = _tv_pair(lambda: tvr.Bottleneck(64, 32, 2, ds()),
                                lambda: fastres.Bottleneck(64, 32, 2, ds()), dtype)
    x = torch.randn(4, 64, 14, 14, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    with fastres.use_conv("cudnn"):
        check_parity(ref, ours, x, train=True, tol=1e-3, steps=2, what=f"bottleneck {dtype} cudnn train",
                     truth=truth)
        expect = {"scale_shift_relu_conv_genstats", "conv_genstats", "scale_shift_relu_wgrad"}
        if dtype == torch.float16:
            expect.add("dgrad_drelu_dbn")  # bf16: the fallback up front (cudnn.BF16_DGRAD_WHY)
        assert expect <= set(calls), calls
        calls.clear()
        check_parity(ref, ours, x, train=False, tol=1e-3, what=f"bottleneck {dtype} cudnn eval", truth=truth)
        assert calls == ["conv_bias_add_relu"] * 4, calls
    assert not cudnn._no_engine, cudnn._no_engine


@gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet50_with_cudnn_vs_torchvision(train, monkeypatch):
    """resnet50 in bf16 (channels_last) under FASTRES_CONV=cudnn against torchvision's
    bf16, float64 truth (2x rule): output, input gradient, every parameter gradient,
    running statistics; the graphs ran and none was refused."""
    _need_gpu()
    import torchvision
    from resnet_ref import check_parity
    calls = _spy_graphs(monkeypatch)
    ref, ours, truth = _tv_pair(lambda: torchvision.models.resnet50(num_classes=10),
                                lambda: fastres.resnet50(num_classes=10), torch.bfloat16)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with fastres.use_conv("cudnn"):
        check_parity(ref, ours, x, train=train, tol=1e-3, what=f"resnet50 bf16 cudnn {'train' if train else 'eval'}",
                     truth=truth)
    assert calls, "no cuDNN graph ran"
    if train:
        assert "scale_shift_relu_wgrad" in set(calls) and "dgrad_drelu_dbn" not in set(calls), set(calls)
    assert not cudnn._no_engine, cudnn._no_engine


@gpu
def test_cuda_graph_block_training_step_with_cudnn():
    """A Bottleneck training step (forward through the genstats graphs, backward through
    the dgrad/wgrad graphs) captured in a CUDA graph and replayed on new input: the same
    gradients as the eager step."""
    _need_gpu()
    dtype = torch.bfloat16
    torch.manual_seed(0)
    block = fastres.Bottleneck(64, 16).to(dtype).to(memory_format=torch.channels_last).cuda()
    params = [p for p in block.parameters()]
    x = torch.randn(4, 64, 14, 14, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)

    def step():
        return torch.autograd.grad(block(x).float().square().mean(), params)

    with fastres.use_conv("cudnn"):
        grads, eager = _capture_and_replay(step, x)
    for a, e in zip(grads, eager):
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-3)
    assert not cudnn._no_engine, cudnn._no_engine


@gpu
def test_device_props_match_the_gpu():
    """The hand-written device description of this GPU's target (cudnn.DEVICE_PROPS)
    against cuDNN's own serialization of the device: the same fields, the
    architecture-defining values equal, and the deviceless check on the real JSON agrees
    with the one on the hand-written JSON for every checked fp16 graph."""
    _need_gpu()
    import json
    _need_deviceless()
    major, minor = torch.cuda.get_device_capability()
    target = f"sm_{major}{minor}"
    if target not in cudnn.DEVICE_PROPS:
        pytest.skip(f"no hand-written device description for {target}")
    real = json.loads(torch.ops.fastres_cudnn.device_json(torch.cuda.current_device()))
    ours = cudnn.DEVICE_PROPS[target]
    print("cuDNN's device JSON:", json.dumps(real))
    assert set(ours) <= set(real), sorted(set(ours) - set(real))
    for k in ("deviceVer", "maxSharedMemoryPerBlockOptin", "maxSharedMemoryPerBlock", "maxRegistersPerSM",
              "maxThreadsPerSM", "maxCtasPerSM", "warpSize", "maxBlockSize", "maxGridSize"):
        assert real[k] == ours[k], (k, real[k], ours[k])
    for pattern, ops in cudnn.CHECKED_GRAPHS:
        mine = cudnn.graph_check(pattern, torch.float16, target, operands=ops)
        theirs = torch.ops.fastres_cudnn.graph_check(
            pattern, "float16", json.dumps(real), [8, 64, 56, 56], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1],
            [] if pattern == "dgrad_drelu_dbn" else list(ops), False, True)
        assert mine["ok"] == theirs[0], (pattern, ops, mine, theirs)


def test_deviceless_survey_tool(capsys, tmp_path):
    """tools/cudnn_deviceless.py puts each ResNet-50 conv in its roles and asks cuDNN, per
    role, for the graph the pattern tables choose: in fp16 on sm_90 a bottleneck's conv3 has
    an engine in every role (eval with the residual, training forward with the prologue,
    dgrad, wgrad); bf16 dgrad is the up-front fallback with its reason."""
    _need_deviceless()
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "cudnn_deviceless.py")
    spec = importlib.util.spec_from_file_location("cudnn_deviceless", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert [r for r, _ in tool.layer_roles("l2-1x1-128-512")] == ["eval:conv3", "fwd:conv3", "dgrad:conv3",
                                                                   "wgrad:conv3"]
    assert [r for r, _ in tool.layer_roles("l2-ds-1x1s2-256-512")] == ["eval:proj", "fwd:proj"]
    out = tmp_path / "r.json"
    assert tool.main(["--target", "sm_90", "--layer", "l2-1x1-128-512", "--dtype", "float16", "--dtype", "bfloat16",
                      "--batch", "32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| l2-1x1-128-512 | eval:conv3 |" in text and "fallback reasons:" in text
    res = json.loads(out.read_text())
    for role in ("eval:conv3", "fwd:conv3", "dgrad:conv3", "wgrad:conv3"):
        r = res[f"sm_90|l2-1x1-128-512|{role}|float16"]
        assert r["status"] == "ok" and r["configs"] > 0, (role, r)
    r = res["sm_90|l2-1x1-128-512|dgrad:conv3|bfloat16"]
    assert r["status"] == "fallback" and r["detail"] == cudnn.BF16_DGRAD_WHY
    assert res["sm_90|l2-1x1-128-512|eval:conv3|bfloat16"]["pattern"] == "conv_bias_add_relu"
