"""The same behaviour on every supported stack (issue 8): torch 2.11-2.14 with the Triton
each ships (3.6 / 3.8), NumPy 2.4 / 2.5, Python 3.10-3.12. CI runs this file on both of
its stacks (`make test` and `make test-gpustack`).

* eps must be positive in training and eval, with fastres's one message (PyTorch 2.11
  also refuses eps=0 in eval, 2.14 only in training, each in its own words);
* CPU inference whose conv output is 1x1 with a residual: torch 2.11's fused oneDNN
  conv+add primitive fails there, so fastres never sends it that case;
* torch.compile(fullgraph=True) never traces the backend-availability probes;
* the Triton kernels: no runtime-bounded ``range`` loop (Triton 3.6's interpreter cannot
  take one with NumPy >= 2.4), and every kernel still compiles for sm_90 (checked on
  the CPU: the GPU machine is scarce).
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from fastres import backends, conv_aten, fold
from fastres.functional import batch_norm_act
from fastres.nn import BatchNormAct2d

from conftest import backend_params, run_on
from resnet_ref import randomize, rel_err

BACKENDS = backend_params("cpu")


def _eps_message(eps) -> str:
    return f"fastres: eps must be positive, got {eps!r}"


# ----------------------------------------------------------------------------- eps
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_is_refused_in_training_and_eval(backend, training):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with run_on(backend), pytest.raises(ValueError) as e:
        batch_norm_act(x, rm, rv, None, None, training, 0.1, 0.0)
    assert str(e.value) == _eps_message(0.0)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64)) and torch.equal(rv, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("eps", [-1e-5, math.nan, True, "1e-5"], ids=["negative", "nan", "bool", "str"])
def test_eps_not_a_positive_number_is_refused(eps):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError) as e:
        batch_norm_act(x, torch.zeros(3), torch.ones(3), training=False, eps=eps)
    assert str(e.value) == _eps_message(eps)


def test_eps_zero_module_and_folded_block_in_eval():
    """The eval paths that never reach F.batch_norm (a BatchNormAct2d in eval, a block
    whose BN is folded into its conv) refuse eps=0 the same way."""
    bn = BatchNormAct2d(3, eps=0.0).eval()
    with pytest.raises(ValueError) as e:
        bn(torch.randn(2, 3, 4, 4))
    assert str(e.value) == _eps_message(0.0)
    block = fastres.BasicBlock(4, 4).eval()
    block.bn2.eps = 0.0
    with torch.no_grad(), pytest.raises(ValueError) as e:
        block(torch.randn(2, 4, 5, 5))
    assert str(e.value) == "BasicBlock: " + _eps_message(0.0)  # (a block names itself)


# ----------------------------------------------------------------------------- 1x1 CPU inference
def _cl_strided(t: torch.Tensor) -> torch.Tensor:
    """t with channels-last strides written out, (HWC, 1, WC, C), even where H = W = 1
    (where .contiguous(memory_format=torch.channels_last) keeps the NCHW strides)."""
    n, c, h, w = t.shape
    out = torch.empty_strided(t.shape, (h * w * c, 1, w * c, c), dtype=t.dtype)
    return out.copy_(t)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cl_strided"])
@pytest.mark.parametrize("hw,stride", [(1, 1), (2, 2), (1, 2)], ids=["1x1", "2x2s2", "1x1s2"])
def test_cpu_inference_residual_at_1x1_output(hw, stride, layout):
    """fp32 CPU inference of a block whose output is 1x1 (resnet at small image sizes)
    equals torchvision. On torch 2.11 the fused oneDNN conv + residual add raised
    "could not create a memory" here."""
    assert fold.use_onednn()
    ds = nn.Sequential(tvr.conv1x1(8, 16, stride), nn.BatchNorm2d(16)) if stride != 1 else None
    planes = 16 if stride != 1 else 8
    ref = randomize(tvr.BasicBlock(8, planes, stride, ds)).eval()
    ours = fastres.BasicBlock(8, planes, stride, copy.deepcopy(ds)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 8, hw, hw)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "cl_strided": _cl_strided(x)}[layout]
    with torch.no_grad():
        for _ in range(2):  # the second call runs the cached, packed weights
            y = ours(x)
            assert y.shape == (2, planes, 1, 1) and rel_err(y, ref(x)) < 1e-5


def test_onednn_fused_residual_not_used_at_1x1_output():
    """The routing itself: a 1x1 output with a residual goes to conv + the fused epilogue
    (the caller's path), a larger one to the one oneDNN primitive."""
    if not conv_aten.onednn_available():
        pytest.skip("this torch has no oneDNN fused convolution (torch.ops.mkldnn._convolution_pointwise)")
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    w, b = conv.weight.detach(), torch.randn(16)
    with torch.no_grad():
        for hw, fused in ((1, False), (2, True)):
            x = _cl_strided(torch.randn(2, 8, hw, hw))
            r = torch.randn(2, 16, hw, hw)
            y = fold.onednn_conv_act(conv, x, w, b, r, "relu")
            assert (y is not None) == fused, hw
            if fused:
                torch.testing.assert_close(y, torch.relu(nn.functional.conv2d(x, w, b, padding=1) + r))
            # without a residual the one primitive works at every size
            y = fold.onednn_conv_act(conv, x, w, b, None, "relu")
            torch.testing.assert_close(y, torch.relu(nn.functional.conv2d(x, w, b, padding=1)))


# ----------------------------------------------------------------------------- compile
def test_compile_fullgraph_never_runs_an_availability_probe(monkeypatch):
    """Availability is probed at import; a traced forward only reads the results, so
    torch.compile(fullgraph=True) never reaches importlib.util.find_spec or an import
    (torch 2.11's Dynamo stopped there with the Triton backend)."""
    def probe():
        raise AssertionError("a backend availability probe ran while tracing")

    monkeypatch.setattr(backends, "_probe_C", probe)
    monkeypatch.setattr(backends, "_probe_triton", probe)
    for backend in ("triton", "cpp"):
        with run_on(backend):
            torch._dynamo.reset()
            torch.manual_seed(0)
            ref, ours = nn.BatchNorm2d(4), BatchNormAct2d(4, activation="none")
            ours.load_state_dict(ref.state_dict())
            compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
            x = torch.randn(2, 4, 3, 3)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.running_var, ref.running_var)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- Triton kernels
def test_runtime_bounded_range_loop_runs_under_the_interpreter():
    """``for i in range(n)`` over a runtime ``n`` broke Triton 3.6's interpreter with
    NumPy >= 2.4 (int() of a 1-element array). fastres.kernels installs the fix Triton 3.8
    has (kernels/_interpreter_compat.py), so the kernels keep their range loops (the ones
    Triton pipelines on a GPU). Run such a loop, as the conv kernels do."""
    import triton
    import triton.language as tl

    from fastres.kernels import _interpreter_compat

    @triton.jit
    def _sum_loop(x_ptr, out_ptr, n):
        acc = tl.zeros((1,), tl.float32)
        for i in range(0, n):
            acc += tl.load(x_ptr + i + tl.arange(0, 1))
        tl.store(out_ptr + tl.arange(0, 1), acc)

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU interpreter)")
    x = torch.arange(7, dtype=torch.float32)
    out = torch.zeros(1)
    _sum_loop[(1,)](x, out, 7)
    assert out.item() == 21.0
    assert _interpreter_compat.apply() in (True, False)


def _nested_jit():
    """A kernel calling a helper that calls another (module globals: jit functions resolve
    the names they call there)."""
    import triton
    import triton.language as tl

    global _inner_jit, _outer_jit

    @triton.jit
    def _inner_jit(v):
        return tl.sum(v * v, axis=0)

    @triton.jit
    def _outer_jit(v):
        return _inner_jit(v) + tl.max(v, axis=0)

    @triton.jit
    def _kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        v = tl.load(x_ptr + tl.arange(0, BLOCK))
        acc = tl.zeros((BLOCK,), tl.float32) + v
        tl.store(out_ptr, _outer_jit(acc))

    return _inner_jit, _outer_jit, _kernel


def test_device_function_calls_restore_triton_language():
    """Under the interpreter a kernel's device-function calls (tl.zeros, a reduction's
    combine function, a @triton.jit helper calling another) patch triton.language only
    where no enclosing scope has (kernels/_interpreter_compat.py), and every patch is
    undone when the kernel returns: triton.language's builtins are builtins again (torch's
    triton_op analysis generates IR from them) and no scope is left open."""
    import triton
    import triton.language as tl

    from fastres.kernels import _interpreter_compat as compat

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU interpreter)")

    _kernel = _nested_jit()[2]
    builtins = {n for n, m in vars(tl.core).items() if tl.core.is_builtin(m)}
    x = torch.arange(8, dtype=torch.float32)
    out = torch.zeros(1)
    _kernel[(1,)](x, out, BLOCK=8)
    assert out.item() == float((x * x).sum() + x.max())
    assert not any(compat._live.values()), compat._live
    assert builtins == {n for n, m in vars(tl.core).items() if tl.core.is_builtin(m)}
    from triton.runtime import interpreter as I
    assert getattr(I._patch_lang, "_fastres_once", False)


# (The sm_90 compile check of every Triton kernel lives in tools/aot_compile.py and
# tests/test_aot_compile.py: run in a process of its own, where no interpreted kernel has
# patched triton.language, on this Triton and on the GPU stack's 3.6.)
