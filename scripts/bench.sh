#!/usr/bin/env bash
# The reproducible benchmark of aswa-merge: builds the release binary, generates the data,
# runs every measurement and prints a summary (docs/performance.md explains each figure).
#
#   scripts/bench.sh            # full run (about 20 minutes on 2 cores; ~12 GB of data)
#   scripts/bench.sh --quick    # small version (a few minutes; checks the whole chain)
#
# Environment (optional):
#   ORT_DYLIB_PATH   libonnxruntime.so.1.31.1 (default: scripts/setup-ort.sh fetches it)
#   PYTHON           a Python with numpy, onnx and onnxruntime==1.31.1 (the safetensors
#                    package is used when present; torch is not needed). Default: the
#                    venv made by scripts/setup-python.sh
#   BENCH_THREADS    threads for the tool (--threads) and ONNX Runtime in Python (default 2)
#   BENCH_REPS       repetitions of each timed command; figures are medians (default 3,
#                    1 with --quick)
#   BENCH_DIR        where data and results go (default target/bench, git-ignored)
#   BENCH_SKIP       comma-separated sections to skip: averaging,e2e,cnn,wide,extra,perf,scale,rss
#
# Results: $BENCH_DIR/results/{results.jsonl,averaging.jsonl,summary.md,logs/}.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (use --quick)" >&2; exit 2 ;;
  esac
done

ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/setup-ort.sh)}"
export ORT_DYLIB_PATH
PYTHON="${PYTHON:-$(scripts/setup-python.sh)}"
THREADS="${BENCH_THREADS:-2}"
if [ "$QUICK" = 1 ]; then REPS="${BENCH_REPS:-1}"; else REPS="${BENCH_REPS:-3}"; fi
DIR="${BENCH_DIR:-target/bench}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"  # absolute: commands below run from other directories too
SKIP=",${BENCH_SKIP:-},"
RES="$DIR/results"
LOGS="$RES/logs"
TMP="$DIR/tmp"
rm -rf "$RES" "$TMP"
mkdir -p "$LOGS" "$TMP"
JSONL="$RES/results.jsonl"
: > "$JSONL"
BIN="$PWD/target/release/aswa-merge"
SHIM="$DIR/libort_timer.so"
MEASURE=("$PYTHON" benches/measure.py --out "$JSONL")
PIPE=("$PYTHON" scripts/bench_python_pipeline.py)
skip() { [[ "$SKIP" == *",$1,"* ]]; }
say() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)" >&2; }
started=$(date +%s)

say "machine"
{
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) logical CPUs"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel: $(uname -sr)"
  echo "rustc: $(rustc --version)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain -- src Cargo.toml 2>/dev/null | grep -q . && echo ' (with uncommitted changes in src/ or Cargo.toml)')"
  echo "python: $("$PYTHON" -c 'import sys, numpy, onnx, onnxruntime; print(sys.version.split()[0], "numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)')"
  echo "onnxruntime library: $ORT_DYLIB_PATH"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "mode: $([ "$QUICK" = 1 ] && echo quick || echo full), threads $THREADS, repetitions $REPS"
} | tee "$RES/machine.txt" >&2

say "build"
cargo build --release --quiet
cc -O2 -shared -fPIC -o "$SHIM" benches/ort_timer.c -ldl

# ---------------------------------------------------------------------------------------
# 1. Averaging throughput vs memcpy (cargo bench).
if ! skip averaging; then
  say "1. averaging throughput (cargo bench --bench averaging)"
  if [ "$QUICK" = 1 ]; then AN=4; AP=$((8 << 20)); else AN=8; AP=$((64 << 20)); fi
  ASWA_BENCH_N="$AN" ASWA_BENCH_PARAMS="$AP" ASWA_BENCH_REPS=3 ASWA_BENCH_DIR="$TMP" \
    ASWA_BENCH_DTYPES=f32,bf16,f16 \
    ASWA_BENCH_JSON="$RES/averaging.jsonl" \
    cargo bench --quiet --bench averaging 2>"$LOGS/averaging.err" | tee "$RES/averaging.txt" >&2
fi

# ---------------------------------------------------------------------------------------
# Data (deterministic; regenerated only when the parameters change).
say "data (scripts/bench_make.py)"
MAKE=("$PYTHON" scripts/bench_make.py)
if [ "$QUICK" = 1 ]; then
  E2E_N=6; E2E_ROWS=1000; VAL_ROWS=250,500; N_AXIS="3"; MANY=20; FEW=5
  "${MAKE[@]}" "$DIR/q-e2e" --hidden 1024,1024,512 --n 6 --rows 1000 --val-rows 250,500 --subsets 3
  "${MAKE[@]}" "$DIR/q-small" --hidden 256,256 --n 6 --rows 1000 --subsets 3
  "${MAKE[@]}" "$DIR/q-large" --hidden 2048,2048,1024 --n 6 --rows 1000 --subsets 3
  "${MAKE[@]}" "$DIR/q-many" --hidden 1024,1024,512 --n 20 --rows 128 --subsets 5
  "${MAKE[@]}" "$DIR/q-huge" --in 1024 --hidden 4096,4096,4096 --n 3 --rows 64
  "${MAKE[@]}" "$DIR/q-cnn" --arch cnn --channels 16,32 --n 4 --rows 256
  "${MAKE[@]}" "$DIR/q-wide" --in 64 --hidden 256 --classes 5000 --n 4 --rows 512
  E2E="$DIR/q-e2e"; SMALL="$DIR/q-small"; LARGE="$DIR/q-large"; MANYD="$DIR/q-many"; HUGE="$DIR/q-huge"
  CNN="$DIR/q-cnn"; WIDE="$DIR/q-wide"
  SCALE_N_SET="$E2E"; SIZE_N=6; SIZE_VAL=val.npz
else
  E2E_N=20; E2E_ROWS=5000; VAL_ROWS=1000,2500; N_AXIS="5 10"; MANY=100; FEW=10
  "${MAKE[@]}" "$DIR/e2e" --n 20 --rows 5000 --val-rows 1000,2500 --subsets 3,5,10
  "${MAKE[@]}" "$DIR/small" --hidden 1024,1024,512 --n 10 --rows 1000 --subsets 3
  "${MAKE[@]}" "$DIR/large" --hidden 4096,4096,2048 --n 10 --rows 1000 --subsets 3
  "${MAKE[@]}" "$DIR/many" --n 100 --rows 512 --subsets 10
  "${MAKE[@]}" "$DIR/huge" --in 1024 --hidden 8192,8192,8192,8192,8192 --n 3 --rows 64
  "${MAKE[@]}" "$DIR/cnn" --arch cnn --channels 32,64,128 --n 10 --rows 1000
  "${MAKE[@]}" "$DIR/wide" --in 64 --hidden 256 --classes 20000 --n 10 --rows 2000
  E2E="$DIR/e2e"; SMALL="$DIR/small"; LARGE="$DIR/large"; MANYD="$DIR/many"; HUGE="$DIR/huge"
  CNN="$DIR/cnn"; WIDE="$DIR/wide"
  SIZE_N=10; SIZE_VAL=val_1000.npz
fi
params_of() { "$PYTHON" -c "import json,sys; a=json.load(open(sys.argv[1]+'/.stamp'))
if a.get('arch') == 'cnn':
    c=[3]+[int(h) for h in a['channels'].split(',')]; print(sum(9*i*o+4*o for i,o in zip(c,c[1:]))+c[-1]*a['classes']+a['classes'])
else:
    d=[a['d_in']]+[int(h) for h in a['hidden'].split(',')]+[a['classes']]; print(sum(i*o+o for i,o in zip(d,d[1:]))+sum(4*h for h in d[1:-1]))" "$1"; }
ckdir() { if [ "$2" = all ]; then echo "$1/checkpoints"; else echo "$1/checkpoints_$2"; fi; }

# The tool on a data set: rust_cmd SET CKPTS VAL OUT [extra flags...]
rust_cmd() {
  local set=$1 ck=$2 val=$3 out=$4; shift 4
  echo "$BIN" "$ck" --model "$set/model.onnx" --val "$set/$val" -o "$out" \
    --threads "${RUN_THREADS:-$THREADS}" --device cpu --batch-size "${RUN_BATCH:-256}" -q "$@"
}

# ---------------------------------------------------------------------------------------
# 2 and 3. End to end: the tool vs the Python pipeline (both modes), same data, same
# decisions; repetitions interleaved so that load from other work hits all alike. The
# tool runs with the timing shim (benches/ort_timer.c) as its ONNX Runtime library, which
# adds up the wall time of every OrtApi::Run call: that gives section 3 from the same runs.
if ! skip e2e; then
  say "2+3. end to end: aswa-merge vs Python ($E2E_N checkpoints, $E2E_ROWS rows, $REPS repetitions, interleaved)"
  for r in $(seq "$REPS"); do
    # shellcheck disable=SC2046
    ASWA_BENCH_REAL_ORT="$ORT_DYLIB_PATH" ORT_DYLIB_PATH="$SHIM" \
      "${MEASURE[@]}" --ort-times --label "rust" --tag group=e2e --tag variant=rust --tag rep="$r" \
      --tag n="$E2E_N" --tag params="$(params_of "$E2E")" --tag rows="$E2E_ROWS" \
      --log "$LOGS/e2e-rust-$r.log" -- $(rust_cmd "$E2E" "$E2E/checkpoints" val.npz "$TMP/rust.safetensors" --report "$TMP/rust_report.json")
    for mode in inputs sessions; do
      "${MEASURE[@]}" --label "python-$mode" --tag group=e2e --tag variant="py-$mode" --tag rep="$r" \
        --tag pyjson="\"$RES/py-$mode-$r.json\"" --log "$LOGS/e2e-py-$mode-$r.log" -- \
        "${PIPE[@]}" "$E2E/checkpoints" --model "$E2E/model.onnx" --val "$E2E/val.npz" --mode "$mode" \
        --threads "$THREADS" --batch-size 256 -o "$TMP/py.safetensors" -q \
        --check "$TMP/rust_report.json" --same-weights "$TMP/rust.safetensors" --json "$RES/py-$mode-$r.json"
    done
  done
  cp "$TMP/rust_report.json" "$RES/e2e_report.json"
fi

# 2b. The same on a CNN with BatchNorm, where ONNX Runtime optimises constant weights
# (Conv+BatchNorm fusion, pre-packed convolution weights): the tool's default there is
# --weights-as constants (a session per candidate); --weights-as inputs runs too.
if ! skip cnn; then
  CNN_N=$(find -L "$CNN/checkpoints" -name '*.safetensors' | wc -l)
  say "2b. end to end on a CNN: aswa-merge (constants, inputs) vs Python ($CNN_N checkpoints, $REPS repetitions, interleaved)"
  for r in $(seq "$REPS"); do
    for form in auto inputs; do
      # shellcheck disable=SC2046
      ASWA_BENCH_REAL_ORT="$ORT_DYLIB_PATH" ORT_DYLIB_PATH="$SHIM" \
        "${MEASURE[@]}" --ort-times --label "cnn rust $form" --tag group=e2e-cnn --tag variant="rust-$form" --tag rep="$r" \
        --tag n="$CNN_N" --tag params="$(params_of "$CNN")" \
        --log "$LOGS/cnn-rust-$form-$r.log" -- \
        $(rust_cmd "$CNN" "$CNN/checkpoints" val.npz "$TMP/cnn-$form.safetensors" --weights-as "$form" --report "$TMP/cnn-$form.json")
    done
    for mode in inputs sessions; do
      "${MEASURE[@]}" --label "cnn python-$mode" --tag group=e2e-cnn --tag variant="py-$mode" --tag rep="$r" \
        --tag pyjson="\"$RES/cnn-py-$mode-$r.json\"" --log "$LOGS/cnn-py-$mode-$r.log" -- \
        "${PIPE[@]}" "$CNN/checkpoints" --model "$CNN/model.onnx" --val "$CNN/val.npz" --mode "$mode" \
        --threads "$THREADS" --batch-size 256 -o "$TMP/py.safetensors" -q \
        --check "$TMP/cnn-auto.json" --same-weights "$TMP/cnn-auto.safetensors" --json "$RES/cnn-py-$mode-$r.json"
    done
  done
  cp "$TMP/cnn-auto.json" "$RES/cnn_report.json"
fi

# 3c. Wide outputs: a model with thousands of classes (as knowledge-graph embeddings rank
# every entity), where the metric compares every output value with the true one; the tool
# with the timing shim, for a ranking metric and accuracy.
if ! skip wide; then
  WIDE_N=$(find -L "$WIDE/checkpoints" -name '*.safetensors' | wc -l)
  say "3c. wide outputs: aswa-merge on a many-class model ($WIDE_N checkpoints, $REPS repetitions, interleaved)"
  for r in $(seq "$REPS"); do
    for metric in mrr accuracy; do
      # shellcheck disable=SC2046
      ASWA_BENCH_REAL_ORT="$ORT_DYLIB_PATH" ORT_DYLIB_PATH="$SHIM" \
        "${MEASURE[@]}" --ort-times --label "wide rust $metric" --tag group=wide --tag variant="$metric" --tag rep="$r" \
        --tag n="$WIDE_N" --tag params="$(params_of "$WIDE")" \
        --log "$LOGS/wide-$metric-$r.log" -- \
        $(rust_cmd "$WIDE" "$WIDE/checkpoints" val.npz "$TMP/wide.safetensors" --metric "$metric")
    done
  done
fi

if ! skip extra && [ "$QUICK" = 0 ]; then
  say "3b. the same run with other settings (one run each): ORT on 1 thread; batches of 1024"
  for extra in "threads=1" "batch=1024"; do
    RUN_THREADS=$THREADS; RUN_BATCH=256
    case "$extra" in
      threads=1) RUN_THREADS=1 ;;
      batch=1024) RUN_BATCH=1024 ;;
    esac
    # shellcheck disable=SC2046
    ASWA_BENCH_REAL_ORT="$ORT_DYLIB_PATH" ORT_DYLIB_PATH="$SHIM" \
      "${MEASURE[@]}" --ort-times --label "rust $extra" --tag group=extra --tag setting="$extra" \
      --log "$LOGS/extra-$extra.log" -- $(rust_cmd "$E2E" "$E2E/checkpoints" val.npz "$TMP/rust.safetensors")
  done
  unset RUN_THREADS RUN_BATCH
fi

if ! skip perf && command -v perf >/dev/null && [ "$QUICK" = 0 ]; then
  say "3c. CPU samples by library (perf record -F 499, one run)"
  # shellcheck disable=SC2046
  if perf record -F 499 -o "$TMP/perf.data" -- $(rust_cmd "$E2E" "$E2E/checkpoints" val.npz "$TMP/rust.safetensors") \
      >"$LOGS/perf.log" 2>&1; then
    perf report -i "$TMP/perf.data" --sort dso --stdio 2>/dev/null >"$TMP/perf_dso.txt" || true
    perf report -i "$TMP/perf.data" --sort dso,sym --stdio 2>/dev/null >"$TMP/perf_sym.txt" || true
    grep -v '^#' "$TMP/perf_dso.txt" | grep -v '^$' | sed -n '1,8p' >"$RES/perf_dso.txt" || true
    grep -v '^#' "$TMP/perf_sym.txt" | grep -v '^$' | grep -v libonnxruntime | sed -n '1,15p' >"$RES/perf_outside_ort.txt" || true
    cat "$RES/perf_dso.txt" "$RES/perf_outside_ort.txt" >&2
  else
    echo "perf record failed (see $LOGS/perf.log); skipped" >&2
  fi
fi

# ---------------------------------------------------------------------------------------
# 5. How time grows with N, model size and validation size (the tool, with the shim).
# Repetitions are the outer loop, so that load from other work drifts over all the
# configurations alike. Along the validation-size axis the Python pipeline (both modes)
# runs too, checked against the tool's report of the same configuration.
if ! skip scale; then
  say "5. scaling (the tool with the timing shim; Python along the validation-size axis)"
  configs=()  # "axis value set ckpts val"
  for k in $N_AXIS; do configs+=("N $k $E2E $E2E/checkpoints_$k val.npz"); done
  for v in ${VAL_ROWS//,/ }; do configs+=("rows $v $E2E $E2E/checkpoints val_$v.npz"); done
  for s in "$SMALL" "$E2E" "$LARGE"; do
    ck="$s/checkpoints"; val=val.npz
    if [ "$s" = "$E2E" ]; then val="$SIZE_VAL"; [ "$SIZE_N" != "$E2E_N" ] && ck="$s/checkpoints_$SIZE_N"; fi
    configs+=("params $(basename "$s") $s $ck $val")
  done
  for r in $(seq "$REPS"); do
    for c in "${configs[@]}"; do
      read -r axis value set ck val <<<"$c"
      n=$(find -L "$ck" -name '*.safetensors' | wc -l)
      rows=$("$PYTHON" -c "import numpy as np,sys; print(np.load(sys.argv[1])['y'].shape[0])" "$set/$val")
      tags=(--tag axis="$axis" --tag n="$n" --tag params="$(params_of "$set")" --tag rows="$rows" --tag rep="$r")
      # shellcheck disable=SC2046
      ASWA_BENCH_REAL_ORT="$ORT_DYLIB_PATH" ORT_DYLIB_PATH="$SHIM" \
        "${MEASURE[@]}" --ort-times --label "scale $axis=$value" --tag group=scale "${tags[@]}" \
        --log "$LOGS/scale-$axis-$value-$r.log" -- \
        $(rust_cmd "$set" "$ck" "$val" "$TMP/scale.safetensors" --report "$TMP/scale_report.json")
      if [ "$axis" = rows ]; then
        for mode in inputs sessions; do
          "${MEASURE[@]}" --label "scale $axis=$value python-$mode" --tag group=scale-py --tag variant="py-$mode" \
            "${tags[@]}" --tag pyjson="\"$RES/scale-py-$mode-$value-$r.json\"" \
            --log "$LOGS/scale-py-$mode-$value-$r.log" -- \
            "${PIPE[@]}" "$ck" --model "$set/model.onnx" --val "$set/$val" --mode "$mode" \
            --threads "$THREADS" --batch-size 256 -q --check "$TMP/scale_report.json" --json "$RES/scale-py-$mode-$value-$r.json"
        done
      fi
    done
  done
fi

# ---------------------------------------------------------------------------------------
# 4. Peak RSS (/usr/bin/time -f %M) vs N and vs model size, for aswa and uniform.
if ! skip rss; then
  say "4. peak RSS (/usr/bin/time -f %M), aswa and uniform"
  rss_run() {  # what set ckpts
    local what=$1 set=$2 ck=$3 n params strategy
    n=$(find -L "$ck" -name '*.safetensors' | wc -l)
    params=$(params_of "$set")
    for strategy in aswa uniform; do
      # shellcheck disable=SC2046
      "${MEASURE[@]}" --label "rss $what $strategy" --tag group=rss --tag axis="$what" --tag strategy="$strategy" \
        --tag n="$n" --tag params="$params" --log "$LOGS/rss-$what-$strategy-$(basename "$set")-$n.log" -- \
        $(rust_cmd "$set" "$ck" val.npz "$TMP/rss.safetensors" --strategy "$strategy")
    done
  }
  rss_run N "$MANYD" "$MANYD/checkpoints_$FEW"
  rss_run N "$MANYD" "$MANYD/checkpoints"
  for s in "$SMALL" "$E2E" "$LARGE"; do rss_run params "$s" "$s/checkpoints_3"; done
  rss_run params "$HUGE" "$HUGE/checkpoints"
fi

rm -rf "$TMP"
say "summary"
"$PYTHON" benches/summarize.py "$RES" --threads "$THREADS" --reps "$REPS" \
  --elapsed "$(( $(date +%s) - started ))" | tee "$RES/summary.md"
