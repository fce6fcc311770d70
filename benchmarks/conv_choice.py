"""FASTRES_CONV=auto's decision table from measurements: which convolutions run fused.

Reads the pytest-benchmark JSON of ``benchmarks/test_bench_conv.py`` (forward, mode
``fwd``: ``fastres`` vs the faster of ``cudnn+fastres`` — what a fastres block runs where
the conv is not fused — and ``cudnn+eager``) and ``benchmarks/test_bench_conv_bwd.py``
(``dgrad`` / ``wgrad``: ``fastres-triton`` vs ``aten-fallback``, the aten backward
``conv2d_act`` runs for that part, prologue recomputed; files without it: ``aten+eager``)
— each case's
``extra_info`` names the device, dtype, layout and convolution (``conv``) — and writes,
per device (:func:`fastres.conv_backend.slug_of_name` of the GPU's name) and shape class
(:func:`fastres.conv_backend.shape_key`: dtype, layout, kernel, stride, dilation,
groups, channel buckets), the choice for the forward (``fused``|``aten``) and for each
of dgrad and wgrad (``triton``|``aten``), with the measured speed-ups
(= aten's median time / fastres's). A part is fastres's only when EVERY measured shape
of its class is more than ``--min-speedup`` times faster (default 1.0: strictly faster);
a shape whose alternative was measured but fastres's case was not (it failed or was
skipped) vetoes its class (speed-up 0); an unmeasured part stays ``aten``.

    python benchmarks/conv_choice.py benchmarks/results/h200/benchmarks_h200_bf16_b256_benchmarks-conv*.json
        # -> rewrites fastres/conv_choice_table.py: the measured (class, part) entries of this
        #    device replaced, every other entry (other parts, classes, devices) kept
    python benchmarks/conv_choice.py FILES... --json OUT.json --table ''   # the sections only

Inputs may also be files written by ``--json`` (``{"schema": 1, "devices": {...}}``):
merged in, later files winning per class and part. Files of several devices give one
section each; the table keeps the devices that were not measured. Exit status 1 when no
usable measurement was found.
"""
from __future__ import annotations

import argparse
import json
import os
import pprint
import sys
from typing import Dict, Iterable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout: fastres from this tree
    sys.path.insert(0, ROOT)

from fastres import conv_backend as CB  # noqa: E402

DEFAULT_TABLE = os.path.join(ROOT, "fastres", "conv_choice_table.py")
# (op in extra_info, part, fastres impl, the alternatives it must beat: tiers in order --
# the first tier with a measurement counts, the fastest alternative of that tier)
CONTESTS = [
    ("conv2d_act_fwd", "fwd", "fastres", [("cudnn+fastres", "cudnn+eager")]),
    ("conv_dgrad", "dgrad", "fastres-triton", [("aten-fallback",), ("aten+eager",)]),
    ("conv_wgrad", "wgrad", "fastres-triton", [("aten-fallback",), ("aten+eager",)]),
]
WIN = {"fwd": "fused", "dgrad": "triton", "wgrad": "triton"}


def _seconds(bench: dict) -> Optional[float]:
    info = bench.get("extra_info", {})
    if info.get("ms_per_call") is not None:
        return float(info["ms_per_call"]) / 1e3
    med = bench.get("stats", {}).get("median")
    return None if med is None else float(med) / max(1, int(info.get("calls_per_round") or 1))


def measurements(data: dict) -> List[dict]:
    """One row per (device, class, part, shape): fastres's and aten's seconds."""
    times: Dict[tuple, Dict[str, float]] = {}
    meta: Dict[tuple, tuple] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        conv = info.get("conv")
        if not conv or info.get("device") != "cuda":
            continue  # not a conv case with its description, or not a GPU measurement
        for op, part, ours, tiers in CONTESTS:
            if info.get("op") != op or info.get("impl") not in (ours, *(i for tier in tiers for i in tier)):
                continue
            sec = _seconds(b)
            if sec is None or sec <= 0:
                continue
            slug = CB.slug_of_name(str(info.get("device_name", "cuda")))
            key = CB.shape_key(info.get("dtype"), str(info.get("layout", "NCHW")).upper() == "NHWC",
                               [conv["cout"], conv["cin"] // conv["groups"], *conv["kernel"]], conv["stride"],
                               conv["dilation"], conv["groups"])
            k = (slug, key, part, conv["name"])
            times.setdefault(k, {})["ours" if info["impl"] == ours else info["impl"]] = sec
            meta[k] = (info.get("device_name"), info.get("torch"))
    rows = []
    tiers_of = {part: tiers for _, part, _, tiers in CONTESTS}
    for (slug, key, part, name), t in sorted(times.items()):
        alt = None
        for tier in tiers_of[part]:
            got = [(t[i], i) for i in tier if i in t]
            if got:
                alt = min(got)
                break
        if alt is None:
            continue  # no alternative measured: nothing to compare
        ours = t.get("ours")
        rows.append(dict(device=slug, device_name=meta[(slug, key, part, name)][0],
                         torch=meta[(slug, key, part, name)][1], key=key, part=part, shape=name,
                         speedup=alt[0] / ours if ours else 0.0, ms_fastres=None if ours is None else ours * 1e3,
                         ms_aten=alt[0] * 1e3, against=alt[1]))
    return rows


def build_sections(rows: Iterable[dict], min_speedup: float = 1.0, sources: Iterable[str] = ()) -> Dict[str, dict]:
    """{device: {"device": .., "device_name": .., "classes": {key: {part: choice,
    part_speedup: worst speed-up, part_shapes: [...]}}}} from :func:`measurements` rows."""
    by: Dict[tuple, List[dict]] = {}
    names: Dict[str, tuple] = {}
    for r in rows:
        by.setdefault((r["device"], r["key"], r["part"]), []).append(r)
        names[r["device"]] = (r["device_name"], r["torch"])
    out: Dict[str, dict] = {}
    for (slug, key, part), rs in sorted(by.items()):
        sec = out.setdefault(slug, dict(device=slug, device_name=names[slug][0], torch=names[slug][1],
                                         sources=sorted(os.path.basename(s) for s in sources), classes={}))
        worst = min(r["speedup"] for r in rs)
        entry = sec["classes"].setdefault(key, {})
        entry[part] = WIN[part] if worst > min_speedup else "aten"
        entry[f"{part}_speedup"] = round(worst, 4)
        entry[f"{part}_shapes"] = sorted(r["shape"] for r in rs)
    return out


def merge(base: Dict[str, dict], new: Dict[str, dict]) -> Dict[str, dict]:
    """Sections of ``new`` over ``base``: per device, per class, per part."""
    out = json.loads(json.dumps(base))
    for slug, sec in new.items():
        dst = out.setdefault(slug, dict(sec, classes={}))
        for k in ("device_name", "torch"):
            dst[k] = sec.get(k) or dst.get(k)
        dst["sources"] = sorted(set(dst.get("sources", [])) | set(sec.get("sources", [])))
        for key, entry in sec["classes"].items():
            dst["classes"].setdefault(key, {}).update(entry)
    return out


def read_inputs(paths: Iterable[str], min_speedup: float) -> Dict[str, dict]:
    rows: List[dict] = []
    sections: Dict[str, dict] = {}
    bench_files = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        if "devices" in data:  # sections written by --json
            sections = merge(sections, data["devices"])
        else:
            rows += measurements(data)
            bench_files.append(p)
    return merge(sections, build_sections(rows, min_speedup, bench_files))


def write_table(path: str, devices: Dict[str, dict]) -> None:
    table = {"schema": CB.TABLE_SCHEMA, "devices": devices}
    text = ('"""FASTRES_CONV=auto\'s decision table: GENERATED by benchmarks/conv_choice.py from the\n'
            "conv benchmarks under benchmarks/results/<device>/ (docs/GPU.md); do not edit by hand.\n"
            "See fastres.conv_backend for how it is read. No entry => aten.\n"
            '"""\n'
            f"TABLE = {pprint.pformat(table, width=110, sort_dicts=True)}\n")
    with open(path, "w") as f:
        f.write(text)


def read_table(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    ns: dict = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), ns)  # our own generated file: a dict literal
    return ns.get("TABLE", {})


def summary(sections: Dict[str, dict]) -> List[str]:
    lines = []
    for slug, sec in sorted(sections.items()):
        cls = sec["classes"]
        n = {p: sum(e.get(p) == WIN[p] for e in cls.values()) for p in WIN}
        lines.append(f"conv choice {slug}: {len(cls)} shape classes; fastres wins fwd {n['fwd']}, "
                     f"dgrad {n['dgrad']}, wgrad {n['wgrad']}")
        for key, e in sorted(cls.items()):
            parts = [f"{p} {e[p]} x{e[p + '_speedup']:.2f}" for p in WIN if p in e]
            lines.append(f"  {key}: " + ", ".join(parts))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="pytest-benchmark JSON of test_bench_conv*.py, or --json sections")
    ap.add_argument("--table", default=DEFAULT_TABLE,
                    help="the table module to update ('' = none; default fastres/conv_choice_table.py)")
    ap.add_argument("--json", default=None, help="also write the measured device section(s) as JSON here")
    ap.add_argument("--min-speedup", type=float, default=1.0,
                    help="fastres must be faster than this factor on every shape of a class (default 1.0)")
    ap.add_argument("--allow-empty", action="store_true",
                    help="exit 0 when the inputs hold no GPU conv measurement (run_gpu.sh's CPU dry run)")
    a = ap.parse_args(argv)
    sections = read_inputs([p for p in a.inputs if not (a.allow_empty and not os.path.exists(p))], a.min_speedup)
    for line in summary(sections):
        print(line)
    if not sections:
        print("conv_choice: no GPU conv measurement with extra_info['conv'] in the inputs", file=sys.stderr)
        return 0 if a.allow_empty else 1
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schema": CB.TABLE_SCHEMA, "devices": sections}, f, indent=1, sort_keys=True)
    if a.table:  # merged per device, class and part: a forward-only run keeps the backward's choices
        devices = merge(read_table(a.table).get("devices", {}), sections)
        write_table(a.table, devices)
        print(f"conv_choice: wrote {a.table} ({', '.join(sorted(devices))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
