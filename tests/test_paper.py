"""``python -m fastres paper {degradation,shortcuts}`` (issue 14).

Both commands run end to end through ``fastres.cli.main`` — the code path users run —
on tiny nets (depths 8 and 14), a few iterations and a subset of the data: the CSV,
PNG, JSON and text table are written, every number is finite, the summary is there.
Unit tests: the paper's step schedule, the CIFAR-10 loader on a fake folder of
python batches, the augmentation, the summary's logic, the missing-extra messages.
Nothing here asserts that a net learned (a few iterations prove nothing) or on a time.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from fastres import cli, paper


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _outputs(out_dir):
    files = sorted(os.listdir(out_dir))
    by_ext = {}
    for f in files:
        by_ext.setdefault(f.rsplit(".", 1)[-1], []).append(os.path.join(out_dir, f))
    assert set(by_ext) == {"csv", "json", "png", "txt"}, files
    assert all(len(v) == 1 for v in by_ext.values()), files
    return {k: v[0] for k, v in by_ext.items()}


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000


def _fake_cifar(folder, n_train_batches=2, per_batch=24, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for i in range(1, n_train_batches + 1):
        batches[f"data_batch_{i}"] = per_batch
    batches["test_batch"] = n_test
    for name, n in batches.items():
        d = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
             b"batch_label": name.encode()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f)
    return folder


# ============================================================================ schedule
def test_schedule_is_the_papers_scaled():
    assert paper.paper_milestones(64000) == [32000, 48000]  # the paper's 32k / 48k of 64k
    assert paper.paper_milestones(8) == [4, 6]
    assert paper.paper_milestones(138) == [69, 104]
    with pytest.raises(ValueError):
        paper.paper_milestones(0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = paper.make_schedule(opt, 8)
    lrs = []
    for _ in range(8):  # the training loop's order: use the lr, then step
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


# ============================================================================ data
def test_cifar10_loader_on_fake_batches(tmp_path):
    folder = _fake_cifar(str(tmp_path / "cifar-10-batches-py"))
    d = paper.load_cifar10(str(tmp_path))  # the parent folder is accepted too
    assert d.name == "cifar10" and d.augment is True
    assert d.train_x.shape == (48, 3, 32, 32) and d.test_x.shape == (20, 3, 32, 32)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    raw = []
    for name in ("data_batch_1", "data_batch_2"):
        with open(os.path.join(folder, name), "rb") as f:
            raw.append(pickle.load(f, encoding="bytes"))
    x = np.concatenate([r[b"data"] for r in raw]).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    y = np.concatenate([r[b"labels"] for r in raw])
    mean = x.mean(axis=0, keepdims=True)  # per-pixel mean of the training set
    np.testing.assert_allclose(d.train_x.numpy(), x - mean, atol=1e-5)
    np.testing.assert_array_equal(d.train_y.numpy(), y)
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        t = pickle.load(f, encoding="bytes")
    tx = t[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    np.testing.assert_allclose(d.test_x.numpy(), tx - mean, atol=1e-5)  # the *training* mean
    lim = paper.load_cifar10(folder, limit=10)
    assert len(lim.train_y) == 10 and len(lim.test_y) == 10


def test_cifar10_loader_missing_folder_says_what_it_wants(tmp_path):
    with pytest.raises(SystemExit, match="data_batch_1..5 and test_batch"):
        paper.load_cifar10(str(tmp_path))
    with pytest.raises(ValueError, match="digits' or 'cifar10:PATH"):
        paper.parse_data("cifar100:/x")


def test_digits_split_is_fixed_and_stratified():
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn (fastres[paper])")
    a, b = paper.load_digits(), paper.load_digits()
    assert a.train_x.shape == (1497, 3, 32, 32) and a.test_x.shape == (300, 3, 32, 32)
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.test_x, b.test_x)
    assert torch.bincount(a.test_y, minlength=10).tolist() == [30] * 10
    assert a.augment is False
    assert a.train_x.mean(0).abs().max() < 1e-5  # per-pixel mean subtracted
    assert torch.equal(a.train_x[:, 0], a.train_x[:, 2])  # grey, repeated to 3 channels


def test_augment_is_pad_crop_flip():
    x = torch.randn(64, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = paper.augment(x, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    kinds = set()
    for i in range(len(x)):
        found = None
        for oy in range(9):
            for ox in range(9):
                crop = padded[i, :, oy:oy + 32, ox:ox + 32]
                for flip in (False, True):
                    if torch.equal(out[i], crop.flip(2) if flip else crop):
                        found = (oy, ox, flip)
        assert found is not None, f"image {i} is not a flipped/unflipped 32x32 crop of the padded input"
        kinds.add(found)
    assert len({k[2] for k in kinds}) == 2 and len(kinds) > 10  # both flips, many offsets
    assert torch.equal(paper.augment(x, torch.Generator().manual_seed(0)), out)  # seeded


# ============================================================================ summary
def _fake_run(net, depth, train, test):
    return dict(label=paper.net_label(depth, None if net == "plain" else "A"), net=net, depth=depth,
                shortcut="none" if net == "plain" else "A", final_train_error=train, final_test_error=test)


def test_summary_reports_what_was_measured():
    cfg = paper.PaperConfig(experiment="degradation", data="digits", nets=[], epochs=1, batch_size=1, lr=0.1,
                            momentum=0.9, weight_decay=1e-4, device="cpu", dtype="fp32", channels_last=True,
                            seed=0, out="")
    like_paper = [_fake_run("plain", 20, 5.0, 8.0), _fake_run("plain", 56, 9.0, 11.0),
                  _fake_run("residual", 20, 4.0, 7.0), _fake_run("residual", 56, 2.0, 6.0)]
    text = "\n".join(paper.summarize(cfg, like_paper))
    assert "plain-56 ended with training error 9.00% vs 5.00% for plain-20 -> HIGHER" in text
    assert "ResNet-56 ended with training error 2.00% vs 4.00% for ResNet-20 -> LOWER" in text
    assert "REPRODUCED in this run" in text
    unlike = [_fake_run("plain", 20, 5.0, 8.0), _fake_run("plain", 56, 3.0, 11.0),
              _fake_run("residual", 20, 4.0, 7.0), _fake_run("residual", 56, 6.0, 6.0)]
    text = "\n".join(paper.summarize(cfg, unlike))
    assert "-> LOWER" in text and "-> HIGHER" in text
    assert "NOT reproduced in this run: plain unlike the paper, residual unlike the paper" in text


# ============================================================================ the commands, end to end
def test_degradation_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn (fastres[paper])")
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (fastres[paper])")
    out = tmp_path / "deg"
    rc = cli.main(["paper", "degradation", "--depths", "8,14", "--epochs", "2", "--limit", "64",
                   "--batch-size", "16", "--lr", "0.1", "--out", str(out), "--device", "cpu", "--seed", "3",
                   "--threads", "1", "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "summary: plain: the deeper plain-14 ended with training error" in stdout
    assert "summary: residual: the deeper ResNet-14 ended with training error" in stdout
    assert "summary: degradation claim" in stdout
    files = _outputs(out)
    rows = _read_csv(files["csv"])
    assert len(rows) == 4 * 2  # 4 nets x 2 epochs
    assert {(r["net"], int(r["depth"])) for r in rows} == {("plain", 8), ("plain", 14), ("residual", 8),
                                                          ("residual", 14)}
    assert {r["shortcut"] for r in rows} == {"none", "A"}
    for r in rows:
        for k in ("train_error", "test_error", "train_loss", "lr"):
            v = float(r[k])
            assert math.isfinite(v), (k, r)
        assert 0.0 <= float(r["train_error"]) <= 100.0 and 0.0 <= float(r["test_error"]) <= 100.0
    # 64 images / batch 16 = 4 iterations per epoch, 8 in all: lr /10 after 4 (and after 6)
    assert [(int(r["iteration"]), int(r["epoch"]), float(r["lr"])) for r in rows if r["label"] == "plain-8"] == \
        [(4, 1, pytest.approx(0.1)), (8, 2, pytest.approx(0.01))]
    with open(files["json"]) as f:
        res = json.load(f)
    meta = res["meta"]
    assert meta["complete"] is True and meta["seed"] == 3 and meta["settings"]["seed"] == 3
    assert meta["wall_s"] > 0 and meta["device"] == "cpu" and meta["versions"]["torch"] == torch.__version__
    assert meta["settings"]["momentum"] == 0.9 and meta["settings"]["weight_decay"] == 1e-4
    assert [r["label"] for r in res["runs"]] == ["plain-8", "plain-14", "ResNet-8", "ResNet-14"]
    assert all(r["milestones"] == [4, 6] for r in res["runs"])
    assert res["summary"] and all(line in stdout for line in res["summary"])
    _check_png(files["png"])
    with open(files["txt"]) as f:
        assert "summary: degradation claim" in f.read()


def test_shortcuts_command_on_fake_cifar10(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (fastres[paper])")
    folder = _fake_cifar(str(tmp_path / "cifar"))
    out = tmp_path / "sc"
    rc = cli.main(["paper", "shortcuts", "--data", f"cifar10:{folder}", "--depth", "8", "--epochs", "2",
                   "--batch-size", "8", "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    for label in ("ResNet-8 (A)", "ResNet-8 (B)", "ResNet-8 (C)", "plain-8"):
        assert label in stdout
    assert "summary: ResNet-8 (B) vs ResNet-8 (A): test error" in stdout
    assert "summary: ResNet-8 (C) vs ResNet-8 (B): test error" in stdout
    files = _outputs(out)
    rows = _read_csv(files["csv"])
    assert {r["shortcut"] for r in rows} == {"A", "B", "C", "none"} and len(rows) == 4 * 2
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("train_error", "test_error", "train_loss"))
    with open(files["json"]) as f:
        res = json.load(f)
    params = {r["shortcut"]: r["params"] for r in res["runs"]}
    assert params["none"] == params["A"] < params["B"] < params["C"]  # A adds no parameters
    assert "augmentation: 4-pixel zero padding" in res["meta"]["data_description"]
    assert res["runs"][0]["iterations"] == 2 * (48 // 8)
    _check_png(files["png"])


# ============================================================================ arguments and extras
@pytest.mark.parametrize("argv", [
    ["paper", "degradation", "--depths", "20,21"],
    ["paper", "degradation", "--data", "mnist"],
    ["paper", "shortcuts", "--options", "A,D"],
    ["paper", "shortcuts", "--depth", "20,56"],
    ["paper", "degradation", "--lr", "-1"],
    ["paper", "degradation", "--lr", "nan"],
    ["paper", "degradation", "--lr", "inf"],
    ["paper", "degradation", "--epochs", "0"],
])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_defaults(tmp_path):
    args = cli.build_parser().parse_args(["paper", "degradation", "--device", "cpu"])
    cfg = paper.resolve_config(args)
    assert cfg.nets == [(20, None), (56, None), (20, "A"), (56, "A")]
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (6, 64, 0.02, 0.9, 1e-4)
    assert cfg.out == os.path.join("benchmarks", "results", "cpu", "paper")
    args = cli.build_parser().parse_args(["paper", "shortcuts", "--data", "cifar10:/x", "--device", "cpu"])
    cfg = paper.resolve_config(args)
    assert cfg.nets == [(20, "A"), (20, "B"), (20, "C"), (20, None)]
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (164, 128, 0.1)  # the paper's 64k iterations of batch 128
    assert paper.resolve_config(cli.build_parser().parse_args(["paper", "shortcuts", "--lr", "0.05"])).lr == 0.05


def test_missing_extras_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit, match=r"fastres\[paper\]"):
        cli.main(["paper", "degradation", "--depths", "8", "--no-plot", "--out", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"figure.*fastres\[paper\]"):
        cli.main(["paper", "shortcuts", "--data", f"cifar10:{tmp_path}", "--out", str(tmp_path)])
    assert not os.listdir(tmp_path)  # failed before training, wrote nothing
