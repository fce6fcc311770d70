"""Build checks of fastres._C and op-level parity of its CPU kernels vs fastres._reference.

Fast (< 30 s on 2 cores). The end-to-end parity suite through the public API lives
elsewhere; this file talks to torch.ops.fastres.* directly.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastres import _reference as ref

C_ext = pytest.importorskip("fastres._C", reason="fastres._C is not built")

OPS = {
    "bn_act_train": "fastres::bn_act_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
                    "float eps, bool relu) -> (Tensor y, Tensor mean, Tensor var)",
    "bn_act_train_backward": "fastres::bn_act_train_backward(Tensor grad_y, Tensor x, Tensor y, Tensor? weight, "
                             "Tensor mean, Tensor var, float eps, bool relu, bool need_grad_z) -> "
                             "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_z)",
    "affine_act": "fastres::affine_act(Tensor x, Tensor? scale, Tensor? shift, Tensor? residual, bool relu) "
                  "-> Tensor y",
    "affine_act_backward": "fastres::affine_act_backward(Tensor grad_y, Tensor x, Tensor y, Tensor? scale, "
                           "bool relu, bool need_grad_z, bool need_param_grads) -> "
                           "(Tensor grad_x, Tensor grad_z, Tensor grad_scale, Tensor grad_shift)",
}

F = torch.ops.fastres


def build_info() -> dict:
    return dict(kv.split("=", 1) for kv in F._build_info().split(";"))


# --------------------------------------------------------------------------- build
def test_extension_loads_and_registers():
    assert C_ext.__file__.endswith((".so", ".pyd"))
    for name in OPS:
        assert hasattr(F, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastres::{name}", "CPU"), name


@pytest.mark.parametrize("name", sorted(OPS))
def test_schema_exact(name):
    assert str(getattr(F, name).default._schema) == OPS[name]


def test_build_info():
    info = build_info()
    assert info == dict(kv.split("=", 1) for kv in C_ext.build_info().split(";"))
    assert info["version"] == "0.1.0"
    assert info["cpu"] == "1"
    assert info["cpu_active"] in info["cpu_isa"].split(",")
    assert (info["cuda"] == "1") == bool(C_ext.WITH_CUDA)
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("fastres::bn_act_train", "CUDA")
    assert has_cuda_kernels == bool(C_ext.WITH_CUDA)
    nvcc = shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc")
    skipped = os.environ.get("FASTRES_SKIP_CUDA", "0").lower() in ("1", "true", "yes", "on")
    if nvcc and torch.version.cuda and not skipped:
        assert info["cuda"] == "1", f"nvcc exists but _C was built without CUDA kernels: {info}"
        assert info.get("cuda_archs")


def _cudnn_headers_here() -> bool:
    """cudnn.h of cuDNN 9 where setup.py looks for it (the wheel torch loads)."""
    import glob
    roots = [os.environ.get("CUDNN_INCLUDE_DIR"), "/usr/local/cuda/include"]
    roots += [os.path.join(p, "nvidia", "cudnn", "include") for p in sys.path if p]
    return any(r and os.path.isfile(os.path.join(r, "cudnn_graph.h")) for r in roots) or bool(
        glob.glob("/usr/local/cuda-*/include/cudnn_graph.h"))


def test_build_info_cudnn():
    """The cuDNN fused-conv graphs (csrc/cudnn/) are built wherever the CUDA kernels
    are and the cuDNN headers exist; their schemas exist on every build."""
    info = build_info()
    assert (info["cudnn"] == "1") == bool(C_ext.WITH_CUDNN)
    for name in ("cudnn_conv_bias_act", "cudnn_conv_act_stats", "cudnn_dgrad_drelu_dbn",
                 "cudnn_wgrad_scale_shift_relu"):
        assert hasattr(F, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastres::{name}", "CUDA") == bool(C_ext.WITH_CUDNN)
    skipped = os.environ.get("FASTRES_SKIP_CUDNN", "0").lower() in ("1", "true", "yes", "on")
    if C_ext.WITH_CUDA and _cudnn_headers_here() and not skipped:
        assert C_ext.WITH_CUDNN is True, f"cuDNN headers exist but _C was built without the cuDNN graphs: {info}"
        assert info["cudnn_version"].startswith("9.")
    if not C_ext.WITH_CUDA:
        assert C_ext.WITH_CUDNN is False


# --------------------------------------------------------------------------- parity
DTYPES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
SHAPES = [(n, c, h, w) for n in (2, 5) for c in (1, 3, 65) for (h, w) in ((1, 1), (7, 7), (13, 17))]
LAYOUTS = ("contiguous", "channels_last", "view")


def make(shape, dtype, layout, gen, scale=1.0, offset=0.0):
    n, c, h, w = shape
    if layout == "view":  # non-contiguous in both formats: a channel slice of a bigger tensor
        base = torch.randn(n, c + 2, h, w + 1, generator=gen, dtype=torch.float64)
        t = base[:, 1:c + 1, :, 1:]
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    t = t * scale + offset
    return t.to(dtype)


def close(a, b, tol, what):
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if a.numel() and a.dim() == 4:
        assert a.stride() == b.stride(), (what, a.stride(), b.stride())
    torch.testing.assert_close(a.double(), b.double(), msg=lambda m: f"{what}: {m}", equal_nan=True, **tol)


def acc_tol(dtype):
    # per-channel reductions are in the acc dtype: fp32 tolerances for 16-bit inputs
    return DTYPES[torch.float64] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def one_thread():
    # Small tensors: parallel regions only cost time (the kernels' reduction
    # partition never depends on the thread count; see test_deterministic_across_threads).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


FLAGS = list(itertools.product((True, False), (True, False), (True, False)))  # relu, residual, weights


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).split(".")[-1])
def test_parity(dtype, layout, one_thread):
    gen = torch.Generator().manual_seed(1234)
    tol = DTYPES[dtype]
    acc = ref.acc_dtype(dtype)
    for i, shape in enumerate(SHAPES):
        C = shape[1]
        x = make(shape, dtype, layout, gen, scale=2.0, offset=0.5)
        res = make(shape, dtype, layout, gen)
        gy = make(shape, dtype, layout, gen)
        wdt = torch.float32 if i % 2 else dtype  # weight/bias may be fp32 or x's dtype
        w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(wdt)
        b = torch.randn(C, generator=gen, dtype=torch.float64).to(wdt)
        scale = (torch.randn(C, generator=gen, dtype=torch.float64)).to(acc)
        shift = (torch.randn(C, generator=gen, dtype=torch.float64)).to(acc)
        # 3 of the 8 flag combinations per shape, rotating: all of them across the shapes
        for relu, use_res, use_wb in (FLAGS[(3 * i + k) % len(FLAGS)] for k in range(3)):
            tag = f"{shape} {dtype} {layout} relu={relu} res={use_res} wb={use_wb}"
            r = res if use_res else None
            ww, bb = (w, b) if use_wb else (None, None)
            # bn_act_train
            y, m, v = F.bn_act_train(x, ww, bb, r, 1e-5, relu)
            yr, mr, vr = ref.bn_act_train(x, ww, bb, r, 1e-5, relu)
            close(m, mr, acc_tol(dtype), "mean " + tag)
            close(v, vr, acc_tol(dtype), "var " + tag)
            close(y, yr, tol, "y " + tag)
            # bn_act_train_backward (same y / stats on both sides so the masks agree)
            for need_gz in ((True, False) if use_res else (False,)):
                out = F.bn_act_train_backward(gy, x, yr, ww, mr, vr, 1e-5, relu, need_gz)
                outr = ref.bn_act_train_backward(gy, x, yr, ww, mr, vr, 1e-5, relu, need_gz)
                close(out[0], outr[0], tol, "grad_x " + tag)
                close(out[1], outr[1], acc_tol(dtype), "grad_weight " + tag)
                close(out[2], outr[2], acc_tol(dtype), "grad_bias " + tag)
                close(out[3], outr[3], tol, "grad_z " + tag)
            # affine_act
            s, t = (scale, shift) if use_wb else (None, shift)
            ya = F.affine_act(x, s, t, r, relu)
            yar = ref.affine_act(x, s, t, r, relu)
            close(ya, yar, tol, "affine y " + tag)
            # affine_act_backward
            for need_gz, need_pg in ((True, True), (False, False)) if use_res else ((False, True), (True, False)):
                out = F.affine_act_backward(gy, x, yar, s, relu, need_gz, need_pg)
                outr = ref.affine_act_backward(gy, x, yar, s, relu, need_gz, need_pg)
                close(out[0], outr[0], tol, "affine grad_x " + tag)
                close(out[1], outr[1], tol, "affine grad_z " + tag)
                close(out[2], outr[2], acc_tol(dtype), "affine grad_scale " + tag)
                close(out[3], outr[3], acc_tol(dtype), "affine grad_shift " + tag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_large(dtype, layout, one_thread):
    """Several reduction units per channel (N*H*W > 8192) and C not a vector multiple."""
    gen = torch.Generator().manual_seed(7)
    shape = (4, 19, 61, 67)
    x = make(shape, dtype, layout, gen, scale=3.0, offset=-1.0)
    r = make(shape, dtype, layout, gen)
    gy = make(shape, dtype, layout, gen)
    w = torch.rand(19, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    b = torch.randn(19, generator=gen, dtype=torch.float64).to(dtype)
    tol = DTYPES[dtype]
    y, m, v = F.bn_act_train(x, w, b, r, 1e-5, True)
    yr, mr, vr = ref.bn_act_train(x, w, b, r, 1e-5, True)
    close(m, mr, tol, "mean")
    close(v, vr, tol, "var")
    close(y, yr, tol, "y")
    out = F.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, True, True)
    outr = ref.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, True, True)
    for a, e, name in zip(out, outr, ("grad_x", "grad_weight", "grad_bias", "grad_z")):
        close(a, e, dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * 10), name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty(layout, one_thread):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 5), (2, 0, 4, 4)]:
        x = torch.empty(shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        C = shape[1]
        w, b = torch.ones(C), torch.zeros(C)
        y, m, v = F.bn_act_train(x, w, b, x, 1e-5, True)
        yr, mr, vr = ref.bn_act_train(x, w, b, x, 1e-5, True)
        assert y.shape == x.shape and m.shape == (C,) and v.shape == (C,)
        torch.testing.assert_close(m, mr, equal_nan=True)
        gx, gw, gb, gz = F.bn_act_train_backward(x, x, x, w, mr, vr, 1e-5, True, True)
        assert gx.shape == x.shape and gz.shape == x.shape and gw.shape == (C,) and gb.shape == (C,)
        assert not gw.any() and not gb.any()
        _, _, _, gz0 = F.bn_act_train_backward(x, x, x, w, mr, vr, 1e-5, True, False)
        assert gz0.shape == (0,)
        assert F.affine_act(x, w, b, x, True).shape == x.shape
        gx, gz, gs, gsh = F.affine_act_backward(x, x, x, w, True, True, True)
        assert gx.shape == x.shape and gs.shape == (C,) and not gs.any() and not gsh.any()
        gx, gz, gs, gsh = F.affine_act_backward(x, x, x, w, True, False, False)
        assert gz.shape == (0,) and gs.shape == (0,) and gsh.shape == (0,)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stats_stability(layout):
    """Huge-magnitude, near-constant channels: no NaN, no garbage (fp32)."""
    gen = torch.Generator().manual_seed(3)
    n, c, h, w = 4, 5, 48, 48
    base = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([3e4, -1e6, 1e8, 0.0, 5e3], dtype=torch.float64).view(1, c, 1, 1)
    noise = torch.tensor([1.0, 1.0, 0.0, 1e-3, 1e-2], dtype=torch.float64).view(1, c, 1, 1)
    x = (offsets + noise * base).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, m, v = F.bn_act_train(x, None, None, None, 1e-5, False)
    xd = x.double()
    mt = xd.mean(dim=(0, 2, 3))
    vt = xd.var(dim=(0, 2, 3), unbiased=False)
    assert torch.isfinite(m).all() and torch.isfinite(v).all() and (v >= 0).all()
    torch.testing.assert_close(m.double(), mt, rtol=1e-6, atol=0)
    torch.testing.assert_close(v.double(), vt, rtol=1e-3, atol=1e-6)
    assert v[2].item() == pytest.approx(0.0, abs=1e-3)  # exactly constant channel
    yt = (xd - mt.view(1, c, 1, 1)) * torch.rsqrt(vt + 1e-5).view(1, c, 1, 1)
    torch.testing.assert_close(y.double(), yt, rtol=0, atol=2e-2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_like_reference(layout, dtype, one_thread):
    """aten semantics: a channel with +-Inf has mean +-Inf (NaN with both signs) and
    var NaN; a NaN channel is all NaN; the other channels are untouched."""
    x = torch.randn(3, 5, 20, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[1, 0, 3, 4] = float("inf")
    x[0, 1, 0, 0] = float("-inf")
    x[2, 2, 5, 5] = float("inf")
    x[1, 2, 6, 6] = float("-inf")
    x[0, 3, 7, 7] = float("nan")
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    out = F.bn_act_train(x, w, b, None, 1e-5, True)
    outr = ref.bn_act_train(x, w, b, None, 1e-5, True)
    for a, e, name in zip(out, outr, ("y", "mean", "var")):
        close(a, e, DTYPES[dtype] if name == "y" else acc_tol(dtype), name)
    assert out[1][0] == float("inf") and out[1][1] == float("-inf") and out[1][2].isnan()
    gy = torch.randn_like(x)
    gout = F.bn_act_train_backward(gy, x, outr[0], w, outr[1], outr[2], 1e-5, True, True)
    goutr = ref.bn_act_train_backward(gy, x, outr[0], w, outr[1], outr[2], 1e-5, True, True)
    for a, e, name in zip(gout, goutr, ("grad_x", "grad_weight", "grad_bias", "grad_z")):
        close(a, e, DTYPES[dtype] if name in ("grad_x", "grad_z") else acc_tol(dtype), name)


def test_deterministic_across_threads():
    gen = torch.Generator().manual_seed(5)
    outs = []
    for layout in ("contiguous", "channels_last"):
        x = make((6, 24, 40, 41), torch.float32, layout, gen, scale=2.0, offset=3.0)
        gy = make((6, 24, 40, 41), torch.float32, layout, gen)
        old = torch.get_num_threads()
        res = []
        try:
            # 1-2 threads: NCHW channel-blocked path (C=24 >= 2*threads); 16 threads: two-phase
            # path. Both must agree bitwise (same units, same merge order).
            for nt in (1, 2, old, 16):
                torch.set_num_threads(nt)
                y, m, v = F.bn_act_train(x, None, None, None, 1e-5, True)
                g = F.bn_act_train_backward(gy, x, y, None, m, v, 1e-5, True, False)
                a = F.affine_act_backward(gy, x, y, m, True, False, True)
                res.append((y, m, v, g[0], g[1], g[2], a[2], a[3]))
        finally:
            torch.set_num_threads(old)
        for other in res[1:]:
            for t0, t1 in zip(res[0], other):
                assert torch.equal(t0, t1)
        outs.append(res[0])


_SUBPROCESS_CHECK = r"""
import torch, fastres._C
from fastres import _reference as ref
info = dict(kv.split('=', 1) for kv in torch.ops.fastres._build_info().split(';'))
assert info['cpu_active'] == '{cap}', info
g = torch.Generator().manual_seed(0)
for shape in [(3, 21, 9, 11), (2, 67, 5, 5)]:
    for cl in (False, True):
        for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x = torch.randn(shape, generator=g).to(dt)
            r = torch.randn(shape, generator=g).to(dt)
            gy = torch.randn(shape, generator=g).to(dt)
            if cl:
                x, r, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, gy))
            w = torch.rand(shape[1]) + 0.5
            b = torch.randn(shape[1])
            tol = dict(rtol=2e-2, atol=3e-2) if dt in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-5)
            y, m, v = torch.ops.fastres.bn_act_train(x, w, b, r, 1e-5, True)
            yr, mr, vr = ref.bn_act_train(x, w, b, r, 1e-5, True)
            torch.testing.assert_close(y.double(), yr.double(), **tol)
            o = torch.ops.fastres.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, True, True)
            orf = ref.bn_act_train_backward(gy, x, yr, w, mr, vr, 1e-5, True, True)
            for a, e in zip(o, orf):
                torch.testing.assert_close(a.double(), e.double(), **tol)
            o = torch.ops.fastres.affine_act_backward(gy, x, yr, w.to(ref.acc_dtype(dt)), True, True, True)
            orf = ref.affine_act_backward(gy, x, yr, w.to(ref.acc_dtype(dt)), True, True, True)
            for a, e in zip(o, orf):
                torch.testing.assert_close(a.double(), e.double(), **tol)
print('ok')
"""


def test_other_cpu_isa_paths():
    """The kernels are compiled per ISA; run the ones this machine does not pick
    (ATEN_CPU_CAPABILITY selects them, as for torch's own kernels), concurrently."""
    info = build_info()
    built = info["cpu_isa"].split(",")
    order = ["DEFAULT", "AVX2", "AVX512"]
    active = info["cpu_active"]
    caps = [c for c in ("DEFAULT", "AVX2") if c in built and c != active
            and active in order and order.index(c) < order.index(active)]
    if not caps:
        pytest.skip("no other ISA path runnable on this machine")
    procs = []
    for cap in caps:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower(), OMP_NUM_THREADS="1")
        procs.append((cap, subprocess.Popen([sys.executable, "-c", _SUBPROCESS_CHECK.replace("{cap}", cap)],
                                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for cap, p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip().endswith("ok"), f"{cap}:\n{out}"
