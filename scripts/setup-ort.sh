#!/usr/bin/env bash
# Puts the ONNX Runtime shared library from the PyPI wheel `onnxruntime==1.31.1` into
# .deps/onnxruntime/ (git-ignored) and prints its path. Needs python3 with pip and access
# to PyPI; does nothing when the library is already there. The wheel is only downloaded
# and unpacked, never installed: nothing outside the project changes.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION="${ORT_VERSION:-1.31.1}"
dest=".deps/onnxruntime"
lib="$dest/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$lib" ]; then
  mkdir -p .deps/wheels "$dest"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    "onnxruntime==$ORT_VERSION" -d .deps/wheels >&2
  wheel=$(ls .deps/wheels/onnxruntime-"$ORT_VERSION"-*.whl | head -n 1)
  python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PY
fi
echo "$PWD/$lib"
