"""How much could a different CPU convolution gain over oneDNN's? (docs/PERF_CPU.md)

    python benchmarks/cpu_conv_ceiling.py layouts BATCH SIZE ROUNDS   # whole resnet50
    python benchmarks/cpu_conv_ceiling.py winograd                   # per 3x3 layer
    python benchmarks/cpu_conv_ceiling.py bf16                       # per layer

``layouts``: torchvision resnet50 in eval, fp32, 1 thread, interleaved rounds of
channels_last eager, torch.compile with inductor freezing (channels_last), BN folded
by ``torch.fx.experimental.optimization.fuse`` then ``torch.utils.mkldnn.to_mkldnn``
(oneDNN's blocked activation layout, nChw16c on AVX-512), and TorchScript
``freeze`` + ``optimize_for_inference``; prints the median of the per-round ratios
against compile(freezing).

``winograd``: the ceiling of a Winograd F(m x m, 3 x 3) convolution built on the
batched GEMM (``torch.bmm`` -> MKL): the time of its (m+2)^2 GEMMs alone (no input,
weight or output transform counted) against oneDNN's whole direct 3x3 conv with the
weight prepacked and bias+ReLU fused, for every 3x3 stride-1 shape of resnet50 at
batch 8 / 128^2 and batch 1 / 224^2. A Winograd conv can only win where this ratio
is well above 1.

``bf16``: oneDNN's prepacked conv + bias + ReLU in fp32 against bf16 on the same
shapes (the CPU's avx512_bf16 / AMX, if any, decide the gap).
"""
import math
import statistics
import sys
import time

import torch

torch.set_num_threads(1)


def median_ms(f, n=15):
    f(); f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def packed_conv(x, w, b, pad):
    wp = torch.ops.mkldnn._reorder_convolution_weight(w, [pad, pad], [1, 1], [1, 1], 1, list(x.shape))
    return lambda: torch.ops.mkldnn._convolution_pointwise(x, wp, b, [pad, pad], [1, 1], [1, 1], 1, "relu", [], "")


SHAPES_3x3 = [(8, [(64, 32), (128, 16), (256, 8), (512, 4)]), (1, [(64, 56), (128, 28), (256, 14), (512, 7)])]


def winograd():
    for B, shapes in SHAPES_3x3:
        for C, H in shapes:
            x = torch.randn(B, C, H, H).contiguous(memory_format=torch.channels_last)
            direct = median_ms(packed_conv(x, torch.randn(C, C, 3, 3), torch.randn(C), 1))
            cols = []
            for m in (2, 4):
                a, tiles = m + 2, B * math.ceil(H / m) ** 2
                U, V = torch.randn(a * a, tiles, C), torch.randn(a * a, C, C)
                M = torch.empty(a * a, tiles, C)
                g = median_ms(lambda: torch.bmm(U, V, out=M))
                cols.append(f"F({m}x{m},3x3) GEMMs {g:7.3f} ms ({direct / g:4.2f}x)")
            print(f"b{B} C={C:3d} {H:2d}x{H:<2d}: oneDNN direct {direct:7.3f} ms   " + "   ".join(cols), flush=True)


def bf16():
    for B, C, H, k in [(8, 64, 32, 3), (8, 256, 32, 1), (8, 128, 16, 3), (8, 512, 16, 1), (1, 64, 56, 3), (1, 256, 14, 3)]:
        t = []
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(B, C, H, H).to(dt).contiguous(memory_format=torch.channels_last)
            t.append(median_ms(packed_conv(x, torch.randn(C, C, k, k).to(dt), torch.randn(C).to(dt), k // 2)))
        print(f"b{B} C={C:3d} {H:2d}x{H:<2d} {k}x{k}: fp32 {t[0]:7.3f} ms  bf16 {t[1]:7.3f} ms  ({t[0] / t[1]:4.2f}x)", flush=True)


def layouts(B, S, N):
    import copy
    import os
    import torchvision
    import torch.fx.experimental.optimization as fx_opt
    from torch.utils import mkldnn as mkldnn_utils
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    x = torch.randn(B, 3, S, S)
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    blocked = mkldnn_utils.to_mkldnn(fx_opt.fuse(copy.deepcopy(tv)))
    x_blk = x.to_mkldnn()
    inductor_config.freezing = True
    with torch.no_grad():
        t = time.perf_counter(); cm = torch.compile(tv_cl); cm(x_cl)
        print(f"compile(freezing) {time.perf_counter() - t:.1f} s", flush=True)
        js = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(copy.deepcopy(tv))))
        ref = tv(x)
        runs = {"channels_last eager": lambda: tv_cl(x_cl), "compile(freezing)": lambda: cm(x_cl),
                "oneDNN blocked (to_mkldnn)": lambda: blocked(x_blk).to_dense(),
                "TorchScript freeze+optimize_for_inference": lambda: js(x)}
        for k, f in runs.items():
            print(f"{k}: max |err| vs eager NCHW {(f() - ref).abs().max().item():.1e}")
        ts = {k: [] for k in runs}
        for f in runs.values():
            f(); f()
        for _ in range(N):
            for k, f in runs.items():
                t = time.perf_counter(); f(); ts[k].append((time.perf_counter() - t) * 1e3)
    print(f"resnet50 b{B} {S}px fp32 1 thread, {N} rounds, load {os.getloadavg()[0]:.1f}")
    for k, v in ts.items():
        r = statistics.median(a / b for a, b in zip(ts["compile(freezing)"], v))
        print(f"{k:44s} p50 {statistics.median(v):8.2f} ms  min {min(v):8.2f}  compile(freezing)/this {r:.3f}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "winograd"
    if what == "layouts":
        layouts(*(int(a) for a in sys.argv[2:5]))
    elif what == "bf16":
        bf16()
    else:
        winograd()
