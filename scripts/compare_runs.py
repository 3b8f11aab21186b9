#!/usr/bin/env python3
"""Compares two runs of aswa-merge (used by scripts/gpu_check.sh): the decisions and scores
of their reports and the tensors of their outputs.

    compare_runs.py A.json B.json [--expected E.json]

A and B are `--report` files; their `output` fields name the merged safetensors files.
Prints one line: whether the members (the final ensemble) and the per-step decisions are
the same, the largest score difference, whether the outputs are bit-identical tensor by
tensor, and else the largest absolute and relative difference of any float tensor
(computed in float64). With --expected (a fixture's expected JSON, whose members are names
relative to the checkpoint directory), also whether A's members match it. Reads the
outputs with scripts/reference_aswa.py's reader (numpy; ml_dtypes for bf16).
Exit status: 0 when the decisions agree (and match --expected), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from reference_aswa import read_safetensors


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
    ta, tb = read_safetensors(ra["output"]), read_safetensors(rb["output"])
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
                x, y = ta[k][1].astype(np.float64), tb[k][1].astype(np.float64)
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
