#!/usr/bin/env python3
"""Compares two runs of aswa-merge (used by scripts/gpu_check.sh): the decisions and scores
of their reports and the tensors of their outputs.

    compare_runs.py A.json B.json [--expected E.json]

A and B are `--report` files; their `output` fields name the merged safetensors files.
Prints one line: whether the members (the final ensemble) and the per-step decisions are
the same, the largest score difference, whether the outputs are bit-identical tensor by
tensor, and else the largest absolute and relative difference of any float tensor
(computed in float64). With --expected (a fixture's expected JSON, whose members are names
relative to the checkpoint directory), also whether A's members match it. Needs numpy
only; reads safetensors by its documented layout (u64 header length, JSON header, data).
Exit status: 0 when the decisions agree (and match --expected), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
          "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
          "U8": "u1", "BOOL": "u1"}


def tensors(path: str) -> "dict[str, tuple[str, np.ndarray]]":
    """name -> (safetensors dtype, raw array). BF16 stays as its 16-bit patterns."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        raw = np.frombuffer(data[8 + n + lo: 8 + n + hi].tobytes(), dtype=DTYPES[meta["dtype"]])
        out[name] = (meta["dtype"], raw.reshape(meta["shape"]))
    return out


def as_f64(dtype: str, a: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def members(report: dict) -> "list[str]":
    return [os.path.basename(m) for m in report.get("members", [])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--expected")
    args = ap.parse_args()
    ra, rb = (json.load(open(p)) for p in (args.a, args.b))
    same_members = members(ra) == members(rb)
    da = [(os.path.basename(s["checkpoint"]), s["decision"]) for s in ra.get("steps", [])]
    db = [(os.path.basename(s["checkpoint"]), s["decision"]) for s in rb.get("steps", [])]
    same_steps = da == db
    score_diff = 0.0
    scored_alike = True  # a score in one report is a score (not null) in the other
    for sa, sb in zip(ra.get("steps", []), rb.get("steps", [])):
        for key in ("running_score", "ensemble_score", "lookahead_score"):
            x, y = sa.get(key), sb.get(key)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                d = abs(x - y)
                score_diff = max(score_diff, d) if d == d else float("nan")
            elif (x is None) != (y is None):
                scored_alike = False
    parts = [f"members {'same' if same_members else 'DIFFER'} ({len(members(ra))})",
             f"decisions {'same' if same_steps else 'DIFFER'}",
             f"max score diff {score_diff:.3g}",
             f"val_score {ra.get('val_score')} vs {rb.get('val_score')}"]
    if not scored_alike:
        parts.append("a score is null in one report only")
    ok = same_members and same_steps and scored_alike
    if args.expected:
        exp = [os.path.basename(m) for m in json.load(open(args.expected))["members"]]
        match = members(ra) == exp
        ok = ok and match
        parts.append(f"expected members {'match' if match else 'DIFFER'}")
    ta, tb = tensors(ra["output"]), tensors(rb["output"])
    if ta.keys() != tb.keys():
        parts.append("tensor names DIFFER")
        ok = False
    else:
        identical = all(ta[k][0] == tb[k][0] and ta[k][1].tobytes() == tb[k][1].tobytes() for k in ta)
        if identical:
            parts.append("outputs bit-identical")
        else:
            abs_d = rel_d = 0.0
            for k in ta:
                x, y = as_f64(*ta[k]), as_f64(*tb[k])
                d = float(np.max(np.abs(x - y))) if x.size else 0.0
                abs_d = d if d != d else max(abs_d, d)  # NaN (a NaN on one side) sticks
                scale = float(np.max(np.abs(x))) if x.size else 0.0
                if scale > 0:
                    rel_d = max(rel_d, d / scale)
            parts.append(f"outputs differ: max abs {abs_d:.3g}, max rel (to the tensor's max) {rel_d:.3g}")
    print("; ".join(parts))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
