#!/usr/bin/env python3
"""Independent Python reference implementation of offline ASWA.

This file deliberately shares no code with the Rust tool (`aswa-merge`): it
re-implements the acceptance rule, the averaging/rounding rule, the metrics and
the safetensors reading/writing with numpy + onnx + onnxruntime only, so that the
expected results under `fixtures/*/expected/` are an independent oracle.

Rule (ASWA, offline over checkpoints theta_1..theta_T in natural filename order):

* theta_1 initialises ensemble A = {1}, v_A = score(theta_1)      -> "init"
* for every later theta_t:
    v_t = score(theta_t)
    P   = uniform mean of members(A) + {t},  v_P = score(P)
    hard  iff v_t better v_P and v_t better v_A : A = {t},   v_A = v_t
    soft  iff v_P better v_A (or equal with --accept-ties): A = A+{t}, v_A = v_P
    else reject.
  "better" is strict ">" for higher-is-better metrics and "<" for
  lower-is-better ones (cross-entropy, mse, mae).  A NaN candidate score is never
  accepted; a NaN running score v_A is beaten by any non-NaN score.

Averaging: each float tensor of a candidate is the uniform mean of its members,
accumulated in float64 in member order, divided by n, and rounded ONCE (round to
nearest even, computed as a correctly-rounded f64 -> target conversion) to the
checkpoint dtype (F64/F32/F16/BF16).  That rounded value, converted to the ONNX
initializer's dtype, is what gets scored.  Non-float tensors (e.g. BatchNorm's
int64 `num_batches_tracked`) are never averaged: they are copied from the newest
member (the highest checkpoint index).

Scoring: the ONNX model is loaded with its external data, every initializer whose
name equals a checkpoint tensor name is replaced by the candidate's value (shape
must match), the model is serialised to bytes and a fresh onnxruntime
InferenceSession (CPU) is built from those bytes.  The validation npz holds one
array per ONNX input (by input name) plus the target `y`.  Metrics are computed
in float64 as means over validation rows:

* accuracy          argmax (ties -> lowest index) == y
* top-K / top@K     true class within the first K of a stable descending sort
                    (rank = 1 + #{j: z_j > z_y} + #{j < y: z_j == z_y}) <= K
* cross-entropy     mean(logsumexp(z) - z_y)
* mse, mae          mean over all elements of (out - y)^2, |out - y|
* mrr, hits@K       rank = 1 + #{j != y: s_j > s_y} + 0.5 * #{j != y: s_j == s_y},
                    where j ranges over candidates not listed in the optional
                    filter (CSR `indptr`/`indices` in a filter npz, one row per
                    validation row, listing other true answers to exclude).
                    mrr = mean(1/rank), hits@K = mean(rank <= K).

CLI:
  python scripts/reference_aswa.py CKPT_DIR --model M.onnx --val V.npz \
      [--metric accuracy] [--accept-ties] [--filter F.npz] [--batch-size N] \
      [--pattern '*.safetensors'] --out expected.json [--out-weights final.safetensors]

The JSON written has fields
  metric, higher_is_better, accept_ties, checkpoints (names relative to CKPT_DIR,
  in processing order), steps [{checkpoint, running_score, ensemble_score,
  lookahead_score (null for init), decision, members (count)}], members (names of
  the final ensemble), val_score (final v_A).
`running_score` is v_t (the score of the checkpoint itself, the paper's running model); `ensemble_score` is v_A after the step.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import struct
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

try:  # bfloat16 support for numpy
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - only needed for BF16 checkpoints
    ml_dtypes = None
    BF16 = None

# --------------------------------------------------------------------------
# safetensors (minimal, independent reader / writer)
# --------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_ST = {"F64", "F32", "F16", "BF16"}


def _np_dtype(st: str) -> np.dtype:
    if st == "BF16":
        if BF16 is None:
            raise RuntimeError("BF16 tensors need the ml_dtypes package")
        return BF16
    if st not in _ST_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {st}")
    return _ST_DTYPES[st]


def _st_name(dt: np.dtype) -> str:
    if BF16 is not None and dt == BF16:
        return "BF16"
    for k, v in _ST_DTYPES.items():
        if np.dtype(dt).newbyteorder("<") == v or np.dtype(dt) == v:
            return k
    raise ValueError(f"unsupported numpy dtype {dt}")


def read_safetensors(path: str) -> Dict[str, Tuple[str, np.ndarray]]:
    """Return {name: (safetensors dtype string, array)} in file order."""
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out: Dict[str, Tuple[str, np.ndarray]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        st = info["dtype"]
        dt = _np_dtype(st)
        b, e = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        arr = np.frombuffer(data[base + b : base + e], dtype=dt).reshape(shape).copy()
        out[name] = (st, arr)
    return out


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors (sorted by name, like the safetensors library) to `path`."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs = []
    off = 0
    for name in sorted(tensors):
        a = np.array(tensors[name], order="C", copy=True)  # (ascontiguousarray turns 0-dim into 1-dim)
        st = _st_name(a.dtype)
        if st not in ("BF16",) and a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        raw = a.tobytes()
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


# --------------------------------------------------------------------------
# correctly rounded float64 -> F32 / F16 / BF16
# --------------------------------------------------------------------------


def _f64_to_f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 with round-to-odd (sticky) rounding.

    Rounding to odd at >= 2 extra bits followed by round-to-nearest-even to the
    final precision gives the correctly rounded result (no double rounding).
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)  # RNE
        fd = f.astype(np.float64)
        # truncate toward zero
        too_big = np.abs(fd) > np.abs(x)
        f = np.where(too_big & np.isfinite(x), np.nextafter(f, np.float32(0)), f).astype(np.float32)
        inexact = (f.astype(np.float64) != x) & np.isfinite(x)
    bits = f.view(np.uint32).copy()
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def round_f64_to(x: np.ndarray, st: str) -> np.ndarray:
    """Round a float64 array once, to nearest even, to the safetensors dtype `st`."""
    x = np.asarray(x, dtype=np.float64)
    if st == "F64":
        return x.copy()
    if st == "F32":
        return x.astype(np.float32)  # IEEE f64->f32 conversion is RNE
    odd = _f64_to_f32_round_to_odd(x)
    if st == "F16":
        with np.errstate(over="ignore"):
            return odd.astype(np.float16)  # f32 -> f16 RNE
    if st == "BF16":
        bits = odd.view(np.uint32).astype(np.uint64)
        nan = np.isnan(odd)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN
        return rounded.view(BF16)
    raise ValueError(f"not a float dtype: {st}")


# --------------------------------------------------------------------------
# checkpoints and averaging
# --------------------------------------------------------------------------


def natural_key(s: str):
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t != ""]


def list_checkpoints(ckpt_dir: str, pattern: str = "*.safetensors") -> List[str]:
    files = [os.path.relpath(p, ckpt_dir) for p in glob.glob(os.path.join(ckpt_dir, pattern)) if os.path.isfile(p)]
    files.sort(key=natural_key)
    if not files:
        raise SystemExit(f"no checkpoints matching {pattern!r} in {ckpt_dir}")
    return files


def average(ckpts: Sequence[Dict[str, Tuple[str, np.ndarray]]], members: Sequence[int]) -> Dict[str, np.ndarray]:
    """Uniform mean of the given member checkpoints (see module docstring)."""
    members = list(members)
    first = ckpts[members[0]]
    newest = ckpts[max(members)]
    out: Dict[str, np.ndarray] = {}
    for name, (st, arr0) in first.items():
        for m in members:
            st_m, a_m = ckpts[m][name]
            if st_m != st or a_m.shape != arr0.shape:
                raise ValueError(f"tensor {name}: dtype/shape mismatch between checkpoints")
        if st in FLOAT_ST:
            acc = np.zeros(arr0.shape, dtype=np.float64)
            for m in members:
                acc += ckpts[m][name][1].astype(np.float64)
            out[name] = round_f64_to(acc / float(len(members)), st)
        else:
            out[name] = newest[name][1].copy()
    return out


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------

LOWER_IS_BETTER = {"cross-entropy", "mse", "mae"}


def canonical_metric(name: str) -> Tuple[str, Optional[int]]:
    n = name.strip().lower()
    if n in ("accuracy", "acc"):
        return "accuracy", None
    if n in ("cross-entropy", "cross_entropy", "crossentropy", "ce", "xent"):
        return "cross-entropy", None
    if n in ("mse", "mae", "mrr"):
        return n, None
    m = re.fullmatch(r"(top|hits)[-@_]?(\d+)", n)
    if m:
        k = int(m.group(2))
        if k < 1:
            raise ValueError("K must be >= 1")
        return ("top" if m.group(1) == "top" else "hits") + f"@{k}", k
    raise ValueError(f"unknown metric {name!r}")


def metric_display(name: str) -> str:
    c, k = canonical_metric(name)
    if c.startswith("top@"):
        return f"top-{k}"
    return c


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = np.max(z, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(z - m), axis=1, keepdims=True)))[:, 0]


def compute_metric(metric: str, out: np.ndarray, y: np.ndarray, filt: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> float:
    c, k = canonical_metric(metric)
    z = np.asarray(out, dtype=np.float64)
    if c in ("mse", "mae"):
        t = np.asarray(y, dtype=np.float64).reshape(z.shape)
        d = z - t
        return float(np.mean(d * d) if c == "mse" else np.mean(np.abs(d)))
    z = z.reshape(z.shape[0], -1)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    n, c_dim = z.shape
    if y.shape[0] != n:
        raise ValueError("label count does not match output rows")
    if np.any(y < 0) or np.any(y >= c_dim):
        raise ValueError("label out of range")
    zy = z[np.arange(n), y]
    if c == "accuracy":
        return float(np.mean(np.argmax(z, axis=1) == y))
    if c == "cross-entropy":
        return float(np.mean(_logsumexp(z) - zy))
    if c.startswith("top@"):
        idx = np.arange(c_dim)[None, :]
        rank = 1 + np.sum(z > zy[:, None], axis=1) + np.sum((z == zy[:, None]) & (idx < y[:, None]), axis=1)
        return float(np.mean(rank <= k))
    # ranking metrics
    mask = np.ones_like(z, dtype=bool)
    mask[np.arange(n), y] = False
    if filt is not None:
        indptr, indices = filt
        if indptr.shape[0] != n + 1:
            raise ValueError("filter indptr must have val rows + 1 entries")
        for i in range(n):
            mask[i, indices[indptr[i] : indptr[i + 1]]] = False
    gt = np.sum((z > zy[:, None]) & mask, axis=1)
    eq = np.sum((z == zy[:, None]) & mask, axis=1)
    rank = 1.0 + gt + 0.5 * eq
    if c == "mrr":
        return float(np.mean(1.0 / rank))
    return float(np.mean(rank <= k))


# --------------------------------------------------------------------------
# ONNX scoring
# --------------------------------------------------------------------------


class Scorer:
    def __init__(self, model_path: str, val_path: str, metric: str, filter_path: Optional[str] = None,
                 batch_size: int = 0, output: Optional[str] = None, label: str = "y"):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        self._onnx = onnx
        self._ort = ort
        self._nh = numpy_helper
        # onnx.load resolves external data relative to the model's directory
        self.model = onnx.load(model_path, load_external_data=True)
        self.init_index = {init.name: i for i, init in enumerate(self.model.graph.initializer)}
        self.init_meta = {}
        for init in self.model.graph.initializer:
            self.init_meta[init.name] = (onnx.helper.tensor_dtype_to_np_dtype(init.data_type), tuple(init.dims))
        init_names = set(self.init_index)
        self.inputs = [i for i in self.model.graph.input if i.name not in init_names]
        self.output = output or self.model.graph.output[0].name
        with np.load(val_path) as v:
            self.val = {k: v[k] for k in v.files}
        self.label = label
        if label not in self.val:
            raise SystemExit(f"validation file has no {label!r} array")
        self.feeds = {}
        for inp in self.inputs:
            if inp.name not in self.val:
                raise SystemExit(f"validation file has no array for ONNX input {inp.name!r}")
            dt = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            self.feeds[inp.name] = self.val[inp.name].astype(dt, copy=False)
        self.n = int(self.val[label].shape[0])
        self.metric = metric
        self.filter = None
        if filter_path:
            with np.load(filter_path) as f:
                self.filter = (f["indptr"].astype(np.int64), f["indices"].astype(np.int64))
        self.batch_size = batch_size if batch_size and batch_size > 0 else self.n
        self.unmatched_initializers: List[str] = []

    def check_names(self, tensors: Dict[str, np.ndarray]) -> List[str]:
        """Return the ONNX initializer names that are replaced; raise on shape mismatch."""
        matched = []
        for name in self.init_index:
            if name in tensors:
                dt, shape = self.init_meta[name]
                if tuple(tensors[name].shape) != shape:
                    raise ValueError(f"shape mismatch for {name}: checkpoint {tensors[name].shape} vs onnx {shape}")
                matched.append(name)
        if not matched:
            raise ValueError("no ONNX initializer matches a checkpoint tensor name")
        self.unmatched_initializers = [n for n in self.init_index if n not in tensors]
        return matched

    def outputs(self, tensors: Dict[str, np.ndarray]) -> np.ndarray:
        onnx = self._onnx
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for name in self.check_names(tensors):
            i = self.init_index[name]
            dt, _ = self.init_meta[name]
            arr = np.asarray(tensors[name]).astype(dt)
            t = self._nh.from_array(arr, name=name)
            m.graph.initializer[i].CopyFrom(t)
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = self._ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = []
        for s in range(0, self.n, self.batch_size):
            feed = {k: v[s : s + self.batch_size] for k, v in self.feeds.items()}
            outs.append(sess.run([self.output], feed)[0])
        return np.concatenate(outs, axis=0)

    def score(self, tensors: Dict[str, np.ndarray]) -> float:
        return compute_metric(self.metric, self.outputs(tensors), self.val[self.label], self.filter)


# --------------------------------------------------------------------------
# ASWA
# --------------------------------------------------------------------------


def _better(a: float, b: float, higher: bool, allow_eq: bool = False) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    if allow_eq and a == b:
        return True
    return a > b if higher else a < b


def run_aswa(ckpt_dir: str, model: str, val: str, metric: str = "accuracy", accept_ties: bool = False,
             filter_path: Optional[str] = None, batch_size: int = 0, pattern: str = "*.safetensors",
             output: Optional[str] = None, verbose: bool = False):
    """Run ASWA; return (result dict, final averaged tensors {name: array})."""
    canon, _ = canonical_metric(metric)
    higher = canon not in LOWER_IS_BETTER
    names = list_checkpoints(ckpt_dir, pattern)
    ckpts = [read_safetensors(os.path.join(ckpt_dir, n)) for n in names]
    scorer = Scorer(model, val, metric, filter_path, batch_size, output)

    def raw(i):
        return {k: v for k, (_, v) in ckpts[i].items()}

    members = [0]
    v_a = scorer.score(raw(0))
    steps = [{"checkpoint": names[0], "running_score": v_a, "ensemble_score": v_a, "lookahead_score": None,
              "decision": "init", "members": 1}]
    for t in range(1, len(names)):
        v_t = scorer.score(raw(t))
        look = members + [t]
        v_p = scorer.score(average(ckpts, look))
        if _better(v_t, v_p, higher) and _better(v_t, v_a, higher):
            decision, members, v_a = "hard", [t], v_t
        elif _better(v_p, v_a, higher, allow_eq=accept_ties):
            decision, members, v_a = "soft", look, v_p
        else:
            decision = "reject"
        steps.append({"checkpoint": names[t], "running_score": v_t, "ensemble_score": v_a, "lookahead_score": v_p,
                      "decision": decision, "members": len(members)})
        if verbose:
            print(f"{names[t]:>28s} v_t={v_t:.6f} v_P={v_p:.6f} -> {decision:6s} v_A={v_a:.6f} n={len(members)}",
                  file=sys.stderr)
    final = average(ckpts, members)
    result = {
        "metric": metric_display(metric),
        "higher_is_better": higher,
        "accept_ties": bool(accept_ties),
        "checkpoints": names,
        "steps": steps,
        "members": [names[i] for i in members],
        "val_score": v_a,
    }
    # Diagnostics only (the reference still scores): ONNX initializers that no
    # checkpoint tensor replaces, and float checkpoint tensors absent from the
    # ONNX graph (e.g. bn.* after an export that fused BatchNorm into a conv).
    if scorer.unmatched_initializers:
        result["unmatched_onnx_initializers"] = scorer.unmatched_initializers
    missing = [k for k, (st, _) in ckpts[0].items() if st in FLOAT_ST and k not in scorer.init_index]
    if missing:
        result["checkpoint_tensors_not_in_onnx"] = missing
    for key in ("unmatched_onnx_initializers", "checkpoint_tensors_not_in_onnx"):
        if key in result:
            print(f"warning: {key}: {result[key]}", file=sys.stderr)
    return result, final


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    raise TypeError(type(o))


def write_json(path: str, result: dict) -> None:
    def fix(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(fix(result), f, indent=2, default=_json_default)
        f.write("\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt_dir")
    ap.add_argument("--model", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--accept-ties", action="store_true")
    ap.add_argument("--filter")
    ap.add_argument("--batch-size", type=int, default=0, help="0 = whole validation set in one run")
    ap.add_argument("--pattern", default="*.safetensors")
    ap.add_argument("--output", help="ONNX output name (default: first output)")
    ap.add_argument("--out", required=True, help="expected JSON to write")
    ap.add_argument("--out-weights", help="write the final averaged tensors here (safetensors)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    result, final = run_aswa(a.ckpt_dir, a.model, a.val, a.metric, a.accept_ties, a.filter, a.batch_size,
                             a.pattern, a.output, a.verbose)
    write_json(a.out, result)
    if a.out_weights:
        write_safetensors(a.out_weights, final)
    print(" ".join(s["decision"] for s in result["steps"]), f"val_score={result['val_score']}")


if __name__ == "__main__":
    main()
