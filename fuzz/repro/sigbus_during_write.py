#!/usr/bin/env python3
"""Reproducer (bug 2 in docs/reliability.md): a checkpoint truncated while the output
is being written from its memory map raises SIGBUS; the handler prints its message and
exits 2, but the temporary file `.OUT.XXXXXX.tmp` is left beside the output.

Standard library only. Usage, from the repository root, after `cargo build --release`:

    ORT_DYLIB_PATH=... python3 fuzz/repro/sigbus_during_write.py [path/to/aswa-merge]

It builds, in a scratch directory, a model and a 210 MB checkpoint of 400 tensors of
512 KiB (small enough to go through the writer's 1 MiB buffer, which copies them from
the map in user space: a read past the new end of file there is a SIGBUS, whereas a
large tensor handed straight to write(2) fails with EFAULT and is cleaned up), runs
`--strategy last` (the output is the checkpoint itself, written from its map), and
truncates the checkpoint as soon as the temporary file appears.
"""
import glob
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from seeds import fb, fv, graph, model, node, npy, npz, value_info  # noqa: E402

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/aswa-merge"
BIN = os.path.abspath(BIN)
K, R, C = 400, 128, 1024


def build(d):
    os.makedirs(os.path.join(d, "ck"), exist_ok=True)
    inits = [
        b"".join(fv(1, x) for x in (R, C)) + fv(2, 1) + fb(8, f"w{i:03d}") + fb(9, bytes(16))
        for i in range(K)
    ]
    g = graph(
        nodes=[node("MatMul", ["x", "w000"], ["y"])],
        inits=inits,
        inputs=[value_info("x", 1, ["batch", R])],
        outputs=[value_info("y", 1, ["batch", C])],
    )
    open(os.path.join(d, "model.onnx"), "wb").write(model(g))
    header, off = {}, 0
    for i in range(K):
        header[f"w{i:03d}"] = {"dtype": "F32", "shape": [R, C], "data_offsets": [off, off + 4 * R * C]}
        off += 4 * R * C
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(d, "ck", "epoch_1.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
    open(os.path.join(d, "val.npz"), "wb").write(
        npz({"x": npy("<f4", [1, R], bytes(4 * R)), "y": npy("<f4", [1, C], bytes(4 * C))})
    )
    return 8 + len(h)


def trial(d, data_start):
    build(d)
    ck = os.path.join(d, "ck", "epoch_1.safetensors")
    p = subprocess.Popen(
        [BIN, "ck", "--model", "model.onnx", "--val", "val.npz", "--metric", "mse",
         "--strategy", "last", "-o", "out.safetensors", "-q"],
        cwd=d, stderr=subprocess.PIPE,
    )
    while not glob.glob(os.path.join(d, ".out.safetensors.*.tmp")) and p.poll() is None:
        pass
    os.truncate(ck, data_start)  # keep the header, drop the data
    err = p.communicate()[1].decode().strip().splitlines()
    left = glob.glob(os.path.join(d, ".*.tmp"))
    for f in left + glob.glob(os.path.join(d, "out.safetensors")):
        os.remove(f)
    return p.returncode, (err[-1] if err else ""), [os.path.basename(f) for f in left]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        data_start = build(d)
        for i in range(5):
            code, msg, left = trial(d, data_start)
            print(f"trial {i}: exit {code}; {msg[:110]}; temporary files left: {left}")
