#!/usr/bin/env bash
# The whole test suite: formatting, lints, API docs, unit and integration tests.
# Fetches the ONNX Runtime library (scripts/setup-ort.sh) and makes a Python with numpy,
# onnx and onnxruntime for the reference checks (scripts/setup-python.sh) first.
# .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_DYLIB_PATH="$(scripts/setup-ort.sh)"
export ORT_DYLIB_PATH
echo "ONNX Runtime: $ORT_DYLIB_PATH"
echo "Python reference: $(scripts/setup-python.sh)"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --quiet
cargo test --locked
# The vector levels differ only in optimised code: the numeric kernels' tests once more,
# optimised (tests/simd.rs checks that every level the CPU has gives the same bits).
cargo test --release --locked --lib --test simd
