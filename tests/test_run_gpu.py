"""benchmarks/run_gpu.sh — the one command for the lent GPU machine — checked on the CPU.

The dry run (``FASTRES_GPU_DRY_RUN=1``) runs the quick profile's steps at tiny sizes on
the CPU: it proves the plumbing (every step runs and is recorded, timeouts and the
budget hold, exactly three files come back in the layout docs/GPU.md describes), not
the GPU figures. ``benchmarks/gpu_summary.py`` (the key figures of summary.txt) is
checked on synthetic inputs.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_gpu.sh")
QUICK_STEPS = ["env", "build", "info", "tests", "check", "bandwidth", "bench", "plot"]
OUT_FILES = ["logs.tar.gz", "results.tar.gz", "summary.txt"]

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_summary  # noqa: E402


def _run(out, *args, env=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RUN_GPU_TIMEOUT_", "FASTRES_GPU_"))}
    e.update(FASTRES_GPU_DRY_RUN="1", PYTHON=sys.executable)
    e.update(env or {})
    return subprocess.run(["bash", SCRIPT, str(out), *args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _steps(summary: str):
    """{step: (rc, [figure lines])} from summary.txt."""
    steps, cur = {}, None
    for line in summary.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("    "):
            assert cur is not None, line
            steps[cur][1].append(line.strip())
            continue
        m = re.match(r"^(\S+)\s+rc=(\S+)\s+(\d+)s", line)
        assert m, f"unexpected summary line: {line!r}"
        cur = m.group(1)
        steps[cur] = (m.group(2), [])
    return steps


@pytest.mark.slow
def test_dry_run_quick_profile_layout(tmp_path):
    out = tmp_path / "out"
    r = _run(out, "quick")
    assert r.returncode == 0, r.stdout[-6000:]
    assert sorted(os.listdir(out)) == OUT_FILES, r.stdout[-3000:]

    summary = (out / "summary.txt").read_text()
    steps = _steps(summary)
    assert list(steps) == QUICK_STEPS, summary
    for name, (rc, _) in steps.items():
        assert rc == "0", f"{name}: rc={rc}\n{summary}"
    figs = {k: " ".join(v) for k, (_, v) in steps.items()}
    assert "torch" in figs["env"] and "python" in figs["env"]
    assert "cpu: backend cpp" in figs["info"]
    m = re.search(r"passed (\d+), failed (\d+), errors (\d+)", figs["tests"])
    assert m and int(m.group(1)) > 0 and m.group(2) == "0" and m.group(3) == "0", figs["tests"]
    assert re.search(r"PASS \d+", figs["check"]) and "FAIL" not in figs["check"], figs["check"]
    assert "GB/s" in figs["bandwidth"], figs["bandwidth"]
    assert re.search(r"torchvision [0-9.]+ img/s \(1\.00x\)", figs["bench"]), figs["bench"]

    with tarfile.open(out / "results.tar.gz") as t:
        names = [n for n in t.getnames() if t.getmember(n).isfile()]
    assert names and all(n.startswith("cpu-dryrun/") and n.count("/") == 1 for n in names), names
    base = [n.split("/", 1)[1] for n in names]
    for pattern in (r"bench_resnet18_cpu_fp32_b2_32px_\d{4}-\d\d-\d\d\.(json|csv|txt|png)",
                    r"check_cpu-dryrun_fp32_\d{4}-\d\d-\d\d\.(json|txt)",
                    r"benchmarks_cpu-dryrun_fp32_b8_bandwidth_\d{4}-\d\d-\d\d\.json",
                    r"README\.md"):
        assert any(re.fullmatch(pattern, b) for b in base), (pattern, base)

    with tarfile.open(out / "logs.tar.gz") as t:
        logs = set(t.getnames())
        info_name = next(n for n in logs if re.fullmatch(r"logs/info_cpu-dryrun_\d{4}-\d\d-\d\d\.json", n))
        info = json.load(t.extractfile(info_name))
    for step in QUICK_STEPS:
        assert f"logs/{step}.log" in logs, (step, sorted(logs))
    for extra in ("logs/env.txt", "logs/junit_tests.xml", "logs/run.log"):
        assert extra in logs, (extra, sorted(logs))
    assert info["devices"]["cpu"]["available"]["cpp"] is True


def test_step_timeout_is_recorded_and_the_run_still_packs(tmp_path):
    out = tmp_path / "out"
    r = _run(out, "quick", "info", "plot", env={"RUN_GPU_TIMEOUT_info": "0.01", "RUN_GPU_TIMEOUT_plot": "0.02"},
             timeout=300)
    assert r.returncode != 0, r.stdout[-3000:]
    assert sorted(os.listdir(out)) == OUT_FILES
    steps = _steps((out / "summary.txt").read_text())
    assert {k: v[0] for k, v in steps.items()} == {"info": "124", "plot": "124"}
    assert (out / "summary.txt").read_text().count("TIMEOUT") == 2
    with tarfile.open(out / "logs.tar.gz") as t:
        assert {"logs/info.log", "logs/plot.log", "logs/run.log"} <= set(t.getnames())


def test_spent_budget_skips_steps(tmp_path):
    out = tmp_path / "out"
    r = _run(out, "quick", "env", "info", env={"FASTRES_GPU_BUDGET": "1"}, timeout=120)
    assert r.returncode != 0
    assert sorted(os.listdir(out)) == OUT_FILES
    text = (out / "summary.txt").read_text()
    steps = _steps(text)
    assert {k: v[0] for k, v in steps.items()} == {"env": "skip", "info": "skip"}, text
    assert text.count("budget spent") == 2


def test_real_run_names_the_results_folder_like_fastres_bench(tmp_path):
    # Not a dry run (no step runs: no budget): the results folder is named by
    # fastres.bench.device_slug, read from the source before fastres is installed.
    import torch

    from fastres.bench import device_slug
    out = tmp_path / "out"
    r = _run(out, "quick", "env", env={"FASTRES_GPU_DRY_RUN": "0", "FASTRES_GPU_BUDGET": "1"}, timeout=120)
    assert "budget spent" in r.stdout, r.stdout[-3000:]
    slug = device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert f"# device: {slug} " in (out / "summary.txt").read_text()
    with tarfile.open(out / "results.tar.gz") as t:
        assert t.getnames() == [slug]


def test_full_profile_needs_a_known_part(tmp_path):
    r = _run(tmp_path / "out", "full", "nonsense", timeout=60)
    assert r.returncode == 2
    assert "full needs a PART" in r.stdout and "bench-variants" in r.stdout and "conv-bwd" in r.stdout
    assert "12|triton-op" in r.stdout


# ----------------------------------------------------------------------------- gpu_summary
def test_summary_junit_counts_and_failures(tmp_path):
    (tmp_path / "junit_tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" '
        'skipped="1" time="12.5">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_ok2"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="z"/></testcase>'
        '</testsuite></testsuites>')
    lines = gpu_summary.figures("tests", str(tmp_path), str(tmp_path))
    assert lines[0].startswith("passed 2, failed 1, errors 1, skipped 1 (of 5")
    assert "tests.test_a::test_bad" in lines[1] and "tests.test_b::test_err" in lines[1]
    assert gpu_summary.figures("tests-all", str(tmp_path), str(tmp_path)) == [
        "no junit xml (pytest did not finish?)"]


def test_summary_build_times_from_ninja_status(tmp_path):
    (tmp_path / "build.log").write_text(
        "fastres: building _C with CPU kernels + CUDA kernels for sm_90 (CUDA_HOME=/usr/local/cuda, "
        "TORCH_CUDA_ARCH_LIST=9.0)\n"
        "  [1/3 20.5s] c++ -MMD -c /r/csrc/ops.cpp -o /r/build/ops.o -O3\n"
        "  [2/3 71.2s] /usr/local/cuda/bin/nvcc -c /r/csrc/cuda/ops_cuda.cu -o /r/build/ops_cuda.o\n"
        "  [3/3 73.0s] c++ /r/build/ops.o /r/build/ops_cuda.o -shared -o _C.so\n")
    lines = gpu_summary.figures("build", str(tmp_path), str(tmp_path))
    assert lines[0] == "ninja: 3 steps, 73.0 s to the last one; ops_cuda.cu done at 71.2 s"
    assert "built for TORCH_CUDA_ARCH_LIST=9.0" in lines


def test_summary_bench_and_bandwidth_figures(tmp_path):
    rows = [dict(contender="torchvision", mode="train", status="ok", img_per_s=1000.0, speedup_vs_eager=1.0),
            dict(contender="fastres[triton]", mode="train", status="ok", img_per_s=1250.0, speedup_vs_eager=1.25),
            dict(contender="fastres[cuda]", mode="train", status="error: boom", img_per_s=None)]
    meta = dict(settings=dict(model="resnet50", batch_size=256, image_size=224, dtype="bf16", channels_last=True))
    (tmp_path / "bench_resnet50_h200_bf16_b256_224px_2026-12-01.json").write_text(
        json.dumps(dict(meta=meta, rows=rows)))
    lines = gpu_summary.figures("bench", str(tmp_path), str(tmp_path))
    assert lines[0].startswith("resnet50 b256 224px bf16 NHWC")
    assert lines[1].strip() == ("train: torchvision 1000.0 img/s (1.00x) | fastres[triton] 1250.0 img/s (1.25x) | "
                        "fastres[cuda] error: boom")
    bm = dict(benchmarks=[
        dict(group="bn_act_train 256x256x56x56 NHWC bf16", name="a",
             extra_info={"impl": "aten reference", "GB/s": 1500.4}),
        dict(group="bn_act_train 256x256x56x56 NHWC bf16", name="b",
             extra_info={"impl": "fastres[triton]", "GB/s": 3210.0})])
    (tmp_path / "benchmarks_h200_bf16_b256_bandwidth_2026-12-01.json").write_text(json.dumps(bm))
    lines = gpu_summary.figures("bandwidth", str(tmp_path), str(tmp_path))
    assert lines[1].strip() == "bn_act_train 256x256x56x56 NHWC bf16 [GB/s]: aten reference 1500 | fastres[triton] 3210"


@pytest.mark.slow
def test_dry_run_triton_op_part(tmp_path):
    """full part 12: the triton_op tests and the compiled-training benchmark (which skips,
    with its reason, on the CPU), packed into the three files."""
    out = tmp_path / "out"
    r = _run(out, "full", "triton-op")
    assert r.returncode == 0, r.stdout[-6000:]
    assert sorted(os.listdir(out)) == OUT_FILES, r.stdout[-3000:]
    steps = _steps((out / "summary.txt").read_text())
    assert list(steps) == ["env", "build", "info", "tests-triton-op", "benchmarks-triton-op", "plot"], steps
    assert all(rc == "0" for rc, _ in steps.values()), steps
    m = re.search(r"passed (\d+), failed (\d+), errors (\d+)", " ".join(steps["tests-triton-op"][1]))
    assert m and int(m.group(1)) > 0 and m.group(2) == "0" and m.group(3) == "0", steps["tests-triton-op"]
    with tarfile.open(out / "logs.tar.gz") as t:
        log = t.extractfile("logs/benchmarks-triton-op.log").read().decode()
    assert "inductor cannot compile user-defined Triton kernels on CPU tensors" in log or "skipped" in log, log
