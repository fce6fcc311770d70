"""``python -m fastres {info,bench,check}`` and examples/train.py.

Argument handling; a tiny CPU bench run that writes the table, JSON, CSV and PNG;
``check`` passing on the CPU and failing (exit 1) when a backend is made wrong on
purpose; the training example with checkpoint save and resume. Nothing here asserts
on a timing: benchmarks measure, tests assert.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

import fastres
from fastres import _argtypes as argtypes, backends, bench, check, cli, ops

from conftest import require_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def _cpu_backends():
    return [b for b in ("torch", "cpp", "triton") if backends.available(b, "cpu")[0]]


# ============================================================================ argument handling
def test_bench_defaults_resolve_per_device():
    args = parse("bench", "--device", "cpu")
    assert args.model is None and args.batch_size is None and args.dtype is None  # resolved later
    cfg = bench.resolve_config(args)
    assert (cfg.model, cfg.batch_size, cfg.image_size, cfg.dtype) == ("resnet50", 8, 128, "fp32")
    assert cfg.channels_last is True and cfg.modes == ["train", "infer"]
    assert cfg.compile is True and cfg.num_classes == 1000
    assert cfg.out == os.path.join("benchmarks", "results", "cpu")
    gpu = bench.DEFAULTS["cuda"]
    assert (gpu["model"], gpu["batch_size"], gpu["image_size"], gpu["dtype"], gpu["channels_last"]) == \
        ("resnet50", 256, 224, "bf16", True)


def test_bench_options_parse():
    args = parse("bench", "--model", "resnext50_32x4d", "--batch-size", "4", "--image-size", "96",
                 "--dtype", "bf16", "--no-channels-last", "--mode", "infer", "--backend", "torch,cpp",
                 "--no-compile", "--iters", "3", "--warmup", "0", "--repeats", "2", "--out", "x",
                 "--device", "cpu", "--threads", "1")
    cfg = bench.resolve_config(args)
    assert cfg.model == "resnext50_32x4d" and cfg.batch_size == 4 and cfg.image_size == 96
    assert cfg.dtype == "bf16" and cfg.channels_last is False and cfg.modes == ["infer"]
    assert cfg.backends == "torch,cpp" and cfg.compile is False
    assert (cfg.iters, cfg.warmup, cfg.repeats, cfg.out) == (3, 0, 2, "x")
    assert parse("bench", "--channels-last", "--compile").channels_last is True


def test_bench_cifar_defaults():
    cfg = bench.resolve_config(parse("bench", "--model", "cifar_resnet20", "--device", "cpu"))
    assert cfg.image_size == 32 and cfg.num_classes == 10
    assert bench.parse_model("cifar_resnet110") == ("cifar", 110)


@pytest.mark.parametrize("argv", [
    ["bench", "--dtype", "fp8"],
    ["bench", "--model", "resnet9000"],
    ["bench", "--model", "cifar_resnet21"],
    ["bench", "--batch-size", "0"],
    ["bench", "--iters", "-1"],
    ["bench", "--warmup", "x"],
    ["bench", "--mode", "sideways"],
    ["bench", "--backend", "cudnn"],
    ["check", "--backend", "tpu"],
    ["nonsense"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("parse, text, message", [
    (argtypes.positive_int, "0", "expected a positive integer, got 0"),
    (argtypes.positive_int, "2.5", "expected a positive integer, got '2.5'"),
    (argtypes.nonneg_int, "-1", "expected an integer >= 0, got -1"),
    (argtypes.positive_float, "0", "expected a positive number, got '0'"),
    (argtypes.positive_float, "nan", "expected a positive number, got 'nan'"),
    (argtypes.positive_float, "-inf", "expected a positive number, got '-inf'"),
    (argtypes.positive_float, "lr", "expected a positive number, got 'lr'"),
])
def test_argument_types_say_what_they_expected_and_got(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        parse(text)


def test_argument_types_accept():
    assert argtypes.positive_int("3") == 3 and argtypes.nonneg_int("0") == 0
    assert argtypes.positive_float("0.1") == 0.1 and argtypes.positive_float("1e-3") == 1e-3


def test_bad_argument_message_reaches_the_user(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--batch-size", "0"])
    assert "argument --batch-size: expected a positive integer, got 0" in capsys.readouterr().err


def test_check_rejects_unknown_case_and_dtype(capsys):
    assert cli.main(["check", "--cases", "ops,kernels"]) == 2
    assert cli.main(["check", "--dtype", "fp8"]) == 2


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().err


# ============================================================================ info
def test_info_readable(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fused ops run on backend" in out
    for b in backends.BACKENDS:
        assert b in out
    assert fastres.backend_for(torch.device("cpu")) in out


def test_info_json_via_python_m():
    r = subprocess.run([sys.executable, "-m", "fastres", "info", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info) >= {"requested", "built", "devices", "torch"}
    assert info["devices"]["cpu"]["backend"] in backends.BACKENDS


# ============================================================================ bench
def test_tiny_bench_writes_table_json_csv_png(tmp_path, capsys):
    argv = ["bench", "--model", "resnet18", "--batch-size", "2", "--image-size", "64", "--iters", "2",
            "--warmup", "1", "--repeats", "1", "--no-compile", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "torchvision" in out and "vs torchvision" in out
    files = {os.path.splitext(f)[1]: tmp_path / f for f in os.listdir(tmp_path)}
    expected = {".txt", ".json", ".csv"}
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        expected.add(".png")
    assert set(files) == expected
    stem = files[".json"].name[:-5]
    assert "resnet18" in stem and "cpu" in stem and "fp32" in stem and "b2" in stem
    assert any(ch.isdigit() for ch in stem.split("_")[-1])  # the date

    result = json.loads(files[".json"].read_text())
    rows = result["rows"]
    meta = result["meta"]
    assert meta["settings"]["batch_size"] == 2 and meta["versions"]["torch"] == torch.__version__
    names = {r["contender"] for r in rows}
    assert "torchvision" in names
    for b in _cpu_backends():
        if b != "triton":  # the interpreter is not benchmarked
            assert f"fastres[{b}]" in names
    for r in rows:
        assert r["status"] == "ok", r
        assert r["img_per_s"] > 0 and r["ms_per_iter"] > 0 and r["peak_mem_mib"] > 0
        assert r["ms_min"] <= r["ms_per_iter"] <= r["ms_max"]
    assert {r["mode"] for r in rows} == {"train", "infer"}
    for r in rows:
        if r["contender"] == "torchvision":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)

    with open(files[".csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert [r["contender"] for r in csv_rows] == [r["contender"] for r in rows]
    assert "img/s" in files[".txt"].read_text()
    if has_mpl:
        assert files[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # benchmarks/plot.py turns the same files into the chart and the results README
    plot = _load_script("benchmarks/plot.py", "fastres_plot_script")
    if has_mpl:
        os.remove(files[".png"])  # plot.py draws it again from the CSV
    assert plot.main([str(tmp_path), "--readme"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "| torchvision | train |" in readme and "resnet18, batch 2, 64px, fp32" in readme
    if has_mpl:
        assert files[".png"].exists()


def test_plot_readme_takes_the_bn_table_from_the_file_that_has_it(tmp_path):
    """The results README's fused-BN table comes from the newest pytest-benchmark file
    that holds bn_add_relu cases, not from whichever file is newest (a kernels-only or
    conv benchmark file written after it)."""
    plot = _load_script("benchmarks/plot.py", "fastres_plot_script")

    def case(op, impl, ms):
        return {"name": f"t[{op}-{impl}]", "group": "g", "stats": {"median": ms / 1e3, "min": ms / 1e3,
                                                                 "max": ms / 1e3, "rounds": 3},
                "extra_info": dict(op=op, impl=impl, backend=impl, shape=[8, 64, 56, 56], dtype="bf16",
                                   layout="NHWC", pass_="fwd", device="cuda", device_name="NVIDIA H200",
                                   ms_per_call=ms, **{"GB/s": 100.0 / ms})}

    bn = tmp_path / "benchmarks_h200_bf16_b256_bandwidth-bn-act_2026-12-02.json"
    bn.write_text(json.dumps({"machine_info": {}, "benchmarks": [case("bn_add_relu", "eager", 2.0),
                                                                  case("bn_add_relu", "cuda", 0.5)]}))
    later = tmp_path / "benchmarks_h200_bf16_b256_bandwidth-kernels_2026-12-02.json"
    later.write_text(json.dumps({"machine_info": {}, "benchmarks": [case("bn_act_train", "cuda", 0.4)]}))
    os.utime(bn, (1_000_000, 1_000_000))
    os.utime(later, (2_000_000, 2_000_000))
    assert plot.main([str(tmp_path), "--readme"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "## Fused BN + add + ReLU" in readme and f"From `{bn.name}`" in readme, readme
    assert "| cuda | 0.500 |" in readme and "4.00x" in readme, readme


def test_bench_records_a_failing_contender_and_exits_1(tmp_path, monkeypatch, capsys):
    def broken(model, num_classes):
        def build():
            raise RuntimeError("deliberately broken model")
        return build
    monkeypatch.setattr(bench, "fastres_builder", broken)
    _bench_fastres_fails(tmp_path, 1, "deliberately broken model")


def _bench_fastres_fails(tmp_path, repeats, message):
    """A resnet18 inference run (torchvision, fastres[torch]) in which fastres[torch] fails
    with ``message``: exit 1, the failure recorded in its row, torchvision's row intact."""
    argv = ["bench", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--iters", "1",
            "--warmup", "0", "--repeats", str(repeats), "--no-compile", "--device", "cpu", "--mode", "infer",
            "--backend", "torch", "--no-progress", "--no-plot", "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    status = {r["contender"]: r["status"] for r in rows}
    assert status["torchvision"] == "ok"
    assert status["fastres[torch]"].startswith(f"error: RuntimeError: {message}")
    return rows


def _tiny_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def _fake_bench(monkeypatch, tmp_path, *flags):
    """A bench run whose contenders' steps only record who was called (and under which
    fastres backend): torchvision, torchvision+compile(freezing) (not compiled: _runner is
    faked) and fastres[torch], inference, warm-up 1, 3 repeats of 1 iteration."""
    calls = []

    def fake_runner(c, model, mode, x, y, cfg, device):
        def step():
            calls.append((c.name, backends.requested_backend()))
        return model, step, (0.25 if c.compiled else None)
    loads = iter(float(i) for i in range(100))
    monkeypatch.setattr(bench, "_runner", fake_runner)
    monkeypatch.setattr(bench, "_loadavg", lambda: next(loads))
    monkeypatch.setattr(bench, "reference_builder", lambda model, n: _tiny_net)
    monkeypatch.setattr(bench, "fastres_builder", lambda model, n: _tiny_net)
    argv = ["bench", "--model", "resnet18", "--batch-size", "2", "--image-size", "8", "--iters", "1",
            "--warmup", "1", "--repeats", "3", "--device", "cpu", "--mode", "infer", "--backend", "torch",
            "--compile", "--infer-compile", "freezing", "--no-progress", "--no-plot", "--threads", "1",
            "--out", str(tmp_path), *flags]
    assert cli.main(argv) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    return calls, result


def test_bench_interleaves_the_timed_repeats_round_robin(monkeypatch, tmp_path, capsys):
    calls, result = _fake_bench(monkeypatch, tmp_path)
    tv, frz, fr = "torchvision", "torchvision+compile(freezing)", "fastres[torch]"
    # every contender built, then warm-up + the peak-memory iteration of each, then the rounds:
    # repeat i of every contender in turn, the order rotated by one each round
    assert [n for n, _ in calls] == [tv, tv, frz, frz, fr, fr] + [tv, frz, fr] + [frz, fr, tv] + [fr, tv, frz]
    assert {b for n, b in calls if n == fr} == {"torch"}  # each repeat under its own backend
    assert {b for n, b in calls if n != fr} == {"auto"}
    meta, rows = result["meta"], result["rows"]
    assert meta["interleave"] is True and meta["strongest_alternative"] == {"infer": frz}
    assert [r["contender"] for r in rows] == [tv, frz, fr]
    by = {r["contender"]: r for r in rows}
    for r in rows:
        assert r["status"] == "ok" and r["interleaved"] is True
        assert len(r["repeat_ms"]) == 3 and r["ms_per_iter"] == pytest.approx(statistics.median(r["repeat_ms"]))
        assert r["alt_contender"] == frz and r["paired_vs_eager"] > 0 and r["paired_vs_alt"] > 0
        assert r["speedup_vs_alt"] == pytest.approx(by[frz]["ms_per_iter"] / r["ms_per_iter"])
        assert r["peak_mem_mib"] > 0
        # the load was sampled at the start (0), before each round (1, 2, 3) and at the end (4, 5)
        assert (r["load_min"], r["load_max"]) == (1.0, 4.0)
    assert by[tv]["paired_vs_eager"] == 1.0 and by[frz]["paired_vs_alt"] == 1.0
    assert by[fr]["paired_vs_eager"] == pytest.approx(statistics.median(
        [a / b for a, b in zip(by[tv]["repeat_ms"], by[fr]["repeat_ms"])]))
    assert by[frz]["compile_s"] == 0.25 and by[tv]["compile_s"] is None
    load = meta["load"]
    assert load["samples"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and (load["min"], load["max"]) == (0.0, 5.0)
    assert load["cpu_count"] == (os.cpu_count() or 1) and load["threads"] == 1
    assert (load["busy"] is True) == (load["others_max"] > 0.5 * load["cpu_count"])
    assert any("was busy" in n and "0.00-5.00" in n for n in meta["notes"]) == load["busy"]
    out = capsys.readouterr().out
    assert "paired" in out and "vs alt" in out and f"infer: {frz}" in out
    header = next(tmp_path.glob("*.csv")).read_text().splitlines()[0].split(",")
    assert list(bench.CSV_FIELDS) == header
    assert {"alt_contender", "speedup_vs_alt", "paired_vs_eager", "paired_vs_alt", "load_min", "load_max"} <= set(header)


def test_bench_no_interleave_runs_each_contender_alone(monkeypatch, tmp_path):
    calls, result = _fake_bench(monkeypatch, tmp_path, "--no-interleave")
    tv, frz, fr = "torchvision", "torchvision+compile(freezing)", "fastres[torch]"
    assert [n for n, _ in calls] == [tv] * 4 + [frz] * 4 + [fr] * 4  # warm-up 1 + 3 repeats each
    meta, rows = result["meta"], result["rows"]
    assert meta["interleave"] is False and "--no-interleave" in meta["timing"]
    for r in rows:
        assert r["status"] == "ok" and r["interleaved"] is False and len(r["repeat_ms"]) == 3
        assert r["paired_vs_eager"] is None and r["paired_vs_alt"] is None  # repeats are not paired
        assert r["speedup_vs_alt"] is not None and r["alt_contender"] == frz
    # samples: the start, each repeat of each contender and its end, the end of the run
    assert len(meta["load"]["samples"]) == 1 + 3 * 4 + 1
    assert [(r["load_min"], r["load_max"]) for r in rows] == [(1.0, 4.0), (5.0, 8.0), (9.0, 12.0)]


def test_bench_interleaved_failure_drops_only_that_contender(monkeypatch, tmp_path, capsys):
    """A contender that fails in a timed round is recorded and leaves the rounds; the others finish."""
    real = bench.timed_repeat
    seen = []

    def flaky(step, cfg, device, per_iter=None):
        seen.append(step)
        if len(seen) == 2:  # the second contender of the first round
            raise RuntimeError("deliberately failing repeat")
        return real(step, cfg, device, per_iter)
    monkeypatch.setattr(bench, "timed_repeat", flaky)
    rows = _bench_fastres_fails(tmp_path, 3, "deliberately failing repeat")
    assert len(seen) == 1 + 1 + 2  # round 1: both; rounds 2 and 3: torchvision alone
    assert [t is not None for t in rows[0]["repeat_ms"]] == [True] * 3


@pytest.mark.parametrize("interleave", ["--interleave", "--no-interleave"])
def test_tiny_cifar_bench_both_modes(tmp_path, interleave):
    """The real loop (no fakes): a CIFAR net, batch 2, one iteration, training and inference."""
    argv = ["bench", "--model", "cifar_resnet20", "--batch-size", "2", "--iters", "1", "--warmup", "1",
            "--repeats", "2", "--no-compile", "--device", "cpu", "--mode", "both", "--backend", "torch",
            "--no-progress", "--no-plot", "--threads", "1", "--out", str(tmp_path), interleave]
    assert cli.main(argv) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = result["rows"]
    assert [(r["contender"], r["mode"]) for r in rows] == [
        ("eager", "train"), ("eager", "infer"), ("fastres[torch]", "train"), ("fastres[torch]", "infer")]
    for r in rows:
        assert r["status"] == "ok" and r["peak_mem_mib"] > 0 and len(r["repeat_ms"]) == 2
        assert (r["paired_vs_eager"] is not None) == (interleave == "--interleave")
        assert r["alt_contender"] == "" and r["speedup_vs_alt"] is None  # --no-compile: no alternative
    assert result["meta"]["strongest_alternative"] == {"train": None, "infer": None}


def test_paired_ratio_and_alone_peak():
    assert bench.paired_ratio([2.0, 4.0, 9.0, None], [1.0, 1.0, 3.0, 1.0]) == 3.0  # rounds 1-3: 2, 4, 3
    assert bench.paired_ratio([1.0, None], [None, 2.0]) is None
    assert bench._alone_peak_mib(100.0, 50.0, 300.0, 400.0, "peak_rss") == 250.0
    assert bench._alone_peak_mib(100.0, -5.0, 300.0, 290.0, "cuda_max_allocated") == 100.0
    assert bench._alone_peak_mib(100.0, 50.0, 300.0, 400.0, "peak_rss_process") == 400.0
    assert bench._alone_peak_mib(None, 50.0, 300.0, 400.0, "peak_rss") == 400.0


def test_load_note_threshold():
    # 2 cores, 2 threads: the run's own 2 threads are taken off the samples after the start
    assert bench.load_note([0.2, 3.0, 2.9], 2, 2)["busy"] is False
    n = bench.load_note([0.2, 3.5, 2.9], 2, 2)
    assert n["busy"] is True and n["others_max"] == 1.5 and n["busy_threshold"] == 1.0
    assert bench.load_note([1.5, 1.0], 2, 1)["busy"] is True  # busy at the start
    assert (n["min"], n["max"]) == (0.2, 3.5)
    none = bench.load_note([None, None], 4, 4)
    assert none["busy"] is None and none["min"] is None


@pytest.mark.slow
def test_bench_cifar_with_compile(tmp_path, capsys):
    """The CIFAR path (eager baseline = the fastres model on aten ops) and torch.compile."""
    argv = ["bench", "--model", "cifar_resnet20", "--batch-size", "2", "--iters", "1", "--warmup", "1",
            "--repeats", "1", "--compile", "--device", "cpu", "--mode", "infer", "--backend", "none",
            "--no-progress", "--no-plot", "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [(r["contender"], r["status"]) for r in rows] == [("eager", "ok"), ("eager+compile(default)", "ok")]
    assert rows[1]["compile_s"] > 0 and rows[1]["lat_p50_ms"] > 0 and rows[0]["compile_s"] is None


def test_benchmark_suite_runs(tmp_path):
    """The pytest-benchmark files import and run (timing disabled: one call per case)."""
    pytest.importorskip("pytest_benchmark")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_bn_act.py",
                        "benchmarks/test_bench_kernels.py", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                        "-k", "(2048x7x7 and fwdbwd and not compile) or (bn_act_train_backward and NHWC)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


# ============================================================================ check
def test_check_ops_pass_on_cpu_for_every_backend(capsys):
    rc = cli.main(["check", "--cases", "ops", "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for b in _cpu_backends():
        assert any(line.startswith(b) and " PASS " in line for line in out.splitlines()), (b, out)
    assert " FAIL " not in out and "ERROR" not in out
    assert "OK:" in out


def test_check_blocks_pass_on_cpu(capsys, tmp_path):
    path = tmp_path / "check.json"
    rc = cli.main(["check", "--cases", "blocks", "--backend", "auto", "--dtype", "fp64,fp32",
                   "--device", "cpu", "--threads", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["status"] == "PASS" for r in rows), out
    assert {r["dtype"] for r in rows} == {"fp64", "fp32"}


@pytest.mark.slow
def test_check_resnet50_passes_on_cpu(capsys):
    rc = cli.main(["check", "--cases", "models", "--backend", "auto", "--dtype", "fp32", "--device", "cpu",
                   "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count(" PASS ") == 2


def _break_backend(monkeypatch, backend):
    """Make ``backend`` wrong on purpose: outputs off by 1 %."""
    from fastres import functional as FF
    real_family = ops.family

    def wrong_family(name):
        fam = real_family(name)
        if name != backend:
            return fam

        def bn_act_train(*a, **k):
            y, mean, var = fam.bn_act_train(*a, **k)
            return y * 1.01, mean, var

        def affine_act(*a, **k):
            return fam.affine_act(*a, **k) * 1.01
        return fam._replace(bn_act_train=bn_act_train, affine_act=affine_act)

    monkeypatch.setattr(ops, "family", wrong_family)
    if backend == "torch":  # the torch backend's training path is a plain aten composition
        real = FF._torch_batch_norm_act
        monkeypatch.setattr(FF, "_torch_batch_norm_act", lambda *a, **k: real(*a, **k) * 1.01)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_check_fails_when_a_backend_is_wrong(backend, monkeypatch, capsys):
    require_backend(backend, "cpu")
    _break_backend(monkeypatch, backend)
    rc = cli.main(["check", "--cases", "ops", "--backend", backend, "--dtype", "fp32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert " FAIL " in out and "FAILED" in out


def test_check_runs_fp32_without_tf32_on_cuda(monkeypatch):
    """On a CUDA device every case of ``fastres check`` (torch's reference included) runs
    with TF32 off for cuDNN and cuBLAS, and the user's settings come back afterwards: with
    cuDNN's default TF32, torch's own fp32 error is ~1e-3 and the fp32 tolerance
    (2x torch's error + 1e-5) could not catch a kernel far off fp32 accuracy. The device
    is only named here (the probe case builds no CUDA tensor); on the CPU nothing changes."""
    seen = []

    def probe(impl, device, seed):
        seen.append((device.type, impl.kind, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return {"out:y": torch.ones(3, dtype=torch.float64)}

    monkeypatch.setattr(check, "build_cases", lambda device, kinds: [("convs", "probe", probe)])
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # torch's cuDNN default
    try:
        rows, notes = check.run_check(torch.device("cuda"), "none", kinds=("convs",), dtypes=["fp32"])
        assert rows and all(r.status == "PASS" for r in rows), rows
        assert any("TF32 was off" in n for n in notes), notes  # said in the report
        assert {(k, c, m) for d, k, c, m in seen} == {("torch", False, False), ("fastres", False, False)}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
        seen.clear()
        _, notes = check.run_check(torch.device("cpu"), "none", kinds=("convs",), dtypes=["fp32"])
        assert seen and all(c and m for _, _, c, m in seen)  # the CPU: the settings untouched
        assert not any("TF32" in n for n in notes), notes
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_check_judge_rules():
    ref = {"out:y": torch.ones(10, dtype=torch.float64), "grad:x": torch.ones(10, dtype=torch.float64)}
    close = {k: v * (1 + 1e-12) for k, v in ref.items()}
    assert check.judge("fp64", close, None, ref)[0]
    far = {k: v * 1.001 for k, v in ref.items()}
    assert not check.judge("fp64", far, None, ref)[0]
    theirs = {k: v * 1.01 for k, v in ref.items()}  # torch's own bf16 error: 1e-2
    assert check.judge("bf16", {k: v * 1.015 for k, v in ref.items()}, theirs, ref)[0]
    assert not check.judge("bf16", {k: v * 1.05 for k, v in ref.items()}, theirs, ref)[0]
    nan = {k: v.clone() for k, v in ref.items()}
    nan["grad:x"][3] = float("nan")
    assert not check.judge("fp32", nan, ref, ref)[0]
    missing = {"out:y": ref["out:y"]}
    assert not check.judge("fp32", missing, ref, ref)[0]


# ============================================================================ examples/train.py
def _load_script(relpath, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_train_example():
    return _load_script(os.path.join("examples", "train.py"), "fastres_train_example")


def test_train_example_runs_saves_and_resumes(tmp_path, capsys):
    torch.set_num_threads(1)
    ex = _load_train_example()
    ck = str(tmp_path / "ck.pt")
    base = ["--arch", "resnet18", "--steps-per-epoch", "2", "--batch-size", "2", "--image-size", "32",
            "--num-classes", "10", "--device", "cpu", "--no-progress", "--log-every", "1", "--checkpoint", ck]
    first = ex.train(base + ["--epochs", "1"])
    assert first["global_step"] == 2 and os.path.exists(ck)
    assert all(l == l for l in first["history"]["loss"])  # no NaN
    assert type(first["model"]).__module__.startswith("fastres")
    second = ex.train(base + ["--epochs", "2", "--resume"])
    assert second["global_step"] == 4  # continued, did not restart
    assert "resumed from" in capsys.readouterr().out
    state = torch.load(ck, weights_only=False)
    assert state["global_step"] == 4 and state["epoch"] == 1


def test_train_example_torchvision_same_loop(tmp_path):
    torch.set_num_threads(1)
    ex = _load_train_example()
    out = ex.train(["--model", "torchvision", "--arch", "resnet18", "--steps-per-epoch", "1", "--batch-size", "2",
                    "--image-size", "32", "--num-classes", "10", "--device", "cpu", "--no-progress"])
    assert out["global_step"] == 1
    assert type(out["model"]).__module__.startswith("torchvision")


def test_train_example_image_folder(tmp_path):
    """--data DIR with DIR/train and DIR/val (ImageFolder): one step, then val top-1."""
    Image = pytest.importorskip("PIL.Image")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    ex = _load_train_example()
    out = ex.train(["--data", str(tmp_path / "data"), "--arch", "resnet18", "--batch-size", "2",
                    "--image-size", "32", "--workers", "0", "--device", "cpu", "--no-progress", "--epochs", "1"])
    assert out["global_step"] == 2  # 4 training images, batch 2
    assert len(out["history"]["val_acc"]) == 1 and 0.0 <= out["history"]["val_acc"][0] <= 1.0
    assert out["model"].fc.out_features == 2  # classes from the folders


# ============================================================================ --conv-paths
def test_bench_conv_paths_adds_the_fused_conv_contenders(monkeypatch):
    """--conv-paths: fastres[triton] with FASTRES_CONV=fused and fastres[cuda] with cuDNN's
    graphs (FASTRES_CONV=cudnn) as contenders of their own; skipped, saying why, where the
    path cannot run (the CPU; a GPU without the cuDNN graphs)."""
    from fastres import cudnn
    monkeypatch.setattr(bench, "fastres_backends", lambda cfg: (["torch", "triton", "cuda"], []))
    for dev in ("cpu", "cuda"):
        monkeypatch.setattr(cudnn, "available", lambda device_type: (False, "cuDNN graphs not built"))
        cfg = bench.resolve_config(parse("bench", "--device", "cpu", "--conv-paths", "--no-compile"))
        cfg.device = dev
        conts = {c.name: c for c in bench.contenders(cfg)[0]}
        fused, cud = conts["fastres[triton]+conv(fused)"], conts["fastres[cuda]+conv(cudnn)"]
        assert (fused.backend, fused.conv, cud.backend, cud.conv) == ("triton", "fused", "cuda", "cudnn")
        assert "fastres[torch]+conv(fused)" not in conts and "fastres[torch]+conv(aten)" not in conts
        if dev == "cpu":
            assert "CUDA GPUs only" in fused.skip and "CUDA GPUs only" in cud.skip
        else:
            assert fused.skip is None and cud.skip == "cuDNN graphs not built"
    cfg = bench.resolve_config(parse("bench", "--device", "cpu", "--no-compile"))
    assert not any(c.conv for c in bench.contenders(cfg)[0])  # off by default


def test_bench_job_runs_under_its_conv_path():
    from fastres import conv_backend
    before = conv_backend.requested_conv()
    job = bench._Job(c=bench.Contender("x", "fastres", "torch", False, conv="fused"), mode="infer", row={})
    with job.ctx():
        assert conv_backend.requested_conv() == "fused"
        assert backends.backend_for(torch.device("cpu")) == "torch"
    assert conv_backend.requested_conv() == before


def test_check_conv_rows_run_the_backward_of_the_family_they_name(monkeypatch):
    """A ``triton`` conv row of ``fastres check`` checks the Triton dgrad/wgrad kernels too:
    the backward runs inside the conv choice (it used to run after it, on aten's backward)."""
    from fastres.kernels import _conv_bwd
    from fastres import backends as B
    ok, why = B.available("triton", "cpu")
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    calls = []
    for name in ("conv2d_act_dgrad", "conv2d_act_wgrad"):
        real = getattr(_conv_bwd, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)
        monkeypatch.setattr(_conv_bwd, name, spy)
    run = check._conv_case(*check.CONV_CASES["1x1 prologue"])
    dev = torch.device("cpu")
    impl = check.Impl("fastres", "fp64", "triton")
    with check._ctx(impl, dev):
        ours = run(impl, dev, 0)
    assert sorted(set(calls)) == ["conv2d_act_dgrad", "conv2d_act_wgrad"], calls
    calls.clear()
    impl = check.Impl("fastres", "fp64", "torch")
    with check._ctx(impl, dev):
        aten = run(impl, dev, 0)
    assert calls == []  # the aten family: aten's backward
    for k in ("grad:x", "grad:weight", "grad:in_scale", "grad:in_shift"):
        torch.testing.assert_close(ours[k], aten[k], rtol=1e-9, atol=1e-9)
