"""``python -m fastres paper {degradation,shortcuts}``: He et al. 2015 on fastres's own models.

* ``degradation`` — Fig. 6 of the paper: plain and residual CIFAR nets
  (:func:`fastres.cifar_resnet`, ``shortcut=None`` and ``"A"``) of two or more
  depths (default 20 and 56), one recipe, training and test error per epoch.
* ``shortcuts`` — Table 3: shortcut options A, B, C (and the plain net) at one depth.

Recipe (§4.2): SGD, momentum 0.9, weight decay 1e-4 on every parameter, learning
rate (default 0.1 on CIFAR-10, 0.02 on digits: see ``DATA_DEFAULTS``) divided by 10 at 50% and 75% of the run (the paper's 32k and
48k of 64k iterations, scaled to the run's length, stepped per iteration), BN after
every conv (the models' own), He initialisation (``kaiming_normal_``, fan_out — the
models' own), cross-entropy, no dropout. Every net sees the same data order (and the
same augmentation draws) for a given ``--seed``.

Errors, in percent: *training error* is the running error over the epoch's
mini-batches in training mode (batch statistics, augmentation on), as the paper's
dashed curves; *test error* is measured on the whole test set in eval mode after
each epoch.

Data: ``digits`` (default) — scikit-learn's 8x8 handwritten digits (1,797 images,
shipped with scikit-learn, no download), upsampled bilinearly to 32x32, repeated to
3 channels, a fixed stratified 1,497/300 train/test split, per-pixel mean
subtraction, no augmentation (flips would change the digits). ``cifar10:PATH`` — the
CIFAR-10 python batches (``data_batch_*``, ``test_batch``) from a local folder,
per-pixel mean subtraction, the paper's augmentation (4-pixel zero padding, random
32x32 crop, random horizontal flip) on the training batches.

Outputs, in ``--out`` (default ``benchmarks/results/<device>/paper``): ``.png``
(the figure), ``.csv`` (every point), ``.json`` (settings, device, versions, seed,
wall time, the runs, the summary), ``.txt`` (the table and the summary). They are
rewritten after every finished run, so an interrupted run leaves what it finished
(``"complete": false`` in the JSON).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import glob
import json
import math
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._argtypes import positive_float as _pos_float, positive_int as _positive_int

Tensor = torch.Tensor

EXTRA_HINT = "pip install 'fastres[paper]'"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIONS = ("A", "B", "C", "plain")

# Defaults per data set (``None`` on the command line means "take these").
# digits: 6 epochs x 23 iterations of batch 64 keeps the whole default degradation run
# (plain + residual at depths 20 and 56) near 10 minutes on a quiet 2-core CPU. At that
# budget (138 iterations, lr /10 after 69) the paper's lr 0.1 is too large a start for
# ResNet-56 (measured: 57% training error after 138 iterations at 0.1, 1.6% at 0.02) —
# the paper warms ResNet-110 up at 0.01 for the same reason — so digits starts at 0.02.
# cifar10: the paper's schedule, 64k iterations of batch 128 = 164 epochs of 50k images, lr 0.1.
DATA_DEFAULTS = {
    "digits": dict(epochs=6, batch_size=64, lr=0.02),
    "cifar10": dict(epochs=164, batch_size=128, lr=0.1),
}

# The paper's numbers, for the summary and the README (He et al. 2015, arXiv 1512.03385).
PAPER = {
    "cifar10_test_error_table6": {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                                  "resnet110": 6.43, "resnet1202": 7.93},
    "fig6": "CIFAR-10: plain-56 has higher training (and test) error than plain-20 (left); "
            "ResNet-56 has lower error than ResNet-20 (middle)",
    "imagenet_resnet34_top1_10crop_table3": {"plain": 28.54, "A": 25.03, "B": 24.52, "C": 24.19},
    "schedule": "lr 0.1, /10 at 32k and 48k iterations, stop at 64k; batch 128; wd 1e-4; momentum 0.9",
}

CSV_FIELDS = ("experiment", "data", "label", "depth", "net", "shortcut", "iteration", "epoch", "lr",
              "train_loss", "train_error", "test_error")


# ============================================================================ dependencies
def require(module: str, what: str, pip_name: Optional[str] = None):
    """Import an optional dependency or exit with a message naming the extra."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise SystemExit(f"fastres paper: {what} needs {pip_name or module} ({e}); "
                         f"install the extra: {EXTRA_HINT}  (or: pip install {pip_name or module})") from None


# ============================================================================ schedule
def paper_milestones(total_iters: int) -> List[int]:
    """Iterations after which the learning rate is divided by 10: 50% and 75% of the
    run, the paper's 32k and 48k of 64k (``paper_milestones(64000) == [32000, 48000]``)."""
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    return [max(1, int(math.floor(total_iters * f + 0.5))) for f in (0.5, 0.75)]


def make_schedule(optimizer: torch.optim.Optimizer, total_iters: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """The step schedule, stepped once per iteration: iteration ``i`` (0-based) runs at
    ``lr * 0.1 ** (number of milestones <= i)``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=paper_milestones(total_iters), gamma=0.1)


# ============================================================================ data
@dataclass
class Data:
    name: str            # "digits" | "cifar10"
    train_x: Tensor      # (N, 3, 32, 32) float32, per-pixel mean subtracted
    train_y: Tensor      # (N,) int64
    test_x: Tensor
    test_y: Tensor
    augment: bool        # the paper's pad-4 / crop-32 / flip on training batches
    description: str
    num_classes: int = 10


def parse_data(text: str) -> Tuple[str, Optional[str]]:
    """``digits`` or ``cifar10:PATH`` → (kind, path)."""
    if text == "digits":
        return "digits", None
    if text.startswith("cifar10:") and len(text) > len("cifar10:"):
        return "cifar10", text[len("cifar10:"):]
    raise ValueError(f"--data must be 'digits' or 'cifar10:PATH', got {text!r}")


def _limit(x: Tensor, y: Tensor, n: Optional[int]) -> Tuple[Tensor, Tensor]:
    return (x, y) if n is None else (x[:n], y[:n])


def _mean_subtract(train_x: Tensor, test_x: Tensor) -> Tuple[Tensor, Tensor]:
    mean = train_x.mean(dim=0, keepdim=True)  # per-pixel (and per-channel) mean of the training set
    return train_x - mean, test_x - mean


def load_digits(limit: Optional[int] = None, test_per_class: int = 30) -> Data:
    """scikit-learn's digits, 8x8 → 32x32 (bilinear), 3 channels, values in [0, 1] then
    the training set's per-pixel mean subtracted. Fixed stratified split (independent of
    ``--seed``): ``test_per_class`` images of each digit for the test set (300 in all)."""
    datasets = require("sklearn.datasets", "the digits data set", "scikit-learn")
    d = datasets.load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (1797, 8, 8), 0..16 → 0..1
    labels = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(12345)
    order = torch.randperm(len(labels), generator=g)
    test_idx, train_idx = [], []
    seen = [0] * 10
    for i in order.tolist():
        c = int(labels[i])
        if seen[c] < test_per_class:
            test_idx.append(i)
            seen[c] += 1
        else:
            train_idx.append(i)
    x = F.interpolate(images[:, None], size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    tr_x, tr_y = _limit(x[train_idx], labels[train_idx], limit)
    te_x, te_y = _limit(x[test_idx], labels[test_idx], limit)
    tr_x, te_x = _mean_subtract(tr_x, te_x)
    desc = (f"scikit-learn digits (8x8 upsampled bilinearly to 32x32, 3 channels), fixed stratified split "
            f"{len(tr_y)} train / {len(te_y)} test, per-pixel mean subtracted, no augmentation")
    return Data("digits", tr_x.contiguous(), tr_y, te_x.contiguous(), te_y, augment=False, description=desc)


def _cifar_folder(path: str) -> str:
    path = os.path.expanduser(path)
    if not glob.glob(os.path.join(path, "data_batch_*")) and os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        path = os.path.join(path, "cifar-10-batches-py")
    return path


def _read_cifar_batch(path: str) -> Tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise SystemExit(f"fastres paper: {path} is not a CIFAR-10 python batch (no 'data'/'labels' keys)")
    x = torch.as_tensor(data).reshape(-1, 3, 32, 32)
    y = torch.as_tensor(list(labels), dtype=torch.int64)
    if x.dtype != torch.uint8 or len(x) != len(y):
        raise SystemExit(f"fastres paper: {path}: expected uint8 data of shape (N, 3072) and N labels, got "
                         f"{tuple(data.shape)} {x.dtype} and {len(y)} labels")
    return x, y


def load_cifar10(path: str, limit: Optional[int] = None) -> Data:
    """The CIFAR-10 python batches in ``path`` (or ``path/cifar-10-batches-py``): every
    ``data_batch_*`` for training (the paper trains on all 50k), ``test_batch`` for test;
    scaled to [0, 1], the training set's per-pixel mean subtracted. No download."""
    folder = _cifar_folder(path)
    train_files = sorted(glob.glob(os.path.join(folder, "data_batch_*")))
    test_file = os.path.join(folder, "test_batch")
    if not train_files or not os.path.isfile(test_file):
        raise SystemExit(f"fastres paper: no CIFAR-10 python batches in {path!r}: expected data_batch_1..5 and "
                         f"test_batch (the 'CIFAR-10 python version', cifar-10-batches-py); nothing is downloaded")
    parts = [_read_cifar_batch(f) for f in train_files]
    tr_x, tr_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    te_x, te_y = _read_cifar_batch(test_file)
    tr_x, tr_y = _limit(tr_x, tr_y, limit)
    te_x, te_y = _limit(te_x, te_y, limit)
    tr_x, te_x = _mean_subtract(tr_x.float() / 255.0, te_x.float() / 255.0)
    desc = (f"CIFAR-10 from {folder} ({len(train_files)} training batch(es)): {len(tr_y)} train / {len(te_y)} test, "
            f"per-pixel mean subtracted, augmentation: 4-pixel zero padding, random 32x32 crop, horizontal flip")
    return Data("cifar10", tr_x.contiguous(), tr_y, te_x.contiguous(), te_y, augment=True, description=desc)


def load_data(spec: str, limit: Optional[int] = None) -> Data:
    kind, path = parse_data(spec)
    return load_digits(limit) if kind == "digits" else load_cifar10(path, limit)


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """The paper's augmentation on a batch: zero-pad ``pad`` pixels each side, a random
    crop back to the input size, a random horizontal flip (each with probability 1/2).
    Random draws come from the CPU ``generator``; the work runs on ``x``'s device."""
    n, c, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    p = F.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = p[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
            rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# ============================================================================ config
@dataclass
class PaperConfig:
    experiment: str                 # "degradation" | "shortcuts"
    data: str
    nets: List[Tuple[int, Optional[str]]]   # (depth, shortcut option or None for plain)
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    device: str
    dtype: str
    channels_last: bool
    seed: int
    out: str
    limit: Optional[int] = None
    plot: bool = True
    progress: bool = True
    notes: List[str] = field(default_factory=list)


def net_label(depth: int, shortcut: Optional[str], experiment: str = "degradation") -> str:
    if shortcut is None:
        return f"plain-{depth}"
    return f"ResNet-{depth}" if experiment == "degradation" else f"ResNet-{depth} ({shortcut})"


def _depths(text: str) -> List[int]:
    try:
        ds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of depths like 20,56, got {text!r}") from None
    bad = [d for d in ds if d < 8 or (d - 2) % 6]
    if not ds or bad:
        raise argparse.ArgumentTypeError(f"depths must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                                         f"got {text!r}")
    return sorted(set(ds))


def _depth(text: str) -> int:
    ds = _depths(text)
    if len(ds) != 1:
        raise argparse.ArgumentTypeError(f"expected one depth, got {text!r}")
    return ds[0]


def _options(text: str) -> List[str]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if not t:
            continue
        u = "plain" if t.lower() in ("plain", "none") else t.upper()
        if u not in OPTIONS:
            raise argparse.ArgumentTypeError(f"unknown shortcut option {t!r}; choose from A, B, C, plain")
        if u not in out:
            out.append(u)
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list of A, B, C, plain, got {text!r}")
    return out


def _data_spec(text: str) -> str:
    try:
        parse_data(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_paper_parser(sub) -> argparse.ArgumentParser:
    """Add ``paper {degradation,shortcuts}`` to the CLI's subparsers."""
    pp = sub.add_parser("paper", help="reproduce He et al. 2015 on fastres's CIFAR nets (Fig. 6, Table 3)",
                        description="Reproduce He et al. 2015 (arXiv 1512.03385) on fastres's fused CIFAR "
                                    "ResNets: 'degradation' (Fig. 6, plain vs residual at several depths) and "
                                    "'shortcuts' (Table 3, options A/B/C and plain at one depth).")
    psub = pp.add_subparsers(dest="experiment", metavar="{degradation,shortcuts}")

    def common(p):
        p.add_argument("--data", type=_data_spec, default="digits",
                       help="digits (default: scikit-learn's 8x8 digits upsampled to 32x32, no download) or "
                            "cifar10:PATH (the CIFAR-10 python batches in a local folder)")
        p.add_argument("--epochs", type=_positive_int, default=None,
                       help=f"default: digits {DATA_DEFAULTS['digits']['epochs']}, "
                            f"cifar10 {DATA_DEFAULTS['cifar10']['epochs']} (the paper's 64k iterations)")
        p.add_argument("--batch-size", type=_positive_int, default=None,
                       help=f"default: digits {DATA_DEFAULTS['digits']['batch_size']}, "
                            f"cifar10 {DATA_DEFAULTS['cifar10']['batch_size']} (the paper's)")
        p.add_argument("--lr", type=_pos_float, default=None,
                       help=f"initial learning rate (default: digits {DATA_DEFAULTS['digits']['lr']}, "
                            f"cifar10 {DATA_DEFAULTS['cifar10']['lr']}, the paper's)")
        p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
        p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                       help="fp32 (default), or bf16/fp16 autocast (fp16 with a GradScaler on CUDA)")
        p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="NHWC model and batches (default on)")
        p.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
        p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/paper)")
        p.add_argument("--limit", type=_positive_int, default=None,
                       help="use only the first N training and N test images (quick checks)")
        p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads for the CPU")
        p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
        p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    pd = psub.add_parser("degradation", help="Fig. 6: plain vs residual nets at several depths",
                         description="Train plain and residual (option A) CIFAR nets of each depth with the "
                                     "paper's recipe; plot training (dashed) and test (bold) error vs "
                                     "iterations, plain and residual side by side, like Fig. 6.")
    common(pd)
    pd.add_argument("--depths", type=_depths, default=[20, 56], help="comma list of 6n+2 depths (default 20,56)")

    ps = psub.add_parser("shortcuts", help="Table 3: shortcut options A, B, C and plain at one depth",
                         description="Train the CIFAR net of one depth with shortcut options A (zero-padding "
                                     "identity), B (projection when dimensions grow), C (projection everywhere) "
                                     "and the plain net; a table like Table 3 plus the figure.")
    common(ps)
    ps.add_argument("--depth", type=_depth, default=20, help="one 6n+2 depth (default 20)")
    ps.add_argument("--options", type=_options, default=list(OPTIONS),
                    help="comma list of A, B, C, plain (default all four)")
    return pp


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_config(args) -> PaperConfig:
    from .bench import device_slug
    exp = args.experiment
    dev = torch.device(args.device or default_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastres paper: --device cuda requested but CUDA is not available")
    kind, _ = parse_data(args.data)
    d = DATA_DEFAULTS[kind]
    if exp == "degradation":
        nets = [(depth, sc) for sc in (None, "A") for depth in args.depths]
    else:
        nets = [(args.depth, None if o == "plain" else o) for o in args.options]
    out = args.out or os.path.join("benchmarks", "results", device_slug(dev), "paper")
    cfg = PaperConfig(experiment=exp, data=args.data, nets=nets,
                      epochs=args.epochs if args.epochs is not None else d["epochs"],
                      batch_size=args.batch_size if args.batch_size is not None else d["batch_size"],
                      lr=args.lr if args.lr is not None else d["lr"], momentum=0.9, weight_decay=1e-4, device=str(dev), dtype=args.dtype,
                      channels_last=bool(args.channels_last), seed=args.seed, out=out, limit=args.limit,
                      plot=not args.no_plot, progress=not args.no_progress)
    if cfg.dtype == "fp16" and dev.type == "cpu":
        cfg.notes.append("fp16 autocast on the CPU is slow in PyTorch; bf16 is the CPU's low precision")
    return cfg


# ============================================================================ training
class _Bar:
    """tqdm bar for one run, or a line per epoch on stderr when tqdm is missing or off."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = None
        self.label = label
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=label, unit="it", file=sys.stderr, dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def update(self, n: int, **post) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if post:
                self.bar.set_postfix(post, refresh=False)

    def epoch(self, text: str) -> None:
        if self.bar is None:  # no tqdm, or --no-progress: one line per epoch
            print(f"[{self.label}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _autocast(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: torch.nn.Module, x: Tensor, y: Tensor, cfg: PaperConfig, chunk: int = 500) -> float:
    """Test error (%) of ``model`` in eval mode on (x, y), in chunks."""
    device = torch.device(cfg.device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode(), _autocast(cfg.dtype, device):
        for i in range(0, len(y), chunk):
            xb = x[i:i + chunk].to(device, non_blocking=True).contiguous(memory_format=fmt)
            yb = y[i:i + chunk].to(device, non_blocking=True)
            wrong += (model(xb).argmax(1) != yb).sum()
    model.train()
    return 100.0 * wrong.item() / max(1, len(y))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(depth: int, shortcut: Optional[str], num_classes: int = 10) -> torch.nn.Module:
    """fastres's fused CIFAR net (BN after every conv, He initialisation)."""
    from .models.cifar import cifar_resnet
    return cifar_resnet(depth, shortcut=shortcut, num_classes=num_classes)


def train_run(depth: int, shortcut: Optional[str], data: Data, cfg: PaperConfig) -> Dict[str, object]:
    """Train one net with the paper's recipe; returns its record with one point per epoch."""
    device = torch.device(cfg.device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    label = net_label(depth, shortcut, cfg.experiment)
    n = len(data.train_y)
    if cfg.batch_size > n:
        raise SystemExit(f"fastres paper: --batch-size {cfg.batch_size} is larger than the training set "
                         f"({n} images)")
    iters_per_epoch = n // cfg.batch_size  # the last partial batch is dropped (BN needs full batches)
    total = cfg.epochs * iters_per_epoch

    torch.manual_seed(cfg.seed)  # same initial draw for every net of one depth/option at a seed
    model = build_model(depth, shortcut, data.num_classes).to(device=device, memory_format=fmt)
    params = count_params(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = make_schedule(opt, total)
    scaler = torch.amp.GradScaler("cuda") if (cfg.dtype == "fp16" and device.type == "cuda") else None
    gen = torch.Generator().manual_seed(cfg.seed)  # data order + augmentation: the same for every net
    train_x = data.train_x.to(device)
    train_y = data.train_y.to(device)

    bar = _Bar(total, label, cfg.progress)
    points: List[Dict[str, object]] = []
    it = 0
    train_time = 0.0
    t_run = time.perf_counter()
    model.train()
    try:
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(n, generator=gen).to(device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            wrong = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            lr_epoch = float(f"{opt.param_groups[0]['lr']:.6g}")  # 0.01, not 0.010000000000000002
            _sync(device)
            t0 = time.perf_counter()
            t_last, it_last = t0, 0
            for i in range(iters_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                x, y = train_x[idx], train_y[idx]
                if data.augment:
                    x = augment(x, gen)
                x = x.contiguous(memory_format=fmt)
                with _autocast(cfg.dtype, device):
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                sched.step()
                loss_sum += loss.detach().double() * len(y)
                wrong += (out.detach().argmax(1) != y).sum()
                seen += len(y)
                it += 1
                it_last += 1
                last = i == iters_per_epoch - 1
                if bar.bar is not None and (last or it_last >= 10 or device.type == "cpu"):
                    _sync(device)
                    now = time.perf_counter()
                    bar.update(it_last, ep=f"{epoch}/{cfg.epochs}", loss=f"{loss_sum.item() / seen:.3f}",
                               err=f"{100.0 * wrong.item() / seen:.1f}%",
                               img_s=f"{it_last * cfg.batch_size / max(now - t_last, 1e-9):.0f}")
                    t_last, it_last = now, 0
            _sync(device)
            t_epoch = time.perf_counter() - t0
            train_time += t_epoch
            train_err = 100.0 * wrong.item() / seen
            train_loss = loss_sum.item() / seen
            test_err = evaluate(model, data.test_x, data.test_y, cfg)
            points.append(dict(iteration=it, epoch=epoch, lr=lr_epoch, train_loss=train_loss,
                               train_error=train_err, test_error=test_err))
            bar.epoch(f"epoch {epoch}/{cfg.epochs} iter {it}: loss {train_loss:.3f}, train error {train_err:.2f}%, "
                      f"test error {test_err:.2f}%, {seen / max(t_epoch, 1e-9):.0f} img/s")
            if bar.bar is not None:
                bar.bar.set_postfix(ep=f"{epoch}/{cfg.epochs}", loss=f"{train_loss:.3f}", err=f"{train_err:.1f}%",
                                    test=f"{test_err:.1f}%", img_s=f"{seen / max(t_epoch, 1e-9):.0f}")
    finally:
        bar.close()
    wall = time.perf_counter() - t_run
    final = points[-1]
    return dict(label=label, depth=depth, net="plain" if shortcut is None else "residual",
                shortcut=shortcut or "none", params=params, iterations=total, iters_per_epoch=iters_per_epoch,
                milestones=paper_milestones(total), wall_s=round(wall, 2),
                train_img_per_s=round(cfg.epochs * iters_per_epoch * cfg.batch_size / max(train_time, 1e-9), 1),
                final_train_error=final["train_error"], final_test_error=final["test_error"],
                final_train_loss=final["train_loss"], points=points)


# ============================================================================ summary
def _cmp(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)):
        return "not comparable (non-finite)"
    return "higher" if a > b else "lower" if a < b else "equal"


def summarize(cfg: PaperConfig, runs: Sequence[Dict[str, object]]) -> List[str]:
    """Statements computed from the finished runs (as measured, whatever they show)."""
    lines: List[str] = []
    if cfg.experiment == "degradation":
        verdicts = {}
        for net, want, paper_says in (("plain", "higher", "Fig. 6 left: plain-56 above plain-20"),
                                      ("residual", "lower", "Fig. 6 middle: ResNet-56 below ResNet-20")):
            rs = sorted((r for r in runs if r["net"] == net), key=lambda r: r["depth"])
            if len(rs) < 2:
                continue
            sh, dp = rs[0], rs[-1]
            rel = _cmp(dp["final_train_error"], sh["final_train_error"])
            rel_t = _cmp(dp["final_test_error"], sh["final_test_error"])
            verdicts[net] = rel == want
            lines.append(f"summary: {net}: the deeper {dp['label']} ended with training error "
                         f"{dp['final_train_error']:.2f}% vs {sh['final_train_error']:.2f}% for {sh['label']} "
                         f"-> {rel.upper()} (test error {dp['final_test_error']:.2f}% vs "
                         f"{sh['final_test_error']:.2f}%, {rel_t}); paper ({paper_says}): {want}")
        if len(verdicts) == 2:
            both = verdicts["plain"] and verdicts["residual"]
            lines.append("summary: degradation claim (deeper plain trains worse, deeper residual trains better) "
                         + ("REPRODUCED in this run" if both else
                            "NOT reproduced in this run: "
                            + ", ".join(f"{k} {'as the paper' if v else 'unlike the paper'}"
                                        for k, v in verdicts.items())))
        for d in sorted({r["depth"] for r in runs}):
            p = next((r for r in runs if r["depth"] == d and r["net"] == "plain"), None)
            q = next((r for r in runs if r["depth"] == d and r["net"] == "residual"), None)
            if p and q:
                lines.append(f"summary: depth {d}: residual vs plain final training error "
                             f"{q['final_train_error']:.2f}% vs {p['final_train_error']:.2f}% "
                             f"-> {_cmp(q['final_train_error'], p['final_train_error'])}")
    else:
        by = {r["shortcut"]: r for r in runs}
        paper = PAPER["imagenet_resnet34_top1_10crop_table3"]
        for a, b in (("B", "A"), ("C", "B"), ("A", "none")):
            if a in by and b in by:
                ra, rb = by[a], by[b]
                pa, pb = paper[a], paper["plain" if b == "none" else b]
                lines.append(f"summary: {ra['label']} vs {rb['label']}: test error {ra['final_test_error']:.2f}% vs "
                             f"{rb['final_test_error']:.2f}% -> {_cmp(ra['final_test_error'], rb['final_test_error']).upper()}"
                             f"; training error {ra['final_train_error']:.2f}% vs {rb['final_train_error']:.2f}% -> "
                             f"{_cmp(ra['final_train_error'], rb['final_train_error'])}"
                             f" (paper Table 3, ImageNet ResNet-34 top-1: {pa} vs {pb}, lower)")
    if not lines:
        lines.append("summary: nothing to compare (fewer than two finished runs)")
    return lines


# ============================================================================ output
def output_stem(cfg: PaperConfig, date: str) -> str:
    kind, _ = parse_data(cfg.data)
    depths = sorted({d for d, _ in cfg.nets})
    what = "d" + "-".join(str(d) for d in depths)
    if cfg.experiment == "shortcuts":
        what += "_" + "-".join(sc or "plain" for _, sc in cfg.nets)
    lim = f"_n{cfg.limit}" if cfg.limit else ""
    return f"{cfg.experiment}_{kind}_{what}_e{cfg.epochs}_b{cfg.batch_size}_lr{cfg.lr:g}_{cfg.dtype}{lim}_{date}"


def format_table(result: Dict[str, object]) -> str:
    meta, runs = result["meta"], result["runs"]
    s = meta["settings"]
    lines = [f"fastres paper {s['experiment']} — He et al. 2015 ({'Fig. 6' if s['experiment'] == 'degradation' else 'Table 3'})",
             f"data: {meta['data_description']}",
             f"device: {meta['device']} ({meta['device_name']})   date: {meta['time']}   "
             f"wall time: {meta.get('wall_s', '—')} s",
             f"recipe: SGD momentum {s['momentum']}, weight decay {s['weight_decay']}, lr {s['lr']} /10 at 50% and "
             f"75% of the iterations, batch {s['batch_size']}, {s['epochs']} epochs, {s['dtype']}, seed {s['seed']}",
             f"errors in %: train = {meta['train_error']}; test = {meta['test_error']}",
             ""]
    hdr = f"{'net':<18} {'params':>9} {'iters':>7} {'train err':>10} {'test err':>9} {'img/s':>8} {'wall s':>8}"
    lines += [hdr, "-" * len(hdr)]
    for r in runs:
        lines.append(f"{r['label']:<18} {r['params'] / 1e6:>8.3f}M {r['iterations']:>7} "
                     f"{r['final_train_error']:>9.2f}% {r['final_test_error']:>8.2f}% "
                     f"{r['train_img_per_s']:>8.1f} {r['wall_s']:>8.1f}")
    if not meta.get("complete", True):
        lines.append(f"(incomplete: {len(runs)} of {len(s['nets'])} runs finished)")
    lines.append("")
    lines += list(result["summary"])
    for n in meta.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def csv_rows(result: Dict[str, object]) -> List[Dict[str, object]]:
    s = result["meta"]["settings"]
    kind, _ = parse_data(s["data"])
    rows = []
    for r in result["runs"]:
        for p in r["points"]:
            rows.append(dict(experiment=s["experiment"], data=kind, label=r["label"], depth=r["depth"], net=r["net"],
                             shortcut=r["shortcut"], iteration=p["iteration"], epoch=p["epoch"], lr=p["lr"],
                             train_loss=round(p["train_loss"], 6), train_error=round(p["train_error"], 4),
                             test_error=round(p["test_error"], 4)))
    return rows


def plot(result: Dict[str, object], path: str) -> None:
    """Fig. 6 style: error vs iterations, dashed training / bold test error, a colour per
    depth (degradation: plain | residual side by side) or per option (shortcuts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta, runs = result["meta"], result["runs"]
    s = meta["settings"]
    deg = s["experiment"] == "degradation"
    panels = [("plain", "plain"), ("residual", "ResNet")] if deg else [(None, f"depth {s['nets'][0][0]}")]
    fig = Figure(figsize=(11 if deg else 6.5, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    keys = sorted({r["depth"] for r in runs}) if deg else [r["shortcut"] for r in runs]
    colour = {k: palette[i % len(palette)] for i, k in enumerate(keys)}
    max_it = max((p["iteration"] for r in runs for p in r["points"]), default=1)
    scale, xlabel = (1e4, "iter. (1e4)") if max_it >= 2e4 else (1.0, "iterations")
    ymax = max([p[k] for r in runs for p in r["points"] for k in ("train_error", "test_error")
                if math.isfinite(p[k])] or [1.0])
    axes = []
    for i, (net, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        for r in runs:
            if net is not None and r["net"] != net:
                continue
            c = colour[r["depth"] if deg else r["shortcut"]]
            xs = [p["iteration"] / scale for p in r["points"]]
            lab = (f"{'plain' if r['net'] == 'plain' else 'ResNet'}-{r['depth']}" if deg else
                   ("plain" if r["shortcut"] == "none" else f"option {r['shortcut']}"))
            ax.plot(xs, [p["train_error"] for p in r["points"]], "--", color=c, linewidth=1.2)
            ax.plot(xs, [p["test_error"] for p in r["points"]], "-", color=c, linewidth=2.4, label=lab,
                    marker="o" if len(xs) <= 30 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, min(100.0, ymax * 1.08 + 1))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="bold: test, dashed: train", title_fontsize=7)
    axes[0].set_ylabel("error (%)")
    kind, _ = parse_data(s["data"])
    fig.suptitle(f"fastres paper {s['experiment']} — {kind}, {s['epochs']} epochs, batch {s['batch_size']}, "
                 f"lr {s['lr']} (/10 at 50%, 75%)\n{meta['device_name']}, {meta['date']}, "
                 f"wall time {meta.get('wall_s', '?')} s", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(result: Dict[str, object], out_dir: str, stem: str, plot_png: bool = True) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    paths = {"txt": base + ".txt", "json": base + ".json", "csv": base + ".csv"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(result))
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(paths["txt"], "w") as f:
        f.write(format_table(result) + "\n")
    if plot_png and result["runs"]:
        paths["png"] = base + ".png"
        plot(result, paths["png"])
    return paths


# ============================================================================ entry point
def run(cfg: PaperConfig, write: bool = True) -> Tuple[Dict[str, object], Dict[str, str]]:
    """Train every net of ``cfg``; writes the outputs after each finished run."""
    import fastres
    from .bench import _loadavg, _versions, device_name, device_slug

    if cfg.plot:
        require("matplotlib", "the figure (--no-plot skips it)")
    device = torch.device(cfg.device)
    data = load_data(cfg.data, cfg.limit)
    date = _dt.date.today().isoformat()
    stem = output_stem(cfg, date)
    notes = list(cfg.notes)
    load_before = _loadavg()
    if device.type == "cpu" and load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        notes.append(f"the machine was busy (1-min load average {load_before:.2f} at the start): wall times are "
                     f"inflated")
    if cfg.progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            print("(tqdm not installed: one line per epoch instead of a progress bar)", file=sys.stderr)
    settings = asdict(cfg)
    meta = dict(tool=f"python -m fastres paper {cfg.experiment}", date=date,
                time=_dt.datetime.now().isoformat(timespec="seconds"), device=str(device),
                device_name=device_name(device), device_slug=device_slug(device), versions=_versions(),
                backend=fastres.backend_for(device), settings=settings, seed=cfg.seed,
                data_description=data.description,
                train_error="running error over each epoch's mini-batches in training mode (as the paper's curves)"
                            + (", with augmentation" if data.augment else ""),
                test_error="whole test set in eval mode after each epoch",
                init="He (kaiming_normal_, fan_out) for convs, BN weight 1 / bias 0, fc torch default",
                paper=PAPER, load_before=load_before, notes=notes, complete=False)
    result: Dict[str, object] = dict(meta=meta, runs=[], summary=[])
    t0 = time.perf_counter()
    paths: Dict[str, str] = {}
    print(f"fastres paper {cfg.experiment}: {len(cfg.nets)} runs on {device} ({meta['device_name']}), "
          f"backend {meta['backend']}; {data.description}", file=sys.stderr, flush=True)
    for depth, sc in cfg.nets:
        result["runs"].append(train_run(depth, sc, data, cfg))
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        meta["complete"] = len(result["runs"]) == len(cfg.nets)
        meta["load_after"] = _loadavg()
        result["summary"] = summarize(cfg, result["runs"])
        if write:
            paths = write_outputs(result, cfg.out, stem, plot_png=cfg.plot)
    return result, paths


def main_from_args(args) -> int:
    if getattr(args, "experiment", None) is None:
        print("usage: python -m fastres paper {degradation,shortcuts} [options]  (see --help)", file=sys.stderr)
        return 2
    cfg = resolve_config(args)
    result, paths = run(cfg)
    print(format_table(result))
    print("wrote " + ", ".join(paths.values()))
    return 0 if all(math.isfinite(r["final_train_loss"]) for r in result["runs"]) else 1
