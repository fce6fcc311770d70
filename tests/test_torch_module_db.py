"""PyTorch's own test inputs for ``nn.BatchNorm2d`` and ``F.batch_norm``, run through
``fastres.nn.BatchNormAct2d`` and ``fastres.functional.batch_norm_act``.

``torch.testing._internal.common_modules.module_db`` is the table PyTorch's generic module
tests (test/test_modules.py) take every module through: for ``nn.BatchNorm2d`` its
constructor arguments (default, momentum None, momentum 0.8, affine off, running stats
off, a zero batch, ``bias=False``), its forward inputs and its error inputs. The table
travels with the installed torch, so these cases follow the torch in use (2.14 here,
2.11 on the GPU machine) instead of a copy frozen in this repository.

Each case builds the reference ``nn.BatchNorm2d`` and a ``BatchNormAct2d`` with the same
arguments and state (affine parameters and running statistics randomised alike) and
checks what PyTorch's generic tests check of the reference, against the reference
itself: forward and backward (output, input and parameter gradients, running statistics,
``num_batches_tracked``) in train and eval, with contiguous, channels_last and
non-contiguous inputs (the output's memory format too); first- and second-order
gradients and forward-mode AD (gradcheck/gradgradcheck, float64); factory kwargs
(device/dtype of every parameter and buffer); meta-device construction followed by
``to_empty`` and ``reset_parameters``; pickle / ``torch.save`` / deepcopy round trips;
and every error input raising the reference's exception type with its message.
With ``activation="relu"`` the reference is the module followed by ``torch.relu``.

Likewise ``op_db``'s samples of ``nn.functional.batch_norm`` (OpInfo, the table of
PyTorch's generic op tests; among them momentum -1.0 and eps 0.5) go through
``batch_norm_act``: the 4-D ones give F.batch_norm's output, gradients and running
statistics; the others (1-D to 3-D) are refused with fastres's ShapeError naming the rank.
"""
from __future__ import annotations

import builtins
import copy
import inspect
import io
import os
import pickle
import subprocess
import sys
import tempfile
import types

import pytest
import torch
import torch.nn.functional as F

from fastres.functional import batch_norm_act
from fastres.nn import BatchNormAct2d

from conftest import HAS_CUDA, run_on, targets
from parity import TOL, randomize_bn


def _load_tables():
    """The tables, built by tests/torch_tables.py in a child process (importing
    torch.testing._internal here would freeze torch.backends flags, replace the suite's
    hypothesis profile and patch TorchScript for every later test)."""
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "tables.pt")
        r = subprocess.run([sys.executable, os.path.join(here, "torch_tables.py"), out],
                           capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise RuntimeError(f"tests/torch_tables.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
        tables = torch.load(out, weights_only=True)
    assert tables["torch"] == torch.__version__, (tables["torch"], torch.__version__)
    return tables


TABLES = _load_tables()
# On a GPU (the scarce device: the quick profile's tests step has minutes for every gpu
# test) the forward/backward cases run for channels_last + ReLU, the blocks' case, and
# the factory kwargs; BN's GPU gradients and every layout are test_batchnorm_parity's.
CPU_TARGETS = targets(gpu=())
GPU_TARGETS = [t for t in targets() if t not in CPU_TARGETS]
FWD_CASES = ([pytest.param(*t.values, layout, act, id=f"{t.id}-{layout}-{act or 'noact'}")
              for t in CPU_TARGETS for layout in ("contiguous", "channels_last", "noncontig") for act in (None, "relu")]
             + [pytest.param(*t.values, "channels_last", "relu", marks=t.marks, id=f"{t.id}-channels_last-relu")
                for t in GPU_TARGETS])


DESCS = [row["desc"] for row in TABLES["module_inputs"][True]]
# The table changed shape if these fail: look at it. torch 2.11's has six cases; 2.14 adds
# "affine_not_bias" with BatchNorm2d's new ``bias=`` argument.
assert len(set(DESCS)) == len(DESCS), DESCS
assert {"default", "zero_batch", "not_affine", "not_tracking_stats", "2d_simple_average", "momentum"} <= set(DESCS), DESCS
assert ("affine_not_bias" in DESCS) == ("bias" in inspect.signature(torch.nn.BatchNorm2d).parameters), DESCS


def _case(desc, device, dtype, training):
    """module_db's input ``desc``: constructor ``args``/``kwargs`` and the forward ``input``."""
    for row in TABLES["module_inputs"][training]:
        if row["desc"] == desc:
            return types.SimpleNamespace(desc=desc, args=list(row["args"]), kwargs=dict(row["kwargs"]),
                                         input=row["input"].to(device=device, dtype=dtype))
    raise KeyError(desc)


def _pair(mi, device, dtype, activation, training):
    args, kwargs = mi.args, dict(mi.kwargs)
    ref = torch.nn.BatchNorm2d(*args, **kwargs, device=device, dtype=dtype)
    ours = BatchNormAct2d(*args, **kwargs, activation=activation, device=device, dtype=dtype)
    randomize_bn(ref, torch.Generator().manual_seed(7))
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    ref.train(training)
    ours.train(training)
    return ref, ours


def _ref_call(ref, x, activation):
    y = ref(x)
    return torch.relu(y) if activation == "relu" else y


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":  # as test_modules' non-contiguous check: every other element of a wider tensor
        return torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
    return x


def _step(mod, x, g, call):
    leaf = x.detach().clone().requires_grad_(True)
    for p in mod.parameters():
        p.grad = None
    y = call(leaf)
    if y.numel():
        y.backward(g)
    return y.detach(), [leaf.grad] + [p.grad for p in mod.parameters()]


@pytest.mark.parametrize("backend,device,layout,activation", FWD_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("desc", DESCS)
def test_forward_backward_and_state_match_batchnorm2d(backend, device, desc, training, activation, layout):
    """Two forward + backward steps on the module table's input (then a second draw of the
    same shape): output, its memory format, every gradient and every buffer equal the
    reference's (float64, parity.TOL)."""
    dtype = torch.float64
    mi = _case(desc, device, dtype, training)
    ref, ours = _pair(mi, device, dtype, activation, training)
    x0 = mi.input.detach()
    gen = torch.Generator().manual_seed(11)
    with run_on(backend, device):
        for step in range(2):
            x = x0 if step == 0 else (1.5 * torch.randn(x0.shape, generator=gen, dtype=dtype) + 0.5).to(device)
            x = _layout(x, layout)
            g = torch.randn(x.shape, generator=gen, dtype=dtype).to(device)
            y_ref, g_ref = _step(ref, x, g, lambda t: _ref_call(ref, t, activation))
            y, g_ours = _step(ours, x, g, ours)
            assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
            if y.dim() == 4 and y.numel() and layout != "noncontig":
                assert y.is_contiguous(memory_format=torch.channels_last) == \
                    y_ref.is_contiguous(memory_format=torch.channels_last), "output memory format"
            torch.testing.assert_close(y, y_ref, **TOL[dtype], msg=lambda m: f"{desc} step {step} output: {m}")
            names = ["input"] + [n for n, _ in ref.named_parameters()]
            for name, a, b in zip(names, g_ours, g_ref):
                if b is None:
                    assert a is None or not y.numel(), f"{name}.grad"
                    continue
                torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{desc} step {step} {name}.grad: {m}")
            for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
                if a.is_floating_point():
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12,
                                               msg=lambda m: f"{desc} step {step} {name}: {m}")
                else:
                    assert torch.equal(a, b), f"{desc} step {step} {name}: {a} != {b}"


# The triton backend on the CPU runs under the interpreter, where one gradgradcheck of
# these inputs takes minutes; its fp64 gradients are checked in tests/test_triton_kernels.py
# and test_higher_order.py (and the GPU's in test_batchnorm_parity / test_higher_order).
GRAD_TARGETS = [t for t in CPU_TARGETS if t.values != ("triton", "cpu")]


# With ReLU only (the fused op's full path; without it, test_higher_order's
# test_bn_no_act_no_residual_gradgradcheck): each case is ~1 s of the CI budget.
@pytest.mark.parametrize("backend,device", GRAD_TARGETS)
@pytest.mark.parametrize("activation", ["relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("desc", DESCS)
def test_gradcheck_gradgradcheck_forward_ad(backend, device, desc, training, activation):
    """test_modules' test_grad / test_gradgrad on the same inputs: the input and every
    parameter, reverse and forward mode, first and second order, float64."""
    mi = _case(desc, device, torch.float64, training)
    _, ours = _pair(mi, device, torch.float64, activation, training)
    x = mi.input.detach().clone().requires_grad_(True)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in ours.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(ours, dict(zip(names, ps)), (x,))

    with run_on(backend, device):
        assert torch.autograd.gradcheck(fn, (x, *params), check_forward_ad=True, check_batched_grad=False)
        assert torch.autograd.gradgradcheck(fn, (x, *params), check_batched_grad=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=(pytest.mark.gpu, pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device")))])
@pytest.mark.parametrize("desc", DESCS)
def test_factory_kwargs(desc, device, dtype):
    """Every floating parameter and buffer is created on the requested device with the
    requested dtype; the rest (num_batches_tracked) as the reference makes it."""
    mi = _case(desc, "cpu", torch.float64, True)
    args, kwargs = mi.args, dict(mi.kwargs)
    ref = torch.nn.BatchNorm2d(*args, **kwargs, device=device, dtype=dtype)
    ours = BatchNormAct2d(*args, **kwargs, device=device, dtype=dtype)
    theirs = {n: (t.device, t.dtype, tuple(t.shape)) for n, t in list(ref.named_parameters()) + list(ref.named_buffers())}
    mine = {n: (t.device, t.dtype, tuple(t.shape)) for n, t in list(ours.named_parameters()) + list(ours.named_buffers())}
    assert mine == theirs
    assert all(d.type == device for d, _, _ in mine.values())
    assert all(t == dtype for n, (_, t, _) in mine.items() if n != "num_batches_tracked")


@pytest.mark.parametrize("desc", DESCS)
def test_meta_init_to_empty_reset_parameters(desc):
    """Built on the meta device, materialised with ``to_empty`` and re-initialised with
    ``reset_parameters``: the state of a module built directly on the CPU."""
    mi = _case(desc, "cpu", torch.float64, True)
    args, kwargs = mi.args, dict(mi.kwargs)
    ours = BatchNormAct2d(*args, **kwargs, activation=None, device="meta")
    assert all(t.is_meta for t in ours.state_dict().values())
    ours = ours.to_empty(device="cpu")
    ours.reset_parameters()
    fresh = torch.nn.BatchNorm2d(*args, **kwargs)
    assert ours.state_dict().keys() == fresh.state_dict().keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = mi.input.float()
    torch.testing.assert_close(ours.eval()(x), fresh.eval()(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("desc", DESCS)
def test_save_load_pickle_deepcopy(desc, training):
    """test_modules' test_save_load: the module, pickled, saved whole and as a state dict,
    and deep-copied, computes what the original computes and keeps its class and settings."""
    mi = _case(desc, "cpu", torch.float64, training)
    _, ours = _pair(mi, "cpu", torch.float64, "relu", training)
    x = mi.input.detach()
    y = ours(x)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    sd = io.BytesIO()
    torch.save(ours.state_dict(), sd)
    sd.seek(0)
    fresh = BatchNormAct2d(*mi.args, **mi.kwargs, activation="relu",
                           dtype=torch.float64).train(training)
    fresh.load_state_dict(torch.load(sd, weights_only=True))
    clones = {"pickle": pickle.loads(pickle.dumps(ours)), "deepcopy": copy.deepcopy(ours),
              "torch.save": torch.load(buf, weights_only=False), "state_dict": fresh}
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    y2 = ours(x)
    for how, m in clones.items():
        assert type(m) is BatchNormAct2d and repr(m) == repr(ours), how
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), (how, k)
        torch.testing.assert_close(m(x), y2, rtol=0, atol=0, msg=lambda s: f"{how}: {s}")
    assert y.shape == y2.shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_inputs_raise_like_batchnorm2d(training):
    """test_modules' test_errors: each error input of the table raises, at the stage the
    table names (construction or forward), the table's exception type with a message
    matching its regex -- for fastres in train and eval, and for the reference in train
    (the table still holds). In eval torch 2.14's own BatchNorm2d words a negative eps
    differently ("non-negative") and lets eps=0 through; fastres refuses both with the
    table's message in either mode, on every torch it supports (tests/test_compat.py)."""
    errs = TABLES["error_inputs"][training]
    assert errs, "the table lists no error inputs for BatchNorm2d"
    for err in errs:
        args, kwargs = err["args"], err["kwargs"]
        etype = getattr(builtins, err["error_type"])
        ref = ((torch.nn.BatchNorm2d, {}),) if training else ()
        for cls, extra in ref + ((BatchNormAct2d, {"activation": None}), (BatchNormAct2d, {"activation": "relu"})):
            with pytest.raises(etype, match=err["error_regex"]):
                m = cls(*args, **kwargs, **extra)
                assert err["error_on"] != "construction", f"{cls.__name__}{kwargs}: no error at construction"
                m.train(training)(err["input"])


def test_train_and_eval_differ_as_the_table_says():
    """The table marks BatchNorm2d ``train_and_eval_differ``: so must fastres be (batch
    statistics in train, running statistics in eval)."""
    assert TABLES["train_and_eval_differ"]
    mi = _case("default", "cpu", torch.float64, True)
    _, ours = _pair(mi, "cpu", torch.float64, None, True)
    x = mi.input.detach()
    y_train = ours(x)
    y_eval = ours.eval()(x)
    assert not torch.allclose(y_train, y_eval)
    torch.testing.assert_close(y_eval, F.batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias,
                                                   False, 0.0, ours.eps))


# ------------------------------------------------------------------ F.batch_norm's OpInfo
def _op_samples(device="cpu"):
    """op_db's F.batch_norm samples: (input, [running_mean, running_var, weight, bias], kwargs)."""
    return [(s["input"].to(device), [a.to(device) if isinstance(a, torch.Tensor) else a for a in s["args"]],
             dict(s["kwargs"])) for s in TABLES["op_samples"]]


OP_IDS = [f"{i}-{'x'.join(map(str, x.shape))}-{'train' if kw.get('training') else 'eval'}"
          for i, (x, _, kw) in enumerate(_op_samples())]
assert any(x.dim() == 4 for x, _, _ in _op_samples()), "op_db has no 4-D batch_norm sample any more: look"


@pytest.mark.parametrize("backend,device", CPU_TARGETS)
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("index", range(len(OP_IDS)), ids=OP_IDS)
def test_op_db_batch_norm_samples(backend, device, index, activation):
    x, args, kw = _op_samples(device)[index]
    running = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args[:2]]
    ours_running = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args[:2]]
    affine = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args[2:4]]
    training, momentum, eps = kw.get("training", False), kw.get("momentum", 0.1), kw.get("eps", 1e-5)
    with run_on(backend, device):
        if x.dim() != 4:
            with pytest.raises(ValueError, match=f"expected input to be 4-D .* got a {x.dim()}-D tensor"):
                batch_norm_act(x, *ours_running, *affine, training, momentum, eps, activation=activation)
            return
        xl = x.detach().clone().requires_grad_(True)
        y = batch_norm_act(xl, *ours_running, *affine, training, momentum, eps, activation=activation)
    xr = x.detach().clone().requires_grad_(True)
    ref_affine = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args[2:4]]
    y_ref = F.batch_norm(xr, *running, *ref_affine, training=training, momentum=momentum, eps=eps)
    if activation == "relu":
        y_ref = torch.relu(y_ref)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    for a, b in zip(ours_running, running):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    for name, a, b in zip(("input", "weight", "bias"), [xl] + affine, [xr] + ref_affine):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64], msg=lambda m: f"{name}.grad: {m}")


def test_the_tables_leave_this_process_alone():
    """The tables come from a child process: torch.testing._internal, which freezes
    torch.backends flags and loads its own hypothesis profile on import, is never
    imported into the test process."""
    mods = ("common_utils", "common_modules", "common_methods_invocations", "common_device_type")
    assert not [m for m in mods if f"torch.testing._internal.{m}" in sys.modules]
    assert not torch.backends.flags_frozen()
