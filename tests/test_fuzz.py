"""Fuzzed parity (issue #5): Hypothesis draws shapes, dtypes (incl. bf16/fp16 with fp32
or same-dtype parameters), layouts of the input, the residual and the incoming gradient
(contiguous, channels_last, permuted, sliced, channel-sliced channels_last, expanded,
expanded-then-cloned), momentum (incl. None, 0 and 1), eps, affine,
track_running_stats, residual on/off, activation relu/none, 0-2 training steps and an
eval step, and checks each backend against nn.BatchNorm2d + add + ReLU: output, grads
of input / residual / weight / bias, running_mean, running_var, num_batches_tracked.
Drawing N*H*W == 1 in training checks that both raise PyTorch's ValueError.

Budget (profile ``fastres-ci``, the default: 300 module examples in all, plus 100 of
the functional ``affine_act``) is split over the CPU backends by ``SHARE`` below; the
Triton interpreter is the slowest, so it gets fewer. On a CUDA device (``gpu`` marker)
the ``cuda`` and ``triton`` backends get ``GPU_SHARE`` of it on top (their
examples are cheap there, but every new shape may compile new Triton kernels). ``FASTRES_FUZZ_PROFILE=long``
runs 10x as many with a fresh seed; ``FASTRES_FUZZ_SEED=<int>`` replays a run. The
seed is printed in the pytest header and in every failure. See the block at the end of
tests/conftest.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note, seed, settings
from hypothesis import strategies as st

from conftest import FUZZ_PROFILE, FUZZ_SEED, REFERENCE_OPS, require_backend, targets
from parity import LAYOUTS, AffineCase, Case, check_affine_case, check_module_case

TARGETS = targets()  # torch, triton, cpp, reference_ops on the CPU; cuda, triton on CUDA

# Share of the profile's max_examples per CPU backend (sums to 1: 300 examples in ci).
# (Interpreted Triton costs ~2.8 s an example, the others ~0.1 s: its fixed cases are
# tests/test_triton_kernels.py's, and the same kernels are fuzzed compiled on a GPU.)
SHARE = {"cpp": 0.50, REFERENCE_OPS: 0.25, "triton": 0.10, "torch": 0.15}
# On a CUDA device: 30 / 6 module examples (10 / 2 affine_act) in ci. The cuda backend's
# examples cost milliseconds; each Triton example compiles ~8 new kernel specializations
# (~0.3 s each) -- the Triton kernels' fixed cases are the rest of the gpu selection.
GPU_SHARE = {"cuda": 0.10, "triton": 0.02}
AFFINE_SHARE = 1 / 3  # functional affine_act: a third of the module budget on top

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def budget(backend: str, device: str = "cpu", share: float = 1.0) -> int:
    part = SHARE[backend] if device == "cpu" else GPU_SHARE[backend]
    return max(1, math.ceil(settings.default.max_examples * part * share))


@st.composite
def module_cases(draw) -> Case:
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 70)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    dtype = draw(st.sampled_from(DTYPES))
    pdtype = draw(st.sampled_from([torch.float32, dtype])) if dtype in (torch.bfloat16, torch.float16) else None
    train_steps = draw(st.integers(0, 2))
    eval_step = draw(st.booleans()) if train_steps else True
    # data scale and an offset relative to it (mild, so fp32 accumulation is not the
    # limit: ill-conditioned data is tests/test_edge_cases.py's job)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    offset = draw(st.sampled_from([0.0, 0.5, -3.0])) * scale
    return Case(
        shape=shape, dtype=dtype, param_dtype=pdtype,
        layout=draw(st.sampled_from(LAYOUTS)),
        res_layout=draw(st.one_of(st.none(), st.sampled_from(LAYOUTS))),
        grad_layout=draw(st.sampled_from(("contiguous", "channels_last", "permuted"))),
        activation=draw(st.sampled_from(("relu", "none"))),
        momentum=draw(st.one_of(st.none(), st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0))),
        eps=draw(st.one_of(st.sampled_from([1e-5, 1e-3, 0.1]), st.floats(1e-6, 1.0))),
        affine=draw(st.booleans()), track=draw(st.booleans()),
        train_steps=train_steps, eval_step=eval_step, scale=scale, offset=offset,
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


@st.composite
def affine_cases(draw) -> AffineCase:
    shape = (draw(st.integers(0, 4)), draw(st.integers(1, 70)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    dtype = draw(st.sampled_from(DTYPES))
    pdtypes = [torch.float32, dtype] if dtype in (torch.bfloat16, torch.float16) else [dtype]
    return AffineCase(
        shape=shape, dtype=dtype,
        layout=draw(st.sampled_from(LAYOUTS)),
        res_layout=draw(st.one_of(st.none(), st.sampled_from(LAYOUTS))),
        scale=draw(st.one_of(st.none(), st.sampled_from(pdtypes))),
        shift=draw(st.one_of(st.none(), st.sampled_from(pdtypes))),
        activation=draw(st.sampled_from(("relu", "none"))),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _replay_hint(backend: str, device: str, n: int) -> str:
    k = backend if device == "cpu" else f"gpu-{backend}"
    return (f"[fuzz {backend} on {device}: profile={FUZZ_PROFILE}, {n} examples, seed={FUZZ_SEED}; replay with "
            f"FASTRES_FUZZ_PROFILE={FUZZ_PROFILE} FASTRES_FUZZ_SEED={FUZZ_SEED} "
            f"pytest tests/test_fuzz.py -k {k}]")


def _run(check, backend: str, device: str, n: int) -> None:
    hint = _replay_hint(backend, device, n)
    print(hint)  # shown with -s / -rP, and in the captured output of a failure
    try:
        check()
    except Exception as e:
        e.add_note(hint)  # the seed is in every failure message
        raise


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuzz_module_parity(backend, device):
    if backend != REFERENCE_OPS:
        require_backend(backend, device)
    n = budget(backend, device)

    @seed(FUZZ_SEED)
    @settings(max_examples=n)
    @given(case=module_cases())
    def check(case):
        note(f"case = {case!r}")
        check_module_case(backend, case, device=device)

    _run(check, backend, device, n)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuzz_affine_act(backend, device):
    if backend != REFERENCE_OPS:
        require_backend(backend, device)
    n = budget(backend, device, AFFINE_SHARE)

    @seed(FUZZ_SEED + 1)
    @settings(max_examples=n)
    @given(case=affine_cases())
    def check(case):
        note(f"case = {case!r}")
        check_affine_case(backend, case, device=device)

    _run(check, backend, device, n)
