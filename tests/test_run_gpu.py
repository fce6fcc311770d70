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
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_gpu.sh")
QUICK_STEPS = ["env", "build", "info", "tests", "check", "bandwidth", "bench", "plot"]
OUT_FILES = ["logs.tar.gz", "results.tar.gz", "summary.txt"]

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_summary  # noqa: E402
import run_control  # noqa: E402  (tests/run_control.py: result log, shards, watchdog)


def _run(out, *args, env=None, timeout=600):
    # (PYTEST_XDIST_*: a worker's, were the suite run under pytest-xdist; inherited, they would
    # switch pytest-benchmark off in the script's own pytest runs)
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("RUN_GPU_TIMEOUT_", "FASTRES_GPU_", "PYTEST_XDIST_"))}
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
    for extra in ("logs/env.txt", "logs/run.log"):
        assert extra in logs, (extra, sorted(logs))
    for shard in (0, 1):  # the dry run's tests step: 2 shards, each with its log, result log, junit xml
        for f in (f"logs/tests.shard{shard}.log", f"logs/tests.shard{shard}.jsonl", f"logs/junit_tests.shard{shard}.xml"):
            assert f in logs, (f, sorted(logs))
    assert re.search(r"shard 0/2: \d+ of \d+ run, finished, exit 0", figs["tests"]), figs["tests"]
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
    assert "12|cudnn" in r.stdout
    assert "13|triton-op" in r.stdout
    assert "15|bench-conv-fp16" in r.stdout


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


def test_summary_bench_and_bandwidth_name_an_unreadable_json(tmp_path):
    (tmp_path / "bench_resnet50_broken.json").write_text("{not json")
    (tmp_path / "benchmarks_broken.json").write_text("")
    bench = gpu_summary.figures("bench", str(tmp_path), str(tmp_path))
    assert len(bench) == 1 and bench[0].startswith("unreadable bench_resnet50_broken.json: "), bench
    bandwidth = gpu_summary.figures("bandwidth", str(tmp_path), str(tmp_path))
    assert len(bandwidth) == 1 and bandwidth[0].startswith("unreadable benchmarks_broken.json: "), bandwidth


# ----------------------------------------------------------------------------- tests/run_control.py
# A test file of its own, run by a pytest subprocess with only run_control as plugin (no
# torch, no fastres: fast). Its tests cover every outcome the result log records.
DEMO = """
import json, os, time, pytest

def test_a_passes():
    pass

def test_b_fails():
    assert 1 + 1 == 3, "arithmetic is broken"

def test_c_skips():
    pytest.skip("no CUDA device")

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_d_errors(broken):
    pass

@pytest.mark.parametrize("k", range(6))
def test_e_resnet50_model(k):
    pass

def test_f_waits():
    # WAIT=watchdog: until the watchdog has fired; WAIT=forever: until killed
    what, log = os.environ.get("WAIT", ""), os.environ.get("FASTRES_RESULT_LOG", "")
    deadline = time.time() + (60 if what == "watchdog" else 600 if what == "forever" else 0)
    while time.time() < deadline:
        if what == "watchdog" and '"ev": "watchdog"' in open(log).read():
            return
        time.sleep(0.05)
    assert what != "watchdog", "the watchdog did not fire within 60 s"
"""


def _demo_pytest(tmp_path, *args, env=None, wait=True):
    (tmp_path / "test_demo.py").write_text(DEMO)
    e = {k: v for k, v in os.environ.items() if not k.startswith("FASTRES_")}
    e.update(PYTHONPATH=os.path.join(ROOT, "tests"), **(env or {}))
    cmd = [sys.executable, "-m", "pytest", "-p", "run_control", "-p", "no:cacheprovider", "-q", "test_demo.py", *args]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = p.communicate(timeout=120)
        return p.returncode, out
    return p


def _collected(out: str):
    return [ln.strip() for ln in out.splitlines() if ln.startswith("test_demo.py::")]


def test_shards_are_disjoint_cover_the_selection_and_run_models_last(tmp_path):
    rc, out = _demo_pytest(tmp_path, "--collect-only")
    assert rc == 0, out
    full = _collected(out)
    assert len(full) == 11, out
    shards = []
    for i in range(3):
        rc, out = _demo_pytest(tmp_path, "--collect-only", env={"FASTRES_SHARD": f"{i}/3"})
        assert rc == 0, out
        shards.append(_collected(out))
    flat = [n for s in shards for n in s]
    assert sorted(flat) == sorted(full) and len(set(flat)) == len(flat), shards
    assert max(map(len, shards)) - min(map(len, shards)) <= 1, shards
    for s in shards:  # cost order: the whole-model cases come after every op-level one in each shard
        tiers = [run_control.cost_tier(n) for n in s]
        assert tiers == sorted(tiers) and tiers[-1] == 2, s
        assert sum("resnet50" in n for n in s) == 2, s  # and they are dealt evenly
    # -k/-m first, then the shards: the shards of a selection cover exactly that selection
    sel = []
    for i in range(2):
        rc, out = _demo_pytest(tmp_path, "--collect-only", "-k", "resnet50", env={"FASTRES_SHARD": f"{i}/2"})
        sel += _collected(out)
    assert sorted(sel) == sorted(n for n in full if "resnet50" in n)
    rc, out = _demo_pytest(tmp_path, "--collect-only", env={"FASTRES_SHARD": "3/3"})
    assert rc != 0 and "FASTRES_SHARD must be I/N" in out, out


def test_cost_tier_orders_ops_blocks_models():
    assert run_control.cost_tier("tests/test_edge_cases.py::test_nan[gpu-cuda]") == 0
    assert run_control.cost_tier("tests/test_cudnn_conv.py::test_bottleneck_with_cudnn[bf16]") == 1
    assert run_control.cost_tier("tests/test_cudnn_conv.py::test_resnet50_with_cudnn_vs_torchvision[train]") == 2
    assert run_control.cost_tier("tests/test_models.py::test_small_resnet_each_backend[gpu-cuda]") == 2


@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_result_log_survives_a_killed_run(tmp_path, sig):
    """The step's timeout sends TERM (pytest stops, prints its summary, writes its junit
    xml), then KILL: either way the outcomes logged so far reach the summary, and the
    test that was running is named."""
    log = tmp_path / "tests.shard0.jsonl"
    p = _demo_pytest(tmp_path, f"--junitxml={tmp_path / 'junit_tests.shard0.xml'}", wait=False,
                     env={"FASTRES_SHARD": "0/1", "FASTRES_RESULT_LOG": str(log), "WAIT": "forever"})
    try:
        def started() -> bool:  # test_f_waits's "start" event (the "session" event names every test up front)
            if not log.exists():
                return False
            for line in log.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line being written
                    continue
                if rec.get("ev") == "start" and rec.get("nodeid", "").endswith("test_f_waits"):
                    return True
            return False
        deadline = time.time() + 120
        while time.time() < deadline and not started():
            time.sleep(0.1)
        assert started(), log.read_text() if log.exists() else "no result log"
        p.send_signal(getattr(signal, f"SIG{sig}"))
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    lines = gpu_summary.figures("tests", str(tmp_path), str(tmp_path))
    text = "\n".join(lines)
    # (cost order: the six resnet50 cases come after test_f_waits, so they never ran)
    assert lines[0].startswith("passed 1, failed 1, errors 1, skipped 1 (4 run of 11 selected"), text
    state = "interrupted" if sig == "TERM" else "killed (no finish line)"
    assert re.search(rf"shard 0/1: 4 of 11 run, {re.escape(state)}.*was running test_demo.py::test_f_waits", text), text
    assert "FAILED test_demo.py::test_b_fails: AssertionError: arithmetic is broken" in text, text
    assert "ERROR test_demo.py::test_d_errors: setup: RuntimeError: setup broke" in text, text
    assert "1x no CUDA device" in text and "not run (7" in text, text
    if sig == "TERM":  # the stacks at the signal, pytest's own summary and the junit xml
        assert "test_f_waits" in out and "KeyboardInterrupt" in out, out[-3000:]
        assert (tmp_path / "junit_tests.shard0.xml").exists()


def test_watchdog_dumps_a_slow_tests_stacks_and_lets_it_run(tmp_path):
    log = tmp_path / "r.jsonl"
    rc, out = _demo_pytest(tmp_path, "-k", "waits", "-s",
                           env={"FASTRES_TEST_TIMEOUT": "0.5", "FASTRES_RESULT_LOG": str(log), "WAIT": "watchdog"})
    assert rc == 0, out  # the test went on and passed
    assert "[watchdog] test_demo.py::test_f_waits has run 0.5 s" in out, out
    assert re.search(r'File ".*test_demo\.py", line \d+ in test_f_waits', out), out
    ev = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["nodeid"] for e in ev if e["ev"] == "watchdog"] == ["test_demo.py::test_f_waits"]


def test_summary_of_result_logs_warns_and_tolerates_a_torn_line(tmp_path):
    def write(i, digest, *extra):
        rows = [dict(ev="session", shard=f"{i}/2", digest=digest, items=[f"t.py::a{i}", f"t.py::b{i}"]),
                dict(ev="start", nodeid=f"t.py::a{i}"),
                dict(ev="report", nodeid=f"t.py::a{i}", phase="call", outcome="passed", duration=1.5), *extra]
        (tmp_path / f"tests-all.shard{i}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows) + '{"ev": "report", "nodeid": "t.py::b')  # torn by a kill
    write(0, "aaa", dict(ev="collect", nodeid="t.py", outcome="error", repr="ImportError: no triton\nmore"))
    write(1, "bbb")
    text = "\n".join(gpu_summary.figures("tests-all", str(tmp_path), str(tmp_path)))
    assert text.startswith("passed 2, failed 0, errors 1, skipped 0 (3 run of 4 selected; 2 result log(s))"), text
    assert "WARNING: the shards collected different selections" in text
    assert "collection error: t.py: ImportError: no triton" in text
    assert "not run (2, the step ended first): t.py::b0, t.py::b1" in text
    assert gpu_summary.figures("tests", str(tmp_path), str(tmp_path)) == ["no junit xml (pytest did not finish?)"]


@pytest.mark.slow
def test_dry_run_killed_tests_step_still_reports_what_finished(tmp_path):
    """A test that sleeps past the tests step's timeout: the step is recorded as TIMEOUT,
    and summary.txt still lists the outcomes of the tests that finished and names the one
    that was running; the shards' logs come back in logs.tar.gz."""
    extra = tmp_path / "extra"
    extra.mkdir()
    # (the dry run selects -k "dtype or device": the names say "device")
    (extra / "test_device_killed.py").write_text(
        "import time\n\ndef test_device_ok():\n    pass\n\n\ndef test_device_sleeps():\n    time.sleep(600)\n")
    for tmo in (25, 150):  # a loaded machine may not reach the sleeper in 25 s: once more with more time
        out = tmp_path / f"out{tmo}"
        r = _run(out, "quick", "tests", env={"RUN_GPU_TIMEOUT_tests": str(tmo), "PYTEST_ARGS": str(extra)},
                 timeout=tmo + 120)
        text = (out / "summary.txt").read_text()
        if "was running" in text:
            break
    assert r.returncode != 0
    assert sorted(os.listdir(out)) == OUT_FILES
    rc, figs = _steps(text)["tests"]
    assert rc == "124" and "TIMEOUT" in text, text
    figs = "\n".join(figs)
    assert re.search(r"was running \S*test_device_killed\.py::test_device_sleeps", figs), figs
    m = re.search(r"passed (\d+), failed 0, errors 0, skipped (\d+) \((\d+) run of (\d+) selected", figs)
    assert m and int(m.group(1)) > 0 and int(m.group(3)) == int(m.group(1)) + int(m.group(2)), figs
    assert int(m.group(4)) > int(m.group(3)), figs  # the sleeper (and whatever came after it) never finished
    with tarfile.open(out / "logs.tar.gz") as t:
        names = set(t.getnames())
    assert {"logs/tests.log", "logs/tests.shard0.jsonl", "logs/tests.shard1.jsonl",
            "logs/tests.shard0.log", "logs/tests.shard1.log"} <= names, names


def test_dry_run_signalled_from_outside_packs_the_running_step(tmp_path):
    """The device tool's own limit may signal the whole run: the running step is stopped,
    recorded as killed with what it had logged, and the three files are written."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "test_device_hangs.py").write_text("import time\n\ndef test_device_hangs():\n    time.sleep(600)\n")
    out, console = tmp_path / "out", tmp_path / "console.log"
    # (PYTEST_XDIST_*: a worker's, were the suite run under pytest-xdist; inherited, they would
    # switch pytest-benchmark off in the script's own pytest runs)
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("RUN_GPU_TIMEOUT_", "FASTRES_GPU_", "PYTEST_XDIST_"))}
    e.update(FASTRES_GPU_DRY_RUN="1", PYTHON=sys.executable, PYTEST_ARGS=str(extra))
    with open(console, "w") as f:
        p = subprocess.Popen(["bash", SCRIPT, str(out), "quick", "tests", "plot"], cwd=ROOT, env=e, stdout=f,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "== tests (timeout" not in console.read_text():
            time.sleep(0.2)
        time.sleep(3)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 143, console.read_text()[-3000:]
    finally:
        p.kill()
    assert sorted(os.listdir(out)) == OUT_FILES
    text = (out / "summary.txt").read_text()
    steps = _steps(text)
    assert list(steps) == ["tests"] and steps["tests"][0] == "killed", text  # plot never ran
    assert "signalled from outside" in text
    with tarfile.open(out / "logs.tar.gz") as t:
        names = set(t.getnames())
        run_log = t.extractfile("logs/run.log").read().decode()
    assert {"logs/tests.log", "logs/tests.shard0.log", "logs/tests.shard1.log"} <= names, names
    assert "signalled from outside during step tests" in run_log, run_log[-2000:]


@pytest.mark.slow
def test_dry_run_triton_op_part(tmp_path):
    """full part 13: the triton_op tests and the compiled-training benchmark (which skips,
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


@pytest.mark.slow
def test_dry_run_cudnn_part_surveys_the_engines_first(tmp_path):
    """full part 12 starts with the cuDNN engine survey (on the GPU: --target cuda; in the
    dry run the deviceless sm_90 query), its table in summary.txt and its JSON in the results."""
    from fastres import cudnn
    ok, why = cudnn.deviceless_available()
    if not ok:
        pytest.skip(f"deviceless cuDNN check unavailable: {why}")
    out = tmp_path / "out"
    r = _run(out, "full", "cudnn")
    assert r.returncode == 0, r.stdout[-6000:]
    summary = (out / "summary.txt").read_text()
    steps = _steps(summary)
    assert list(steps)[:4] == ["env", "build", "info", "cudnn-engines"], steps
    assert steps["cudnn-engines"][0] == "0", steps
    assert "| l1-3x3-64 | fwd:conv2 |" in summary and "totals: ok 4" in summary, summary
    with tarfile.open(out / "results.tar.gz") as t:
        names = t.getnames()
    assert any("cudnn_engines_" in n and n.endswith(".json") for n in names), names
