"""CPU inference of resnet50, contenders interleaved in one process at 1 thread (docs/PERF_CPU.md).

    python benchmarks/infer_cpu_interleaved.py BATCH SIZE ROUNDS [prof]

Each round runs torchvision eager, fastres (eval plan), fastres (eval plan with
``fold_stem``), fastres (per-block path) and torchvision + torch.compile with inductor
freezing once each, in turn; prints p50/p90/min per contender and the median of the
per-round ratios (robust to a load that drifts between rounds). ``prof``: also
torch.profiler tables (3 iterations) of fastres and compile(freezing). fp32,
channels_last; compile time printed apart.
"""
import sys, time, statistics, torch, torchvision
import fastres
torch.set_num_threads(1)
B, S, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
prof = len(sys.argv) > 4
torch.manual_seed(0)
tv = torchvision.models.resnet50().eval()
fr = fastres.resnet50().eval(); fr.load_state_dict(tv.state_dict())
tv = tv.to(memory_format=torch.channels_last); fr = fr.to(memory_format=torch.channels_last)
x = torch.randn(B, 3, S, S).contiguous(memory_format=torch.channels_last)
import torch._inductor.config as ic
ic.freezing = True
with torch.no_grad():
    t0 = time.perf_counter(); cm = torch.compile(tv); cm(x); print("compile(freezing) s %.1f" % (time.perf_counter()-t0), flush=True)
def plan_on(): fastres.fold.use_eval_plan(True); return fr(x)
def plan_off(): fastres.fold.use_eval_plan(False); y = fr(x); fastres.fold.use_eval_plan(True); return y
fr2 = fastres.resnet50().eval(); fr2.load_state_dict(tv.state_dict()); fr2 = fr2.to(memory_format=torch.channels_last)
fastres.fold.fold_stem(True)
with torch.no_grad(): fr2(x)
fastres.fold._fold_stem[0] = False  # (measurement only: fr2 keeps its stem-folded plan)
assert fastres.models.eval_plan.plan_of(fr2).stem is not None
def stem_on():
    return fr2(x)
runs = {"torchvision": lambda: tv(x), "fastres(plan)": plan_on, "fastres(plan+fold_stem)": stem_on, "fastres(per-block)": plan_off, "compile(freezing)": lambda: cm(x)}
ts = {k: [] for k in runs}
with torch.no_grad():
    for f in runs.values(): f(); f()
    for i in range(N):
        for k, f in runs.items():
            t = time.perf_counter(); f(); ts[k].append((time.perf_counter()-t)*1e3)
print(f"resnet50 b{B} {S}px fp32 channels_last 1 thread, {N} interleaved rounds, load {__import__('os').getloadavg()[0]:.1f}")
c = statistics.median(ts["compile(freezing)"])
for k in ts:
    v = sorted(ts[k]); med = statistics.median(v)
    print(f"{k:22s} p50 {med:8.2f} ms  p90 {v[int(0.9*(len(v)-1))]:8.2f} ms  min {v[0]:8.2f}  vs compile(freezing) {c/med:5.2f}x")
# per-round ratio medians (robust to load drift)
for k in ("fastres(plan)", "fastres(plan+fold_stem)", "fastres(per-block)", "torchvision"):
    r = [a/b for a, b in zip(ts["compile(freezing)"], ts[k])]
    print(f"median per-round ratio compile/{k}: {statistics.median(r):.3f}")
if prof:
    from torch.profiler import profile, ProfilerActivity
    for k in ("fastres(plan)", "fastres(per-block)", "compile(freezing)"):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3): runs[k]()
        print("=====", k, "(3 iterations)")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=42))
