"""CPU benchmark: fastres.resnet50 vs torchvision.models.resnet50 (eval and one SGD
training step), fp32, channels_last by default. Median of several runs after warm-up.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_resnet_cpu.py            # prints
    PYTHONPATH=. .venv/bin/python benchmarks/bench_resnet_cpu.py --save     # + CSV in benchmarks/results/cpu/

Not a timed test: figures depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch
import torchvision

import fastres


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def timeit(fn, warmup: int, runs: int):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def make_models(arch: str, fmt):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    fr = getattr(fastres, arch)(weights=tv.state_dict())
    return tv.to(memory_format=fmt), fr.to(memory_format=fmt)


def bench(arch="resnet50", batch=8, size=128, channels_last=True, warmup=3, runs=10, interleave=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tv, fr = make_models(arch, fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    results = {}

    def eval_fn(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    def train_fn(m):
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

        def f():
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), target).backward()
            opt.step()
        return f

    for mode, make in (("eval", eval_fn), ("train", train_fn)):
        for m in (tv, fr):
            m.train(mode == "train")
        fns = {"torchvision": make(tv), "fastres": make(fr)}
        if interleave:  # alternate rounds so both see the same machine load
            samples = {k: [] for k in fns}
            for k, f in fns.items():
                for _ in range(warmup):
                    f()
            for _ in range(runs):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    samples[k].append(time.perf_counter() - t0)
            for k, s in samples.items():
                results[(mode, k)] = (statistics.median(s) * 1e3, min(s) * 1e3)
        else:
            for k, f in fns.items():
                results[(mode, k)] = timeit(f, warmup, runs)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = fastres.backend_for(torch.device("cpu"))
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    res = bench(args.arch, args.batch, args.size, not args.contiguous, args.warmup, args.runs)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    date = datetime.date.today().isoformat()
    fmt = "contiguous" if args.contiguous else "channels_last"
    load = f"1-min load average {load0:.2f} before, {load1:.2f} after"
    header = [f"# device: {cpu_model()} ({torch.get_num_threads()} threads, {os.cpu_count()} cores; {load} — "
              "a shared machine: other jobs ran alongside)",
              f"# torch {torch.__version__}, torchvision {torchvision.__version__}, fastres backend: {backend}",
              f"# date: {date}; {args.arch}, batch {args.batch}, {args.size}x{args.size}, fp32, {fmt}; "
              f"median (and min) of {args.runs} interleaved runs after {args.warmup} warm-up; "
              "eval under torch.no_grad(); train = zero_grad + forward + CE loss + backward + SGD(momentum) step",
              "mode,impl,median_ms,min_ms,speedup_vs_torchvision"]
    rows = []
    for mode in ("eval", "train"):
        base = res[(mode, "torchvision")][0]
        for impl in ("torchvision", "fastres"):
            med, mn = res[(mode, impl)]
            rows.append(f"{mode},{impl},{med:.1f},{mn:.1f},{base / med:.3f}")
    text = "\n".join(header + rows) + "\n"
    print(text, end="")
    if args.save:
        out = os.path.join(os.path.dirname(__file__), "results", "cpu")
        os.makedirs(out, exist_ok=True)
        suffix = f"_{args.threads}thread" if args.threads else ""
        name = f"{args.arch}_cpu_fp32_b{args.batch}_{args.size}px_{date}{suffix}.csv"
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
        print("saved", os.path.join(out, name))


if __name__ == "__main__":
    main()
