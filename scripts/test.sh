#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests.
# Fetches the ONNX Runtime library (scripts/setup-ort.sh) first. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_DYLIB_PATH="$(scripts/setup-ort.sh)"
export ORT_DYLIB_PATH
echo "ONNX Runtime: $ORT_DYLIB_PATH"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
