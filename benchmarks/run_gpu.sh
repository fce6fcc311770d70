#!/usr/bin/env bash
# fastres on a GPU machine in ONE bounded run: build, check, test and benchmark, and
# bring everything back in three files. Made for the lent GPU machine (one H200, 16
# cores, no network, at most 10 minutes per command, 8 files back): see docs/GPU.md.
#
#   bash benchmarks/run_gpu.sh OUT [quick [STEP ...]]      # default: quick, every step (<= 8 min)
#   bash benchmarks/run_gpu.sh OUT full PART               # one part of the full profile (<= 9 min)
#   FASTRES_GPU_DRY_RUN=1 bash benchmarks/run_gpu.sh OUT quick   # the same steps, tiny, on the CPU
#
# quick steps, in this order:
#   env        versions, GPU, nvcc, CPUs                                       (timeout 180 s)
#   build      pip install --no-build-isolation --no-deps -e . for THIS GPU's arch only
#              (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability, MAX_JOBS=nproc) (300 s)
#   info       python -m fastres info (+ --json); fails when cuda or triton is unavailable (90 s)
#   tests      pytest tests -m gpu (every test that runs CUDA/Triton kernels on the device), in
#              RUN_GPU_SHARDS=4 concurrent pytest processes (pytest-xdist -n where installed),
#              cheap tests first, each outcome streamed to logs/tests.shardI.jsonl  (210 s)
#   check      python -m fastres check (GPU default: fp32, bf16, fp16; ops, blocks, models) (150 s)
#   bandwidth  pytest benchmarks/test_bench_kernels.py --benchmark-only, 10 rounds (GB/s) (120 s)
#   bench      python -m fastres bench at the GPU defaults (resnet50, b256, 224px, bf16,
#              channels_last) with 3 warm-up + 3x5 iterations, torch.compile in infer only,
#              files tagged 'quick' (240 s)
#   plot       python benchmarks/plot.py RESULTS --readme                      (60 s)
# `quick STEP ...` runs only the named steps, in the order given: e.g. `quick tests check`
# to rerun failed steps on a warm machine (fastres stays installed there; name `build` first
# only after changing csrc/ — pip then rebuilds every unit, ~1 min).
#
# full PARTs (each starts with env, build, info and ends with plot):
#   1 | tests       pytest tests -m 'not slow' (the whole suite, 8 shards)
#   2 | slow        pytest tests -m slow
#   3 | bandwidth   pytest benchmarks/test_bench_bn_act.py + test_bench_kernels.py (full rounds)
#   4 | benchmarks  pytest benchmarks/test_bench_blocks.py + test_bench_models.py
#   5 | bench       python -m fastres bench at the full GPU defaults (torch.compile in both modes)
#   6 | bench-variants  resnet50 fp32, fp16, NCHW (torch.compile in infer only)
#   7 | bench-models    resnet18, resnet101 (b128), cifar_resnet56 (b512)
#   8 | conv-bwd    pytest benchmarks/test_bench_conv_bwd.py (Triton conv dgrad/wgrad vs cuDNN, GPU only)
#   9 | conv-fwd    pytest benchmarks/test_bench_conv.py -k 'not bwd' (fused conv forward vs cuDNN, GPU only)
#   (8 and 9 end with conv-choice: benchmarks/conv_choice.py turns the measurements into
#   results/<device>/conv_choice_<device>_<part>_<date>.json, FASTRES_CONV=auto's table; docs/GPU.md)
#  10 | infer       resnet50 inference at batch 1, 32, 256, bf16: eager, torch.compile max-autotune and
#                   reduce-overhead (CUDA graphs), fastres and fastres.cuda_graph_inference; p50/p90 latency
#  11 | infer-fp16  the same in fp16
#  12 | cudnn       tools/cudnn_deviceless.py --target cuda (which fused graphs cuDNN has engines for on
#                   this GPU, runtime fusion included: 4 representative layers, fp16 + bf16), then
#                   pytest benchmarks/test_bench_cudnn_conv.py (cuDNN fused-conv graphs vs aten, every
#                   ResNet-50 conv, b256 bf16 + fp16 NHWC: infer, train-fwd, dgrad, wgrad) and
#                   benchmarks/test_bench_blocks.py with FASTRES_CONV=cudnn (the ResNet-50 bottlenecks)
#  13 | triton-op   tests/test_triton_op.py, then benchmarks/test_bench_triton_op.py: torch.compile (inductor)
#                   training steps (resnet50 layer1.0 block, resnet50 b64; bf16, channels_last) with the Triton
#                   kernels as opaque custom ops vs as torch.library.triton_op (FASTRES_TRITON_OP; docs/GPU.md)
#  14 | bench-conv  python -m fastres bench --conv-paths: fastres[triton] with the Triton fused conv and
#                   fastres[cuda] with cuDNN's fused graphs, next to the same backends on aten convs,
#                   torchvision and torchvision + torch.compile (train), b256 bf16
#  15 | bench-conv-fp16  the same in fp16: the MLPerf route (cuDNN's pre-compiled ConvBNfprop /
#                   dgrad-dReLU-dBN / ConvBNwgrad engines exist for fp16 only: tools/cudnn_deviceless.py)
#
# Output (nothing else is written to OUT; it is rewritten after every step, so a run cut
# short still brings back what it did):
#   OUT/summary.txt      one line per step: name, rc, seconds, then the key figures (test
#                        counts, check PASS/FAIL, img/s and speed-ups, GB/s, build times)
#   OUT/results.tar.gz   <device>/...  — what belongs under benchmarks/results/<device>/
#                        (names carry device, dtype, batch and date); unpack with
#                        tar xzf OUT/results.tar.gz -C benchmarks/results/
#   OUT/logs.tar.gz      logs/<step>.log, logs/env.txt, logs/info_<device>_<date>.json, logs/run.log;
#                        test steps: logs/<step>.shardI.{log,jsonl} and logs/junit_<step>.shardI.xml
#                        (.jsonl: tests/run_control.py's result log, complete up to a kill)
# A step that hits its timeout gets SIGTERM (pytest then prints its summary and writes its
# junit xml), SIGKILL 10 s later; what it wrote is packed all the same. A run signalled
# from outside (TERM/INT/HUP) stops the running step, records it as killed and packs.
#
# Knobs: PYTHON (default: ./.venv/bin/python or python3, the first that has torch), FASTRES_GPU_BUDGET (seconds for
# the whole run: quick 480, full 540, dry run 420), RUN_GPU_TIMEOUT_<STEP> (one step's
# timeout, e.g. RUN_GPU_TIMEOUT_tests=300; '-' in a step name becomes '_'), MAX_JOBS,
# TORCH_CUDA_ARCH_LIST (default: the present GPU's), PYTEST_ARGS (extra pytest args
# for the tests steps), RUN_GPU_SHARDS (pytest processes of a tests step: tests 4, tests-all 8,
# tests-slow 4; the dry run 2). Every step runs under `timeout`; the total budget clips each
# step's timeout, and a step that gets no time left is recorded as skipped. Exit status:
# 0 when every step exited 0.
set -u
{ # the whole script is one compound command: bash parses it completely before running it,
  # so editing the file during a run cannot break that run

usage() { sed -n '2,10p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT_ARG="$1"; shift
PROFILE="${1:-quick}"; [ $# -gt 0 ] && shift
DRY="${FASTRES_GPU_DRY_RUN:-0}"; case "$DRY" in 1|true|yes|on) DRY=1 ;; *) DRY=0 ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
mkdir -p "$OUT_ARG" || exit 1
OUT="$(cd "$OUT_ARG" && pwd)"
T0=$(date +%s)
DATE="$(date +%F)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/run_gpu.XXXXXX")" || exit 1
LOGS="$WORK/logs"
mkdir -p "$LOGS"
exec > >(tee -a "$LOGS/run.log") 2>&1
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export MPLBACKEND=Agg

log() { echo "[run_gpu $(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }

# ------------------------------------------------------------------ profile -> steps
case "$PROFILE" in
quick)
    STEPS="env build info tests check bandwidth bench plot"
    if [ $# -gt 0 ]; then STEPS="$*"; fi
    DEFAULT_BUDGET=480 ;;
full)
    PART="${1:-}"
    case "$PART" in
    1|tests)          PART=tests;          MID="tests-all" ;;
    2|slow)           PART=slow;           MID="tests-slow" ;;
    3|bandwidth)      PART=bandwidth;      MID="bandwidth-bn-act bandwidth-kernels" ;;
    4|benchmarks)     PART=benchmarks;     MID="benchmarks-blocks benchmarks-models" ;;
    5|bench)          PART=bench;          MID="bench-full" ;;
    6|bench-variants) PART=bench-variants; MID="bench-fp32 bench-fp16 bench-nchw" ;;
    7|bench-models)   PART=bench-models;   MID="bench-resnet18 bench-resnet101 bench-cifar56" ;;
    8|conv-bwd)       PART=conv-bwd;       MID="benchmarks-conv-bwd conv-choice" ;;
    9|conv-fwd)       PART=conv-fwd;       MID="benchmarks-conv conv-choice" ;;
    10|infer)         PART=infer;          MID="infer-b1 infer-b32 infer-b256" ;;
    11|infer-fp16)    PART=infer-fp16;     MID="infer-fp16-b1 infer-fp16-b32 infer-fp16-b256" ;;
    12|cudnn)         PART=cudnn;          MID="cudnn-engines benchmarks-cudnn-conv benchmarks-cudnn-blocks" ;;
    13|triton-op)     PART=triton-op;      MID="tests-triton-op benchmarks-triton-op" ;;
    14|bench-conv)    PART=bench-conv;     MID="bench-conv" ;;
    15|bench-conv-fp16) PART=bench-conv-fp16; MID="bench-conv-fp16" ;;
    *) echo "run_gpu.sh: full needs a PART: 1|tests 2|slow 3|bandwidth 4|benchmarks 5|bench" \
            "6|bench-variants 7|bench-models 8|conv-bwd 9|conv-fwd 10|infer 11|infer-fp16 12|cudnn" \
            "13|triton-op 14|bench-conv 15|bench-conv-fp16" \
            "(got '${PART}')" >&2; exit 2 ;;
    esac
    STEPS="env build info $MID plot"
    DEFAULT_BUDGET=540 ;;
*) usage ;;
esac
[ "$DRY" = 1 ] && DEFAULT_BUDGET=420   # ~2-3 min on a quiet 2-core machine; slack for a busy one
BUDGET="${FASTRES_GPU_BUDGET:-$DEFAULT_BUDGET}"
RESERVE=20   # seconds kept for the last kill (timeout --kill-after=10) and packing

tail_reserve() {  # seconds kept for the cheap closing steps after step $1 (conv-choice, plot): a long step cannot starve them
    local after=0 s r=0
    for s in $STEPS; do
        if [ "$after" = 1 ]; then
            case "$s" in plot) r=$((r + 25)) ;; conv-choice) r=$((r + 20)) ;; esac
        fi
        [ "$s" = "$1" ] && after=1
    done
    echo "$r"
}

# ------------------------------------------------------------------ python
pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for c in "$ROOT/.venv/bin/python" python3 python; do
        if command -v "$c" >/dev/null 2>&1 &&
           "$c" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1; then
            command -v "$c"; return
        fi
    done
    echo python3
}
PY="$(pick_python)"

if [ "$DRY" = 1 ]; then
    SLUG=cpu-dryrun            # never collides with real results (benchmarks/results/cpu)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # tiny sizes: threads only add contention
else
    unset TRITON_INTERPRET     # real GPU kernels, never the interpreter
    # the folder name fastres.bench.device_slug gives (read from the file: fastres is not installed yet)
    SLUG="$("$PY" - <<'EOF' 2>/dev/null
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("_fastres_bench", "fastres/bench.py")
m = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
spec.loader.exec_module(m)
print(m.device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
EOF
)"
    [ -n "$SLUG" ] || SLUG=unknown-device
    # cpp must have built (a skip would hide it); cuda and triton are required by the info step
    # (and by the gpu tests themselves). Not triton here: on the GPU machine Triton runs on
    # CUDA only, so its CPU-device cases skip with their reason.
    export FASTRES_REQUIRE_BACKENDS="${FASTRES_REQUIRE_BACKENDS:-cpp}"
fi
RES="$WORK/results/$SLUG"
mkdir -p "$RES"
SUMMARY="$WORK/summary.body"
: >"$SUMMARY"
FAILED=0

# ------------------------------------------------------------------ packing
pack() {  # (re)write OUT/summary.txt, OUT/results.tar.gz, OUT/logs.tar.gz
    local now=$(( $(date +%s) - T0 ))
    {
        echo "# fastres benchmarks/run_gpu.sh $PROFILE ${PART:-} — $(date '+%F %T %Z')"
        echo "# device: $SLUG   dry_run: $DRY   python: $PY   budget: ${BUDGET}s   elapsed: ${now}s   exit: $FAILED"
        echo "# git: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
        echo "# step              rc     seconds  (figures below each step, indented)"
        cat "$SUMMARY"
    } >"$WORK/summary.txt"
    tar -C "$WORK/results" -czf "$WORK/results.tar.gz" "$SLUG" 2>/dev/null
    tar -C "$WORK" -czf "$WORK/logs.tar.gz" logs 2>/dev/null
    local f
    for f in summary.txt results.tar.gz logs.tar.gz; do
        cp "$WORK/$f" "$OUT/.$f.tmp" && mv -f "$OUT/.$f.tmp" "$OUT/$f"
    done
}

STEP_PID=
on_kill() {  # the run itself got SIGTERM/SIGINT/SIGHUP (e.g. the device tool's own time limit):
             # stop the running step (timeout passes the TERM on: pytest writes its summary),
             # record it and pack what there is
    exec >>"$LOGS/run.log" 2>&1 </dev/null   # (tee may be gone with the same signal)
    trap - TERM INT HUP
    log "run_gpu: signalled from outside${STEP_PID:+ during step $STEP_NAME}; packing"
    if [ -n "$STEP_PID" ]; then
        kill -TERM "$STEP_PID" 2>/dev/null
        local i
        for i in 1 2 3 4 5 6; do kill -0 "$STEP_PID" 2>/dev/null || break; sleep 1; done
        record "$STEP_NAME" killed "$(( $(date +%s) - STEP_START ))" "the whole run was signalled from outside"
        "$PY" "$ROOT/benchmarks/gpu_summary.py" "$STEP_NAME" "$LOGS" "$RES" --since "$STEP_MARK" 2>&1 \
            | sed 's/^/    /' >>"$SUMMARY"
    fi
    FAILED=1
    pack
    rm -rf "$WORK"
    exit 143
}

record() {  # record NAME RC SECONDS [NOTE]
    local note="${4:-}"
    [ "$2" = 124 ] || [ "$2" = 137 ] && note="TIMEOUT${note:+ $note}"
    printf '%-18s rc=%-4s %6ss  %s\n' "$1" "$2" "$3" "$note" >>"$SUMMARY"
}

run_step() {  # run_step NAME TIMEOUT CMD...  — log to LOGS/NAME.log, record rc, seconds, figures
    local name="$1" tmo="$2"; shift 2
    local var="RUN_GPU_TIMEOUT_${name//-/_}"
    tmo="${!var:-$tmo}"
    local left=$(( BUDGET - ($(date +%s) - T0) - RESERVE - $(tail_reserve "$name") ))
    if [ "$left" -lt 5 ]; then
        log "== $name: skipped, the run's budget (${BUDGET}s) is spent"
        record "$name" skip 0 "budget spent"
        FAILED=1; pack; return 0
    fi
    if [ "${tmo%%.*}" -ge "$left" ] 2>/dev/null; then tmo="$left"; fi
    local start rc mark="$WORK/.mark_$name"
    touch "$mark"
    start=$(date +%s)
    local shown="$*"; shown="${shown//$'\n'/ }"
    log "== $name (timeout ${tmo}s): ${shown:0:240}"
    # (in the background + wait: a signal to the run itself reaches on_kill at once)
    timeout --kill-after=10 "$tmo" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    STEP_PID=$! STEP_NAME=$name STEP_START=$start STEP_MARK=$mark
    wait "$STEP_PID"
    rc=$?
    STEP_PID=
    local secs=$(( $(date +%s) - start ))
    tail -n 15 "$LOGS/$name.log"
    log "== $name: exit $rc after ${secs}s"
    record "$name" "$rc" "$secs"
    "$PY" "$ROOT/benchmarks/gpu_summary.py" "$name" "$LOGS" "$RES" --since "$mark" 2>&1 | sed 's/^/    /' >>"$SUMMARY"
    [ "$rc" = 0 ] || FAILED=1
    pack
    return 0
}

# ------------------------------------------------------------------ the steps
pytest_common() {  # pytest options of every test step (each shard adds its own junit xml)
    local per_test="$1"
    echo "-q -ra -p no:cacheprovider --durations=15"
    if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then echo "--timeout=$per_test"; fi
}

# One pytest per shard, all at once (Triton's JIT is CPU-bound: 16 cores, one GPU), each
# with FASTRES_SHARD=I/N (tests/run_control.py: cost order, round-robin deal), its own
# streaming result log (FASTRES_RESULT_LOG, a JSON line per outcome, flushed), junit xml
# and console log, all sharing the Triton cache. Exit status: the first failing shard's
# (an empty shard's 5, "no tests", counts only when every shard is empty).
run_shards() {  # run_shards STEP N LOGDIR PY PYTEST-ARGS...
    local step="$1" n="$2" logs="$3" py="$4"; shift 4
    local i r rc=0 empty=0 pids=()
    trap 'echo "run_gpu: SIGTERM: waiting for the shards to stop (they print their summaries)"' TERM
    for ((i = 0; i < n; i++)); do
        FASTRES_SHARD="$i/$n" FASTRES_RESULT_LOG="$logs/$step.shard$i.jsonl" \
            "$py" -m pytest "$@" --junitxml="$logs/junit_$step.shard$i.xml" \
            >"$logs/$step.shard$i.log" 2>&1 </dev/null &
        pids+=($!)
    done
    for ((i = 0; i < n; i++)); do
        while :; do  # (a trapped signal interrupts wait: wait again until the shard is gone)
            wait "${pids[$i]}"; r=$?
            kill -0 "${pids[$i]}" 2>/dev/null || break
        done
        echo "shard $i/$n: pytest exit $r: $(grep -v '^\s*$' "$logs/$step.shard$i.log" | tail -n 1)"
        if [ "$r" = 5 ]; then empty=$((empty + 1)); elif [ "$r" != 0 ] && [ "$rc" = 0 ]; then rc=$r; fi
    done
    [ "$rc" = 0 ] && [ "$empty" = "$n" ] && rc=5
    return $rc
}
export -f run_shards

env_report() {  # env_report PY — versions and machine, `key: value` lines (gpu_summary.py reads them)
    # Every probe has its own time limit and the versions come from package metadata, not
    # imports (only torch is imported): a slow or hung probe (a cold disk, an nvidia-smi
    # without a driver) costs its own line, never the step (CI once saw the step pass 60 s).
    local PY="$1" rc
    echo "date: $(date -Is)"
    echo "host: $(uname -srm)"
    echo "cpus: $(env -u OMP_NUM_THREADS nproc)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo not a git checkout)"
    echo "nvcc: $(timeout 20 nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1)"
    timeout 120 "$PY" - <<'EOF'
import importlib.metadata as md, platform
print(f"python: {platform.python_version()}", flush=True)
for m, d in (("torch", "torch"), ("torchvision", "torchvision"), ("triton", "triton"), ("numpy", "numpy"),
             ("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"), ("hypothesis", "hypothesis"),
             ("matplotlib", "matplotlib"), ("pip", "pip"), ("setuptools", "setuptools"), ("ninja", "ninja"),
             ("pytest_xdist", "pytest-xdist"), ("pytest_timeout", "pytest-timeout"), ("tqdm", "tqdm"),
             ("psutil", "psutil")):
    try:
        v = md.version(d)
    except Exception:
        v = "missing"
    print(f"{m}: {v}", flush=True)
import torch
print(f"cuda_runtime: {torch.version.cuda}")
print(f"cudnn: {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("gpu: none (CUDA not available)")
EOF
    rc=$?
    echo "free: $(free -g 2>/dev/null | awk '/Mem:/{print $2" GiB total, "$7" GiB available"}')"
    echo; echo "== nvidia-smi"; timeout 30 nvidia-smi 2>&1 || echo "(no nvidia-smi, or it failed or timed out)"
    return $rc
}
export -f env_report

do_env() {
    run_step env 180 bash -c 'env_report "$1" | tee "$2"; exit ${PIPESTATUS[0]}' _ "$PY" "$LOGS/env.txt"
}

do_build() {
    if [ "$DRY" = 1 ]; then
        # The CI venv already has fastres built; rebuilding it inside a test would take
        # minutes and touch the installed package. Show what would run and check the import.
        run_step build 120 bash -c '
            echo "dry run: no build; on the GPU: TORCH_CUDA_ARCH_LIST=<this GPU, e.g. 9.0> MAX_JOBS=$MAX_JOBS NINJA_STATUS=\"[%f/%t %es] \" $1 -m pip install -v --no-build-isolation --no-deps -e ."
            "$1" -c "import fastres, fastres._C as C; print(\"fastres\", fastres.__version__, \"from\", fastres.__file__); print(\"_C:\", C.__file__)"' _ "$PY"
        return
    fi
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)"
        [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST
    fi
    log "building for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} with MAX_JOBS=$MAX_JOBS"
    # NINJA_STATUS: ninja prints each finished compile with the seconds since the build
    # started; gpu_summary.py reads the per-file times from it.
    NINJA_STATUS="[%f/%t %es] " run_step build 300 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
}

do_info() {
    # = python -m fastres info, plus its --json into the logs, plus what must be there:
    # on the GPU the cuda and triton backends, on the CPU (dry run) cpp; one process
    run_step info 90 "$PY" -c '
import json, sys
import fastres
from fastres.cli import main
rc = main(["info"])
info = fastres.backend_info()
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2, default=str)
need = {"cpu": ["cpp"]} if sys.argv[2] == "1" else {"cuda": ["cuda", "triton"]}
bad = [f"{b} on {d}" for d, bs in need.items() for b in bs
       if not info.get("devices", {}).get(d, {}).get("available", {}).get(b)]
if bad:
    sys.exit("run_gpu: required backend(s) unavailable: " + ", ".join(bad))
print("run_gpu: required backends available:", need)
sys.exit(rc)' "$LOGS/info_${SLUG}_${DATE}.json" "$DRY"
}

do_tests() {  # do_tests STEP TIMEOUT PER_TEST_TIMEOUT SHARDS SELECTION...
    local step="$1" tmo="$2" per="$3" n="$4"; shift 4
    [ "$DRY" = 1 ] && n=2   # (2 cores: two shards prove the plumbing)
    n="${RUN_GPU_SHARDS:-$n}"
    # FASTRES_TEST_TIMEOUT: a test running past PER_TEST_TIMEOUT dumps its stacks into the log
    export FASTRES_TEST_TIMEOUT="$per"
    # the Triton conv tuners off (default tilings, untimed): a tuning sweep compiles every
    # candidate tiling of every shape a test meets; the tests of the tuners switch them on
    # themselves (test_gpu_autotuned_tiling, test_conv_bwd_kernels' CUDA cases)
    # (local -x: exported for this function's steps only, the caller's values back afterwards)
    local -x FASTRES_CONV_AUTOTUNE="${FASTRES_CONV_AUTOTUNE:-0}" FASTRES_CONV_BWD_AUTOTUNE="${FASTRES_CONV_BWD_AUTOTUNE:-0}"
    if [ "$DRY" = 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
        # pytest-xdist where installed: one run, -n N workers; the controller logs every outcome
        # shellcheck disable=SC2046
        run_step "$step" "$tmo" env FASTRES_SHARD=0/1 FASTRES_RESULT_LOG="$LOGS/$step.jsonl" \
            "$PY" -m pytest "$@" -n "$n" $(pytest_common "$per") --junitxml="$LOGS/junit_$step.xml" ${PYTEST_ARGS:-}
    else
        # shellcheck disable=SC2046
        run_step "$step" "$tmo" bash -c 'run_shards "$@"' _ "$step" "$n" "$LOGS" "$PY" \
            "$@" $(pytest_common "$per") ${PYTEST_ARGS:-}
    fi
    unset FASTRES_TEST_TIMEOUT
}

do_check() {
    local dt="fp32-bf16-fp16" extra=()
    [ "$DRY" = 1 ] && { dt="fp32"; extra=(--device cpu --cases ops --dtype fp32); }
    local ck="$RES/check_${SLUG}_${dt}_${DATE}"
    # The Triton conv rows check parity (forward, dgrad, wgrad) at the default tilings:
    # no autotuning sweeps (each candidate a JIT compile) inside the step's 150 s.
    run_step check 150 env FASTRES_CONV_AUTOTUNE=0 FASTRES_CONV_BWD_AUTOTUNE=0 \
        bash -c '"$1" -m fastres check --json "$2.json" "${@:3}" | tee "$2.txt"; exit ${PIPESTATUS[0]}' \
        _ "$PY" "$ck" "${extra[@]}"
}

PYTEST_SIGTERM_SAFE='import signal, sys, pytest
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))'

do_benchmark() {  # do_benchmark STEP TIMEOUT ROUNDS DRY_SELECTION FILE...  — pytest-benchmark JSON into RES
    # (the file is named by device, dtype and batch: BENCH_DT / BENCH_B where a step differs from bf16 / b256)
    local step="$1" tmo="$2" rounds="$3" dry_k="$4"; shift 4
    local dt="${BENCH_DT:-bf16}" b="${BENCH_B:-b256}" sel=()
    [ "$DRY" = 1 ] && { dt="fp32"; b="b8"; rounds=2; sel=(-k "$dry_k"); }
    local name="benchmarks_${SLUG}_${dt}_${b}_${step}_${DATE}"
    # pytest with SIGTERM (the step's timeout) turned into KeyboardInterrupt: the session ends
    # normally and pytest-benchmark still writes the JSON of every case timed so far
    run_step "$step" "$tmo" env FASTRES_BENCH_ROUNDS="$rounds" "$PY" -c "$PYTEST_SIGTERM_SAFE" "$@" "${sel[@]}" \
        --benchmark-only -q -p no:cacheprovider --benchmark-json="$RES/$name.json" \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
}

do_bench() {  # do_bench STEP TIMEOUT BENCH-ARGS...
    local step="$1" tmo="$2"; shift 2
    local args=("$@")
    if [ "$DRY" = 1 ]; then
        # tiny: resnet18 at 32 px, batch 2, one iteration, no torch.compile (minutes on a CPU)
        args=(--device cpu --model resnet18 --batch-size 2 --image-size 32 --iters 1 --repeats 1 --warmup 0
              --no-compile --dtype fp32)
    fi
    run_step "$step" "$tmo" "$PY" -m fastres bench "${args[@]}" --no-progress --out "$RES"
}

do_conv_choice() {  # FASTRES_CONV=auto's table from this run's conv benchmarks, its lines into the summary
    local files=("$RES"/benchmarks_*_benchmarks-conv*.json) extra=()
    [ "$DRY" = 1 ] && extra=(--allow-empty)   # the CPU never times the conv: no measurement
    run_step conv-choice 60 "$PY" benchmarks/conv_choice.py "${files[@]}" --table "" \
        --json "$RES/conv_choice_${SLUG}_${PART:-quick}_${DATE}.json" "${extra[@]}"
    head -n 40 "$LOGS/conv-choice.log" | sed 's/^/    /' >>"$SUMMARY"
    pack
}

do_cudnn_engines() {  # which fused graphs cuDNN serves on this GPU (runtime fusion included), into the summary
    local target=cuda layers=(--layer l1-3x3-64 --layer l2-1x1-128-512 --layer l2-ds-1x1s2-256-512
                              --layer l3-1x1-1024-256) dts=(--dtype float16 --dtype bfloat16)
    [ "$DRY" = 1 ] && { target=sm_90; layers=(--layer l1-3x3-64); dts=(--dtype float16); }
    run_step cudnn-engines 90 "$PY" tools/cudnn_deviceless.py --target "$target" "${layers[@]}" "${dts[@]}" --progress \
        --json "$RES/cudnn_engines_${SLUG}_${DATE}.json"
    grep -E '^(cuDNN|\||totals)' "$LOGS/cudnn-engines.log" | head -n 40 | sed 's/^/    /' >>"$SUMMARY"
    grep -q '^totals' "$LOGS/cudnn-engines.log" || grep -E '^- ' "$LOGS/cudnn-engines.log" | cut -c1-150 \
        | head -n 40 | sed 's/^/    /' >>"$SUMMARY"   # cut short: the checks that ended
    pack
}

do_plot() {
    run_step plot 60 "$PY" benchmarks/plot.py "$RES" --readme \
        --note "Measured by \`bash benchmarks/run_gpu.sh OUT $PROFILE ${PART:-}\` on $DATE ($(git rev-parse --short HEAD 2>/dev/null || echo 'unknown commit'))."
}

K_KERNELS="NHWC and bn_act_train and not backward"
# (--infer-compile reduce-overhead: max-autotune's autotuning would not fit the 240 s; full 5, 9, 10 run it)
QUICK_BENCH=(--iters 5 --repeats 3 --warmup 3 --compile-modes infer --infer-compile reduce-overhead --tag quick)
RO=(--infer-compile reduce-overhead)
if [ "$DRY" = 1 ]; then
    # a tiny real selection: exercises pytest, the junit xml and the counts on the CPU
    GPU_TESTS=(tests/test_validation.py -k "dtype or device")
    ALL_TESTS=("${GPU_TESTS[@]}"); SLOW_TESTS=("${GPU_TESTS[@]}")
else
    GPU_TESTS=(tests -m gpu)
    ALL_TESTS=(tests -m "not slow")
    SLOW_TESTS=(tests -m slow)
fi

trap on_kill TERM INT HUP
log "profile $PROFILE ${PART:-}; steps: $STEPS; budget ${BUDGET}s; dry run $DRY; python $PY; device $SLUG; work $WORK"
pack
for step in $STEPS; do
    case "$step" in
    env)   do_env ;;
    build) do_build ;;
    info)  do_info ;;
    # (do_tests STEP TIMEOUT PER-TEST-WATCHDOG SHARDS SELECTION: a test past its watchdog
    #  time dumps its stacks into logs/STEP.shardI.log; pytest-timeout, if installed, fails it)
    tests) do_tests tests 210 120 4 "${GPU_TESTS[@]}" ;;
    tests-all)  do_tests tests-all 480 300 8 "${ALL_TESTS[@]}" ;;
    tests-slow) do_tests tests-slow 480 400 4 "${SLOW_TESTS[@]}" ;;
    tests-triton-op) do_tests tests-triton-op 150 120 1 tests/test_triton_op.py ;;
    check) do_check ;;
    # (the dry run's tiny selection of each file follows the rounds)
    bandwidth)         do_benchmark bandwidth 120 10 "$K_KERNELS" benchmarks/test_bench_kernels.py ;;
    bandwidth-kernels) do_benchmark bandwidth-kernels 150 20 "$K_KERNELS" benchmarks/test_bench_kernels.py ;;
    bandwidth-bn-act)  do_benchmark bandwidth-bn-act 300 20 "8x64x56x56 and fwd and not fwdbwd and (eager or cpp)" \
                           benchmarks/test_bench_bn_act.py ;;
    benchmarks-blocks) do_benchmark benchmarks-blocks 240 20 "basic-id and infer and (torchvision or cpp)" \
                           benchmarks/test_bench_blocks.py ;;
    benchmarks-models) do_benchmark benchmarks-models 240 10 "resnet18 and infer and (torchvision or cpp)" \
                           benchmarks/test_bench_models.py ;;
    benchmarks-conv-bwd) do_benchmark benchmarks-conv-bwd 480 10 "stem" benchmarks/test_bench_conv_bwd.py ;;
    benchmarks-conv)   do_benchmark benchmarks-conv 420 10 "stem" benchmarks/test_bench_conv.py -k "not bwd" ;;
    benchmarks-triton-op) BENCH_B="b${FASTRES_BENCH_TRITON_OP_BATCH:-64}" \
        do_benchmark benchmarks-triton-op 360 10 "bottleneck" benchmarks/test_bench_triton_op.py ;;
    conv-choice)       do_conv_choice ;;
    cudnn-engines)     do_cudnn_engines ;;
    benchmarks-cudnn-conv) BENCH_DT=bf16-fp16 do_benchmark benchmarks-cudnn-conv 300 10 "stem" benchmarks/test_bench_cudnn_conv.py ;;
    # (FASTRES_CONV=cudnn: the fastres blocks' convs through the cuDNN graphs; torchvision's unchanged)
    benchmarks-cudnn-blocks) FASTRES_CONV=cudnn do_benchmark benchmarks-cudnn-blocks 200 20 \
                           "basic-id and infer and (torchvision or cpp)" benchmarks/test_bench_blocks.py \
                           -k "bottleneck and (torchvision or cuda)" ;;
    bench)          do_bench bench 240 "${QUICK_BENCH[@]}" ;;
    bench-full)     do_bench bench-full 420 ;;
    # (the fused convolutions in the whole model: fastres[triton] with FASTRES_CONV=fused, fastres[cuda]
    #  with cuDNN's graphs, next to the same backends on aten convs, torchvision and torch.compile)
    bench-conv)     do_bench bench-conv 420 --conv-paths --backend triton,cuda --compile-modes train \
                        --iters 10 --repeats 3 --tag conv ;;
    bench-conv-fp16) do_bench bench-conv-fp16 420 --conv-paths --backend triton,cuda --compile-modes train \
                        --dtype fp16 --iters 10 --repeats 3 --tag conv ;;
    bench-fp32)     do_bench bench-fp32 150 --dtype fp32 --compile-modes infer "${RO[@]}" ;;
    bench-fp16)     do_bench bench-fp16 150 --dtype fp16 --compile-modes infer "${RO[@]}" ;;
    bench-nchw)     do_bench bench-nchw 150 --no-channels-last --compile-modes infer "${RO[@]}" ;;
    bench-resnet18) do_bench bench-resnet18 130 --model resnet18 --compile-modes infer "${RO[@]}" ;;
    bench-resnet101) do_bench bench-resnet101 200 --model resnet101 --batch-size 128 --compile-modes infer "${RO[@]}" ;;
    bench-cifar56)  do_bench bench-cifar56 130 --model cifar_resnet56 --batch-size 512 --compile-modes infer "${RO[@]}" ;;
    infer-b1|infer-b32|infer-b256|infer-fp16-b1|infer-fp16-b32|infer-fp16-b256)
        b="${step##*-b}"; dt=bf16; case "$step" in infer-fp16-*) dt=fp16 ;; esac
        do_bench "$step" 170 --mode infer --batch-size "$b" --dtype "$dt" --backend auto --tag "infer" ;;
    plot)  do_plot ;;
    *) log "unknown step '$step'"; record "$step" unknown 0; FAILED=1 ;;
    esac
done

log "done in $(( $(date +%s) - T0 ))s, exit $FAILED"
pack
log "wrote $(cd "$OUT" && ls | tr '\n' ' ')"
cat "$OUT/summary.txt"
rm -rf "$WORK"
exit "$FAILED"
}
