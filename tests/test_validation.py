"""Bad input gets a clear TypeError/ValueError naming the tensor, the expected and the
actual dtype/device/shape, on every backend (one validation layer in front of all), on
the CPU and (``gpu`` marker) with CUDA inputs for the cuda and triton backends."""
from __future__ import annotations

import pytest
import torch

import fastres
from fastres.functional import affine_act, batch_norm_act
from fastres.nn import BatchNormAct2d

from conftest import run_on, targets

TARGETS = targets()


def _args(c=3, device="cpu"):
    return dict(running_mean=torch.zeros(c, device=device), running_var=torch.ones(c, device=device),
                weight=torch.ones(c, device=device), bias=torch.zeros(c, device=device))


def _to(v, device):
    """Tensors (not on the meta device) to ``device``; anything else as is."""
    return v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v


BAD = [
    # (description, input, overrides, exception, message regex; {dev} is the input's device)
    ("integer input", torch.ones(2, 3, 4, 4, dtype=torch.int64), {}, TypeError,
     r"input must be float64, float32, bfloat16 or float16, got int64"),
    ("3-D input", torch.randn(3, 4, 4), {}, ValueError, r"expected input to be 4-D .* got a 3-D tensor of shape \(3, 4, 4\)"),
    ("5-D input", torch.randn(2, 3, 4, 4, 1), {}, ValueError, r"got a 5-D tensor"),
    ("weight dtype", torch.randn(2, 3, 4, 4), {"weight": torch.ones(3, dtype=torch.float64)}, TypeError,
     r"weight has dtype float64 but input is float32; expected float32"),
    ("bf16 input, fp16 bias", torch.randn(2, 3, 4, 4).bfloat16(), {"bias": torch.zeros(3).half()}, TypeError,
     r"bias has dtype float16 but input is bfloat16; expected bfloat16 or float32"),
    ("weight shape", torch.randn(2, 3, 4, 4), {"weight": torch.ones(4)}, ValueError,
     r"weight must have shape \(3,\) to match the input's 3 channels, got \(4,\)"),
    ("running_var shape", torch.randn(2, 3, 4, 4), {"running_var": torch.ones(3, 1)}, ValueError,
     r"running_var must have shape \(3,\)"),
    ("residual shape", torch.randn(2, 3, 4, 4), {"residual": torch.randn(2, 3, 4, 5)}, ValueError,
     r"residual must have the output's shape \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"),
    ("residual dtype", torch.randn(2, 3, 4, 4), {"residual": torch.randn(2, 3, 4, 4, dtype=torch.float64)}, TypeError,
     r"residual has dtype float64 but input is float32"),
    ("weight on meta device", torch.randn(2, 3, 4, 4), {"weight": torch.ones(3, device="meta")}, ValueError,
     r"weight is on meta but input is on {dev}; expected both on the same device"),
    ("residual on meta device", torch.randn(2, 3, 4, 4), {"residual": torch.randn(2, 3, 4, 4, device="meta")},
     ValueError, r"residual is on meta but input is on {dev}"),
    ("one running stat", torch.randn(2, 3, 4, 4), {"running_var": None}, ValueError,
     r"running_mean and running_var must both be tensors or both be None"),
    ("activation", torch.randn(2, 3, 4, 4), {"activation": "gelu"}, ValueError, r"activation must be one of"),
    ("not a tensor", [[1.0]], {}, TypeError, r"input must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("desc,x,over,exc,msg", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_input_functional(backend, device, desc, x, over, exc, msg, training):
    kw = _args(device=device)
    kw.update({k: _to(v, device) for k, v in over.items()})
    x = _to(x, device)
    dev = str(x.device) if isinstance(x, torch.Tensor) else device
    msg = msg.replace("{dev}", dev)
    with run_on(backend, device):
        with pytest.raises(exc, match=msg):
            batch_norm_act(x, kw.pop("running_mean"), kw.pop("running_var"), training=training, **kw)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_one_value_per_channel_in_training_raises_like_pytorch(backend, device):
    x = torch.randn(1, 3, 1, 1, device=device)
    with pytest.raises(ValueError) as ref:
        torch.nn.BatchNorm2d(3).to(device)(x)
    bn = BatchNormAct2d(3).to(device)
    with run_on(backend, device):
        with pytest.raises(ValueError) as ours:
            bn(x)
        assert str(ours.value) == str(ref.value)
        bn.eval()
        assert bn(x).shape == x.shape  # batch 1 in eval is fine, as in PyTorch


def test_module_channel_count_and_rank():
    bn = BatchNormAct2d(4)
    with pytest.raises(ValueError, match=r"input has 3 channels \(shape \(2, 3, 5, 5\)\), expected num_features=4"):
        bn(torch.randn(2, 3, 5, 5))
    bn_noaff = BatchNormAct2d(4, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match="expected num_features=4"):
        bn_noaff(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        bn(torch.randn(2, 4))


def test_eval_without_running_stats_needs_them():
    with pytest.raises(ValueError, match="must be given when training=False"):
        batch_norm_act(torch.randn(2, 3, 4, 4), None, None, training=False)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_affine_act_validation(backend, device):
    x = torch.randn(2, 3, 4, 4, device=device)
    with run_on(backend, device):
        with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
            affine_act(x, torch.ones(2, device=device))
        with pytest.raises(TypeError, match="shift has dtype float64 but input is float32"):
            affine_act(x, None, torch.zeros(3, dtype=torch.float64, device=device))
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            affine_act(x, None, None, torch.randn(2, 3, 4, 3, device=device))


def test_activation_names():
    assert BatchNormAct2d(3, activation=None).activation == "none"
    assert BatchNormAct2d(3, activation="ReLU").activation == "relu"
    assert "activation=relu" in repr(BatchNormAct2d(3))
