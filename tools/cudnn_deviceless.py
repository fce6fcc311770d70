"""Ask cuDNN, without a GPU, whether it has an engine for every fused-conv graph fastres
would build for ResNet-50 -- per layer, role and dtype -- on sm_90 (H200) and sm_80 (A100).

    python tools/cudnn_deviceless.py [--target sm_90 --target sm_80 | --target cuda] [--batch 256]
                                     [--dtype float16 ...] [--layer NAME ...] [--json FILE]

Each of the 22 distinct ResNet-50 convolutions (``benchmarks/_bench_utils.RESNET50_CONVS``,
NHWC) is put in every role it has in the network, and the role's graph is chosen by the
same functions the ops use (``fastres.cudnn.pattern_for`` / ``backward_pattern_for``):

- ``eval``   folded conv + bias (+ residual) (+ ReLU): conv1/conv2 (+ReLU), the
             projection (bias only), conv3 (bias + residual + ReLU), the stem (+ReLU);
- ``fwd``    training forward: conv + genstats (a block's first conv, the projection, the
             stem) or the previous BN's scale/shift/ReLU + conv + genstats (conv2, conv3);
- ``dgrad``  dgrad + dReLU + dBN weights (conv2, conv3: their input went through BN + ReLU);
- ``wgrad``  scale/shift/ReLU recomputed + wgrad (conv2, conv3).

A role the pattern table sends to the fallback up front (fp32 genstats, bf16 dgrad, the
3-channel stem, ...) is printed as ``fallback`` with the reason; the others are built by
the C++ builders of ``csrc/cudnn/conv_graph.cpp`` against a hand-written device
description (``fastres.cudnn.DEVICE_PROPS``) and cuDNN's heuristics are asked for an engine
whose plan finalizes (``fastres.cudnn.graph_check``). Only cuDNN's *pre-compiled* engines
can answer here: runtime-fusion engines need the CUDA driver library, so ``none`` means
"no pre-compiled engine" and the GPU run decides (docs/DESIGN.md).

``--target cuda`` asks for the present GPU instead (cuDNN's own description of it, and with
the driver present runtime-fusion engines are considered too: each plan may be compiled,
seconds each -- name a few ``--layer`` s); ``run_gpu.sh full 12`` does that first.

Exit status 0 whatever cuDNN answers (this is a survey, not a test); 2 when the check
cannot run here (fastres._C without the cuDNN path, cuDNN < 9.8).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

from fastres import cudnn  # noqa: E402
from _bench_utils import RESNET50_CONVS  # noqa: E402

DTYPES = {name: dt for dt, name in cudnn.DTYPE_STR.items()}  # "float16" -> torch.float16, ...
CAPABILITY = {"sm_90": (9, 0), "sm_80": (8, 0)}


def capability(target: str) -> Tuple[int, int]:
    """(major, minor) the pattern tables are asked with: the named target's, or the GPU's."""
    return tuple(torch.cuda.get_device_capability()) if target == "cuda" else CAPABILITY[target]
ROLES = ("eval", "fwd", "dgrad", "wgrad")


def layer_roles(name: str) -> List[Tuple[str, dict]]:
    """The (role, flags) a ResNet-50 conv of this name plays: flags of pattern_for /
    backward_pattern_for. The table's 1x1 convs serve as conv1 (C -> C/4 or the first
    block's 64 -> 64), conv3 (-> 4x) or the projection (``ds``); 3x3 convs are conv2."""
    c, _, k, r, _, _ = RESNET50_CONVS[name]
    if name.startswith("stem"):
        kinds = ["stem"]
    elif "-ds-" in name:
        kinds = ["proj"]
    elif r == 3:
        kinds = ["conv2"]
    elif k == 4 * c:
        kinds = ["conv3"]
    else:
        kinds = ["conv1"]
    out = []
    for kind in kinds:
        after_bn = kind in ("conv2", "conv3")
        eval_flags = dict(prologue=False, stats=False, bias=True, residual=kind == "conv3",
                          relu=kind != "proj")
        out.append((f"eval:{kind}", eval_flags))
        out.append((f"fwd:{kind}", dict(prologue=after_bn, stats=True, bias=False, residual=False, relu=False)))
        if after_bn:
            out.append((f"dgrad:{kind}", dict(scale=True, shift=True, in_relu=True)))
            out.append((f"wgrad:{kind}", dict(scale=True, shift=True, in_relu=True)))
    return out


def check_one(name: str, role: str, flags: dict, dtype: torch.dtype, target: str, batch: int) -> dict:
    c, h, k, r, stride, pad = RESNET50_CONVS[name]
    cap = capability(target)
    part = role.split(":")[0]
    if part in ("dgrad", "wgrad"):
        pattern, why = cudnn.backward_pattern_for(part, dtype, c, k, 1, capability=cap,
                                                  cudnn_version=torch.backends.cudnn.version(), **flags)
        operands = ("scale", "shift", "in_relu")
    else:
        pattern, why = cudnn.pattern_for(dtype, c, k, 1, capability=cap, **flags)
        if part == "eval":
            operands = tuple(o for o in ("bias", "residual", "relu") if flags[o])
        else:
            operands = ("scale", "shift", "in_relu") if flags["prologue"] else ()
    if pattern is None:
        return dict(status="fallback", pattern=None, detail=why, configs=0)
    res = cudnn.graph_check(pattern, dtype, target, x_shape=(batch, c, h, h), w_shape=(k, c, r, r),
                            stride=(stride, stride), padding=(pad, pad), operands=operands)
    return dict(status="ok" if res["ok"] else "none", pattern=pattern, detail=res["detail"],
                configs=res["configs"], runtime_compiled=res["runtime_compiled"])


def survey(targets, dtypes, layers, batch, progress: bool = False) -> Dict[str, dict]:
    out: Dict[str, dict] = {}
    for target in targets:
        for name in layers:
            for role, flags in layer_roles(name):
                for dt in dtypes:
                    t0 = time.perf_counter()
                    r = out[f"{target}|{name}|{role}|{dt}"] = check_one(name, role, flags, DTYPES[dt], target, batch)
                    if progress:  # a line per check as it ends: a run cut short still shows what it found
                        print(f"- {target} {name} {role} {dt}: {r['status']} ({r['configs']} configs, "
                              f"{time.perf_counter() - t0:.1f} s) {r['detail'][:160]}", flush=True)
    return out


def render(results: Dict[str, dict], targets, dtypes, layers) -> str:
    cell = {"ok": lambda r: f"{r['configs']}", "none": lambda r: "none", "fallback": lambda r: "fb"}
    lines = []
    for target in targets:
        lines.append(f"\n{target}: engine configs per layer and role ({' / '.join(dtypes)}); "
                     "'none' = no pre-compiled engine, 'fb' = fallback up front (reason below)")
        lines.append("| layer | role | " + " | ".join(dtypes) + " |")
        lines.append("| --- | --- |" + " --- |" * len(dtypes))
        for name in layers:
            for role, _ in layer_roles(name):
                row = [cell[results[f"{target}|{name}|{role}|{dt}"]["status"]](results[f"{target}|{name}|{role}|{dt}"])
                       for dt in dtypes]
                lines.append(f"| {name} | {role} | " + " | ".join(row) + " |")
    reasons = sorted({r["detail"] for r in results.values() if r["status"] == "fallback"})
    if reasons:
        lines.append("\nfallback reasons:")
        lines += [f"- {w}" for w in reasons]
    counts: Dict[str, int] = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append("\ntotals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", choices=sorted(CAPABILITY) + ["cuda"],
                    help="default: sm_90 and sm_80; cuda: the present GPU")
    ap.add_argument("--dtype", action="append", choices=list(DTYPES), help="default: float16, bfloat16, float32")
    ap.add_argument("--layer", action="append", choices=list(RESNET50_CONVS), help="default: all 22")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--progress", action="store_true", help="a line per check as it ends")
    ap.add_argument("--json", help="write every result (pattern, status, cuDNN's detail) to this file")
    a = ap.parse_args(argv)
    ok, why = cudnn.deviceless_available()
    if not ok:
        print(f"cudnn_deviceless: the deviceless check cannot run here: {why}", file=sys.stderr)
        return 2
    targets = a.target or ["sm_90", "sm_80"]
    if "cuda" in targets and not torch.cuda.is_available():
        print("cudnn_deviceless: --target cuda needs a CUDA device (none here); use sm_90 / sm_80", file=sys.stderr)
        return 2
    dtypes = a.dtype or ["float16", "bfloat16", "float32"]
    layers = a.layer or list(RESNET50_CONVS)
    results = survey(targets, dtypes, layers, a.batch, a.progress)
    print(f"cuDNN {torch.backends.cudnn.version()}, batch {a.batch}, NHWC; runtime-compiled engines considered: "
          f"{any(r.get('runtime_compiled') for r in results.values())}")
    print(render(results, targets, dtypes, layers))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
