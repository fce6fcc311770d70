#!/usr/bin/env python
"""The key figures of one ``benchmarks/run_gpu.sh`` step, for ``OUT/summary.txt``.

    python benchmarks/gpu_summary.py STEP LOGDIR RESDIR [--since FILE]

prints a few short lines (no line = nothing to report) read from what the step left:

* ``env``      — ``LOGDIR/env.txt`` (``key: value`` lines written by the script);
* ``build``    — ninja's status lines in ``LOGDIR/build.log`` (``NINJA_STATUS`` carries
  the elapsed seconds, so each compiled file shows when it finished);
* ``info``     — ``LOGDIR/info_*.json`` (``fastres.backend_info()``);
* ``tests*``   — the streaming result logs ``LOGDIR/<step>[.shardI].jsonl`` (tests/run_control.py:
  a JSON line per outcome, there also when the step was killed): counts, each shard's
  state (finished / interrupted / killed while running which test), what never ran, the
  slowest tests, every failure with its short repr, skip reasons; without them
  ``LOGDIR/junit_<step>[.shardI].xml``: passed / failed / errors / skipped;
* ``check``    — ``RESDIR/check_*.json``: PASS / FAIL / ERROR / SKIP and the worst error;
* ``bench*``   — ``RESDIR/bench_*.json``: img/s per contender and mode, speed-up vs eager;
* ``bandwidth`` / ``benchmarks*`` — ``RESDIR/benchmarks_*.json`` (pytest-benchmark):
  effective GB/s (or img/s) per case and implementation;
* ``plot``     — how many files the results folder holds.

Only files modified at or after ``--since`` count, so several steps of one run that
write the same kind of file each report their own. Standard library only: it must
work where torch or fastres is broken.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Tuple


def _newer(paths: List[str], since: Optional[float]) -> List[str]:
    out = [p for p in paths if since is None or os.path.getmtime(p) >= since - 1e-3]
    return sorted(out, key=os.path.getmtime)


def _json_files(paths: List[str], since: Optional[float], lines: List[str]) -> Iterator[Tuple[str, Any]]:
    """(path, parsed JSON) of each of ``paths`` written since ``since``, oldest first; one
    that cannot be read or parsed adds an ``unreadable NAME: why`` line to ``lines`` instead."""
    for p in _newer(paths, since):
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            lines.append(f"unreadable {os.path.basename(p)}: {e}")
            continue
        yield p, data


def _num(v, spec: str = ".0f") -> str:
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return "?"


# ----------------------------------------------------------------------------- per step
def env_figures(logdir: str) -> List[str]:
    path = os.path.join(logdir, "env.txt")
    if not os.path.isfile(path):
        return []
    kv: Dict[str, str] = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"^([a-z_]+): (.*)$", line.rstrip("\n"))
            if m and m.group(1) not in kv:
                kv[m.group(1)] = m.group(2).strip()
    keys = ("gpu", "python", "torch", "torchvision", "triton", "numpy", "nvcc", "cpus", "git")
    return ["; ".join(f"{k} {kv[k]}" for k in keys if kv.get(k))]


NINJA_RE = re.compile(r"^\[(\d+)/(\d+) +([0-9.]+)s\] (.*)$")


def build_figures(logdir: str) -> List[str]:
    path = os.path.join(logdir, "build.log")
    if not os.path.isfile(path):
        return []
    done = []  # (elapsed, file)
    with open(path, errors="replace") as f:
        text = f.read()
    for line in text.splitlines():
        m = NINJA_RE.match(line.strip())
        if not m:
            continue
        cmd = m.group(4)
        src = re.findall(r"-c (\S+\.(?:cu|cpp|c))\b", cmd) or re.findall(r"(\S+\.(?:cu|cpp))\b", cmd)
        what = os.path.basename(src[-1]) if src else ("link" if " -shared " in f" {cmd} " else cmd.split()[0])
        done.append((float(m.group(3)), what))
    lines = []
    if done:
        total = max(t for t, _ in done)
        cu = [(t, w) for t, w in done if w.endswith(".cu")]
        lines.append(f"ninja: {len(done)} steps, {total:.1f} s to the last one"
                     + (f"; {', '.join(f'{w} done at {t:.1f} s' for t, w in cu)}" if cu else ""))
    m = re.search(r"TORCH_CUDA_ARCH_LIST=(\S+?)\)", text)
    if m:
        lines.append(f"built for TORCH_CUDA_ARCH_LIST={m.group(1)}")
    for key in ("dry run:", "no build:"):
        for line in text.splitlines():
            if line.startswith(key):
                lines.append(line.strip())
                break
    return lines


def info_figures(logdir: str, since: Optional[float]) -> List[str]:
    paths = _newer(glob.glob(os.path.join(logdir, "info_*.json")), since)
    if not paths:
        return []
    try:
        with open(paths[-1]) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        return [f"unreadable {os.path.basename(paths[-1])}: {e}"]
    out = []
    for dev, d in info.get("devices", {}).items():
        avail = [b for b, ok in d.get("available", {}).items() if ok]
        out.append(f"{dev}: backend {d.get('backend')}; available {','.join(avail) or 'none'}")
    built = info.get("built", {})
    out.append(f"_C {'yes' if built.get('_C') else 'no'}, CUDA kernels {'yes' if built.get('_C_cuda_kernels') else 'no'}, "
               f"triton {'yes' if built.get('triton') else 'no'}")
    return ["; ".join(out)]


def _shard_key(path: str):
    m = re.search(r"\.shard(\d+)\.", os.path.basename(path))
    return int(m.group(1)) if m else -1


def _step_files(logdir: str, step: str, prefix: str, ext: str) -> List[str]:
    """LOGDIR/<prefix><step>.<ext> and the shards' <prefix><step>.shardI.<ext>, in shard order."""
    paths = glob.glob(os.path.join(logdir, f"{prefix}{step}.{ext}"))
    paths += glob.glob(os.path.join(logdir, f"{prefix}{step}.shard*.{ext}"))
    return sorted(paths, key=_shard_key)


def junit_figures(logdir: str, step: str) -> List[str]:
    paths = _step_files(logdir, step, "junit_", "xml")
    if not paths:
        return ["no junit xml (pytest did not finish?)"]
    tot = dict(tests=0, failures=0, errors=0, skipped=0)
    t = 0.0
    bad = []
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            return [f"unreadable junit xml {os.path.basename(path)}: {e}"]
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        for s in suites:
            for k in tot:
                tot[k] += int(s.get(k, 0) or 0)
            t = max(t, float(s.get("time", 0) or 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                bad.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    lines = [f"passed {passed}, failed {tot['failures']}, errors {tot['errors']}, skipped {tot['skipped']} "
             f"(of {tot['tests']}; pytest {t:.0f} s)"]
    if bad:
        lines.append("first failures: " + ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    return lines


def _read_jsonl(path: str) -> List[dict]:
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # the last line of a process killed mid-write
                continue
    return out


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")


MAX_LISTED_FAILURES = 80


def results_figures(logdir: str, step: str) -> Optional[List[str]]:
    """The streaming result logs of a test step (None when there are none)."""
    paths = _step_files(logdir, step, "", "jsonl")
    if not paths:
        return None
    outcome: Dict[str, str] = OrderedDict()   # node id -> passed|failed|error|skipped|xfailed|xpassed
    dur: Dict[str, float] = {}
    reprs: Dict[str, str] = {}
    reasons: Dict[str, int] = {}
    selected, digests, shard_lines, not_run, other = 0, set(), [], [], []
    for path in paths:
        ev = _read_jsonl(path)
        sess = next((e for e in ev if e.get("ev") == "session"), None)
        started, done = [], set()
        for e in ev:
            kind, nid = e.get("ev"), e.get("nodeid", "")
            if kind == "start":
                started.append(nid)
            elif kind == "report":
                done.add(nid)
                dur[nid] = dur.get(nid, 0.0) + float(e.get("duration") or 0)
                o, phase = e.get("outcome"), e.get("phase")
                if o == "failed":
                    o = "failed" if phase == "call" else "error"
                    reprs.setdefault(nid, f"{'' if phase == 'call' else phase + ': '}{e.get('repr', '')}")
                elif o == "skipped":
                    r = e.get("reason") or "?"
                    reasons[r] = reasons.get(r, 0) + 1
                prev = outcome.get(nid)  # (a failed teardown after a passed call: error)
                outcome[nid] = o if prev is None or (o == "error" and prev != "failed") else prev
            elif kind == "collect":
                other.append(f"collection error: {nid}: {_first_line(e.get('repr', ''))[:200]}")
                outcome[nid or path] = "error"
                reprs[nid or path] = "collection: " + e.get("repr", "")
            elif kind == "watchdog":
                other.append(f"watchdog: {nid} ran past {e.get('seconds')} s (its stacks are in the shard's log)")
        name = os.path.basename(path)
        label = f"shard {sess.get('shard')}" if sess and sess.get("shard") else name
        if sess is None:
            shard_lines.append(f"{label}: no session line (killed before its tests were collected?)")
            continue
        items = sess.get("items") or []
        selected += len(items)
        digests.add(sess.get("digest"))
        missing = [i for i in items if i not in done]
        not_run += missing
        running = [s for s in started if s not in done]
        fin = next((e for e in ev if e.get("ev") == "finish"), None)
        intr = next((e for e in ev if e.get("ev") == "interrupted"), None)
        state = ("interrupted (SIGTERM: the step's timeout, or Ctrl-C)" if intr else
                 f"finished, exit {fin.get('exitstatus')}" if fin else "killed (no finish line)")
        last_t = max((float(e.get("t") or 0) for e in ev), default=0.0)
        since = next((float(e.get("t") or 0) for e in reversed(ev)
                      if e.get("ev") == "start" and running and e.get("nodeid") == running[-1]), last_t)
        shard_lines.append(f"{label}: {len(done)} of {len(items)} run, {state}, last event at {last_t:.0f} s"
                           + (f"; was running {running[-1]} (for {last_t - since:.0f}+ s)" if running else ""))
    counts: Dict[str, int] = {}
    for o in outcome.values():
        counts[o] = counts.get(o, 0) + 1
    c = lambda k: counts.get(k, 0)  # noqa: E731
    head = (f"passed {c('passed')}, failed {c('failed')}, errors {c('error')}, skipped {c('skipped')}"
            + "".join(f", {k} {c(k)}" for k in ("xfailed", "xpassed") if c(k))
            + f" ({sum(counts.values())} run of {selected} selected; {len(paths)} result log(s))")
    lines = [head] + ["  " + s for s in shard_lines]
    if len(digests) > 1:
        lines.append("WARNING: the shards collected different selections (digests "
                     + ", ".join(sorted(str(d) for d in digests)) + "): the union may miss or repeat tests")
    if not_run:
        lines.append(f"not run ({len(not_run)}, the step ended first): " + ", ".join(not_run[:8])
                     + (f" (+{len(not_run) - 8} more)" if len(not_run) > 8 else ""))
    lines += other
    if dur:
        slow = sorted(dur.items(), key=lambda kv: -kv[1])[:8]
        lines.append("slowest (setup + call + teardown):")
        lines += [f"  {t:6.1f}s {n}" for n, t in slow]
    bad = [n for n, o in outcome.items() if o in ("failed", "error")]
    if bad:
        by_msg: Dict[str, int] = OrderedDict()
        for n in bad:
            m = _first_line(reprs.get(n, ""))[:150]
            by_msg[m] = by_msg.get(m, 0) + 1
        if len(bad) > 3 and len(by_msg) < len(bad):
            lines.append("failures by message: " + " | ".join(
                f"{k}x {m}" for m, k in sorted(by_msg.items(), key=lambda kv: -kv[1])[:6]))
        lines.append(f"failures ({len(bad)}; the full reprs are in logs/{step}*.jsonl):")
        for n in bad[:MAX_LISTED_FAILURES]:
            r = reprs.get(n, "")
            at = re.search(r"^\s*at (\S+)$", r, re.M)
            lines.append(f"  {outcome[n].upper()} {n}: {_first_line(r)[:220]}" + (f" (at {at.group(1)})" if at else ""))
        if len(bad) > MAX_LISTED_FAILURES:
            lines.append(f"  (+{len(bad) - MAX_LISTED_FAILURES} more)")
    if reasons:
        lines.append("skip reasons: " + " | ".join(f"{k}x {r[:100]}" for r, k in
                                                   sorted(reasons.items(), key=lambda kv: -kv[1])[:5]))
    return lines


def tests_figures(logdir: str, step: str) -> List[str]:
    lines = results_figures(logdir, step)
    return junit_figures(logdir, step) if lines is None else lines


def check_figures(resdir: str, since: Optional[float]) -> List[str]:
    paths = _newer(glob.glob(os.path.join(resdir, "check_*.json")), since)
    if not paths:
        return ["no check json"]
    with open(paths[-1]) as f:
        rows = json.load(f).get("rows", [])
    counts: Dict[str, int] = OrderedDict()
    for r in rows:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    lines = [", ".join(f"{k} {v}" for k, v in counts.items()) or "no rows"]
    bad = [r for r in rows if r.get("status") not in ("PASS", "SKIP")]
    if bad:
        lines.append("not passing: " + ", ".join(
            f"{r.get('backend')}/{r.get('dtype')}/{r.get('case')}" for r in bad[:6])
            + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""))
    return lines


def bench_figures(resdir: str, since: Optional[float]) -> List[str]:
    lines: List[str] = []
    for p, res in _json_files(glob.glob(os.path.join(resdir, "bench_*.json")), since, lines):
        s = res.get("meta", {}).get("settings", {})
        lines.append(f"{s.get('model')} b{s.get('batch_size')} {s.get('image_size')}px {s.get('dtype')} "
                     f"{'NHWC' if s.get('channels_last') else 'NCHW'} ({os.path.basename(p)}):")
        by_mode: Dict[str, List[str]] = OrderedDict()
        for r in res.get("rows", []):
            m = by_mode.setdefault(r.get("mode"), [])
            if r.get("status") == "ok":
                sp = r.get("speedup_vs_eager")
                m.append(f"{r.get('contender')} {_num(r.get('img_per_s'), '.1f')} img/s"
                         + (f" ({sp:.2f}x)" if isinstance(sp, (int, float)) else ""))
            else:
                m.append(f"{r.get('contender')} {str(r.get('status'))[:60]}")
        for mode, items in by_mode.items():
            lines.append(f"  {mode}: " + " | ".join(items))
    return lines or ["no bench json"]


def benchmark_figures(resdir: str, since: Optional[float]) -> List[str]:
    lines: List[str] = []
    for p, data in _json_files(glob.glob(os.path.join(resdir, "benchmarks_*.json")), since, lines):
        groups: Dict[str, List[str]] = OrderedDict()
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if info.get("GB/s") is not None:
                val, unit = info["GB/s"], "GB/s"
            elif info.get("img/s") is not None:
                val, unit = info["img/s"], "img/s"
            elif info.get("ms_per_call") is not None:
                val, unit = info["ms_per_call"], "ms"
            else:
                continue
            key = b.get("group") or b.get("name")
            groups.setdefault(f"{key} [{unit}]", []).append(f"{info.get('impl', '?')} {_num(val, '.4g')}")
        lines.append(f"{os.path.basename(p)}: {len(data.get('benchmarks', []))} cases")
        lines += [f"  {k}: " + " | ".join(v) for k, v in groups.items()]
    return lines or ["no pytest-benchmark json"]


def figures(step: str, logdir: str, resdir: str, since: Optional[float] = None) -> List[str]:
    if step == "env":
        return env_figures(logdir)
    if step == "build":
        return build_figures(logdir)
    if step == "info":
        return info_figures(logdir, since)
    if step.startswith("tests"):
        return tests_figures(logdir, step)
    if step == "check":
        return check_figures(resdir, since)
    if step.startswith("bench-") or step == "bench":
        return bench_figures(resdir, since)
    if step.startswith("bandwidth") or step.startswith("benchmarks"):
        return benchmark_figures(resdir, since)
    if step == "plot":
        files = sorted(os.listdir(resdir)) if os.path.isdir(resdir) else []
        png = sum(f.endswith(".png") for f in files)
        return [f"{len(files)} result files ({png} PNG){'; README.md written' if 'README.md' in files else ''}"]
    return []


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step")
    p.add_argument("logdir")
    p.add_argument("resdir")
    p.add_argument("--since", default=None, help="only files modified at or after this file's mtime")
    a = p.parse_args(argv)
    since = os.path.getmtime(a.since) if a.since and os.path.exists(a.since) else None
    try:
        lines = figures(a.step, a.logdir, a.resdir, since)
    except Exception as e:  # a summary must never break the run
        lines = [f"(no figures: {type(e).__name__}: {e})"]
    for line in lines:
        print(line[:400])
    return 0


if __name__ == "__main__":
    sys.exit(main())
