#!/usr/bin/env bash
# Creates .deps/venv (git-ignored) with numpy, onnx and onnxruntime==1.31.1: the
# independent Python reference the tests compare against (scripts/score_onnx.py).
# Needs python3 with venv and pip, and access to PyPI; does nothing when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=".deps/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import numpy, onnx, onnxruntime" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "numpy>=1.26" "onnx>=1.16" "onnxruntime==1.31.1" >&2
fi
echo "$PWD/$venv/bin/python"
