#!/usr/bin/env bash
# One command for a GPU machine: build/install fastres, run the whole test suite on
# CUDA, `python -m fastres check`, `python -m fastres bench` (defaults: resnet50,
# batch 256, bf16, channels_last), every pytest-benchmark case, and the plots —
# logs, CSV/JSON and PNGs into one small output folder.
#
#   bash benchmarks/run_gpu.sh OUT [STEP ...]
#
# STEPs (default: all but bench-extra, in this order):
#   env install info tests check bench benchmarks plot      (+ bench-extra: resnet18,
#   resnet101, cifar_resnet56, fp32/NCHW variants of resnet50)
# Several calls may share one OUT (e.g. `... OUT install tests` then `... OUT bench`):
# each step appends its exit code and duration to OUT/summary.txt.
#
# Output:
#   OUT/summary.txt                      step, exit code, seconds
#   OUT/logs/<step>.log                  full log of each step
#   OUT/results/<device>/                what to commit under benchmarks/results/<device>/:
#       bench_*.{txt,json,csv,png}       the bench CLI (names carry model, device, dtype, batch, date)
#       benchmarks_<device>_<dtype>_b<batch>_<date>.{json,csv} + *_bn_act.png   pytest-benchmark
#       check_<device>_<dtypes>_b8_<date>.{txt,json}   the parity self-check
#       README.md                        the table of the latest figures
#   OUT/junit_tests.xml, OUT/env.txt, OUT/info_<device>_<date>.json (fastres.backend_info())
#
# Environment knobs: PYTHON (interpreter to use), STEP_TIMEOUT (seconds per step,
# default 3600), MAX_JOBS (build parallelism), PYTEST_ARGS (extra args for the tests).
# Individual failures do not stop the script; the exit status is non-zero if any
# step failed.
set -u

OUT="${1:?usage: bash benchmarks/run_gpu.sh OUT [STEP ...]}"
shift
STEPS="${*:-env install info tests check bench benchmarks plot}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
mkdir -p "$OUT/logs" || exit 1
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
STEP_TIMEOUT="${STEP_TIMEOUT:-3600}"
DATE="$(date +%F)"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
unset TRITON_INTERPRET       # real GPU kernels, never the interpreter
export PYTHONUNBUFFERED=1
FAILED=0

log() { echo "[run_gpu $(date +%T)] $*"; }

# ---------------------------------------------------------------------------- python
pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "$ROOT/.venv/bin/python"; return
    fi
    for c in python3 python; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then
            command -v "$c"; return
        fi
    done
    echo ""
}
PY="$(pick_python)"
if [ -z "$PY" ]; then
    log "no python with torch found: trying 'make setup' (needs network)"
    make setup >"$OUT/logs/make_setup.log" 2>&1
    echo "make-setup rc=$? 0s" >>"$SUMMARY"
    PY="$ROOT/.venv/bin/python"
fi
log "python: $PY"

run_step() {  # run_step NAME CMD...  — log to OUT/logs/NAME.log, record rc and duration
    local name="$1"; shift
    local start rc cmd="$*"
    start=$(date +%s)
    log "== $name: $*"
    timeout --kill-after=30 "$STEP_TIMEOUT" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    printf '%-14s rc=%-3s %5ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "${cmd:0:110}" >>"$SUMMARY"
    tail -n 25 "$OUT/logs/$name.log"
    log "== $name: exit $rc after $(( $(date +%s) - start ))s"
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

SLUG="$("$PY" -c "import torch, fastres.bench as b; print(b.device_slug(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null \
        || "$PY" -c "import torch, re; n=torch.cuda.get_device_name().lower().replace('nvidia',''); print(re.sub(r'[^a-z0-9]+','-',n).strip('-'))" 2>/dev/null \
        || echo gpu)"
RES="$OUT/results/$SLUG"
mkdir -p "$RES"
log "results -> $RES"

for step in $STEPS; do
    case "$step" in
    env)
        run_step env bash -c "date; uname -a; nvidia-smi || true; nvcc --version || true; '$PY' -V; \
            '$PY' -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'; \
            '$PY' -m pip list 2>/dev/null | grep -iE 'torch|triton|numpy|pytest|matplotlib|tqdm|hypothesis|psutil' || true"
        cp "$OUT/logs/env.log" "$OUT/env.txt" ;;
    install)
        # optional extras first (no-op without network); then the editable build of fastres._C
        run_step deps bash -c "'$PY' -m pip install -q -r requirements-test.txt -r requirements-bench.txt || \
            echo 'pip could not install the extras (offline?): tests/bench degrade gracefully'; exit 0"
        # build only for this GPU's architecture (unless TORCH_CUDA_ARCH_LIST is set already)
        CC_ARCH="$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || true)"
        if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$CC_ARCH" ]; then export TORCH_CUDA_ARCH_LIST="$CC_ARCH"; fi
        run_step install "$PY" -m pip install -v --no-build-isolation --no-deps -e . ;;
    info)
        run_step info "$PY" -m fastres info
        "$PY" -m fastres info --json >"$OUT/info_${SLUG}_${DATE}.json" 2>/dev/null || true ;;
    tests)
        run_step tests "$PY" -m pytest tests -q -ra --durations=30 --junitxml="$OUT/junit_tests.xml" ${PYTEST_ARGS:-} ;;
    check)
        CK="$RES/check_${SLUG}_fp32-bf16-fp16_b8_${DATE}"
        run_step check bash -c "'$PY' -m fastres check --json '$CK.json' | tee '$CK.txt'; exit \${PIPESTATUS[0]}" ;;
    bench)
        run_step bench "$PY" -m fastres bench --out "$RES" ;;
    bench-extra)
        run_step bench-r18 "$PY" -m fastres bench --model resnet18 --out "$RES"
        run_step bench-r101 "$PY" -m fastres bench --model resnet101 --batch-size 128 --out "$RES"
        run_step bench-cifar "$PY" -m fastres bench --model cifar_resnet56 --batch-size 512 --out "$RES"
        run_step bench-fp32 "$PY" -m fastres bench --dtype fp32 --out "$RES"
        run_step bench-nchw "$PY" -m fastres bench --no-channels-last --out "$RES" ;;
    benchmarks)
        if "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then
            run_step benchmarks "$PY" -m pytest benchmarks -q --benchmark-only \
                --benchmark-json="$RES/benchmarks_${SLUG}_bf16_b256_${DATE}.json" --benchmark-columns=median,iqr,rounds
        else
            log "pytest-benchmark is not installed: benchmarks skipped"
            printf '%-14s rc=%-3s %5ss  %s\n' benchmarks skip 0 "pytest-benchmark not installed" >>"$SUMMARY"
        fi ;;
    plot)
        run_step plot "$PY" benchmarks/plot.py "$RES" --readme \
            --note "Measured by \`bash benchmarks/run_gpu.sh\` on $DATE ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))." ;;
    *)
        log "unknown step '$step'"; FAILED=1 ;;
    esac
done

du -sh "$OUT" 2>/dev/null | sed 's/^/output size: /'
log "summary:"; cat "$SUMMARY"
exit "$FAILED"
