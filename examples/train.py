#!/usr/bin/env python
"""Train a ResNet with fastres swapped in — a real training loop, nothing hidden.

    python examples/train.py                          # fastres.ResNet50, synthetic data
    python examples/train.py --model torchvision      # the same loop on torchvision's resnet50
    python examples/train.py --data /path/imagenet    # ImageFolder: DIR/train (and DIR/val) or DIR
    python examples/train.py --checkpoint ck.pt --resume   # save every epoch, resume where it stopped
    torchrun --nproc-per-node 8 examples/train.py --sync-bn  # DistributedDataParallel, one machine
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --master-addr HOST --master-port 29500 \
        examples/train.py --data /path/imagenet --sync-bn       # two machines (run on each, R = 0, 1)

What it does: AMP (autocast bf16 by default on a GPU — ``--amp-dtype fp16`` adds a
GradScaler), channels_last, SGD with momentum and weight decay, a cosine learning-rate
schedule with linear warm-up (stepped every iteration), tqdm progress with live img/s,
checkpoint save (atomic) and resume (model, optimizer, scheduler, scaler, position).

Under ``torchrun`` (env RANK/WORLD_SIZE/LOCAL_RANK) it trains with
DistributedDataParallel: NCCL on GPUs (one per process, cuda:LOCAL_RANK), gloo on the
CPU; ``--batch-size`` is per process; a DistributedSampler splits an ImageFolder
(synthetic data: a different stream per rank); rank 0 alone logs and saves.
``--sync-bn`` converts the BNs to fastres's fused SyncBatchNorm
(``fastres.convert_sync_batchnorm``; torchvision models: ``nn.SyncBatchNorm``).

fastres models are torchvision-compatible (same constructor arguments and state_dict
keys), so the only fastres-specific line is the model constructor.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from tqdm.auto import tqdm
except ImportError:  # the loop runs without a progress bar
    tqdm = None


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("fastres", "torchvision"), default="fastres",
                   help="fastres.ResNet50 (default) or torchvision's model, same loop")
    p.add_argument("--arch", default="resnet50",
                   help="resnet18/34/50/101/152, wide_resnet50_2, resnext50_32x4d, ... (default resnet50)")
    p.add_argument("--data", default=None, help="ImageFolder root (DIR/train and DIR/val, or DIR); "
                                                "default: synthetic data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="synthetic: steps per epoch (default 50); ImageFolder: cap on steps per epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=None, help="default: 1000 (synthetic) or the folders")
    p.add_argument("--lr", type=float, default=None, help="default 0.1 x batch/256")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up before the cosine decay")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast (default: on for CUDA, off for the CPU)")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (ImageFolder)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written every epoch (and --save-every)")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: epochs only)")
    p.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps between loss syncs / img/s updates")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: synchronise BatchNorm statistics across processes "
                        "(fastres.convert_sync_batchnorm; torchvision: nn.SyncBatchNorm)")
    p.add_argument("--dist-backend", default=None, help="under torchrun: nccl on CUDA, gloo on the CPU (default)")
    return p


# ----------------------------------------------------------------------------- distributed
class Dist:
    """The process's place in a torchrun job (``world == 1``: not distributed)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(args) -> Tuple[Dist, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; init the process group (nccl on CUDA,
    gloo on the CPU) and pick this process's device (cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not d.enabled:
        return d, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, rank=d.rank, world_size=d.world)
    return d, device


def sync_bn(model: torch.nn.Module, which: str) -> torch.nn.Module:
    if which == "fastres":
        import fastres
        return fastres.convert_sync_batchnorm(model)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def mean_over_ranks(value: float, d: Dist, device) -> float:
    if not d.enabled:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / d.world


# ----------------------------------------------------------------------------- model
def build_model(which: str, arch: str, num_classes: int) -> torch.nn.Module:
    if which == "torchvision":
        import torchvision
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    import fastres
    if arch == "resnet50":
        return fastres.ResNet50(num_classes=num_classes)
    return getattr(fastres, arch)(num_classes=num_classes)


# ----------------------------------------------------------------------------- data
class SyntheticLoader:
    """``steps`` batches of random images and labels, made on the device once (a pool of
    a few distinct batches), so the loop measures the model, not a data pipeline."""

    def __init__(self, steps: int, batch_size: int, image_size: int, num_classes: int, device, seed: int,
                 pool: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.steps = steps
        self.batches = [(torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
                         torch.randint(0, num_classes, (batch_size,), generator=g).to(device))
                        for _ in range(max(1, min(pool, steps)))]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


def image_folder_loaders(root: str, image_size: int, batch_size: int, workers: int, d: Optional[Dist] = None):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    val_dir = os.path.join(root, "val")
    train = ImageFolder(train_dir, T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                                              T.ToTensor(), norm]))
    kw = dict(batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
              persistent_workers=workers > 0)
    sampler = None
    if d is not None and d.enabled:  # each rank its own 1/world of every epoch (set_epoch reshuffles)
        sampler = torch.utils.data.DistributedSampler(train, d.world, d.rank, shuffle=True, drop_last=True)
    train_loader = torch.utils.data.DataLoader(train, shuffle=sampler is None, sampler=sampler, drop_last=True,
                                               **kw)
    val_loader = None
    if os.path.isdir(val_dir) and train_dir != root:
        resize = int(round(image_size / 0.875))
        val = ImageFolder(val_dir, T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm]))
        val_sampler = None
        if d is not None and d.enabled:
            val_sampler = torch.utils.data.DistributedSampler(val, d.world, d.rank, shuffle=False)
        val_loader = torch.utils.data.DataLoader(val, shuffle=False, sampler=val_sampler, **kw)
    return train_loader, val_loader, len(train.classes)


# ----------------------------------------------------------------------------- schedule
def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model, optimizer, scheduler, scaler, epoch: int, step_in_epoch: int,
                    global_step: int, args) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
             "args": vars(args)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(path: str, model, optimizer, scheduler, scaler, device) -> Tuple[int, int, int]:
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["epoch"], state["step_in_epoch"], state["global_step"]


# ----------------------------------------------------------------------------- loop
def evaluate(model, loader, device, amp_ctx, channels_last: bool, d: Optional[Dist] = None) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp_ctx():
                correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    model.train()
    if d is not None and d.enabled:  # top-1 over every rank's share of the validation set
        import torch.distributed as dist
        t = torch.tensor([correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        correct, total = t.tolist()
    return correct / max(1, total)


def train(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    d, device = init_distributed(args)
    try:
        return _train(args, d, device)
    finally:
        if d.enabled:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(args, d: Dist, device: torch.device) -> Dict[str, object]:
    log = print if d.main else (lambda *a, **k: None)  # rank 0 alone logs
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP broadcasts rank 0's anyway)
    use_amp = args.amp if args.amp is not None else device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype]

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    # data
    if args.data:
        train_loader, val_loader, n_cls = image_folder_loaders(args.data, args.image_size, args.batch_size,
                                                               args.workers, d)
        num_classes = args.num_classes or n_cls
        steps_per_epoch = min(len(train_loader), args.steps_per_epoch or len(train_loader))
    else:
        num_classes = args.num_classes or 1000
        steps_per_epoch = args.steps_per_epoch or 50
        train_loader = SyntheticLoader(steps_per_epoch, args.batch_size, args.image_size, num_classes, device,
                                       args.seed + d.rank)  # a different stream per rank
        val_loader = None

    # model, optimizer, schedule
    model = build_model(args.model, args.arch, num_classes).to(device)
    if args.sync_bn and d.enabled:
        model = sync_bn(model, args.model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size * d.world / 256  # the global batch
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN parameters and biases
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=args.momentum, nesterov=False)
    total_steps = args.epochs * steps_per_epoch
    scheduler = cosine_with_warmup(optimizer, total_steps, args.warmup_steps)
    scaler = torch.amp.GradScaler(device.type) if (use_amp and amp_dtype == torch.float16) else None

    start_epoch = start_step = global_step = 0
    if args.resume and args.checkpoint and os.path.exists(args.checkpoint):
        start_epoch, start_step, global_step = load_checkpoint(args.checkpoint, model, optimizer, scheduler,
                                                               scaler, device)
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        log(f"resumed from {args.checkpoint}: epoch {start_epoch}, step {start_step}, "
              f"global step {global_step}")
    runner = model
    if d.enabled:  # `model` stays the unwrapped module: checkpoints keep torchvision's keys
        from torch.nn.parallel import DistributedDataParallel as DDP
        runner = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    runner = torch.compile(runner) if args.compile else runner

    log(f"model: {args.model} {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"device {device}, batch {args.batch_size}, {args.image_size}px, "
          f"amp {args.amp_dtype if use_amp else 'off'}, channels_last {args.channels_last}, "
          f"lr {lr:g} cosine over {total_steps} steps, data {'synthetic' if not args.data else args.data}")
    if d.enabled:
        log(f"distributed: world size {d.world} ({torch.distributed.get_backend()}), batch {args.batch_size} "
            f"per process, global batch {args.batch_size * d.world}, sync-bn {'on' if args.sync_bn else 'off'}")
    if args.model == "fastres":
        import fastres
        log(f"fastres backend on {device.type}: {fastres.backend_for(device)}")

    from fastres.training import make_train_step
    train_step = make_train_step(runner, optimizer, loss_fn=F.cross_entropy, scaler=scaler, autocast=amp_ctx)

    history = {"loss": [], "img_per_s": [], "val_acc": []}
    model.train()
    t_start = time.perf_counter()
    images = 0
    for epoch in range(start_epoch, args.epochs):
        first = start_step if epoch == start_epoch else 0
        bar = None
        if tqdm is not None and not args.no_progress and d.main:
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}",
                       unit="step", dynamic_ncols=True)
        sampler = getattr(train_loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
        it = iter(train_loader)
        for _ in range(first):  # resuming mid-epoch: skip the batches already seen
            next(it)
        window_t, window_n = time.perf_counter(), 0
        for step in range(first, steps_per_epoch):
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = train_step(x, y)
            scheduler.step()
            global_step += 1
            images += x.shape[0] * d.world
            window_n += x.shape[0] * d.world
            last = step + 1 == steps_per_epoch
            if (step + 1) % args.log_every == 0 or last:
                loss_v = mean_over_ranks(loss.item(), d, device)  # the sync point: img/s below is real
                now = time.perf_counter()
                ips = window_n / max(now - window_t, 1e-9)
                window_t, window_n = now, 0
                history["loss"].append(loss_v)
                history["img_per_s"].append(ips)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}",
                                    img_s=f"{ips:.1f}")
                elif not args.no_progress:
                    log(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {loss_v:.3f} "
                          f"{ips:.1f} img/s", flush=True)
            if bar is not None:
                bar.update(1)
            if args.checkpoint and args.save_every and global_step % args.save_every == 0 and not last and d.main:
                save_checkpoint(args.checkpoint, model, optimizer, scheduler, scaler, epoch, step + 1,
                                global_step, args)
        if bar is not None:
            bar.close()
        if val_loader is not None:
            acc = evaluate(runner, val_loader, device, amp_ctx, args.channels_last, d)
            history["val_acc"].append(acc)
            log(f"epoch {epoch + 1}: val top-1 {100 * acc:.2f}%")
        if args.checkpoint and d.main:
            save_checkpoint(args.checkpoint, model, optimizer, scheduler, scaler, epoch, steps_per_epoch,
                            global_step, args)
    wall = time.perf_counter() - t_start
    summary = {"global_step": global_step, "images": images, "wall_s": wall,
               "img_per_s": images / wall if wall > 0 else 0.0,
               "final_loss": history["loss"][-1] if history["loss"] else None, "history": history,
               "model": model}
    if d.enabled:
        torch.distributed.barrier()  # rank 0's last checkpoint is on disk before anyone leaves
    log(f"done: {global_step} steps, {images} images in {wall:.1f} s ({summary['img_per_s']:.1f} img/s "
          f"overall, incl. warm-up); final loss {summary['final_loss']}")
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
