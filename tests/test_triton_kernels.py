"""Op-level parity of the Triton launchers (``kernels/``) with ``fastres._reference``.

Every case runs on ``dev``: "cpu" under the Triton interpreter (TRITON_INTERPRET=1, set
below before triton is imported: a machine without a GPU) and "cuda" with compiled
kernels (``gpu`` marker; skipped with "no CUDA device" on a CPU machine). One process
either interprets or compiles Triton, so on a GPU machine the interpreter cases skip
with their reason. Shapes are small and
the cases are a hand-picked spread rather than a cartesian product. Tolerances: fp64
rel 1e-9, fp32 rel 1e-5; bf16/fp16: error against an fp32 reference at most 2x
PyTorch's own low-precision error (+ a small floor). The kernels' tiling knobs are shrunk in some cases so that small shapes still
exercise multi-tile loops, several chunks per channel and several channel blocks.
"""
import os

import torch

if not torch.cuda.is_available():  # CPU only: the interpreter (before anything imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402

if torch.cuda.is_available():
    import triton  # noqa: E402,F401  (on a GPU machine a missing Triton is an error, never a skip)
else:
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

try:  # installed layout: the top-level kernels/ folder is the package fastres.kernels
    from fastres import kernels as K
except ImportError:  # a source checkout on PYTHONPATH
    import kernels as K  # noqa: E402
L = importlib.import_module(K.__name__ + "._launch")  # tiling knobs, for the small-tile cases
from fastres import _reference as R  # noqa: E402

from conftest import gpu_param  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

# the device of every case: the interpreter on the CPU, compiled kernels on CUDA (gpu)
DEVS = [pytest.param("cpu", id="interp", marks=pytest.mark.skipif(
            not INTERPRET, reason="TRITON_INTERPRET is not 1 (a CUDA device is present): Triton is compiled "
                                  "in this process, the gpu cases run instead")),
        gpu_param("cuda", id="gpu")]
LOW = (torch.bfloat16, torch.float16)
CL = torch.channels_last

# Tiling knobs shrunk so the small test shapes still walk the code paths of the real
# ones: SMALL = many chunks per channel (multi-iteration finalize) and several channel
# blocks; LONG = few chunks, each program looping over many tiles.
SMALL = dict(tile=16, max_block_c=4, target_programs=64, min_tiles=2, max_chunks=4096, max_warps=1,
             finalize_tile=8, finalize_block_c=4)
LONG = dict(SMALL, target_programs=8)
TILINGS = {None: None, "small": SMALL, "long": LONG}


@contextlib.contextmanager
def tiling(name):
    old = dict(L.CONFIG)
    L.CONFIG.update(TILINGS[name] or {})
    try:
        yield
    finally:
        L.CONFIG.clear()
        L.CONFIG.update(old)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- helpers
def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(shape, dtype, layout, dev, scale=1.0, offset=0.0):
    """layout: 'contiguous', 'channels_last' or 'noncontig' (a permuted view that is
    neither NCHW- nor NHWC-dense when H*W > 1 and C > 1). Drawn on the CPU (the same
    values on every device), then moved to ``dev``."""
    n, c, h, w = shape
    if layout == "noncontig":
        base = torch.randn(n, h, c, w, dtype=torch.float64) * scale + offset
        return base.to(device=dev, dtype=dtype).permute(0, 2, 1, 3)
    x = (torch.randn(n, c, h, w, dtype=torch.float64) * scale + offset).to(device=dev, dtype=dtype)
    return x.contiguous(memory_format=CL) if layout == "channels_last" else x


def vec(c, dtype, dev, offset=0.0):
    return (torch.randn(c, dtype=torch.float64) + offset).to(device=dev, dtype=dtype)


def hi(t):
    """fp32 copy of a low-precision tensor (same values, same strides)."""
    return None if t is None else (t.float() if t.dtype in LOW else t)


def max_err(a, b):
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def check(name, actual, expected, dtype, ref_hi=None):
    """Compare one output. Also: dtype, shape and strides (memory format) identical."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dim() == 4:
        assert actual.stride() == expected.stride(), f"{name}: strides {actual.stride()} != {expected.stride()}"
    if actual.numel() == 0:
        return
    assert not (actual.isnan() & ~expected.isnan()).any(), f"{name}: NaN where the reference has none"
    scale = max(1.0, expected.double().abs().max().item())
    if dtype in LOW:
        assert ref_hi is not None
        ours, theirs = max_err(actual, ref_hi), max_err(expected, ref_hi)
        floor = 1e-3 * max(1.0, ref_hi.double().abs().max().item())
        assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3g} > 2 x PyTorch's {theirs:.3g} (+{floor:.1g})"
        return
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def check_all(names, outs, refs, dtype, refs_hi=None):
    for i, name in enumerate(names):
        check(name, outs[i], refs[i], dtype, None if refs_hi is None else refs_hi[i])


# ----------------------------------------------------------------------------- cases
# (shape, dtype, layout, weight, bias, residual, relu, tiling)
CASES = [
    ((2, 3, 7, 7), torch.float64, "contiguous", True, True, True, True, None),
    ((2, 8, 7, 7), torch.float64, "channels_last", True, True, True, True, "small"),
    ((2, 8, 7, 7), torch.float64, "contiguous", True, False, True, True, "small"),
    ((5, 3, 7, 7), torch.float32, "contiguous", True, True, False, True, "long"),
    ((5, 3, 7, 7), torch.float32, "channels_last", False, True, True, True, "long"),
    ((2, 65, 1, 1), torch.float32, "contiguous", True, True, True, True, None),
    ((5, 65, 7, 7), torch.float32, "channels_last", True, True, True, True, None),
    ((2, 8, 13, 17), torch.float32, "noncontig", False, False, True, False, None),
    ((5, 1, 13, 17), torch.float32, "contiguous", True, True, False, True, None),
    ((2, 3, 13, 17), torch.float32, "channels_last", False, True, False, True, None),
    ((2, 8, 13, 17), torch.bfloat16, "channels_last", True, True, True, True, None),
    ((5, 3, 7, 7), torch.float16, "contiguous", True, True, True, True, None),
    ((2, 8, 7, 7), torch.bfloat16, "noncontig", True, True, True, True, None),
]


def _case_id(case):
    shape, dtype, layout, w, b, r, relu, til = case
    flags = "".join(f for f, on in zip("wbr", (w, b, r)) if on) + ("-relu" if relu else "")
    return f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{layout}-{flags}" + (f"-{til}tiles" if til else "")


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bn_act_train_and_backward(case, dev):
    shape, dtype, layout, has_w, has_b, has_r, relu, til = case
    c = shape[1]
    pdt = dtype if dtype == torch.float64 else torch.float32  # weights: fp32 (or x's dtype, below)
    if dtype in LOW and has_w:
        pdt = dtype  # exercise the "weight in x's dtype" path
    x = make(shape, dtype, layout, dev, scale=2.0, offset=0.5)
    w = vec(c, pdt, dev, 1.0) if has_w else None
    b = vec(c, pdt, dev) if has_b else None
    r = make(shape, dtype, layout, dev) if has_r else None
    eps = 1e-5
    with tiling(til):
        y, mean, var = K.bn_act_train(x, w, b, r, eps, relu)
    ry, rmean, rvar = R.bn_act_train(x, w, b, r, eps, relu)
    fwd_hi = R.bn_act_train(hi(x), hi(w), hi(b), hi(r), eps, relu) if dtype in LOW else None
    check_all(("y", "mean", "var"), (y, mean, var), (ry, rmean, rvar), dtype, fwd_hi)

    gy = make(shape, dtype, layout, dev)
    for need_z in ((True, False) if relu else (False,)):
        with tiling(til):
            outs = K.bn_act_train_backward(gy, x, ry, w, rmean, rvar, eps, relu, need_z)
        refs = R.bn_act_train_backward(gy, x, ry, w, rmean, rvar, eps, relu, need_z)
        refs_hi = (R.bn_act_train_backward(hi(gy), hi(x), hi(ry), hi(w), rmean, rvar, eps, relu, need_z)
                   if dtype in LOW else None)
        check_all(("grad_x", "grad_weight", "grad_bias", "grad_z"), outs, refs, dtype, refs_hi)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("case", CASES[::2] + [CASES[5]], ids=_case_id)
def test_affine_act_and_backward(case, dev):
    shape, dtype, layout, has_s, has_t, has_r, relu, til = case
    c = shape[1]
    acc = acc_of(dtype)
    x = make(shape, dtype, layout, dev, scale=2.0)
    s = vec(c, acc, dev, 1.0) if has_s else None
    t = vec(c, acc, dev) if has_t else None
    r = make(shape, dtype, layout, dev) if has_r else None
    with tiling(til):
        y = K.affine_act(x, s, t, r, relu)
    ry = R.affine_act(x, s, t, r, relu)
    check("y", y, ry, dtype, R.affine_act(hi(x), s, t, hi(r), relu) if dtype in LOW else None)

    gy = make(shape, dtype, layout, dev)
    for need_z, need_p in ((True, True), (False, False)) if relu else ((False, True),):
        with tiling(til):
            outs = K.affine_act_backward(gy, x, ry, s, relu, need_z, need_p)
        refs = R.affine_act_backward(gy, x, ry, s, relu, need_z, need_p)
        refs_hi = (R.affine_act_backward(hi(gy), hi(x), hi(ry), s, relu, need_z, need_p)
                   if dtype in LOW else None)
        check_all(("grad_x", "grad_z", "grad_scale", "grad_shift"), outs, refs, dtype, refs_hi)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_huge_magnitude_near_constant_channel(layout, dev):
    """fp32 channels at 1e4 (noise 0.1) and -3e4 (noise 0.01, a few ulps): E[x^2] - E[x]^2
    cancels to garbage or a negative variance (NaN), and a plain fp32 Welford mean
    stagnates once delta / count drops below half an ulp. The statistics must match the
    fp64 truth of the very same fp32 data, whatever the split into tiles and chunks."""
    n, c, h, w = 5, 3, 13, 17
    x = make((n, c, h, w), torch.float32, layout, dev)
    x[:, 1] = (1e4 + 0.1 * torch.randn(n, h, w, dtype=torch.float64)).float().to(dev)
    x[:, 2] = (-3e4 + 1e-2 * torch.randn(n, h, w, dtype=torch.float64)).float().to(dev)
    x64 = x.double()
    mean64 = x64.mean(dim=(0, 2, 3))
    var64 = (x64 - mean64.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    y64 = (x64 - mean64.view(1, -1, 1, 1)) * torch.rsqrt(var64 + 1e-5).view(1, -1, 1, 1)
    ry, rmean, rvar = R.bn_act_train(x, None, None, None, 1e-5, False)
    for til in (None, "small", "long"):
        with tiling(til):
            y, mean, var = K.bn_act_train(x, None, None, None, 1e-5, False)
        assert torch.isfinite(y).all() and torch.isfinite(var).all()
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=0)
        # y is limited by the fp32 resolution of x - mean at 3e4: no worse than twice the
        # aten reference's own error (+ a small floor)
        ours, theirs = max_err(y, y64), max_err(ry, y64)
        assert ours <= 2 * theirs + 1e-3, f"y error {ours:.3g} > 2 x aten's {theirs:.3g}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_like_reference(layout, dev):
    """A channel holding +Inf has mean +Inf (aten's sum / M, not a Welford NaN) and NaN
    variance; NaN, or both infinities, give NaN; the other channels are untouched:
    channel 4 (all finite, between and after the non-finite ones in memory) matches the
    reference to the fp32 tolerance, forward and backward."""
    shape = (2, 5, 3, 5)
    x = make(shape, torch.float32, layout, dev)
    x[1, 0, 2, 3] = float("inf")
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 1, 1], x[1, 2, 0, 4] = float("inf"), -float("inf")
    x[0, 3, 0, 0] = -float("inf")  # the channel's first element (the kernels' shift)
    assert torch.isfinite(x[:, 4]).all() and not torch.isfinite(x.transpose(0, 1)[:4].flatten(1)).all(1).any()
    for til in (None, "small"):
        with tiling(til):
            outs = K.bn_act_train(x, None, None, None, 1e-5, True)
        refs = R.bn_act_train(x, None, None, None, 1e-5, True)
        for name, a, e in zip(("y", "mean", "var"), outs, refs):
            for f in (torch.isnan, torch.isposinf, torch.isneginf):
                assert torch.equal(f(a), f(e)), f"{name}: {f.__name__} pattern {a} vs {e}"
            fin = a[:, 4] if name == "y" else a[4:]
            assert torch.isfinite(fin).all(), f"{name}: the finite channel 4 became non-finite: {fin}"
            check(f"{name} (finite channel 4, tiling {til})", fin, e[:, 4] if name == "y" else e[4:],
                  torch.float32)
    gy = make(shape, torch.float32, layout, dev)
    y, mean, var = refs
    gx, gw, gb, _ = K.bn_act_train_backward(gy, x, y, None, mean, var, 1e-5, True, False)
    rgx, rgw, rgb, _ = R.bn_act_train_backward(gy, x, y, None, mean, var, 1e-5, True, False)
    for name, a, e in (("grad_x", gx, rgx), ("grad_weight", gw, rgw), ("grad_bias", gb, rgb)):
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN pattern {a} vs {e}"
        fin, efin = (a[:, 4], e[:, 4]) if a.dim() == 4 else (a[4:], e[4:])
        assert torch.isfinite(fin).all(), f"{name}: the finite channel 4 became non-finite: {fin}"
        check(f"{name} (finite channel 4)", fin, efin, torch.float32)


@contextlib.contextmanager
def no_launch():
    """Make any kernel launch fail."""
    names = [n for n in dir(L.K) if n.startswith("_") and hasattr(getattr(L.K, n), "__getitem__")
             and not n.startswith("__")]
    saved = {n: getattr(L.K, n) for n in names}

    class _Boom:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for an empty tensor")

    try:
        for n in names:
            setattr(L.K, n, _Boom())
        yield
    finally:
        for n, v in saved.items():
            setattr(L.K, n, v)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("shape,layout", [((0, 4, 5, 5), "contiguous"), ((3, 4, 0, 5), "channels_last"),
                                          ((2, 4, 5, 0), "contiguous")])
def test_empty(shape, layout, dev):
    x = make(shape, torch.float32, layout, dev)
    c = shape[1]
    w, b, s = vec(c, torch.float32, dev), vec(c, torch.float32, dev), vec(c, torch.float32, dev)
    with no_launch():
        y, mean, var = K.bn_act_train(x, w, b, x, 1e-5, True)
        gb = K.bn_act_train_backward(x, x, x, w, vec(c, torch.float32, dev).abs(), vec(c, torch.float32, dev).abs(),
                                     1e-5, True, True)
        ya = K.affine_act(x, s, b, x, True)
        ga = K.affine_act_backward(x, x, x, s, True, True, True)
        ga0 = K.affine_act_backward(x, x, x, s, True, False, False)
    ry, _, _ = R.bn_act_train(x, w, b, x, 1e-5, True)
    assert y.shape == ry.shape and y.stride() == ry.stride() and y.dtype == ry.dtype
    assert mean.shape == (c,) and var.shape == (c,) and mean.dtype == torch.float32
    assert gb[0].shape == x.shape and gb[3].shape == x.shape
    assert gb[1].shape == (c,) and gb[2].shape == (c,) and (gb[1] == 0).all() and (gb[2] == 0).all()
    assert ya.shape == x.shape and ga[0].shape == x.shape and ga[1].shape == x.shape
    assert ga[2].shape == (c,) and (ga[2] == 0).all() and (ga[3] == 0).all()
    assert ga0[1].shape == (0,) and ga0[2].shape == (0,) and ga0[3].shape == (0,)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("layout,res_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                               ("noncontig", "channels_last")])
def test_memory_format_preserved(layout, res_layout, dev):
    """Outputs take x's memory format (DESIGN.md rule), whatever the other inputs' formats."""
    shape = (2, 4, 3, 5)
    x = make(shape, torch.float32, layout, dev)
    r = make(shape, torch.float32, res_layout, dev)
    gy = make(shape, torch.float32, res_layout, dev)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    w = vec(4, torch.float32, dev, 1.0)
    y, mean, var = K.bn_act_train(x, w, None, r, 1e-5, True)
    gx, gw, gb, gz = K.bn_act_train_backward(gy, x, y, w, mean, var, 1e-5, True, True)
    ya = K.affine_act(x, w, None, r, True)
    ax, az, _, _ = K.affine_act_backward(gy, x, ya, w, True, True, True)
    for name, t in (("y", y), ("grad_x", gx), ("grad_z", gz), ("affine y", ya), ("affine grad_x", ax),
                    ("affine grad_z", az)):
        assert t.is_contiguous(memory_format=fmt), f"{name} lost the memory format {fmt}"
        assert t.stride() == torch.empty_like(x, memory_format=fmt).stride(), name
    ry = R.bn_act_train(x, w, None, r, 1e-5, True)[0]
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, R.bn_act_train_backward(gy, x, ry, w, mean, var, 1e-5, True, True)[0],
                               rtol=1e-5, atol=1e-5)


# GPU only: under the interpreter the programs run one after the other in a fixed
# order, so run-to-run differences cannot happen there and a CPU case could not fail.
@pytest.mark.parametrize("dev", [gpu_param("cuda", id="gpu")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(layout, dev):
    """Two-level reductions in a fixed order, no atomics: bitwise identical results run
    to run, with thousands of programs in flight (default tiling, many chunks per
    channel) and the inputs at other addresses the second time; and right (the default
    tiling's multi-chunk path at a real size)."""
    shape, dtype = (32, 64, 28, 28), torch.float32
    x = make(shape, dtype, layout, dev, scale=3.0, offset=1.0)
    gy = make(shape, dtype, layout, dev)
    w = vec(64, torch.float32, dev, 1.0)
    runs = []
    for i in range(2):
        xi, gyi = (x, gy) if i == 0 else (x.clone(), gy.clone())
        fwd = K.bn_act_train(xi, w, None, None, 1e-5, True)
        bwd = K.bn_act_train_backward(gyi, xi, fwd[0], w, fwd[1], fwd[2], 1e-5, True, True)
        abwd = K.affine_act_backward(gyi, xi, fwd[0], w, True, False, True)
        runs.append(tuple(fwd) + tuple(bwd) + tuple(abwd))
        del xi, gyi
    for k, (u, v) in enumerate(zip(*runs)):
        assert torch.equal(u, v), f"output {k} differs between two identical runs"
    refs = R.bn_act_train(x, w, None, None, 1e-5, True)
    check_all(("y", "mean", "var"), runs[0][:3], refs, dtype)
    rb = R.bn_act_train_backward(gy, x, runs[0][0], w, runs[0][1], runs[0][2], 1e-5, True, True)
    check_all(("grad_x", "grad_weight", "grad_bias", "grad_z"), runs[0][3:7], rb, dtype)
