#!/usr/bin/env bash
# Runs aswa-merge on the bundled digits fixture and prints its summary.
# Fetches the ONNX Runtime library (scripts/setup-ort.sh) and builds the tool first.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_DYLIB_PATH="$(scripts/setup-ort.sh)"
export ORT_DYLIB_PATH
cargo build --release --quiet
mkdir -p target/demo
./target/release/aswa-merge fixtures/digits/checkpoints \
  --model fixtures/digits/model.onnx --val fixtures/digits/val.npz \
  -o target/demo/aswa.safetensors --report target/demo/report.json
