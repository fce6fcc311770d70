"""The Triton backend as ``torch.library.triton_op`` (fastres/_triton_ops.py): the
switch, bit-identity with the custom ops (eager and torch.compile), opcheck, and every
kernel launch going through the traceable hook.

On the CPU (Triton interpreter, kernels traced through their ``JITFunction`` twins):
eager autograd, ``torch.compile(backend="aot_eager", fullgraph=True)`` graphs of the
ops and autograd through compiled graphs (the joint graph AOTAutograd partitions), bit
for bit against ``fastres::triton_*``; opcheck. Inductor cannot compile a user-defined
Triton kernel on CPU tensors ("triton not built with the 'cpu' backend"): the inductor
checks are gpu-marked.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres import _triton_ops, conv_ops, ops
from fastres._triton_ops import use_triton_op

from conftest import HAS_CUDA, NO_CUDA, require_backend

NO_CPU_INDUCTOR = "inductor cannot compile user-defined Triton kernels on CPU tensors (no Triton 'cpu' backend)"
GPU = (pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA))
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def _exact_mutation_analysis():
    """torch finds the tensors each user kernel writes by compiling it to Triton IR; where
    that fails it warns and counts every argument as written (a joint graph then does
    not partition): no case may get there. (torch's loggers do not propagate to pytest's
    capture: a handler on the logger itself.)"""
    log = logging.getLogger("torch._dynamo")  # the logger torch._higher_order_ops.triton_kernel_wrap uses
    rec = _Records()
    log.addHandler(rec)
    try:
        yield
    finally:
        log.removeHandler(rec)
    bad = [m for m in rec.messages if "assuming every input is mutated" in m]
    assert not bad, bad[0]


def _families(device):
    require_backend("triton", device)
    return ops.family("triton"), ops.family("triton_op")


def _equal(got, ref, what):
    assert len(got) == len(ref), what
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == r.dtype and g.shape == r.shape and g.stride() == r.stride(), (what, i)
        assert torch.equal(g, r), f"{what}: output {i} differs by {(g.double() - r.double()).abs().max().item()}"


def _bn_inputs(device, dtype=torch.float32, fmt=torch.channels_last, shape=(2, 5, 3, 4)):
    g = torch.Generator().manual_seed(0)
    pd = torch.float64 if dtype == torch.float64 else torch.float32

    def t(*s, d=dtype, scale=1.0, off=0.0):
        return (torch.randn(s, generator=g, dtype=pd) * scale + off).to(device=device, dtype=d)

    x = t(*shape).contiguous(memory_format=fmt)
    r = t(*shape).contiguous(memory_format=fmt)
    return x, t(shape[1], d=pd, scale=0.2, off=1.0), t(shape[1], d=pd), r, t(*shape).contiguous(memory_format=fmt)


def _bn_graph(fam):
    """Every BN op of ``fam`` once: the forward ops and, called directly, the backward ops."""
    def f(x, w, b, r, gy):
        y, m, v = fam.bn_act_train(x, w, b, r, 1e-5, True)
        z = fam.affine_act(y, w, b, None, True)
        gb = fam.bn_act_train_backward(gy, x, y, w, m, v, 1e-5, True, True)
        ga = fam.affine_act_backward(gy, y, z, w, True, True, True)
        return (y, m, v, z, *gb, *ga)
    return f


def _bn_autograd(fam, x, w, b, r, gy):
    args = [a.detach().clone().requires_grad_(True) for a in (x, w, b, r)]
    y, m, v = fam.bn_act_train(*args, 1e-5, True)
    z = fam.affine_act(y, args[1], args[2], None, True)
    grads = torch.autograd.grad((z * gy).sum(), args)
    return (y.detach(), m, v, z.detach(), *grads)


_CONV = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


def _conv_inputs(device, dtype=torch.float32, fmt=torch.channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 6, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    w = (torch.randn(6, 4, 3, 3, generator=g) * 0.3).to(device, dtype)
    s = (torch.rand(4, generator=g) + 0.5).to(device)
    t = torch.randn(4, generator=g).to(device)
    r = torch.randn(2, 6, 5, 6, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    return x, w, s, t, r


def _conv_graph(fam):
    def f(x, w, s, t, r):
        y, m, v = fam.conv2d_act(x, w, None, s, t, r, *_CONV, True, True, True)
        gy = y * 0.5
        grads = fam.conv2d_act_backward(gy, m, v, x, w, s, t, y, m, *_CONV, True, True, [True] * 6)
        return (y, m, v, *grads)
    return f


def _conv_autograd(fam, x, w, s, t, r):
    args = [a.detach().clone().requires_grad_(True) for a in (x, w, s, t, r)]
    y, m, v = fam.conv2d_act(args[0], args[1], None, args[2], args[3], args[4], *_CONV, True, True, True)
    grads = torch.autograd.grad((y * y).sum() + m.sum() + v.sum(), args)
    return (y.detach(), m.detach(), v.detach(), *grads)


def _conv_families(device):
    require_backend("triton", device)
    return conv_ops.family("triton"), conv_ops.family("triton_op")


# ----------------------------------------------------------------------------- the switch
def test_switch_values_and_family_choice(monkeypatch):
    assert _triton_ops._parse(None) == "auto" and _triton_ops._parse(True) == "1"
    assert _triton_ops._parse(" Off ") == "0" and _triton_ops._parse("") == "auto"
    with pytest.raises(ValueError, match="FASTRES_TRITON_OP must be one of auto, 1, 0.*'fast'"):
        _triton_ops.set_triton_op("fast")
    with use_triton_op("auto"):
        assert not _triton_ops.enabled()  # auto: the custom ops until a GPU measurement says otherwise
        assert ops.family("triton").name == "triton" and conv_ops.family("triton").name == "triton"
    require_backend("triton", "cpu")
    with use_triton_op(True):
        assert _triton_ops.requested() == "1"
        assert ops.family("triton").name == "triton_op"
        assert ops.family("triton").bn_act_train is torch.ops.fastres.tritonop_bn_act_train
        assert conv_ops.family("triton").conv2d_act is torch.ops.fastres.tritonop_conv2d_act
    with use_triton_op("0"):
        assert ops.family("triton").bn_act_train is torch.ops.fastres.triton_bn_act_train


def test_backend_info_and_fastres_info_report_the_switch():
    from fastres import cli
    for mode, variant in (("auto", "custom_op"), ("0", "custom_op"), ("1", "triton_op + wrap_triton")):
        with use_triton_op(mode):
            info = fastres.backend_info()["triton_op"]
            assert info["requested"] == mode and info["variant"] == variant
            assert info["enabled"] is (mode == "1")
            text = cli.format_info(fastres.backend_info())
            assert f"triton ops as: {variant}  (FASTRES_TRITON_OP={mode};" in text


def test_switch_from_the_environment():
    """FASTRES_TRITON_OP=1 at import: the variant is on and its ops are registered by
    ``import fastres`` (torch.compile cannot register ops mid-trace); a bad value fails
    the import naming the variable."""
    import os
    import subprocess
    import sys
    code = ("import torch, fastres; from fastres import _triton_ops as t; "
            "print(t.requested(), t.enabled(), hasattr(torch.ops.fastres, 'tritonop_bn_act_train'), "
            "hasattr(torch.ops.fastres, 'tritonop_conv2d_act'))")
    env = dict(os.environ, FASTRES_TRITON_OP="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expect_ops = fastres.backends.available("triton", "cpu")[0] or torch.cuda.is_available()
    assert r.stdout.split() == ["1", "True", str(expect_ops), str(expect_ops)], r.stdout
    env["FASTRES_TRITON_OP"] = "sometimes"
    r = subprocess.run([sys.executable, "-c", "import fastres"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "FASTRES_TRITON_OP must be one of auto, 1, 0" in r.stderr, r.stderr[-3000:]


def test_switch_is_a_guard_of_compiled_code():
    """Flipping the switch after compiling recompiles onto the other variant."""
    require_backend("triton", "cpu")
    from fastres.functional import batch_norm_act
    graphs = []

    def backend(gm, _inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, w, b, r, _ = _bn_inputs("cpu")
    torch._dynamo.reset()
    f = torch.compile(lambda x: batch_norm_act(x, None, None, w, b, training=True, residual=r),
                      backend=backend, fullgraph=True)
    with fastres.use_backend("triton"):
        for mode in ("0", "1", "0"):
            with use_triton_op(mode):
                f(x)
    assert len(graphs) == 2, graphs
    assert "fastres.triton_bn_act_train" in graphs[0] and "tritonop" not in graphs[0]
    assert "fastres.tritonop_bn_act_train" in graphs[1]


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.name()))
        return func(*args, **(kwargs or {}))


def test_functional_api_runs_the_selected_variant():
    """``fastres.functional`` / the modules reach the triton_op ops when switched on."""
    require_backend("triton", "cpu")
    from fastres.functional import batch_norm_act
    x, w, b, r, _ = _bn_inputs("cpu")
    seen = {}
    for mode in ("1", "0"):
        with use_triton_op(mode), fastres.use_backend("triton"), _OpNames() as rec:
            rm, rv = torch.zeros(5), torch.ones(5)
            seen[mode] = (batch_norm_act(x, rm, rv, w, b, training=True, residual=r), rm, rv, rec.names)
    assert "fastres::tritonop_bn_act_train" in seen["1"][3] and "fastres::triton_bn_act_train" not in seen["1"][3]
    assert "fastres::triton_bn_act_train" in seen["0"][3]
    _equal(seen["1"][:3], seen["0"][:3], "batch_norm_act")


def test_every_launch_goes_through_the_hook():
    """Each kernel the launchers start passes through ``kernels.launching``'s hook (a
    launch that bypassed it would be invisible to torch.compile)."""
    require_backend("triton", "cpu")
    from fastres import kernels
    from fastres.kernels import _conv, _conv_bwd
    from fastres.kernels import _kernels as K
    names = []

    def hook(kernel):
        names.append(kernel.fn.__name__)
        return kernel

    x, w, b, r, gy = _bn_inputs("cpu")
    with kernels.launching(hook):
        y, m, v = kernels.bn_act_train(x, w, b, r, 1e-5, True)
        kernels.bn_act_train_backward(gy, x, y, w, m, v, 1e-5, True, True)
        kernels.affine_act_backward(gy, x, y, w, True, True, True)
        xc, wc, s, t, _ = _conv_inputs("cpu")
        _conv.conv2d_act(xc, wc, None, s, t, None, *_CONV, True, True, True)
        go = torch.randn(2, 6, 5, 6)
        _conv_bwd.conv2d_act_dgrad(go, wc, xc, s, t, True, [1, 1], [1, 1], [1, 1], 1, True)
        _conv_bwd.conv2d_act_wgrad(go, xc, s, t, True, wc.shape, [1, 1], [1, 1], [1, 1], 1, True)
    expected = {K._stats_kernel, K._stats_finalize, K._act_kernel, K._bwd_kernel, K._bwd_finalize,
                _conv._conv_fwd_kernel, _conv_bwd._dgrad_kernel, _conv_bwd._wgrad_kernel}
    assert set(names) == {k.fn.__name__ for k in expected}
    names.clear()
    kernels.affine_act(x, w, b, r, True)  # outside launching(): no hook
    assert names == []


def test_real_standins_while_tracing():
    """What tunes the fused conv's tiling while a GPU graph is traced: real tensors of the
    traced ones' shapes, strides and dtypes, outside fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    seen = []
    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        w = torch.empty(6, dtype=torch.float64)
        assert is_fake(x)
        _triton_ops.on_real_standins(lambda *a: seen.extend(a), (x, w, [1, 1], True))
    got_x, got_w, stride, flag = seen
    assert not is_fake(got_x) and not is_fake(got_w) and stride == [1, 1] and flag is True
    assert got_x.shape == x.shape and got_x.stride() == x.stride() and got_w.dtype == torch.float64
    assert torch.isfinite(got_x).all()


# ----------------------------------------------------------------------------- bit identity
KINDS = {"bn": (_families, _bn_inputs, _bn_graph, _bn_autograd),
         "conv": (_conv_families, _conv_inputs, _conv_graph, _conv_autograd)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, torch.channels_last), (torch.float64, torch.contiguous_format),
                                       (torch.bfloat16, torch.channels_last)], ids=["f32-nhwc", "f64-nchw", "bf16"])
def test_ops_eager_bit_identical(device, kind, dtype, fmt):
    """Every op called directly, and autograd through the differentiable ones."""
    families, inputs, graph, autograd = KINDS[kind]
    cop, top = families(device)
    args = inputs(device, dtype, fmt)
    _equal(graph(top)(*args), graph(cop)(*args), "ops")
    _equal(autograd(top, *args), autograd(cop, *args), "autograd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_ops_aot_eager_bit_identical(device, kind):
    """Every op in one compiled graph (no autograd: the backward ops called directly)."""
    families, inputs, graph, _ = KINDS[kind]
    cop, top = families(device)
    args = inputs(device)
    torch._dynamo.reset()
    got = torch.compile(graph(top), backend="aot_eager", fullgraph=True)(*args)
    _equal(got, graph(cop)(*args), "aot_eager")


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _families(device)
    _conv_families(device)
    x, w, b, r, gy = _bn_inputs(device)
    ns = torch.ops.fastres
    grad = [a.detach().clone().requires_grad_(True) for a in (x, w, b, r)]
    torch.library.opcheck(ns.tritonop_bn_act_train, (*grad, 1e-5, True))
    torch.library.opcheck(ns.tritonop_affine_act, (grad[0], grad[1], grad[2], None, True))
    y, m, v = ns.triton_bn_act_train(x, w, b, r, 1e-5, True)
    torch.library.opcheck(ns.tritonop_bn_act_train_backward, (gy, x, y, w, m, v, 1e-5, True, True))
    torch.library.opcheck(ns.tritonop_affine_act_backward, (gy, x, y, w, True, False, True))
    xc, wc, s, t, rc = _conv_inputs(device)
    torch.library.opcheck(ns.tritonop_conv2d_act, (xc.requires_grad_(), wc.requires_grad_(), None, s, t, rc,
                                                  *_CONV, True, True, False))
    # (the shared conv autograd with stats=False: empty mean/var whose gradients must be ignored)
    torch.library.opcheck(ns.conv2d_act, (xc, wc, None, s, t, rc, *_CONV, True, True, False))
    xc, wc = xc.detach(), wc.detach()
    yc, mc, _ = ns.triton_conv2d_act(xc, wc, None, s, t, None, *_CONV, True, True, True)
    torch.library.opcheck(ns.tritonop_conv2d_act_backward, (yc * 0.5, None, None, xc, wc, s, t, yc, mc, *_CONV,
                                                           True, True, [True, True, False, True, True, False]))


# ----------------------------------------------------------------------------- autograd through compiled graphs
def _forward(fam, cfam):
    """Both op families' differentiable forward ops, and a loss over every output."""
    def f(x, w, b, r, gy, xc, wc, s, t, rc):
        y, m, v = fam.bn_act_train(x, w, b, r, 1e-5, True)
        z = fam.affine_act(y, w, b, None, True)
        yc, mc, vc = cfam.conv2d_act(xc, wc, None, s, t, rc, *_CONV, True, True, True)
        loss = (z * gy).sum() + (yc.float() * yc.float()).sum() + mc.sum() + vc.sum()
        return loss, y, m, v, z, yc, mc, vc
    return f


def _train(f, args):
    """Outputs of ``f`` and the gradients of its loss for the differentiable inputs."""
    leaves = [a.detach().clone().requires_grad_(i != 4) for i, a in enumerate(args)]
    out = f(*leaves)
    out[0].backward()
    return [o.detach() for o in out] + [a.grad for i, a in enumerate(leaves) if i != 4]


@pytest.mark.parametrize("device,backend", [
    ("cpu", "aot_eager"), pytest.param("cuda", "aot_eager", marks=GPU),
    pytest.param("cuda", "inductor", marks=(pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason=f"{NO_CUDA} (on the CPU: {NO_CPU_INDUCTOR})")))])
def test_autograd_through_compile(device, backend):
    """Forward and backward of the BN and conv ops through one compiled graph (the joint
    graph AOTAutograd partitions into forward and backward). aot_eager: bit for bit
    against eager custom ops; inductor (its own kernels for the small aten ops around
    the user kernels): to rounding against the custom ops under inductor."""
    cop, top = _families(device)
    ccop, ctop = _conv_families(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = _bn_inputs(device, dtype) + _conv_inputs(device, dtype)
    torch._dynamo.reset()
    ref_fn = _forward(cop, ccop)
    ref = _train(ref_fn if backend == "aot_eager" else torch.compile(ref_fn, fullgraph=True), args)
    torch._dynamo.reset()
    got = _train(torch.compile(_forward(top, ctop), backend=backend, fullgraph=True), args)
    if backend == "aot_eager":
        _equal(got, ref, "aot_eager autograd")
    else:
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=f"{NO_CUDA} ({NO_CPU_INDUCTOR})")
def test_model_training_step_inductor_gpu():
    """A resnet18 training step with the triton_op variant under inductor matches the
    same step with the custom ops under inductor (bf16, channels_last)."""
    require_backend("triton", "cuda")
    results = []
    for mode in ("0", "1"):
        torch.manual_seed(0)
        model = fastres.resnet18(num_classes=10).cuda().to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
        with use_triton_op(mode), fastres.use_backend("triton"):
            torch._dynamo.reset()
            cm = torch.compile(model, fullgraph=True)
            with torch.autocast("cuda", torch.bfloat16):
                loss = cm(x).float().square().mean()
            loss.backward()
        results.append((loss.detach(), model.fc.weight.grad.clone(), model.bn1.running_var.clone()))
    for g, r in zip(results[1], results[0]):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def test_block_training_through_aot_eager_cpu():
    """A fastres block (BasicBlock, stride 2 with a projection shortcut) trains under
    ``torch.compile(fullgraph=True)`` through the triton_op ops exactly as eager through
    the custom ops (output, every gradient, running statistics), and the compiled
    graphs hold the user kernels themselves, not the custom ops. (A whole model is
    tests/test_compile_models.py's check; under the interpreter its Triton-IR analyses
    of every launch take minutes.)"""
    require_backend("triton", "cpu")
    import copy

    from functorch.compile import make_boxed_func
    from torch import nn
    from torch._dynamo.backends.common import aot_autograd
    targets = []

    def record(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    block = fastres.BasicBlock(4, 6, stride=2, downsample=nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False),
                                                                        nn.BatchNorm2d(6)))
    block = block.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    results = []
    for mode, compiler in (("0", None), ("1", aot_autograd(fw_compiler=record, bw_compiler=record))):
        b = copy.deepcopy(block)
        xx = x.clone().requires_grad_()
        with use_triton_op(mode), fastres.use_backend("triton"):
            torch._dynamo.reset()
            run = b if compiler is None else torch.compile(b, backend=compiler, fullgraph=True)
            y = run(xx)
            (y * y).sum().backward()
        results.append([y.detach(), xx.grad] + [p.grad for p in b.parameters()] + list(b.buffers()))
    _equal(results[1], results[0], "block")
    assert any("triton_kernel_wrapper_functional" in t for t in targets), sorted(set(targets))[:40]
    assert not any("fastres.triton_" in t for t in targets), sorted(set(targets))
