#!/usr/bin/env python
"""Turn benchmark outputs into the charts and tables the README shows.

    python benchmarks/plot.py benchmarks/results/cpu                 # every file in a folder
    python benchmarks/plot.py bench_....csv benchmarks_....json      # given files
    python benchmarks/plot.py benchmarks/results/cpu --readme        # + README.md table there

Inputs:
* ``bench_*.csv`` from ``python -m fastres bench``: a PNG bar chart of img/s per
  contender and mode next to it (the same chart the CLI draws);
* pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json=...``): flattened to a
  CSV of the same stem (one row per case: impl, shape, dtype, layout, ms per call,
  GB/s, TFLOP/s, img/s), plus ``<stem>_bn_act.png`` — effective GB/s of the fused
  BN+add+ReLU per shape, eager vs compile vs fastres backends — and
  ``<stem>_models.png`` (img/s) when those cases ran.

``--readme`` writes ``README.md`` in the folder: the latest bench table per model and
the fused-op table (ms and speed-up against eager), each naming device, dtype, batch
and date.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

BENCH_FIELDS = ("name", "group", "impl", "backend", "op", "pass_", "mode", "block", "model", "shape", "dtype",
                "layout", "device", "device_name", "calls_per_round", "rounds", "median_s", "min_s", "max_s",
                "ms_per_call", "GB/s", "TFLOP/s", "img/s", "bytes", "flops")


# ----------------------------------------------------------------------------- pytest-benchmark JSON
def flatten_pytest_benchmark(path: str) -> List[Dict[str, object]]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        st = b.get("stats", {})
        row = {k: info.get(k) for k in BENCH_FIELDS}
        row.update(name=b.get("name"), group=b.get("group"), rounds=st.get("rounds"), median_s=st.get("median"),
                   min_s=st.get("min"), max_s=st.get("max"))
        if isinstance(row.get("shape"), list):
            row["shape"] = "x".join(map(str, row["shape"]))
        rows.append(row)
    return rows


def write_csv(rows: List[Dict[str, object]], path: str, fields=BENCH_FIELDS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _figure(nplots: int, width: float = 5.0, height: float = 4.0):
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(width * nplots, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_bn_act(rows: List[Dict[str, object]], path: str, title: str) -> Optional[str]:
    """Effective GB/s of the fused BN(+add)+ReLU per shape: one panel per pass."""
    sel = [r for r in rows if r.get("op") == "bn_add_relu" and r.get("GB/s")]
    if not sel:
        return None
    passes = [p for p in ("fwd", "fwdbwd", "eval") if any(r["pass_"] == p for r in sel)]
    fig = _figure(len(passes), 5.5, 4.2)
    impls = list(OrderedDict.fromkeys(r["impl"] for r in sel))
    for k, p in enumerate(passes):
        ax = fig.add_subplot(1, len(passes), k + 1)
        cases = list(OrderedDict.fromkeys(f"{r['shape']} {r['layout']}" for r in sel if r["pass_"] == p))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            xs, hs = [], []
            for j, c in enumerate(cases):
                r = next((r for r in sel if r["pass_"] == p and r["impl"] == impl
                          and f"{r['shape']} {r['layout']}" == c), None)
                if r is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    hs.append(float(r["GB/s"]))
            ax.bar(xs, hs, width=width, label=impl)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.split("x", 1)[1] for c in cases], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{p}", fontsize=9)
        ax.set_ylabel("effective GB/s (higher is better)", fontsize=8)
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_models(rows: List[Dict[str, object]], path: str, title: str) -> Optional[str]:
    sel = [r for r in rows if r.get("model") and r.get("img/s")]
    if not sel:
        return None
    from fastres.bench import plot_rows
    conv = [dict(contender=f"{r['model']} {r['impl']}", mode=r["mode"], img_per_s=r["img/s"], status="ok")
            for r in sel]
    err = plot_rows(conv, path, title)
    return None if err else path


# ----------------------------------------------------------------------------- bench CSV
def read_bench_csv(path: str) -> List[Dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_bench_csv(path: str, out_dir: Optional[str] = None) -> Optional[str]:
    from fastres.bench import plot_rows
    rows = read_bench_csv(path)
    if not rows:
        return None
    r0 = rows[0]
    title = (f"{r0['model']} — {r0.get('device_name') or r0['device']}\n{r0['dtype']}, batch {r0['batch_size']}, "
             f"{r0['image_size']}px, {'channels_last' if r0['channels_last'] == 'True' else 'NCHW'}, {r0['date']}")
    png = os.path.join(out_dir or os.path.dirname(path), os.path.basename(path)[:-4] + ".png")
    err = plot_rows(rows, png, title)
    if err:
        print(f"{path}: no chart ({err})", file=sys.stderr)
        return None
    return png


# ----------------------------------------------------------------------------- README
def _f(v, spec):
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return "—"


def readme_text(folder: str, notes: Optional[List[str]] = None) -> str:
    lines = [f"# Benchmark results — {os.path.basename(os.path.abspath(folder))}", "",
             "Written by `python benchmarks/plot.py <folder> --readme` from the files in this folder "
             "(the newest file of each kind). Every file name carries device, dtype, batch and date.", ""]
    for n in notes or []:
        lines += [n, ""]
    bench_csvs = sorted(glob.glob(os.path.join(folder, "bench_*.csv")), key=os.path.getmtime)
    latest: Dict[str, str] = OrderedDict()
    for p in bench_csvs:
        rows = read_bench_csv(p)
        if rows:
            r0 = rows[0]
            latest[(r0["model"], r0["dtype"], r0["batch_size"], r0["image_size"], r0["channels_last"],
                    r0.get("device_name"))] = p
    for key, p in latest.items():
        rows = read_bench_csv(p)
        r0 = rows[0]
        lines += [f"## `python -m fastres bench` — {r0['model']}, batch {r0['batch_size']}, {r0['image_size']}px, "
                  f"{r0['dtype']}, {'channels_last' if r0['channels_last'] == 'True' else 'NCHW'}", "",
                  f"{r0.get('device_name') or r0['device']}, {r0['date']}; median of {r0['repeats']} repeats x "
                  f"{r0['iters']} iterations after {r0['warmup']} warm-up (`{os.path.basename(p)}`)", "",
                  "| contender | mode | img/s | ms/iter (min–max) | peak MiB | vs eager |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['contender']} | {r['mode']} | {r['status']} | | | |")
                continue
            lines.append(f"| {r['contender']} | {r['mode']} | {_f(r['img_per_s'], '.1f')} | "
                         f"{_f(r['ms_per_iter'], '.1f')} ({_f(r['ms_min'], '.1f')}–{_f(r['ms_max'], '.1f')}) | "
                         f"{_f(r['peak_mem_mib'], '.0f')} | {_f(r['speedup_vs_eager'], '.2f')}x |")
        png = p[:-4] + ".png"
        if os.path.exists(png):
            lines += ["", f"![{r0['model']}]({os.path.basename(png)})"]
        lines.append("")
    pb = sorted((p for p in glob.glob(os.path.join(folder, "*.json"))
                 if not os.path.basename(p).startswith("bench_") and _is_pytest_benchmark(p)), key=os.path.getmtime)
    # the newest file that holds the fused BN + add + ReLU cases (a later kernels-only or
    # conv benchmark file must not hide them)
    ops, src = [], None
    for p in reversed(pb):
        ops = [r for r in flatten_pytest_benchmark(p) if r.get("op") == "bn_add_relu" and r.get("ms_per_call")]
        if ops:
            src = p
            break
    if ops:
        d = ops[0]
        lines += [f"## Fused BN + add + ReLU (`pytest benchmarks/ --benchmark-only`) — {d['dtype']}, "
                  f"{d.get('device_name') or d['device']}", "",
                  f"From `{os.path.basename(src)}`: ms per call (median) and effective GB/s "
                  "(least bytes the op must move / time); speed-up against eager PyTorch "
                  "(`F.batch_norm` + add + ReLU).", "",
                  "| shape | layout | pass | impl | ms | GB/s | vs eager |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
        for r in ops:
            base = next((b for b in ops if b["impl"] == "eager" and b["shape"] == r["shape"]
                         and b["layout"] == r["layout"] and b["pass_"] == r["pass_"]), None)
            sp = (float(base["ms_per_call"]) / float(r["ms_per_call"])) if base else None
            lines.append(f"| {r['shape']} | {r['layout']} | {r['pass_']} | {r['impl']} | "
                         f"{_f(r['ms_per_call'], '.3f')} | {_f(r['GB/s'], '.1f')} | {_f(sp, '.2f')}x |")
        png = src[:-5] + "_bn_act.png"
        if os.path.exists(png):
            lines += ["", f"![bn_act]({os.path.basename(png)})"]
        lines.append("")
    checks = sorted(glob.glob(os.path.join(folder, "check_*.txt")), key=os.path.getmtime)
    if checks:
        with open(checks[-1]) as f:
            text = f.read().splitlines()
        verdict = next((t for t in reversed(text) if t.startswith(("OK:", "FAILED:"))), "no verdict line")
        lines += ["## `python -m fastres check`", "",
                  f"`{os.path.basename(checks[-1])}`: **{verdict}** (backend x case x dtype, worst relative "
                  "error against a float64 torch reference; the full table is in the file).", ""]
    return "\n".join(lines)


def _is_pytest_benchmark(path: str) -> bool:
    try:
        with open(path) as f:
            head = f.read(4096)
        return '"machine_info"' in head or '"benchmarks"' in head
    except OSError:
        return False


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--out", default=None, help="where charts go (default: next to each input)")
    p.add_argument("--readme", action="store_true", help="write README.md in each folder given")
    p.add_argument("--note", action="append", default=[], help="a paragraph for the README (repeatable)")
    args = p.parse_args(argv)
    files, folders = [], []
    for path in args.paths:
        if os.path.isdir(path):
            folders.append(path)
            files += sorted(glob.glob(os.path.join(path, "*.csv")) + glob.glob(os.path.join(path, "*.json")))
        else:
            files.append(path)
    made = []
    for f in files:
        base = os.path.basename(f)
        out_dir = args.out or os.path.dirname(f)
        if base.startswith("bench_") and f.endswith(".csv"):
            png = plot_bench_csv(f, out_dir)
            made += [png] if png else []
        elif f.endswith(".json") and not base.startswith("bench_") and _is_pytest_benchmark(f):
            rows = flatten_pytest_benchmark(f)
            stem = os.path.join(out_dir, base[:-5])
            write_csv(rows, stem + ".csv")
            made.append(stem + ".csv")
            title = f"{base[:-5]} — {rows[0].get('device_name') if rows else ''}"
            try:
                for fn, suffix in ((plot_bn_act, "_bn_act.png"), (plot_models, "_models.png")):
                    png = fn(rows, stem + suffix, title)
                    made += [png] if png else []
            except ImportError:
                print("matplotlib is not installed: CSV only", file=sys.stderr)
    if args.readme:
        for d in folders:
            path = os.path.join(d, "README.md")
            with open(path, "w") as fh:
                fh.write(readme_text(d, args.note))
            made.append(path)
    for m in made:
        print(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
