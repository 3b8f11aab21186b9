#!/usr/bin/env python3
"""Reproducer (bug 4 in docs/reliability.md): an ONNX model's external-data `location`
is used as given, so an absolute path (or one with `..`) makes aswa-merge read any file
the user can read, feed it to ONNX Runtime and, with --export-onnx, copy it into the
exported model. The ONNX format requires the location to be relative to the model's
folder (onnx.checker and ONNX Runtime refuse paths that leave it); the tool reads the
data itself (scoring/onnx.rs, inline_external) before ONNX Runtime sees the model.

Usage, from the repository root, after `cargo build --release`:

    ORT_DYLIB_PATH=... python3 fuzz/repro/external_data_outside_model_dir.py [path/to/aswa-merge]

Expected: exit 2 naming the initializer and the location. Seen: exit 0, and the
exported model contains the secret file's bytes.
"""
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from seeds import fb, fv  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/aswa-merge")
DIGITS = os.path.join(ROOT, "fixtures", "digits")

with tempfile.TemporaryDirectory() as outside, tempfile.TemporaryDirectory() as d:
    secret = os.path.join(outside, "secret.txt")
    open(secret, "wb").write(b"TOP-SECRET-" + b"x" * 29)  # 40 bytes: 5 int64
    shutil.copytree(os.path.join(DIGITS, "checkpoints"), os.path.join(d, "ck"))
    for f in ("model.onnx.data", "val.npz"):
        shutil.copy(os.path.join(DIGITS, f), d)
    # An int64 initializer (never bound, so the name check leaves it alone) whose data
    # is "external", at an absolute path. Appending a second `graph` field merges it
    # into the first (protobuf semantics), adding the initializer.
    t = fv(1, 5) + fv(2, 7) + fb(8, "leak")
    for k, v in (("location", secret), ("offset", "0"), ("length", "40")):
        t += fb(13, fb(1, k) + fb(2, v))
    t += fv(14, 1)
    base = open(os.path.join(DIGITS, "model.onnx"), "rb").read()
    open(os.path.join(d, "model.onnx"), "wb").write(base + fb(7, fb(5, t)))
    r = subprocess.run(
        [BIN, "ck", "--model", "model.onnx", "--val", "val.npz", "--strategy", "last",
         "-o", "out.safetensors", "--export-onnx", "exported.onnx", "-q"],
        cwd=d, capture_output=True, text=True,
    )
    exported = os.path.join(d, "exported.onnx")
    leaked = os.path.exists(exported) and b"TOP-SECRET" in open(exported, "rb").read()
    print(f"exit {r.returncode}; {r.stderr.strip()[:200]}")
    print("exported.onnx contains the file outside the model's folder:", leaked)
    sys.exit(1 if leaked else 0)
