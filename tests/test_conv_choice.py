"""FASTRES_CONV=auto chosen by measurement: synthetic pytest-benchmark JSON ->
benchmarks/conv_choice.py -> decision table -> conv_backend's choices (forward, dgrad,
wgrad), and auto = aten wherever the table has no entry."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import backends, conv_aten, conv_backend as CB, conv_ops
from fastres.functional import conv2d_act

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("conv_choice", os.path.join(ROOT, "benchmarks", "conv_choice.py"))
conv_choice = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv_choice)

needs_triton = pytest.mark.skipif(not backends.available("triton", "cpu")[0],
                                  reason="needs Triton on the CPU (TRITON_INTERPRET=1, set by conftest)")


def _case(op, impl, name, cin, cout, r, stride, ms, device_name="NVIDIA H200", dtype="bf16", layout="NHWC"):
    mode = {"conv2d_act_fwd": "fwd", "conv_dgrad": "dgrad", "conv_wgrad": "wgrad"}[op]
    return {"name": f"test[{name}-{mode}-{impl}]", "stats": {"median": ms * 10 / 1e3},
            "extra_info": dict(op=op, impl=impl, dtype=dtype, layout=layout, device="cuda",
                               device_name=device_name, calls_per_round=10, torch="2.11.0", ms_per_call=ms,
                               conv=dict(name=name, mode=mode, cin=cin, cout=cout, kernel=[r, r],
                                         stride=[stride, stride], padding=[r // 2] * 2, dilation=[1, 1],
                                         groups=1))}


def _synthetic(tmp_path):
    fwd = [  # (name, cin, cout, r, stride, fastres ms, cudnn+eager ms)
        ("a-1x1-64-64", 64, 64, 1, 1, 1.0, 2.0),      # fused wins
        ("b-3x3-64", 64, 64, 3, 1, 3.0, 2.0),         # cuDNN wins
        ("c-1x1-256-64-56", 256, 64, 1, 1, 1.0, 1.5),  # same class as the next:
        ("c-1x1-256-64-28", 200, 64, 1, 1, 1.2, 1.0),  # one slower shape -> the class is aten
        ("d-7x7s2", 3, 64, 7, 2, 0.9, 1.0),           # the stem: fused wins by 10%
    ]
    f = [_case("conv2d_act_fwd", impl, n, c, k, r, s, ms) for n, c, k, r, s, ours, theirs in fwd
         for impl, ms in (("fastres", ours), ("cudnn+eager", theirs))]
    f.append(_case("conv2d_act_fwd", "cudnn", "a-1x1-64-64", 64, 64, 1, 1, 0.1))  # the floor: not a contender
    b = [_case("conv_dgrad", "fastres-triton", "a-1x1-64-64", 64, 64, 1, 1, 1.0),
         _case("conv_dgrad", "aten+eager", "a-1x1-64-64", 64, 64, 1, 1, 2.0),
         _case("conv_wgrad", "fastres-triton", "a-1x1-64-64", 64, 64, 1, 1, 3.0),
         _case("conv_wgrad", "aten+eager", "a-1x1-64-64", 64, 64, 1, 1, 2.0),
         _case("conv_wgrad", "fastres-triton", "b-3x3-64", 64, 64, 3, 1, 1.0)]  # no aten twin: unmeasured
    pf, pb = tmp_path / "fwd.json", tmp_path / "bwd.json"
    pf.write_text(json.dumps({"benchmarks": f}))
    pb.write_text(json.dumps({"benchmarks": b}))
    return str(pf), str(pb)


def test_strongest_alternative_and_veto(tmp_path):
    """The forward is weighed against the faster of cudnn+fastres (a fastres block with
    aten's conv) and cudnn+eager; the backward against aten-fallback (the aten backward
    conv2d_act really runs) when measured, else aten+eager; a shape whose fastres case is
    missing (failed / skipped) vetoes its class; a re-run of one part keeps the other
    parts' choices in the table."""
    f = [_case("conv2d_act_fwd", "fastres", "a-1x1-64-64", 64, 64, 1, 1, 1.0),
         _case("conv2d_act_fwd", "cudnn+eager", "a-1x1-64-64", 64, 64, 1, 1, 2.0),
         _case("conv2d_act_fwd", "cudnn+fastres", "a-1x1-64-64", 64, 64, 1, 1, 0.8),  # the stronger one
         _case("conv2d_act_fwd", "cudnn+eager", "b-3x3-64", 64, 64, 3, 1, 2.0)]       # fastres missing
    b = [_case("conv_dgrad", "fastres-triton", "a-1x1-64-64", 64, 64, 1, 1, 1.0),
         _case("conv_dgrad", "aten+eager", "a-1x1-64-64", 64, 64, 1, 1, 0.5),     # (stored a: too cheap)
         _case("conv_dgrad", "aten-fallback", "a-1x1-64-64", 64, 64, 1, 1, 1.5)]  # what runs: this one
    pf, pb = tmp_path / "fwd.json", tmp_path / "bwd.json"
    pf.write_text(json.dumps({"benchmarks": f}))
    pb.write_text(json.dumps({"benchmarks": b}))
    rows = {(r["part"], r["shape"]): r for r in conv_choice.measurements(json.loads(pf.read_text()))
            + conv_choice.measurements(json.loads(pb.read_text()))}
    assert rows[("fwd", "a-1x1-64-64")]["against"] == "cudnn+fastres"
    assert rows[("fwd", "a-1x1-64-64")]["speedup"] == pytest.approx(0.8)
    assert rows[("fwd", "b-3x3-64")]["speedup"] == 0.0 and rows[("fwd", "b-3x3-64")]["ms_fastres"] is None
    assert rows[("dgrad", "a-1x1-64-64")]["against"] == "aten-fallback"
    table_path = tmp_path / "table.py"
    assert conv_choice.main([str(pb), "--table", str(table_path)]) == 0  # the backward part first
    assert conv_choice.main([str(pf), "--table", str(table_path)]) == 0  # then the forward part
    cls = conv_choice.read_table(str(table_path))["devices"]["h200"]["classes"]
    assert cls[K_A]["fwd"] == "aten" and cls[K_A]["dgrad"] == "triton"  # both parts kept
    assert cls[K_A]["dgrad_speedup"] == pytest.approx(1.5)
    assert cls[K_B]["fwd"] == "aten" and cls[K_B]["fwd_speedup"] == 0.0


K_A = "bf16/nhwc/k1x1/s1x1/d1x1/g1/cin64/cout64"
K_B = "bf16/nhwc/k3x3/s1x1/d1x1/g1/cin64/cout64"
K_C = "bf16/nhwc/k1x1/s1x1/d1x1/g1/cin256/cout64"
K_D = "bf16/nhwc/k7x7/s2x2/d1x1/g1/cin4/cout64"


def test_script_writes_the_table(tmp_path):
    pf, pb = _synthetic(tmp_path)
    table_path = tmp_path / "table.py"
    table_path.write_text("TABLE = {'schema': 1, 'devices': {'a100-sxm4-80gb': {'classes': {'x': {'fwd': 'fused'}}}}}\n")
    assert conv_choice.main([pf, pb, "--table", str(table_path), "--json", str(tmp_path / "s.json")]) == 0
    table = conv_choice.read_table(str(table_path))
    assert table["schema"] == CB.TABLE_SCHEMA
    assert set(table["devices"]) == {"h200", "a100-sxm4-80gb"}  # the other device is kept
    cls = table["devices"]["h200"]["classes"]
    assert set(cls) == {K_A, K_B, K_C, K_D}
    assert cls[K_A]["fwd"] == "fused" and cls[K_A]["fwd_speedup"] == pytest.approx(2.0)
    assert cls[K_A]["dgrad"] == "triton" and cls[K_A]["wgrad"] == "aten"
    assert cls[K_B]["fwd"] == "aten" and "wgrad" not in cls[K_B]
    assert cls[K_C]["fwd"] == "aten" and cls[K_C]["fwd_speedup"] == pytest.approx(1 / 1.2, rel=1e-3)
    assert sorted(cls[K_C]["fwd_shapes"]) == ["c-1x1-256-64-28", "c-1x1-256-64-56"]
    assert cls[K_D]["fwd"] == "fused"
    # a stricter margin turns the 10% win into aten; the --json section reads back
    sec = json.loads((tmp_path / "s.json").read_text())["devices"]["h200"]
    assert sec["classes"][K_D]["fwd"] == "fused"
    assert conv_choice.main([pf, "--table", "", "--json", str(tmp_path / "s2.json"), "--min-speedup", "1.2"]) == 0
    strict = json.loads((tmp_path / "s2.json").read_text())["devices"]["h200"]["classes"]
    assert strict[K_D]["fwd"] == "aten" and strict[K_A]["fwd"] == "fused"
    merged = conv_choice.read_inputs([str(tmp_path / "s2.json"), pb], 1.0)["h200"]["classes"]
    assert merged[K_A]["dgrad"] == "triton" and merged[K_D]["fwd"] == "aten"


def test_script_without_measurements_fails(tmp_path):
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps({"benchmarks": [dict(_case("conv2d_act_fwd", "fastres", "a", 64, 64, 1, 1, 1.0),
                                                 extra_info={"op": "conv2d_act_fwd"})]}))
    assert conv_choice.main([str(p), "--table", ""]) == 1


def test_slug_matches_bench(monkeypatch):
    from fastres.bench import device_slug
    for name in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Tesla V100 (PCIe)"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, _n=name: _n)
        assert CB.slug_of_name(name) == device_slug(torch.device("cuda")) == CB.device_slug(torch.device("cuda"))


def test_shape_key():
    w = torch.empty(64, 3, 7, 7)
    assert CB.shape_key(torch.bfloat16, True, w.shape, (2, 2), (1, 1), 1) == K_D
    x = torch.empty(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert CB.conv_key(x.double().contiguous(), w, (1, 1), (1, 1), 1).startswith("fp64/nchw/k7x7/s1x1")
    assert CB.conv_key(x.bfloat16().contiguous(memory_format=torch.channels_last), w, (2, 2), (1, 1), 1) == K_D
    assert [CB.channel_bucket(c) for c in (1, 3, 64, 65, 2048)] == [1, 4, 64, 128, 2048]


@pytest.fixture
def cpu_table(tmp_path, monkeypatch):
    """The synthetic H200 table, as if measured on this CPU (fp64 NCHW classes added)."""
    pf, pb = _synthetic(tmp_path)
    sec = conv_choice.read_inputs([pf, pb], 1.0)["h200"]
    cls = dict(sec["classes"])
    for k, v in list(cls.items()):
        cls[k.replace("bf16/nhwc", "fp64/nchw")] = v
    monkeypatch.delenv("FASTRES_CONV", raising=False)
    monkeypatch.delenv("FASTRES_CONV_BWD", raising=False)
    prev_conv = CB.set_conv(None)
    prev = CB.set_choice_table({"schema": 1, "devices": {"cpu": dict(sec, classes=cls)}})
    yield cls
    CB.set_choice_table(prev)
    CB.set_conv(prev_conv)


def test_no_table_auto_is_aten(monkeypatch):
    monkeypatch.delenv("FASTRES_CONV", raising=False)
    cpu = torch.device("cpu")
    assert CB.load_table().get("devices", {}).get("cpu") is None  # the committed table never has the CPU
    for table in ({}, {"schema": 1, "devices": {"h200": {"classes": {K_A: {"fwd": "fused"}}}}}):
        prev = CB.set_choice_table(table)
        try:
            with fastres.use_conv("auto"):
                assert CB.conv_for_key(cpu, K_A) == "aten"
                assert CB.convs_for(cpu, [K_A]) == "aten"
                assert not CB.may_fuse(cpu)
                x, w = torch.randn(1, 64, 2, 2), torch.randn(64, 64, 1, 1)
                assert CB.backward_parts(x, w, (1, 1), (1, 1), 1) == (False, False)
            assert CB.conv_info("cpu")["path"] == "aten"
        finally:
            CB.set_choice_table(prev)


@needs_triton
def test_table_drives_auto(cpu_table, monkeypatch):
    cpu = torch.device("cpu")
    assert CB.conv_for_key(cpu, K_A) == "fused" and CB.conv_for_key(cpu, K_B) == "aten"
    assert CB.conv_for_key(cpu, K_C) == "aten" and CB.conv_for_key(cpu, "fp32/nchw/k1x1/s1x1/d1x1/g1/cin64/cout64") \
        == "aten"
    assert CB.convs_for(cpu, [K_A, K_D]) == "fused" and CB.convs_for(cpu, [K_A, K_B]) == "aten"
    assert CB.may_fuse(cpu)
    info = CB.conv_info("cpu")
    assert info["table_device"] == "cpu" and K_A in info["auto_fused_classes"] and "fused on" in info["reason"]
    x = torch.randn(1, 64, 3, 3, dtype=torch.float64)
    w = torch.randn(64, 64, 1, 1, dtype=torch.float64)
    assert CB.backward_parts(x, w, (1, 1), (1, 1), 1) == (True, False)  # dgrad measured faster, wgrad slower
    monkeypatch.setenv("FASTRES_CONV_BWD", "triton")
    assert CB.backward_parts(x, w, (1, 1), (1, 1), 1) == (True, True)
    monkeypatch.setenv("FASTRES_CONV_BWD", "aten")
    assert CB.backward_parts(x, w, (1, 1), (1, 1), 1) == (False, False)
    monkeypatch.setenv("FASTRES_CONV_BWD", "nope")
    with pytest.raises(ValueError, match="FASTRES_CONV_BWD"):
        CB.backward_parts(x, w, (1, 1), (1, 1), 1)
    monkeypatch.delenv("FASTRES_CONV_BWD")
    with fastres.use_conv("fused"):  # explicit fused: every fastres kernel, whatever the table says
        assert CB.backward_parts(x, w, (1, 1), (1, 1), 1) == (True, True)
        assert CB.conv_for_key(cpu, K_B) == "fused"
    with fastres.use_conv("aten"):  # overrides win
        assert CB.conv_for_key(cpu, K_A) == "aten"


@needs_triton
@pytest.mark.parametrize("parts", [("triton", "aten"), ("aten", "triton")], ids=["dgrad-triton", "wgrad-triton"])
def test_auto_runs_the_chosen_kernels(cpu_table, monkeypatch, parts):
    """conv2d_act under auto: the Triton forward for the measured-faster class, the mixed
    backward (one of dgrad/wgrad Triton, the other aten) with fp64 gradients equal to
    F.conv2d's; an unmeasured class runs the aten composition."""
    cpu_table[K_A.replace("bf16/nhwc", "fp64/nchw")].update(dgrad=parts[0], wgrad=parts[1])
    used = []
    real_family = conv_ops.family
    monkeypatch.setattr(conv_ops, "family", lambda name: used.append(name) or real_family(name))
    calls = {"dgrad": 0, "wgrad": 0}
    kb = conv_ops._conv_bwd_kernels()
    for part in calls:
        real = getattr(kb, f"conv2d_act_{part}")
        monkeypatch.setattr(kb, f"conv2d_act_{part}", lambda *a, _r=real, _p=part: calls.__setitem__(
            _p, calls[_p] + 1) or _r(*a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(64, 64, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    s = (torch.rand(64, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    t = (torch.randn(64, dtype=torch.float64, generator=g) * 0.1).requires_grad_()
    y, mean, var = conv2d_act(x, w, in_scale=s, in_shift=t, in_relu=True, activation="relu", stats="moments")
    assert used == ["triton"]
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    loss = (y * gy).sum() + mean.sum() + var.sum()
    grads = torch.autograd.grad(loss, (x, w, s, t))
    assert calls == {"dgrad": int(parts[0] == "triton"), "wgrad": int(parts[1] == "triton")}
    u = torch.relu(x * s[None, :, None, None] + t[None, :, None, None])
    yr = torch.relu(F.conv2d(u, w))
    ref_loss = (yr * gy).sum() + yr.mean((0, 2, 3)).sum() + yr.var((0, 2, 3), unbiased=False).sum()
    ref = torch.autograd.grad(ref_loss, (x, w, s, t))
    torch.testing.assert_close(y, yr)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
    used.clear()
    epilogue = []
    real_epilogue = conv_aten.epilogue_conv2d_act
    monkeypatch.setattr(conv_aten, "epilogue_conv2d_act", lambda *a: epilogue.append(1) or real_epilogue(*a))
    w3 = torch.randn(64, 64, 3, 3, dtype=torch.float64)
    conv2d_act(x.detach(), w3, padding=1)  # K_B: cuDNN measured faster -> aten (no prologue: its epilogue backend)
    assert used == [] and epilogue == [1]


@needs_triton
def test_auto_choice_under_compile(cpu_table):
    """torch.compile(fullgraph=True) bakes the table's answer into the graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def f(x, w):
        return conv2d_act(x, w, activation="relu")

    x = torch.randn(1, 64, 4, 4, dtype=torch.float64)
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=backend)
    assert cf(x, torch.randn(64, 64, 1, 1, dtype=torch.float64)).shape == (1, 64, 4, 4)
    cf(x, torch.randn(64, 64, 3, 3, dtype=torch.float64))  # another class: a new graph, aten
    torch._dynamo.reset()
    assert "triton_conv2d_act" in graphs[0]
    assert "triton_conv2d_act" not in graphs[-1] and "conv" in graphs[-1]


# ----------------------------------------------------------------------------- python -m fastres check: conv cases
def test_check_conv_cases_pass_on_cpu(capsys):
    from fastres import cli
    rc = cli.main(["check", "--cases", "convs", "--device", "cpu", "--dtype", "fp64,fp32", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    fams = ["aten"] + (["triton"] if backends.available("triton", "cpu")[0] else [])
    for fam in fams:
        for case in ("1x1 prologue", "3x3 s2 prologue+bias+relu", "7x7 s2 stem C=3"):
            for dt in ("fp64", "fp32"):
                assert any(line.split()[:1] == [fam] and f"conv2d_act {case}" in line and f" {dt} " in line
                           and "PASS" in line for line in out.splitlines()), (fam, case, dt, out)


def test_check_conv_cases_fail_when_the_conv_is_wrong(monkeypatch, capsys):
    """A conv family whose output is 0.1% off fails its rows (the check can fail)."""
    from fastres import cli

    def wrong(*args):
        y, mean, var = conv_ops.conv2d_act_reference(*args)
        return y * 1.001, mean, var

    monkeypatch.setitem(conv_ops._families, "torch", conv_ops.ConvFamily("torch", wrong, None))
    monkeypatch.setattr(check_mod(), "conv_families", lambda device: (["aten"], []))
    rc = cli.main(["check", "--cases", "convs", "--device", "cpu", "--dtype", "fp64"])
    out = capsys.readouterr().out
    assert rc == 1 and out.count("FAIL ") == 3 and "out:y" in out, out


def check_mod():
    from fastres import check
    return check


@needs_triton
def test_auto_routes_a_block_and_the_stem_by_the_table(cpu_table, monkeypatch):
    """Under auto a block goes through conv2d_act only when every conv's class is fused
    in the table; the stem when conv1's is."""
    from fastres import functional as FF
    calls, fams = [], []
    real = FF.conv2d_act
    monkeypatch.setattr(FF, "conv2d_act", lambda x, w, *a, **k: calls.append(tuple(w.shape)) or real(x, w, *a, **k))
    real_family = conv_ops.family
    monkeypatch.setattr(conv_ops, "family", lambda name: fams.append(name) or real_family(name))
    blk = fastres.BasicBlock(64, 64).double().eval()  # two 3x3 convs: K_B's class is aten
    x = torch.randn(1, 64, 3, 3, dtype=torch.float64)
    blk(x)
    # every conv through conv2d_act (the conv step's one home), on the aten path: no op family
    assert calls == [(64, 64, 3, 3)] * 2 and fams == []
    calls.clear()
    cpu_table[K_B.replace("bf16/nhwc", "fp64/nchw")]["fwd"] = "fused"
    CB.set_choice_table(CB.load_table())  # (clears the caches)
    monkeypatch.setattr(conv_ops, "family", lambda name: fams.append(name) or (
        conv_ops._families["ops"] if name == "triton" else conv_ops._families[name]))  # without the slow interpreter
    blk(x)
    assert calls == [(64, 64, 3, 3)] * 2 and fams == ["triton"] * 2
    calls.clear()
    model = fastres.resnet18(num_classes=2).double().eval()
    model._stem(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert calls == [(64, 3, 7, 7)]  # the stem's class (fp64 7x7 s2 C=3: K_D's twin) is fused
    calls.clear()
    cpu_table["fp64/nchw/k7x7/s2x2/d1x1/g1/cin4/cout64"]["fwd"] = "aten"
    CB.set_choice_table(CB.load_table())
    model._stem(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert calls == []
