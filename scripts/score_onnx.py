#!/usr/bin/env python3
"""Score an ONNX model as it is (its own initializers) on a validation .npz.

    python scripts/score_onnx.py MODEL.onnx VAL.npz [--metric accuracy|cross-entropy|mrr|hits@K|top-K|mse|mae]
        [--labels y] [--filter F.npz] [--output NAME] [--batch-size N]

Prints one float (Python repr) and nothing else on stdout.  Independent of the
Rust tool: onnxruntime (CPU, one thread) runs the model file directly, external
data resolved next to it; the metrics are those of reference_aswa.py (float64).

Inputs: every model input that is not an initializer is fed the array of the
same name; a model with a single input falls back to the array `x`.  Arrays are
converted to the input's element type.  When the model's batch dimension is a
fixed number B, rows are fed B at a time and the last partial batch is padded by
repeating its last row (the padded outputs are dropped); otherwise all rows go
in one run unless --batch-size is given.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import reference_aswa as ref  # noqa: E402

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def score_model(model: str, val: str, metric: str = "accuracy", labels: str = "y", filter_path=None,
                output=None, batch_size: int = 0) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    out_name = output or sess.get_outputs()[0].name
    with np.load(val) as v:
        data = {k: v[k] for k in v.files}
    if labels not in data:
        raise SystemExit(f"{val}: no label array {labels!r} (arrays: {sorted(data)})")
    feeds = {}
    fixed = None
    for inp in inputs:
        if inp.name in data:
            arr = data[inp.name]
        elif len(inputs) == 1 and "x" in data:
            arr = data["x"]
        else:
            raise SystemExit(f"{val}: no array for model input {inp.name!r} (arrays: {sorted(data)})")
        if inp.type not in _ORT_TYPES:
            raise SystemExit(f"input {inp.name!r}: unsupported type {inp.type}")
        feeds[inp.name] = np.asarray(arr).astype(_ORT_TYPES[inp.type], copy=False)
        if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0:
            fixed = inp.shape[0]
    n = int(data[labels].shape[0])
    for k, a in feeds.items():
        if a.ndim == 0 or a.shape[0] != n:
            raise SystemExit(f"array for input {k!r} has shape {a.shape}, expected {n} rows")
    step = fixed or (batch_size if batch_size > 0 else n)
    outs = []
    for s in range(0, n, step):
        e = min(s + step, n)
        feed = {}
        for k, a in feeds.items():
            b = a[s:e]
            if fixed and e - s < fixed:
                b = np.concatenate([b, np.repeat(b[-1:], fixed - (e - s), axis=0)], axis=0)
            feed[k] = b
        o = np.asarray(sess.run([out_name], feed)[0])
        if fixed and e - s < fixed:
            if o.ndim == 0 or o.shape[0] != fixed:
                raise SystemExit("output is not one row per input row: cannot drop padded rows")
            o = o[: e - s]
        outs.append(o)
    out = np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
    filt = None
    if filter_path:
        with np.load(filter_path) as f:
            filt = (f["indptr"].astype(np.int64), f["indices"].astype(np.int64))
    return ref.compute_metric(metric, out, data[labels], filt)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("val")
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--labels", default="y")
    ap.add_argument("--filter")
    ap.add_argument("--output", help="ONNX output name (default: first output)")
    ap.add_argument("--batch-size", type=int, default=0)
    a = ap.parse_args(argv)
    print(repr(float(score_model(a.model, a.val, a.metric, a.labels, a.filter, a.output, a.batch_size))))


if __name__ == "__main__":
    main()
