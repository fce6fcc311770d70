"""Every Triton kernel fastres launches compiles for real GPUs (sm_90, sm_80), without one.

The interpreter (every other Triton test here) never runs Triton's compiler.
tools/aot_compile.py records the launches the launchers of kernels/ make (TRITON_INTERPRET
unset, ``JITFunction.run`` intercepted, nothing runs), replays each through Triton's own
binder/specialisation into ``ASTSource`` and compiles it down to a cubin (ptxas),
checking shared memory, registers and the tensor-core instructions of the conv kernels.
Run in a subprocess: this process imported the kernels under the interpreter.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
KERNEL_FILES = ("_kernels.py", "_launch.py", "_conv.py", "_conv_bwd.py")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None
                       or importlib.util.find_spec("triton.backends.nvidia") is None,
                       reason="triton with its NVIDIA backend is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="on a GPU the gpu-marked tests compile and run every kernel with the real JIT"),
]


def _tool(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _launched_kernels():
    """Names of the @triton.jit functions of kernels/ that a launcher launches
    (``kernel[grid](...)`` or ``launch(kernel)[grid](...)``, directly or through
    ``triton.autotune``)."""
    jit, launched = set(), set()
    for f in KERNEL_FILES:
        src = open(os.path.join(ROOT, "kernels", f)).read()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                jit.add(node.name)
        launched |= set(re.findall(r"(\w+)\[[^\]\n]*\]\(", src))
        launched |= set(re.findall(r"launch\((?:K\.)?(\w+)\)\[", src))  # launch([K.]kernel)[grid](...): the triton_op hook
        launched |= set(re.findall(r'\("\w+", _\w+, (_\w+kernel)', src))  # the autotuned ones
    return {k for k in launched if k in jit}


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "list.json"
    r = _tool("--list", "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(out.read_text())["results"]


def test_every_launched_kernel_is_in_the_compile_set(listing):
    """The recorded launches cover every kernel the launchers launch, on both archs
    (a new kernel without a scenario in tools/aot_compile.py fails here)."""
    want = _launched_kernels()
    assert {"_stats_kernel", "_stats_finalize", "_act_kernel", "_bwd_kernel", "_bwd_finalize",
            "_conv_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel"} <= want, want
    for arch in (90, 80):
        got = {r["kernel"] for r in listing if r["arch"] == arch}
        assert got == want, f"sm_{arch}: missing {want - got}, unexpected {got - want}"


def test_compile_set_has_the_jit_specialisation(listing):
    """Replayed through Triton's binder: pointer dtypes of every dtype, the launchers'
    constexprs, and both the tuner's candidates and the launches outside tuning."""
    sm90 = [r for r in listing if r["arch"] == 90]
    ptrs = {t for r in sm90 for t in r["signature"].values() if t.startswith("*")}
    assert {"*bf16", "*fp16", "*fp32", "*fp64"} <= ptrs, ptrs
    conv = [r for r in sm90 if r["kernel"] == "_conv_fwd_kernel"]
    # channels_last: unit channel strides specialised to constexpr 1 by the JIT
    assert any(r["signature"]["sxc"] == "constexpr" for r in conv)
    assert any(r["signature"]["sxc"] == "i32" for r in conv)  # NCHW inputs
    for flag in ("HAS_PRO", "STATS", "HAS_RES", "RELU", "HAS_BIAS"):
        assert any(flag in r["what"].split("|")[0].split() for r in conv), flag
        assert any(flag not in r["what"].split("|")[0].split() for r in conv), flag
    assert any(r["candidate"] for r in sm90) and any(r["required"] for r in sm90)
    for kernel in ("_act_kernel", "_bwd_kernel", "_stats_kernel"):  # both layouts
        cl = {" CL " in f" {r['what'].split('|')[0]} " for r in sm90 if r["kernel"] == kernel}
        assert cl == {True, False}, kernel


def test_quick_set_compiles_for_hopper_and_ampere():
    """CI's subset: every kernel for sm_90 (BN kernels of both layouts in bf16 and fp64;
    the conv kernels with every flag on in bf16, fp32, fp64, the default and the
    largest tiling), the conv kernels for sm_80 -- ptx and cubin, shared memory and
    registers within the limits, wgmma (sm_90) / mma.sync (sm_80) and cp.async for bf16."""
    r = _tool("--quick")
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    lines = r.stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith("FAIL")], r.stdout
    ok = [ln for ln in lines if ln.startswith("ok  ")]
    for arch in (90, 80):
        for kernel in ("_conv_fwd_kernel[bf16]", "_dgrad_kernel[bf16]", "_wgrad_kernel[bf16]"):
            assert any(f"sm_{arch} {kernel}" in ln for ln in ok), (arch, kernel, r.stdout)
    for kernel in ("_stats_kernel", "_stats_finalize", "_act_kernel", "_bwd_kernel", "_bwd_finalize"):
        assert any(f"sm_90 {kernel}[" in ln for ln in ok), (kernel, r.stdout)
    assert re.search(r"passed: 0 failure\(s\), \d+ compilations", r.stdout), r.stdout


def test_torch_mutation_analysis_of_every_launch():
    """The triton_op variant (fastres/_triton_ops.py) hands every kernel to
    torch.library.wrap_triton, which finds the tensors a kernel writes by compiling it to
    Triton IR; if that compile fails torch warns and counts every tensor argument as
    written (AOTAutograd then sees backward inputs "mutated"). On the installed torch /
    Triton (2.14 / 3.8 here; 2.11 / 3.6, the GPU machine's, in the gpustack leg, where every
    non-tensor argument is made a constant for that compile) the analysis must succeed
    for every distinct launch the launchers make and name only the kernel's outputs."""
    r = _tool("--mutations", timeout=600)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    m = re.search(r"mutations: (\d+) distinct launches \((.*)\), 0 failure\(s\)", r.stdout)
    assert m and int(m.group(1)) >= 100, r.stdout[-4000:]
    for kernel in ("_stats_kernel", "_stats_finalize", "_act_kernel", "_bwd_kernel", "_bwd_finalize",
                   "_conv_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel"):
        assert kernel in m.group(2), (kernel, m.group(2))
