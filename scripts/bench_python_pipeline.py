#!/usr/bin/env python3
"""ASWA in Python, written the way a careful user would: the baseline that
scripts/bench.sh compares `aswa-merge` against.

Needs: numpy, onnx, onnxruntime (1.31.1 for a like-for-like comparison). The
`safetensors` package is used to read and write checkpoints when it is installed
(`safetensors.numpy.load_file` / `save_file`); without it a small numpy reader and
writer of the same format is used and the output says so. No torch.

    python scripts/bench_python_pipeline.py CKPT_DIR --model M.onnx --val V.npz
        [--mode inputs|sessions] [--device cpu|cuda] [--batch-size 256] [--threads 2]
        [-o OUT.safetensors] [--check REPORT.json] [--same-weights TOOL_OUT.safetensors] [--json TIMES.json]

Same decisions as the tool, by construction:

* checkpoints are the `*.safetensors` of CKPT_DIR, ordered by the last number in their
  name (the tool's discovery order for names like epoch_001);
* the rule is ASWA's (init; hard iff v_t > v_P and v_t > v_A; else soft iff v_P > v_A;
  else reject), higher is better, metric accuracy (argmax, first index on ties), over
  the validation rows in batches of --batch-size;
* candidates are built like the tool's: the ensemble is a running float64 sum of its
  members in the order they joined, the look-ahead is (sum + θ_t) / (n + 1) in float64,
  rounded once to the checkpoint dtype (numpy's astype: round to nearest even), so the
  scored weights are bit for bit the tool's;
* ONNX Runtime runs on the CPU with intra_op_num_threads = --threads, or with
  `--device cuda` on GPU 0 with the CUDA execution provider (onnxruntime-gpu).

Two ways to feed the candidates' weights (both common; the first is the careful one):

* `--mode inputs` (default): the model is rewritten once so that every weight the
  checkpoints provide is a graph input instead of an initializer (as the tool does), ONE
  InferenceSession is built, and each candidate's arrays are fed with every batch;
* `--mode sessions`: for each candidate the initializers of the ModelProto are replaced
  by the candidate's values, the model is serialised and a new InferenceSession is built
  from the bytes (weights as constants, which ONNX Runtime can pre-pack; what most
  scripts, and scripts/reference_aswa.py, do).

With `--device cuda`, `--mode inputs` does what a careful GPU user does: the validation
batches are copied to the GPU once (OrtValues on the device), each candidate's weights are
copied to the GPU once (OrtValues bound to an IoBinding), and each batch runs with
`run_with_iobinding`, its output copied back to host memory.

With --check REPORT.json (the tool's --report), the decisions and scores are compared step
by step, and with --same-weights the final weights are compared bit for bit with the tool's
output; the script exits 1 if a decision or a tensor differs. --json writes the timings:
total wall time and its parts (reading checkpoints, averaging, building sessions, the
sum of session.run calls, metric, writing the output).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import struct
import sys
import time

import numpy as np

try:
    from safetensors.numpy import load_file as st_load, save_file as st_save

    READER = "safetensors.numpy"
except ImportError:  # the format is simple enough to read with numpy alone
    st_load = st_save = None
    READER = "numpy (safetensors package not installed)"

_DT = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
       "I8": "i1", "U8": "u1", "BOOL": "?"}


def load_checkpoint(path):
    if st_load is not None:
        return st_load(path)
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data, dtype=_DT[info["dtype"]], count=(e - b) // np.dtype(
            _DT[info["dtype"]]).itemsize, offset=base + b).reshape(info["shape"])
    return out


def save_checkpoint(tensors, path):
    if st_save is not None:
        st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
        return
    inv = {np.dtype(v).str: k for k, v in _DT.items()}
    header, off = {}, 0
    for k in sorted(tensors):
        a = tensors[k]
        header[k] = {"dtype": inv[a.dtype.str], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for k in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[k]).tobytes())


def ordered_checkpoints(d):
    paths = glob.glob(os.path.join(d, "*.safetensors"))

    def key(p):
        nums = re.findall(r"\d+", os.path.basename(p)[: -len(".safetensors")])
        return (not nums, int(nums[-1]) if nums else 0, os.path.basename(p))

    return sorted(paths, key=key)


class Timer:
    def __init__(self):
        self.t = {}

    def add(self, key, since):
        self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - since


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints")
    ap.add_argument("--model", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--mode", choices=["inputs", "sessions"], default="inputs")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--check", default=None, help="the tool's --report JSON to compare with")
    ap.add_argument("--same-weights", default=None,
                    help="the tool's output (-o) to compare with this run's result, tensor by tensor")
    ap.add_argument("--json", default=None, help="write timings here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()

    t_start = time.perf_counter()
    tm = Timer()
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    paths = ordered_checkpoints(args.checkpoints)
    if not paths:
        sys.exit(f"no checkpoints in {args.checkpoints}")
    with np.load(args.val) as v:
        x_all = np.ascontiguousarray(v["x"], dtype=np.float32)
        y_all = v["y"].astype(np.int64)
    rows = len(y_all)
    model = onnx.load(args.model)  # loads the (base) weights from model.onnx.data too
    tm.add("setup", t0)

    # Which initializers the checkpoints replace.
    t0 = time.perf_counter()
    first = load_checkpoint(paths[0])
    tm.add("read", t0)
    floats = [k for k, a in first.items() if a.dtype.kind == "f"]
    init_names = {i.name for i in model.graph.initializer}
    bound = [k for k in floats if k in init_names]
    missing = [k for k in floats if k not in init_names]
    if missing:
        sys.exit(f"checkpoint tensors that are not initializers of the model: {missing}")

    so = ort.SessionOptions()
    if args.threads > 0:
        so.intra_op_num_threads = args.threads
    providers = ["CPUExecutionProvider"]
    cuda = args.device == "cuda"
    if cuda:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit(f"--device cuda: this onnxruntime ({ort.__version__}) has no CUDA provider")
        providers = ["CUDAExecutionProvider"]
    out_name = model.graph.output[0].name
    in_name = [i.name for i in model.graph.input if i.name not in init_names][0]

    def new_session(model_bytes):
        t = time.perf_counter()
        s = ort.InferenceSession(model_bytes, so, providers=providers)
        if cuda and s.get_providers()[0] != "CUDAExecutionProvider":
            sys.exit(f"--device cuda: the session runs on {s.get_providers()}")
        tm.add("session", t)
        return s

    if args.mode == "inputs":
        t0 = time.perf_counter()
        m = onnx.ModelProto()
        m.CopyFrom(model)
        keep = [i for i in m.graph.initializer if i.name not in set(bound)]
        moved = [i for i in m.graph.initializer if i.name in set(bound)]
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        for i in moved:
            m.graph.input.append(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
        data = m.SerializeToString()
        tm.add("rewrite", t0)
        session = new_session(data)
        by_name = {i.name: i for i in model.graph.initializer}
        if cuda:  # the validation batches go to the GPU once
            t0 = time.perf_counter()
            x_dev = [ort.OrtValue.ortvalue_from_numpy(x_all[s:s + args.batch_size], "cuda", 0)
                     for s in range(0, rows, args.batch_size)]
            tm.add("upload", t0)
    else:
        by_name = {i.name: i for i in model.graph.initializer}
        template = onnx.ModelProto()
        template.CopyFrom(model)
        tmpl_inits = {i.name: i for i in template.graph.initializer}

    def score(weights):
        """Accuracy of the model with `weights` (name -> array) on the validation rows."""
        if args.mode == "inputs":
            sess = session
            feeds_w = {k: weights[k] for k in bound}
        else:
            t = time.perf_counter()
            for k in bound:
                tmpl_inits[k].raw_data = np.ascontiguousarray(weights[k]).tobytes()
            data = template.SerializeToString()
            tm.add("rewrite", t)
            sess = new_session(data)
            feeds_w = {}
        correct = 0
        if cuda and args.mode == "inputs":
            t = time.perf_counter()
            binding = sess.io_binding()
            for k in bound:  # each weight goes to the GPU once per candidate
                binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(weights[k]), "cuda", 0))
            tm.add("upload", t)
            for i, s in enumerate(range(0, rows, args.batch_size)):
                e = min(s + args.batch_size, rows)
                t = time.perf_counter()
                binding.bind_ortvalue_input(in_name, x_dev[i])
                binding.bind_output(out_name, "cpu")
                sess.run_with_iobinding(binding)
                out = binding.copy_outputs_to_cpu()[0]
                tm.add("run", t)
                t = time.perf_counter()
                correct += int(np.count_nonzero(np.argmax(out, axis=1) == y_all[s:e]))
                tm.add("metric", t)
            return correct / rows
        for s in range(0, rows, args.batch_size):
            e = min(s + args.batch_size, rows)
            feed = {in_name: x_all[s:e]}
            feed.update(feeds_w)
            t = time.perf_counter()
            out = sess.run([out_name], feed)[0]
            tm.add("run", t)
            t = time.perf_counter()
            correct += int(np.count_nonzero(np.argmax(out, axis=1) == y_all[s:e]))
            tm.add("metric", t)
        return correct / rows

    def better(a, b):
        if a != a:
            return False
        if b != b:
            return True
        return a > b

    # ASWA.
    def f64(ck):
        return {k: ck[k].astype(np.float64) for k in floats}

    t0 = time.perf_counter()
    acc = f64(first)
    tm.add("average", t0)
    members = [0]
    ensemble = first
    v_a = score(first)
    steps = [{"checkpoint": os.path.basename(paths[0]), "running_score": v_a,
              "lookahead_score": None, "decision": "init", "members": 1, "ensemble_score": v_a}]
    for t in range(1, len(paths)):
        t0 = time.perf_counter()
        ck = load_checkpoint(paths[t])
        tm.add("read", t0)
        v_t = score(ck)
        t0 = time.perf_counter()
        n = len(members) + 1
        look = {k: ((acc[k] + ck[k]) / n).astype(ck[k].dtype) for k in floats}
        for k, a in ck.items():  # integer tensors come from the newest member
            if k not in look:
                look[k] = a
        tm.add("average", t0)
        v_p = score(look)
        if better(v_t, v_p) and better(v_t, v_a):
            t0 = time.perf_counter()
            acc = f64(ck)
            tm.add("average", t0)
            members, ensemble, v_a, decision = [t], ck, v_t, "hard"
        elif better(v_p, v_a):
            t0 = time.perf_counter()
            for k in floats:
                acc[k] += ck[k]
            tm.add("average", t0)
            members.append(t)
            ensemble, v_a, decision = look, v_p, "soft"
        else:
            decision = "reject"
        steps.append({"checkpoint": os.path.basename(paths[t]), "running_score": v_t,
                      "lookahead_score": v_p, "decision": decision, "members": len(members),
                      "ensemble_score": v_a})
        if not args.quiet:
            print(f"{steps[-1]['checkpoint']:<28} {v_t:.6f} {v_p:.6f} {decision:>7} {len(members):>4} {v_a:.6f}",
                  file=sys.stderr)
    if args.output:
        t0 = time.perf_counter()
        save_checkpoint(ensemble, args.output)
        tm.add("write", t0)
    total = time.perf_counter() - t_start

    result = {"mode": args.mode, "device": args.device, "reader": READER, "onnxruntime": ort.__version__,
              "checkpoints": len(paths), "rows": rows, "batch_size": args.batch_size,
              "threads": args.threads, "evaluations": 2 * len(paths) - 1,
              "members": [os.path.basename(paths[i]) for i in members], "val_score": v_a,
              "total_seconds": total, "parts": tm.t}
    if args.check:
        with open(args.check) as f:
            rep = json.load(f)
        theirs = rep["steps"] if "steps" in rep else rep["result"]["steps"]
        diffs = 0
        max_delta = 0.0
        for a, b in zip(steps, theirs):
            if a["decision"] != b["decision"] or a["checkpoint"] != os.path.basename(b["checkpoint"]):
                diffs += 1
            for key in ("running_score", "lookahead_score"):
                if a[key] is not None and b[key] is not None:
                    max_delta = max(max_delta, abs(a[key] - b[key]))
        diffs += abs(len(steps) - len(theirs))
        result["check"] = {"steps": len(steps), "decisions_differ": diffs, "max_score_delta": max_delta}
        same = "same" if diffs == 0 else f"DIFFERENT ({diffs} steps)"
        print(f"check against {args.check}: decisions {same}, max |score difference| {max_delta:g}",
              file=sys.stderr)
    if args.same_weights:
        theirs = load_checkpoint(args.same_weights)
        differ = [k for k in ensemble if k not in theirs or theirs[k].dtype != ensemble[k].dtype
                  or theirs[k].shape != ensemble[k].shape
                  or theirs[k].tobytes() != np.ascontiguousarray(ensemble[k]).tobytes()]
        result.setdefault("check", {})["weights_differ"] = len(differ)
        print(f"weights against {args.same_weights}: "
              + ("bit for bit the same" if not differ else f"{len(differ)} tensors differ: {differ[:5]}"),
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"python ({args.mode}, {args.device}, {READER}): {len(paths)} checkpoints, {2 * len(paths) - 1} candidates, "
          f"{total:.2f} s total, {tm.t.get('run', 0):.2f} s in session.run; "
          f"result {len(members)} members, accuracy {v_a:.6f}", file=sys.stderr)
    bad = result.get("check", {})
    return 1 if bad.get("decisions_differ") or bad.get("weights_differ") else 0


if __name__ == "__main__":
    sys.exit(main())
