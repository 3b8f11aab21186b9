#!/usr/bin/env bash
# The CUDA check of issue #4, run on a machine with an NVIDIA GPU (docs/performance.md,
# "CUDA and --io-binding", has the figures it gave). It checks, with the CUDA execution
# provider of onnxruntime-gpu==1.31.1:
#   - the bundled fixtures (MLP f32/f16/bf16, ranking with a filter, BatchNorm
#     recalibration, a legacy CNN export with BatchNorm folded, a float16 model): the same
#     decisions as on the CPU, and how far the merged weights move;
#   - --device auto picks CUDA and the report names the provider that ran;
#   - weights uploaded once per candidate (--io-binding on) vs with every batch (off):
#     the same results, and the time each takes on a model whose weights dominate;
#   - end-to-end times on the CPU and the GPU of the same machine (MLP, CNN, wide outputs);
#   - the errors: a GPU that does not exist, CUDA libraries missing, a library without
#     the CUDA provider (cuda must fail and name what is missing; auto falls back to the
#     CPU and says why).
#
# Usage (from the repository root):
#   ORT_GPU_DIR=DIR scripts/gpu_check.sh [OUT_DIR]
# DIR holds libonnxruntime.so.1.31.1, libonnxruntime_providers_shared.so and
# libonnxruntime_providers_cuda.so from the wheel onnxruntime-gpu==1.31.1
# (onnxruntime/capi/). The CUDA 13 and cuDNN 9 libraries are taken from the library path
# and from the nvidia-* Python packages of $PYTHON (as PyTorch installs them).
# Environment: BIN (default target/release/aswa-merge; built with cargo when missing),
# PYTHON (default python3; needs numpy and onnx), GPU_DATA (default target/gpu-data),
# GPU_REPS (default 2). OUT_DIR (default target/gpu) receives the log, the reports and
# summary.md. Exit status: the number of failed checks (0: all held; 99: 99 or more), or 100
# when it cannot start (no binary, no library).
set -uo pipefail
cd "$(dirname "$0")/.."

ORT_GPU_DIR=${ORT_GPU_DIR:?set ORT_GPU_DIR to the capi folder of onnxruntime-gpu==1.31.1}
OUTD=${1:-target/gpu}
BIN=${BIN:-$PWD/target/release/aswa-merge}
PYTHON=${PYTHON:-python3}
DATA=${GPU_DATA:-target/gpu-data}
REPS=${GPU_REPS:-2}
rm -rf "$OUTD/runs"
mkdir -p "$OUTD/runs" "$DATA"
OUTD=$(cd "$OUTD" && pwd)
exec > >(tee "$OUTD/gpu_check.log") 2>&1

LIB="$ORT_GPU_DIR/libonnxruntime.so.1.31.1"
RESULTS="$OUTD/results.tsv"
printf 'group\tlabel\trc\tseconds\tprovider\tio_binding\tweights_as\tpeak_rss_mib\tnote\n' >"$RESULTS"
FAILED=0
say() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }
fail() { echo "CHECK FAILED: $*"; FAILED=$((FAILED + 1)); }

if [ ! -x "$BIN" ]; then
  cargo build --release --quiet || { echo "no binary at $BIN and cargo build failed"; exit 100; }
fi
[ -x "$BIN" ] || { echo "$BIN: no such executable"; exit 100; }
[ -f "$LIB" ] || { echo "$LIB: not found"; exit 100; }

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || fail "nvidia-smi"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) logical CPUs"
echo "binary: $BIN ($("$BIN" --version))"
"$PYTHON" -c 'import sys, numpy, onnx; print("python", sys.version.split()[0], "numpy", numpy.__version__, "onnx", onnx.__version__)'

# The CUDA 13 / cuDNN 9 libraries that the CUDA provider links against.
say "CUDA libraries"
NV_DIRS=$("$PYTHON" - <<'EOF'
import glob, os, sys
dirs = []
for root in sys.path:
    for f in sorted(glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True)):
        d = os.path.dirname(f)
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
)
echo "nvidia package library folders: ${NV_DIRS:-none}"
BARE_LD=${LD_LIBRARY_PATH:-}
echo "missing without them:"
ldd "$ORT_GPU_DIR/libonnxruntime_providers_cuda.so" | grep 'not found' || echo "  (none)"
export LD_LIBRARY_PATH="$NV_DIRS${BARE_LD:+:$BARE_LD}"
echo "missing with them:"
ldd "$ORT_GPU_DIR/libonnxruntime_providers_cuda.so" | grep 'not found' || echo "  (none)"
export ORT_DYLIB_PATH="$LIB"

say "data (scripts/bench_make.py)"
MAKE=("$PYTHON" scripts/bench_make.py)
[ -f "$DATA/e2e/.stamp" ] || "${MAKE[@]}" "$DATA/e2e" --n 20 --rows 5000
[ -f "$DATA/big/.stamp" ] || "${MAKE[@]}" "$DATA/big" --in 1024 --hidden 4096,4096,4096 --n 3 --rows 64
[ -f "$DATA/cnn/.stamp" ] || "${MAKE[@]}" "$DATA/cnn" --arch cnn --channels 32,64,128 --n 10 --rows 1000
[ -f "$DATA/wide/.stamp" ] || "${MAKE[@]}" "$DATA/wide" --in 64 --hidden 256 --classes 20000 --n 10 --rows 2000

# run GROUP LABEL CHECKPOINTS MODEL VAL [flags...]: one run of the tool, timed, with its
# report in runs/GROUP-LABEL.json and its output in runs/GROUP-LABEL.safetensors.
run() {
  local group=$1 label=$2 ck=$3 model=$4 val=$5; shift 5
  local base="$OUTD/runs/$group-$label" t0 t1 rc quiet=-q
  [ -z "${LOUD:-}" ] || quiet=
  t0=$(date +%s.%N)
  "$BIN" "$ck" --model "$model" --val "$val" -o "$base.safetensors" --report "$base.json" ${quiet:+"$quiet"} "$@" \
    >"$base.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  "$PYTHON" - "$group" "$label" "$rc" "$t0" "$t1" "$base" >>"$RESULTS" <<'EOF'
import json, os, sys
group, label, rc, t0, t1, base = sys.argv[1:]
r = json.load(open(base + ".json")) if rc == "0" and os.path.exists(base + ".json") else {}
note = "" if rc == "0" else open(base + ".log").read().strip().replace("\n", " ")[:400]
rss = r.get("peak_rss_bytes")
print("\t".join([group, label, rc, f"{float(t1) - float(t0):.2f}", r.get("execution_provider", "-"),
                 str(r.get("io_binding", "-")), r.get("weights_as", "-"),
                 f"{rss / 2**20:.0f}" if rss else "-", note]))
EOF
  tail -n1 "$RESULTS" | cut -f2-8
  return $rc
}
# compare GROUP A B [--expected E]: decisions and weights of two runs.
compare() {
  local group=$1 a=$2 b=$3; shift 3
  local line
  line=$("$PYTHON" scripts/compare_runs.py "$OUTD/runs/$group-$a.json" "$OUTD/runs/$group-$b.json" "$@")
  local rc=$?
  echo "$group: $a vs $b: $line" | tee -a "$OUTD/compare.txt"
  return $rc
}
provider_is() {  # provider_is GROUP LABEL PROVIDER
  grep -q "\"execution_provider\": *\"$3\"" "$OUTD/runs/$1-$2.json" 2>/dev/null ||
    fail "$1/$2: the report does not name $3"
}

say "fixtures: CPU vs CUDA (io-binding auto = on)"
: >"$OUTD/compare.txt"
D=fixtures/digits
fixture() {  # fixture NAME EXPECTED CHECKPOINTS MODEL VAL [flags...]
  local name=$1 expected=$2; shift 2
  run "fx-$name" cpu "$@" --device cpu || fail "fixture $name on the CPU"
  run "fx-$name" cuda "$@" --device cuda || fail "fixture $name on CUDA"
  provider_is "fx-$name" cuda CUDAExecutionProvider
  if [ -n "$expected" ]; then
    compare "fx-$name" cuda cpu --expected "$expected" || fail "fixture $name: CUDA's decisions differ from the CPU's or the expected ones"
  else
    compare "fx-$name" cuda cpu || fail "fixture $name: CUDA's decisions differ from the CPU's"
  fi
}
fixture digits "$D/expected/aswa_accuracy.json" "$D/checkpoints" "$D/model.onnx" "$D/val.npz"
fixture digits-ce "$D/expected/aswa_cross_entropy.json" "$D/checkpoints" "$D/model.onnx" "$D/val.npz" --metric cross-entropy
fixture f16 fixtures/digits_f16/expected/aswa_accuracy.json fixtures/digits_f16/checkpoints "$D/model.onnx" "$D/val.npz"
fixture bf16 fixtures/digits_bf16/expected/aswa_accuracy.json fixtures/digits_bf16/checkpoints "$D/model.onnx" "$D/val.npz"
fixture kge fixtures/kge/expected/aswa_mrr_filtered.json fixtures/kge/checkpoints fixtures/kge/model.onnx fixtures/kge/val.npz --metric mrr --filter fixtures/kge/filter.npz
fixture bn-recal "" fixtures/bn/checkpoints fixtures/bn/model.onnx fixtures/bn/val.npz --recalibrate-bn fixtures/bn/calib.npz
fixture cnn-fused "" fixtures/exports/cnn_checkpoints fixtures/exports/fused_bn_legacy.onnx fixtures/exports/val_images.npz
fixture half-model "" fixtures/digits_f16/checkpoints fixtures/digits_f16/half/unfolded.onnx "$D/val.npz"
LOUD=1 run fx-digits auto "$D/checkpoints" "$D/model.onnx" "$D/val.npz" --device auto || fail "--device auto"
provider_is fx-digits auto CUDAExecutionProvider
grep -i "cuda" "$OUTD/runs/fx-digits-auto.log" | head -3

say "end to end: 20 checkpoints of a 7.9 M-parameter MLP, 5000 rows (CPU: all cores)"
E=$DATA/e2e
run e2e cpu "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cpu || fail "e2e on the CPU"
for r in $(seq "$REPS"); do
  for mode in on off; do
    run e2e "cuda-$mode-$r" "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda --io-binding "$mode" ||
      fail "e2e on CUDA, io-binding $mode"
  done
done
compare e2e cuda-on-1 cuda-off-1 || fail "e2e: io-binding on and off decide differently"
cmp -s "$OUTD/runs/e2e-cuda-on-1.safetensors" "$OUTD/runs/e2e-cuda-off-1.safetensors" &&
  echo "e2e: io-binding on and off: output files identical" | tee -a "$OUTD/compare.txt" ||
  fail "e2e: io-binding on and off wrote different files"
compare e2e cuda-on-1 cpu || echo "(e2e: CUDA's decisions differ from the CPU's: see the scores above)"

say "weights uploaded once per candidate: 3 checkpoints of a 37.9 M-parameter MLP (151 MB), 64 rows in batches of 4"
B=$DATA/big
run big cpu "$B/checkpoints" "$B/model.onnx" "$B/val.npz" --device cpu --batch-size 4 || fail "big on the CPU"
for r in $(seq "$REPS"); do
  for mode in on off; do
    run big "cuda-$mode-$r" "$B/checkpoints" "$B/model.onnx" "$B/val.npz" --device cuda --batch-size 4 --io-binding "$mode" ||
      fail "big on CUDA, io-binding $mode"
  done
done
compare big cuda-on-1 cuda-off-1 || fail "big: io-binding on and off decide differently"

say "CNN with BatchNorm (constants and inputs), 10 checkpoints, 1000 images"
C=$DATA/cnn
run cnn cpu "$C/checkpoints" "$C/model.onnx" "$C/val.npz" --device cpu || fail "cnn on the CPU"
for r in $(seq "$REPS"); do
  run cnn "cuda-constants-$r" "$C/checkpoints" "$C/model.onnx" "$C/val.npz" --device cuda --weights-as constants ||
    fail "cnn on CUDA with weights as constants"
  run cnn "cuda-inputs-$r" "$C/checkpoints" "$C/model.onnx" "$C/val.npz" --device cuda --weights-as inputs ||
    fail "cnn on CUDA with weights as inputs"
done
compare cnn cuda-constants-1 cpu || echo "(cnn: constants on CUDA decide differently from the CPU)"
compare cnn cuda-inputs-1 cuda-constants-1 || echo "(cnn: inputs and constants on CUDA decide differently)"

say "wide outputs: 20,000 classes, 10 checkpoints, 2000 rows, mrr"
W=$DATA/wide
run wide cpu "$W/checkpoints" "$W/model.onnx" "$W/val.npz" --device cpu --metric mrr || fail "wide on the CPU"
for r in $(seq "$REPS"); do
  run wide "cuda-$r" "$W/checkpoints" "$W/model.onnx" "$W/val.npz" --device cuda --metric mrr || fail "wide on CUDA"
done
compare wide cuda-1 cpu || echo "(wide: CUDA decides differently from the CPU)"

# Where the time goes: the same runs with the timing shim (benches/ort_timer.c) as the ONNX
# Runtime library: time inside the forward passes (Run / RunWithBinding), inside BindInput
# (where a bound weight is copied to the GPU) and in session builds, against wall time.
SHIM=${GPU_SHIM:-}
if [ -z "$SHIM" ] && command -v cc >/dev/null; then
  cc -O2 -shared -fPIC -o "$OUTD/libort_timer.so" benches/ort_timer.c -ldl && SHIM="$OUTD/libort_timer.so"
fi
if [ -n "$SHIM" ]; then
  say "where the time goes (timing shim)"
  shim() {  # shim LABEL CHECKPOINTS MODEL VAL [flags...]
    local label=$1; shift
    ASWA_BENCH_REAL_ORT="$LIB" ORT_DYLIB_PATH="$SHIM" ASWA_BENCH_ORT_TIMES="$OUTD/runs/shim-$label.times.json" \
      run shim "$label" "$@" || fail "shim run $label"
  }
  shim e2e-cpu "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cpu
  shim e2e-cuda-on "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda --io-binding on
  shim e2e-cuda-off "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda --io-binding off
  shim e2e-cuda-on-b1000 "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda --batch-size 1000
  shim e2e-cuda-uniform "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda --strategy uniform
  shim big-cuda-on "$B/checkpoints" "$B/model.onnx" "$B/val.npz" --device cuda --batch-size 4 --io-binding on
  shim big-cuda-off "$B/checkpoints" "$B/model.onnx" "$B/val.npz" --device cuda --batch-size 4 --io-binding off
  shim cnn-cuda-inputs "$C/checkpoints" "$C/model.onnx" "$C/val.npz" --device cuda --weights-as inputs
  shim cnn-cuda-constants "$C/checkpoints" "$C/model.onnx" "$C/val.npz" --device cuda --weights-as constants
  shim wide-cuda "$W/checkpoints" "$W/model.onnx" "$W/val.npz" --device cuda --metric mrr
  "$PYTHON" - "$OUTD" <<'EOF' | tee "$OUTD/shim.md"
import csv, json, os, sys
out = sys.argv[1]
rows = [r for r in csv.reader(open(os.path.join(out, "results.tsv")), delimiter="\t") if r[0] == "shim" and r[2] == "0"]
print("| run | wall s | ORT loaded → first pass s | forward passes | in them s | BindInput s | session builds s | outside ORT |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    try:
        t = json.load(open(os.path.join(out, "runs", f"shim-{r[1]}.times.json")))
    except (OSError, ValueError):
        continue
    wall = float(r[3])
    inside = t["run_seconds"] + t["bind_seconds"] + t["session_create_seconds"]
    print(f"| {r[1]} | {wall:.2f} | {t['t_first_run'] - t['t_ort_loaded']:.2f} | "
          f"{t['run_calls']} | {t['run_seconds']:.2f} | {t['bind_seconds']:.2f} | "
          f"{t['session_create_seconds']:.2f} | {1 - inside / wall:.0%} |")
EOF
else
  echo "(no timing shim: no C compiler and GPU_SHIM unset)"
fi

# The Python pipeline (scripts/bench_python_pipeline.py) on the same machine, where its
# Python has onnxruntime-gpu 1.31.1 (ORT_PY: a folder to put first on its PYTHONPATH):
# on the CPU with every core, and on the GPU (weights and validation batches uploaded once
# per candidate / once in all: the careful GPU version; and a session per candidate).
pyrun() {  # pyrun GROUP LABEL CHECK_REPORT CHECKPOINTS MODEL VAL [flags...]
  local group=$1 label=$2 check=$3 ck=$4 model=$5 val=$6; shift 6
  local base="$OUTD/runs/$group-$label" t0 t1 rc
  t0=$(date +%s.%N)
  PYTHONPATH="${ORT_PY:+$ORT_PY:}${PYTHONPATH:-}" "$PYTHON" scripts/bench_python_pipeline.py "$ck" --model "$model" \
    --val "$val" -o "$base.safetensors" -q --json "$base.py.json" --check "$OUTD/runs/$check.json" \
    --same-weights "$OUTD/runs/$check.safetensors" "$@" >"$base.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  printf '%s\t%s\t%s\t%.2f\tpython\t-\t-\t-\t%s\n' "$group" "$label" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" \
    "$(tr '\n' ' ' <"$base.log" | head -c 400)" >>"$RESULTS"
  tail -n1 "$RESULTS" | cut -f2-4,9
  return $rc
}
if PYTHONPATH="${ORT_PY:+$ORT_PY:}${PYTHONPATH:-}" "$PYTHON" -c 'import onnxruntime as o, sys
sys.exit(not (o.__version__ == "1.31.1" and "CUDAExecutionProvider" in o.get_available_providers()))' 2>/dev/null; then
  say "the Python pipeline on the same machine (e2e and cnn)"
  T=$(nproc)
  for r in $(seq "$REPS"); do
    run e2e "cpu-$((r + 1))" "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cpu || fail "e2e on the CPU"
    pyrun e2e "py-cpu-inputs-$r" e2e-cpu "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --threads "$T" ||
      fail "python e2e on the CPU: not the tool's decisions or weights"
    run e2e "cuda-on-$((r + REPS))" "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda || fail "e2e on CUDA"
    pyrun e2e "py-cuda-inputs-$r" e2e-cuda-on-1 "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda ||
      fail "python e2e on CUDA (exit 1: not the tool's decisions or weights)"
  done
  pyrun e2e py-cuda-sessions e2e-cuda-on-1 "$E/checkpoints" "$E/model.onnx" "$E/val.npz" --device cuda --mode sessions ||
    fail "python e2e on CUDA, a session per candidate (exit 1: not the tool's decisions or weights)"
  pyrun cnn py-cpu-sessions cnn-cpu "$C/checkpoints" "$C/model.onnx" "$C/val.npz" --threads "$T" --mode sessions ||
    fail "python cnn on the CPU (exit 1: not the tool's decisions or weights)"
  pyrun cnn py-cuda-inputs cnn-cuda-inputs-1 "$C/checkpoints" "$C/model.onnx" "$C/val.npz" --device cuda ||
    fail "python cnn on CUDA (exit 1: not the tool's decisions or weights)"
  for f in "$OUTD"/runs/*-py-*.log; do echo "$(basename "$f" .log): $(grep -E '^(check|weights|python)' "$f" | tr '\n' ' ')"; done |
    tee -a "$OUTD/compare.txt"
else
  echo "(the Python pipeline skipped: $PYTHON${ORT_PY:+ with ORT_PY=$ORT_PY} cannot import onnxruntime-gpu 1.31.1 with its CUDA provider)"
fi

say "errors"
expect_fail() {  # expect_fail LABEL PATTERN [flags...]: the run must fail and say PATTERN
  local label=$1 pattern=$2; shift 2
  run err "$label" "$D/checkpoints" "$D/model.onnx" "$D/val.npz" "$@"
  local rc=$?
  if [ "$rc" = 0 ]; then fail "$label: exit 0"; return; fi
  grep -qi -- "$pattern" "$OUTD/runs/err-$label.log" || fail "$label: the message does not say '$pattern'"
  [ ! -e "$OUTD/runs/err-$label.safetensors" ] || fail "$label: an output was written"
  echo "$label: exit $rc: $(head -c 600 "$OUTD/runs/err-$label.log")"
}
expect_fail no-such-gpu "Invalid device ID" --device cuda:7
# Without the nvidia-* folders on the library path: only where that leaves a CUDA library
# missing (machines that install CUDA system-wide find them all the same).
if LD_LIBRARY_PATH=$BARE_LD ldd "$ORT_GPU_DIR/libonnxruntime_providers_cuda.so" | grep -q 'not found'; then
  LD_LIBRARY_PATH=$BARE_LD expect_fail no-cuda-libs "CUDA is not usable" --device cuda
  LOUD=1 LD_LIBRARY_PATH=$BARE_LD run err auto-no-libs "$D/checkpoints" "$D/model.onnx" "$D/val.npz" --device auto ||
    fail "auto without the CUDA libraries did not fall back to the CPU"
  provider_is err auto-no-libs CPUExecutionProvider
  grep -i "cuda" "$OUTD/runs/err-auto-no-libs.log" | head -3
else
  echo "no-cuda-libs: skipped: the system library path has every library the CUDA provider needs"
fi
NOPROV=$(mktemp -d)
cp "$LIB" "$ORT_GPU_DIR/libonnxruntime_providers_shared.so" "$NOPROV/"
ORT_DYLIB_PATH="$NOPROV/libonnxruntime.so.1.31.1" expect_fail no-provider "libonnxruntime_providers_cuda.so" --device cuda
rm -rf "$NOPROV"

say "summary"
{
  echo "| group | run | exit | wall s | provider | io-binding | weights as | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|"
  tail -n +2 "$RESULTS" | cut -f1-8 | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
  echo
  sed 's/^/    /' "$OUTD/compare.txt"
  echo
  echo "failed checks: $FAILED"
} | tee "$OUTD/summary.md"
nvidia-smi --query-gpu=clocks.sm,memory.used --format=csv,noheader
exit $((FAILED > 99 ? 99 : FAILED))
