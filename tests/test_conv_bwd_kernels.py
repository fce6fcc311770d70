"""Parity of the Triton backward kernels of ``conv2d_act`` (``kernels/_conv_bwd.py``).

Reference: autograd of the float64 composition the fused forward computes::

    a = x * s + t  (then ReLU when in_relu);  y = F.conv2d(a, W, b, stride, padding, dilation, groups)

(the zero padding applies to ``a``). Given ``grad_out`` = dL/dy, the dgrad launcher must
return x.grad, s.grad and t.grad (s/t None in the launcher = ones/zeros in the
reference, whose .grad are still sum(da * x) and sum(da)); the wgrad launcher W.grad and
b.grad. Every shape family of ResNets at tiny sizes: 1x1 stride 1/2, 3x3 stride 1/2 with
padding and dilation, the 7x7 stride-2 stem with C=3, grouped, odd channel counts,
asymmetric stride/padding/dilation. fp64 to 1e-9, fp32 to 1e-5, bf16/fp16: error
against the float64 reference at most 2x PyTorch's own low-precision composition's
(+ a small floor). Without a GPU this runs under the Triton interpreter; the ``gpu``
cases run the same checks on CUDA with the autotuned kernels, and a ``slow`` case
compiles the GPU code paths ahead of time for sm_90 / sm_80 (no GPU needed).

The kernels' fixed tiling is shrunk here so that the tiny shapes still walk the
multi-tile paths: several position tiles per stride phase, two output-channel
reduction blocks (K=20), two input-channel blocks (C=20), several wgrad splits.
"""
import os

import torch

if not torch.cuda.is_available():  # CPU only: the interpreter (before anything imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

try:  # installed layout: the top-level kernels/ folder is the package fastres.kernels
    from fastres import kernels as _K
except ImportError:  # a source checkout on PYTHONPATH
    import kernels as _K  # noqa: E402
B = importlib.import_module(_K.__name__ + "._conv_bwd")

from parity import LOW, assert_close_dtype, make_input  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DT = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}

# name: (N, C, H, W, K, (R, S), stride, padding, dilation, groups)
SHAPES = {
    "1x1s1": (2, 16, 8, 8, 16, (1, 1), 1, 0, 1, 1),
    "1x1s2": (2, 8, 8, 8, 16, (1, 1), 2, 0, 1, 1),
    "3x3s1": (2, 8, 8, 8, 12, (3, 3), 1, 1, 1, 1),
    "3x3s2": (2, 8, 7, 7, 8, (3, 3), 2, 1, 1, 1),
    "3x3d2": (2, 8, 8, 8, 8, (3, 3), 1, 2, 2, 1),
    "3x3s2d2": (1, 6, 8, 8, 8, (3, 3), 2, 2, 2, 1),
    "7x7s2stem": (2, 3, 8, 8, 16, (7, 7), 2, 3, 1, 1),
    "grouped": (2, 16, 6, 6, 16, (3, 3), 1, 1, 1, 4),
    "odd": (2, 5, 5, 7, 20, (3, 3), 2, 1, 1, 1),
    "wide_c": (2, 20, 4, 4, 8, (1, 1), 1, 0, 1, 1),
    "asym": (2, 6, 6, 5, 8, (1, 3), (2, 1), (0, 1), (1, 2), 1),
}
# prologue: (has scale, has shift, in_relu)
PROLOGUES = {"none": (False, False, False), "affine": (True, True, False), "affine_relu": (True, True, True),
             "shift_relu": (False, True, True), "scale_relu": (True, False, True)}

# (shape, dtype, layout, prologue): every shape in fp64 with the full prologue, in fp32
# with a rotating other prologue and NCHW input, and a spread in bf16 / fp16
_ROT = ["none", "affine", "shift_relu", "scale_relu"]
CASES = ([(s, F64, "channels_last", "affine_relu") for s in SHAPES]
         + [(s, F32, "contiguous", _ROT[i % 4]) for i, s in enumerate(SHAPES)]
         + [(s, BF16, "channels_last", "affine_relu") for s in ("1x1s1", "3x3s2", "7x7s2stem", "grouped", "odd")]
         + [("3x3s1", F16, "channels_last", "affine_relu"), ("1x1s2", F32, "noncontig", "affine_relu"),
            ("3x3s1", F64, "contiguous", "none")])

# small tiles for the interpreter; several wgrad splits of 32 positions
SMALL = {"interp": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1),
         "wgrad_rows": 32, "wgrad_target": 1 << 20}


@contextlib.contextmanager
def config(**kw):
    old = {k: B.CONFIG[k] for k in kw}
    B.CONFIG.update(kw)
    try:
        yield
    finally:
        B.CONFIG.update(old)


@pytest.fixture(autouse=True)
def _small_tiles():
    if not INTERP:
        yield
        return
    with config(**SMALL):
        yield


def _pairs(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_hw(h, w, rs, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = _pairs(stride), _pairs(padding), _pairs(dilation)
    return (h + 2 * ph - dh * (rs[0] - 1) - 1) // sh + 1, (w + 2 * pw - dw * (rs[1] - 1) - 1) // sw + 1


def make_case(shape, dtype, layout, prologue, device):
    """shape: a name of SHAPES or such a tuple."""
    n, c, h, w, k, rs, stride, padding, dilation, groups = SHAPES[shape] if isinstance(shape, str) else shape
    has_s, has_t, relu = PROLOGUES[prologue]
    pdt = F64 if dtype == F64 else F32  # BN-derived scale/shift: fp32 (fp64 for fp64)
    x = make_input((n, c, h, w), dtype, layout, device=device)
    wt = (torch.randn(k, c // groups, *rs, dtype=F64, device=device) * 0.5).to(dtype)
    s = (torch.rand(c, dtype=F64, device=device) + 0.5).to(pdt) if has_s else None
    t = (torch.randn(c, dtype=F64, device=device) * 0.5).to(pdt) if has_t else None
    p, q = out_hw(h, w, rs, stride, padding, dilation)
    go = torch.randn(n, k, p, q, dtype=F64, device=device).to(dtype)  # in x's layout (NCHW: copied to NHWC)
    if layout == "channels_last":
        go = go.contiguous(memory_format=torch.channels_last)
    return dict(x=x, w=wt, s=s, t=t, relu=relu, go=go, stride=stride, padding=padding, dilation=dilation,
                groups=groups)


def reference(cs, dtype):
    """Autograd of the composition in ``dtype`` (s, t, W, b, grad_out cast to it):
    -> (gx, gs, gt, gw, gb)."""
    x = cs["x"].detach().to(dtype).requires_grad_()
    c = x.shape[1]
    s = (cs["s"] if cs["s"] is not None else torch.ones(c, device=x.device)).detach().to(dtype).requires_grad_()
    t = (cs["t"] if cs["t"] is not None else torch.zeros(c, device=x.device)).detach().to(dtype).requires_grad_()
    w = cs["w"].detach().to(dtype).requires_grad_()
    b = torch.zeros(w.shape[0], dtype=dtype, device=x.device, requires_grad=True)
    a = x * s[None, :, None, None] + t[None, :, None, None]
    if cs["relu"]:
        a = torch.relu(a)
    y = F.conv2d(a, w, b, _pairs(cs["stride"]), _pairs(cs["padding"]), _pairs(cs["dilation"]), cs["groups"])
    y.backward(cs["go"].to(dtype))
    return x.grad, s.grad, t.grad, w.grad, b.grad


def run_kernels(cs, need_in_grads=True, need_bias_grad=True):
    gx, gs, gt = B.conv2d_act_dgrad(cs["go"], cs["w"], cs["x"], cs["s"], cs["t"], cs["relu"], cs["stride"],
                                    cs["padding"], cs["dilation"], cs["groups"], need_in_grads)
    gw, gb = B.conv2d_act_wgrad(cs["go"], cs["x"], cs["s"], cs["t"], cs["relu"], cs["w"].shape, cs["stride"],
                                cs["padding"], cs["dilation"], cs["groups"], need_bias_grad)
    return gx, gs, gt, gw, gb


NAMES = ("grad_x", "grad_in_scale", "grad_in_shift", "grad_weight", "grad_bias")


def check_case(shape, dtype, layout, prologue, device):
    cs = make_case(shape, dtype, layout, prologue, device)
    outs = run_kernels(cs)
    acc = F64 if dtype == F64 else F32
    x = cs["x"]
    # conventions: grad_x in x's dtype and memory format; the rest in the accumulation dtype
    assert outs[0].dtype == dtype and outs[0].shape == x.shape
    want_cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    assert outs[0].is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    for o in outs[1:]:
        assert o.dtype == acc, f"{o.dtype} != {acc}"
    assert outs[3].shape == cs["w"].shape and outs[3].is_contiguous()
    ref = reference(cs, F64)
    if dtype in LOW:
        low = reference(cs, dtype)
        for name, o, r_hi, r_low in zip(NAMES, outs, ref, low):
            assert_close_dtype(o, None, dtype, name=name, ref_low=r_low, ref_hi=r_hi)
        return
    for name, o, r in zip(NAMES, outs, ref):
        assert_close_dtype(o, r.to(o.dtype), dtype, name=name)


def _case_id(case):
    s, dt, layout, pro = case
    return f"{s}-{DT[dt]}-{layout}-{pro}"


# ----------------------------------------------------------------------------- CPU (interpreter)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv_bwd_parity(case):
    if not INTERP:
        pytest.skip("CPU interpreter cases; on a GPU the gpu-marked cases run instead")
    check_case(*case, device="cpu")


def test_partial_rows_in_units_smaller_than_the_tile():
    """A dgrad tile of 32 positions writes its partial sums into the first of its two
    16-position unit rows and zeros into the second (the layout that lets autotuning
    switch BLOCK_M without stale partials); the finalize still gets the exact sums."""
    if not INTERP:
        pytest.skip("the fixed interpreter tiling is what this test shrinks")
    with config(part_unit=16):
        check_case("3x3s2", F64, "channels_last", "affine_relu", "cpu")


def test_single_wgrad_split_and_large_tiles():
    """Default interpreter knobs (one wgrad split for these sizes, the module's own fixed
    tiling) give the same results as the shrunk ones."""
    if not INTERP:
        pytest.skip("interpreter tiling knobs")
    with config(wgrad_rows=1 << 20, interp=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)):
        check_case("grouped", F64, "channels_last", "affine_relu", "cpu")
        check_case("odd", F32, "contiguous", "shift_relu", "cpu")


def test_flags_off_return_empty():
    """need_in_grads / need_bias_grad False: empty [0] tensors; grad_x and grad_weight
    unchanged."""
    cs = make_case("3x3s1", F64, "channels_last", "affine_relu", "cpu")
    full = run_kernels(cs)
    part = run_kernels(cs, need_in_grads=False, need_bias_grad=False)
    for i in (1, 2, 4):
        assert part[i].shape == (0,) and part[i].dtype == F64
    torch.testing.assert_close(part[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(part[3], full[3], rtol=0, atol=0)


def test_relu_mask_recomputed_from_x():
    """With in_relu the gradient is zero exactly where x*s+t <= 0: a channel whose shift
    puts every position below zero gets grad_x == 0, grad_in_* == 0, grad_weight == 0
    for its input channel."""
    cs = make_case("3x3s1", F64, "channels_last", "affine_relu", "cpu")
    cs["t"] = cs["t"].clone()
    cs["t"][3] = -1e3
    gx, gs, gt, gw, gb = run_kernels(cs)
    assert (gx[:, 3] == 0).all() and gs[3] == 0 and gt[3] == 0 and (gw[:, 3] == 0).all()
    assert (gx[:, 2] != 0).any() and (gw[:, 2] != 0).any()
    ref = reference(cs, F64)
    for name, o, r in zip(NAMES, (gx, gs, gt, gw, gb), ref):
        assert_close_dtype(o, r, F64, name=name)


def test_empty_batch():
    cs = make_case("3x3s1", F32, "channels_last", "affine_relu", "cpu")
    for key in ("x", "go"):
        cs[key] = cs[key][:0]
    gx, gs, gt, gw, gb = run_kernels(cs)
    assert gx.shape == cs["x"].shape
    for o in (gs, gt, gw, gb):
        assert o.dtype == F32 and (o == 0).all()
    assert gw.shape == cs["w"].shape and gs.shape == (8,) and gb.shape == (12,)


def test_bad_geometry_is_named():
    cs = make_case("3x3s1", F32, "channels_last", "none", "cpu")
    with pytest.raises(ValueError, match="grad_out has shape"):
        B.conv2d_act_dgrad(cs["go"][:, :, 1:], cs["w"], cs["x"], None, None, False, 1, 1, 1, 1, False)
    with pytest.raises(ValueError, match="groups=3"):
        B.conv2d_act_wgrad(cs["go"], cs["x"], None, None, False, cs["w"].shape, 1, 1, 1, 3)


def test_launch_limits_are_named():
    """Problems past what the kernels index or launch get a ValueError naming the limit
    (before anything is allocated): int32 positions (N*P*Q for wgrad, N*ceil(H/s)*ceil(W/s)
    per phase for dgrad, N*P*Q for the forward) and the 65535 programs of a CUDA grid's
    second axis (the forward's groups; dgrad's groups x channel blocks). The tensors are
    broadcast views of one element: no memory behind the sizes."""
    conv = importlib.import_module(_K.__name__ + "._conv")
    one = torch.zeros((), dtype=F32)
    big_x = one.expand(2 ** 15, 1, 256, 256)           # N*H*W = 2^31
    w1 = one.expand(1, 1, 1, 1)
    with pytest.raises(ValueError, match="weight gradient supports N\\*P\\*Q < 2\\^31"):
        B.conv2d_act_wgrad(big_x, big_x, None, None, False, (1, 1, 1, 1), 1, 0, 1, 1)
    with pytest.raises(ValueError, match="data gradient supports N\\*ceil"):
        B.conv2d_act_dgrad(big_x, w1, big_x, None, None, False, 1, 0, 1, 1, False)
    with pytest.raises(ValueError, match="N\\*P\\*Q < 2\\^31"):
        conv.conv2d_act(big_x, w1, None, None, None, None, (1, 1), (0, 0), (1, 1), 1, False, False, False)
    g = 65536
    xg, wg = one.expand(1, g, 2, 2), one.expand(g, 1, 1, 1)
    with pytest.raises(ValueError, match="at most 65535 groups.*FASTRES_CONV=aten"):
        conv.conv2d_act(xg, wg, None, None, None, None, (1, 1), (0, 0), (1, 1), g, False, False, False)
    with pytest.raises(ValueError, match="second axis.*groups=65536"):
        B.conv2d_act_dgrad(xg, wg, xg, None, None, False, 1, 0, 1, g, False)


# ----------------------------------------------------------------------------- CUDA
GPU_CASES = [(s, dt, "channels_last", "affine_relu") for s in SHAPES for dt in (F32, BF16)] + [
    ("3x3s2", F64, "channels_last", "affine_relu"), ("grouped", F16, "contiguous", "shift_relu")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_conv_bwd_parity_cuda(case, monkeypatch):
    if not torch.cuda.is_available() or INTERP:
        pytest.skip("needs a CUDA device (and TRITON_INTERPRET unset)")
    monkeypatch.setenv("FASTRES_CONV_BWD_AUTOTUNE", "1")  # the tuned kernels (run_gpu.sh turns tuning off)
    check_case(*case, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["1x1s1", "3x3s2", "7x7s2stem"])
def test_conv_bwd_resnet_sized_cuda(name, monkeypatch):
    """ResNet-like channel counts (several autotuned tiles, wgrad splits), bf16 NHWC."""
    if not torch.cuda.is_available() or INTERP:
        pytest.skip("needs a CUDA device (and TRITON_INTERPRET unset)")
    monkeypatch.setenv("FASTRES_CONV_BWD_AUTOTUNE", "1")  # the tuned kernels (run_gpu.sh turns tuning off)
    geometry = SHAPES[name][5:]
    n, c, h, w, k = {"1x1s1": (8, 256, 14, 14, 64), "3x3s2": (8, 128, 28, 28, 128),
                     "7x7s2stem": (4, 3, 64, 64, 64)}[name]
    check_case((n, c, h, w, k, *geometry), BF16, "channels_last", "affine_relu", "cuda")


# ----------------------------------------------------------------------------- GPU compile, no GPU
_AOT = r'''
import importlib, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
B = importlib.import_module(sys.argv[1])
PT = {"bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
DIV = {"C", "KT", "CG", "KG", "N", "M_PER"}  # as the launcher's divisible-by-16 specialisation
def source(fn, dt, ones, consts):
    acc = "fp64" if dt == "fp64" else "fp32"
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], const[name] = "constexpr", consts[name]
        elif name in ones:  # ints equal to 1 are constexpr-specialised by the JIT
            sig[name], const[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("s_ptr", "t_ptr") else "*" + acc if name in (
                "ps_dz_ptr", "ps_dzx_ptr", "gw_ptr", "gb_ptr") else PT[dt]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in DIV:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, const, attrs=attrs)
one_by_one = {"R", "S", "SH", "SW", "DH", "DW", "STEP_R", "STEP_S"}
for arch in (90, 80):
    for kind, dt, ones, tile, nw, ns in [
            ("dgrad", "bf16", one_by_one, (128, 128, 64), 8, 3), ("dgrad", "fp32", {"DH", "DW"}, (64, 64, 32), 4, 3),
            ("dgrad", "fp64", set(), (32, 32, 8), 4, 2), ("wgrad", "bf16", {"DH", "DW"}, (64, 128, 128), 8, 3),
            ("wgrad", "fp64", one_by_one, (32, 32, 8), 4, 2)]:
        consts = dict(HAS_SCALE=True, HAS_SHIFT=True, RELU=True, RNE_BF16=False, DOT=dt != "fp64", DOT_F32=False,
                      IEEE=dt != "bf16", ACC=tl.float64 if dt == "fp64" else tl.float32,
                      BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2])
        consts.update(dict(SUMS=True, MIN_BM=32 if tile[0] > 32 else tile[0]) if kind == "dgrad" else dict(BIAS=True))
        fn = B._dgrad_kernel if kind == "dgrad" else B._wgrad_kernel
        triton.compile(source(fn, dt, ones, consts), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=nw, num_stages=ns))
        print("compiled", arch, kind, dt, flush=True)
'''


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets():
    """The GPU-only code paths (tl.dot / wgmma, fp64 without tl.dot, constexpr-specialised
    1x1 geometry, pipelined loops) compile for Hopper and Ampere -- ahead of time, with
    Triton's bundled ptxas, no GPU needed (the interpreter cases cannot see compile errors)."""
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as _nv  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton's NVIDIA backend is not importable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT, B.__name__], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"compile failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.count("compiled") == 10, res.stdout
