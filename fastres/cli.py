"""Command line: ``python -m fastres {info,bench,check,paper}``.

* ``info``  — what was built and which backend runs on each device
  (:func:`fastres.backend_info`), readable or ``--json``.
* ``bench`` — throughput of torchvision eager, torchvision under ``torch.compile``
  and fastres with each available backend, training and inference, on the same
  inputs (:mod:`fastres.bench`). Table + JSON + CSV + PNG.
* ``check`` — parity self-check of every available backend on this machine
  (:mod:`fastres.check`); exit status 1 on any failure.
* ``paper`` — He et al. 2015 on fastres's CIFAR nets: ``paper degradation`` (Fig. 6)
  and ``paper shortcuts`` (Table 3) (:mod:`fastres.paper`).

Device-dependent defaults (``None`` below) are resolved in :mod:`fastres.bench`
(:func:`fastres.bench.resolve_config`) so that ``--help`` and the tests see them.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ._argtypes import nonneg_int as _nonneg_int, positive_int as _positive_int

DTYPES = ("fp32", "bf16", "fp16")
MODES = ("train", "infer", "both")


def _model_name(text: str) -> str:
    from .bench import model_names, parse_model
    try:
        parse_model(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; choose from {', '.join(model_names())}") from None
    return text


def _backend_list(text: str) -> str:
    from .backends import BACKENDS
    text = text.strip().lower()
    if text in ("all", "none", "auto"):
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(bad) or repr(text)}; use all, auto, none or a comma list of "
            f"{', '.join(BACKENDS)}")
    return ",".join(names)


def _infer_compile_list(text: str) -> List[str]:
    from .bench import INFER_COMPILE_CHOICES
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in INFER_COMPILE_CHOICES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown compile mode(s) {', '.join(bad) or repr(text)}; choose from "
                                         + ", ".join(INFER_COMPILE_CHOICES))
    return list(dict.fromkeys(modes))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastres",
                                description="fastres: fused conv + BatchNorm + ReLU + residual-add ResNets")
    sub = p.add_subparsers(dest="command", metavar="{info,bench,check,paper}")

    # ------------------------------------------------------------------ info
    pi = sub.add_parser("info", help="which backends were built and which one runs on each device")
    pi.add_argument("--json", action="store_true", help="print fastres.backend_info() as JSON")

    # ------------------------------------------------------------------ bench
    pb = sub.add_parser(
        "bench", help="throughput: torchvision eager / torch.compile vs fastres backends",
        description="Compare torchvision eager, torchvision under torch.compile and fastres with each "
                    "available backend, in training (forward + backward + SGD step) and inference, on the "
                    "same inputs and weights. Defaults: GPU resnet50, batch 256, 224x224, bf16, "
                    "channels_last, 10 warm-up + 5x20 timed iterations; CPU resnet50, batch 8, 128x128, "
                    "fp32, channels_last, 3 warm-up + 5x2 timed iterations. Inference rows carry the "
                    "p50/p90 latency of single iterations (--batch-size 1: per-image latency). torch.compile of "
                    "torchvision runs in both modes by default (on the CPU: ~1 minute of inductor C++ codegen; "
                    "--compile-modes infer or --no-compile shorten it).")
    pb.add_argument("--model", type=_model_name, default=None,
                    help="resnet18/34/50/101/152, wide_resnet50_2, wide_resnet101_2, resnext50_32x4d, "
                         "resnext101_32x8d, resnext101_64x4d, cifar_resnet20/32/44/56/110/1202 "
                         "(default resnet50)")
    pb.add_argument("--batch-size", type=_positive_int, default=None, help="GPU 256, CPU 8")
    pb.add_argument("--image-size", type=_positive_int, default=None,
                    help="GPU 224, CPU 128 (CIFAR models: 32)")
    pb.add_argument("--dtype", choices=DTYPES, default=None,
                    help="fp32, or bf16/fp16 under autocast (GPU bf16, CPU fp32)")
    pb.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="NHWC model and input (default on)")
    pb.add_argument("--mode", choices=MODES, default="both",
                    help="train (forward+backward+SGD step), infer, or both (default)")
    pb.add_argument("--backend", type=_backend_list, default="all",
                    help="fastres backends to run: all available (default), auto (the one fastres picks), "
                         "none, or a comma list of torch,triton,cpp,cuda")
    pb.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="include the compiled contenders (default on): torchvision under torch.compile in "
                         "training; in inference the strongest compiled alternative, on the CPU "
                         "torch.compile with inductor freezing, on a GPU mode='max-autotune' and "
                         "mode='reduce-overhead' (CUDA graphs). Compile time is reported apart (compile_s). "
                         "--no-compile skips them all")
    pb.add_argument("--infer-compile", type=_infer_compile_list, default=None, metavar="MODES",
                    help="the compiled inference contenders, a comma list of freezing, default, max-autotune, "
                         "reduce-overhead, max-autotune-no-cudagraphs (default: CPU freezing; GPU "
                         "max-autotune,reduce-overhead)")
    pb.add_argument("--compile-modes", choices=MODES, default=None,
                    help="which modes get the torch.compile contender (default both)")
    pb.add_argument("--compile-fastres", action="store_true",
                    help="also run each fastres backend under torch.compile")
    pb.add_argument("--conv-paths", action="store_true",
                    help="also run fastres[triton] with the Triton fused convolution (FASTRES_CONV=fused) and "
                         "fastres[cuda] with cuDNN's fused conv graphs (FASTRES_CONV=cudnn) as contenders of "
                         "their own (CUDA only; first calls autotune/build plans, untimed)")
    pb.add_argument("--cuda-graphs", action="store_true",
                    help="also time each eager contender with its whole step (forward, backward, SGD; or the "
                         "inference forward) captured in a CUDA graph and replayed (CUDA only)")
    pb.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="time the repeats round-robin (default): every contender is built, compiled and "
                         "warmed up first, then round i runs repeat i of each in turn, so all see the same "
                         "load; rows add the median of the per-round ratios against the baseline and the "
                         "strongest alternative; every contender of a mode is held in memory at once. "
                         "--no-interleave: each contender alone, one after another")
    pb.add_argument("--iters", type=_positive_int, default=None, help="timed iterations per repeat")
    pb.add_argument("--repeats", type=_positive_int, default=None, help="timed repeats (median and spread)")
    pb.add_argument("--warmup", type=_nonneg_int, default=None, help="untimed warm-up iterations")
    pb.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    pb.add_argument("--threads", type=_positive_int, default=None,
                    help="torch.set_num_threads for the CPU (default: torch's choice)")
    pb.add_argument("--num-classes", type=_positive_int, default=None, help="default 1000 (CIFAR: 10)")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--out", default=None,
                    help="output folder for the table, JSON, CSV and PNG "
                         "(default benchmarks/results/<device>)")
    pb.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    pb.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    pb.add_argument("--tag", default="", help="extra word in the output file names")

    # ------------------------------------------------------------------ check
    pc = sub.add_parser(
        "check", help="parity self-check of every available backend (exit 1 on failure)",
        description="Run the core parity cases (fused ops, residual blocks, resnet50 in train and eval, "
                    "conv2d_act per conv family) "
                    "for every backend available on the device, in every dtype it supports, against "
                    "torch reference modules, and print a pass/fail table with the worst relative error.")
    pc.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    pc.add_argument("--backend", type=_backend_list, default="all",
                    help="all available (default), auto, or a comma list of torch,triton,cpp,cuda")
    pc.add_argument("--cases", default="ops,blocks,models,convs",
                    help="comma list of ops, blocks, models, convs (conv2d_act per conv family; default all four)")
    pc.add_argument("--dtype", default=None,
                    help="comma list of fp64,fp32,bf16,fp16 (default: CPU fp64,fp32,bf16; GPU fp32,bf16,fp16)")
    pc.add_argument("--json", dest="json_out", default=None, metavar="PATH",
                    help="also write the rows as JSON to PATH")
    pc.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads for the CPU")
    pc.add_argument("--seed", type=int, default=0)
    pc.add_argument("-v", "--verbose", action="store_true", help="print each case as it runs")

    # ------------------------------------------------------------------ paper
    from .paper import add_paper_parser
    add_paper_parser(sub)
    return p


# ---------------------------------------------------------------------- info
def format_info(info: dict) -> str:
    from . import __version__
    from .backends import BACKENDS, available

    lines = [f"fastres {__version__}  (torch {info.get('torch')}, CUDA available: {info.get('cuda_available')})",
             f"requested backend: {info.get('requested')}   "
             f"(set with FASTRES_BACKEND or fastres.set_backend())"]
    built = info.get("built", {})
    lines.append("built:")
    lines.append(f"  fastres._C      : {'yes' if built.get('_C') else 'no'}  — {built.get('_C_message')}")
    lines.append(f"  C++ CUDA kernels: {'yes' if built.get('_C_cuda_kernels') else 'no'}")
    tri = built.get("triton_message", "")
    if built.get("triton_interpret"):
        tri += "  [TRITON_INTERPRET=1: Triton runs in its interpreter]"
    lines.append(f"  triton          : {'yes' if built.get('triton') else 'no'}  — {tri}")
    top = info.get("triton_op")
    if top:  # issue 12: the Triton family as custom ops or as triton_op + wrap_triton
        lines.append(f"triton ops as: {top['variant']}  (FASTRES_TRITON_OP={top['requested']}; {top['reason']})")
    for dev, d in info.get("devices", {}).items():
        lines.append(f"device {dev}: fused ops run on backend '{d['backend']}'")
        for b in BACKENDS:
            ok = d["available"].get(b)
            try:
                why = available(b, dev)[1]
            except Exception as e:  # pragma: no cover - defensive
                why = str(e)
            lines.append(f"  {b:<7} {'available  ' if ok else 'unavailable'}  {why}")
        ops = d.get("ops", {})
        if ops:
            lines.append("  ops: " + ", ".join(f"{k}={v}" for k, v in ops.items()))
        if d.get("fallback_warning"):
            lines.append(f"  WARNING: {d['fallback_warning']}")
        conv = d.get("conv")
        if conv:  # issue 10: which convolution conv2d_act runs (FASTRES_CONV / fastres.set_conv)
            lines.append(f"  conv: {conv['path']}  (requested {conv['requested']}; {conv['reason']})")
            ab = conv.get("aten_backends")
            if ab:  # the aten path's backends (fastres.conv_aten), chosen per call
                lines.append("  aten conv backends: " + ", ".join(
                    f"{k} ({'on' if v['available'] else 'off: ' + v.get('reason', '')})" for k, v in ab.items()))
        cd = d.get("cudnn_conv")
        if cd:  # issue 11: cuDNN fused-conv graphs (FASTRES_CONV=cudnn)
            state = "available" if cd["available"] else "unavailable"
            pats = ", ".join(cd["patterns"]) or "none"
            lines.append(f"  cudnn conv graphs: {state} ({cd['reason']}); patterns: {pats}; "
                         f"fallback: {cd['fallback']}")
            for dt, parts in (cd.get("backward") or {}).items():  # each backward part's graph or fallback
                lines.append(f"    backward {dt}: " + "; ".join(f"{p} = {v}" for p, v in parts.items()))
    return "\n".join(lines)


def cmd_info(args) -> int:
    import fastres
    info = fastres.backend_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=False, default=str))
    else:
        print(format_info(info))
    return 0


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def cmd_bench(args) -> int:
    _threads(args)
    from . import bench
    return bench.main_from_args(args)


def cmd_check(args) -> int:
    _threads(args)
    from . import check
    return check.main_from_args(args)


def cmd_paper(args) -> int:
    _threads(args)
    from . import paper
    return paper.main_from_args(args)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return {"info": cmd_info, "bench": cmd_bench, "check": cmd_check, "paper": cmd_paper}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
