#!/usr/bin/env python3
"""Independent Python reference for the checkpoint-selection strategies.

Like `reference_aswa.py` (whose safetensors reader/writer, candidate averaging,
ONNX scoring and metrics this file reuses), it shares no code with the Rust tool
(`aswa-merge`), so its outputs under `fixtures/*/expected/` are an oracle.

All strategies work over the same ordered checkpoints theta_0..theta_{N-1}
(natural filename order, 0-based index i).  A "uniform average" is the float64
mean of the members' float tensors (accumulated in member order, divided by n),
rounded ONCE (nearest even) to the checkpoint dtype; integer tensors are copied
from the newest (highest-index) member.  Scores use one metric with a direction;
"better" is ">" for higher-is-better metrics and "<" for lower-is-better ones
(cross-entropy, mse, mae); NaN is worse than any number.  "Best first" order =
by score, better first, ties broken by the earlier checkpoint, NaN last.

* aswa         the ASWA rule of reference_aswa.py (unchanged).
* swa          members s, s+K, s+2K, ... < N with s = floor(f * N) (f = --swa-start,
               default 0.75, f * N computed in float64), or, with --swa-start-at M,
               s = the index of the checkpoint whose ordering number (the LAST
               integer in its name) equals M; K = --swa-every (default 1).
               Uniform average.
* uniform      all checkpoints, or the last K (--last K; K >= N means all).
               Uniform average.
* ema          e = theta_0 (float64); for i = 1..N-1: e = D * e + (1 - D) * theta_i
               (float64, in that operation order: two products then a sum, no
               fused multiply-add; 1 - D computed in float64), rounded once to the
               dtype at the end; D = --ema-decay (default 0.9).  Integer tensors
               from the last checkpoint.  Members: all checkpoints.
* top-k        uniform average of the K best checkpoints by validation score
               (best-first order; K = --k, default 5; K > N means all).
* greedy-soup  checkpoints in best-first order; soup = {first}, v = its score;
               for each next c: v' = score(uniform average of soup + {c}); c is
               added iff v' is better than or equal to v (--strict: better only;
               NaN never added), and then v = v'.
* best         the single best checkpoint (earliest on ties); weights = a copy.
* last         the last checkpoint; weights = a copy.

A single checkpoint's score is the score of its own tensors (averaging one member
reproduces it exactly, so this equals the score of a one-member average).

CLI:
  python scripts/reference_strategies.py CKPT_DIR --model M.onnx --val V.npz \
      [--test T.npz] [--metric accuracy] [--strategies aswa,swa,uniform,ema,top-k,greedy-soup,best,last] \
      [--swa-start 0.75 | --swa-start-at N] [--swa-every K] [--last K] [--ema-decay D] \
      [--k K] [--strict] [--accept-ties] [--filter F.npz] [--pattern '*.safetensors'] \
      --out expected.json [--weights-dir DIR]

JSON written: {"metric", "higher_is_better", "checkpoints": [names in order],
"checkpoint_scores": [validation score of each checkpoint, same order],
"strategies": {name: {"strategy", "params", "members" (names, checkpoint order),
"val_score", "test_score" (only with --test)}}}; greedy-soup also has "steps"
[{"checkpoint", "score" (v' of soup + {c}, or the checkpoint's own score for the
first), "added"}] and aswa its "steps" as in reference_aswa.py.  NaN scores are
written as null.  With --weights-dir, DIR/<strategy>.safetensors holds each
strategy's final weights (tensors sorted by name, no metadata).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import reference_aswa as ref  # noqa: E402

ALL_STRATEGIES = ["aswa", "swa", "uniform", "ema", "top-k", "greedy-soup", "best", "last"]


def _ordering_number(name: str) -> Optional[int]:
    nums = re.findall(r"\d+", name)
    return int(nums[-1]) if nums else None


def best_first(scores: Sequence[float], higher: bool) -> List[int]:
    """Indices in best-first order: better score first, ties -> earlier index, NaN last."""
    def key(i):
        s = scores[i]
        if math.isnan(s):
            return (1, 0.0, i)
        return (0, -s if higher else s, i)

    return sorted(range(len(scores)), key=key)


def swa_members(names: Sequence[str], swa_start: float = 0.75, swa_start_at: Optional[int] = None,
                swa_every: int = 1) -> List[int]:
    n = len(names)
    if swa_every < 1:
        raise ValueError("swa_every must be >= 1")
    if swa_start_at is not None:
        hits = [i for i, nm in enumerate(names) if _ordering_number(nm) == swa_start_at]
        if len(hits) != 1:
            raise ValueError(f"swa_start_at={swa_start_at}: {len(hits)} checkpoints have that ordering number")
        s = hits[0]
    else:
        if not (0.0 <= swa_start <= 1.0):
            raise ValueError("swa_start must be in [0, 1]")
        s = int(math.floor(float(swa_start) * n))
    members = list(range(s, n, swa_every))
    if not members:
        raise ValueError(f"swa: start index {s} leaves no checkpoint (N={n})")
    return members


def ema_weights(ckpts, decay: float) -> Dict[str, np.ndarray]:
    d = float(decay)
    od = 1.0 - d
    first = ckpts[0]
    last = ckpts[-1]
    out: Dict[str, np.ndarray] = {}
    for name, (st, a0) in first.items():
        if st in ref.FLOAT_ST:
            e = a0.astype(np.float64)
            for c in ckpts[1:]:
                st_c, a = c[name]
                if st_c != st or a.shape != a0.shape:
                    raise ValueError(f"tensor {name}: dtype/shape mismatch between checkpoints")
                prod_e = d * e
                prod_x = od * a.astype(np.float64)
                e = prod_e + prod_x
            out[name] = ref.round_f64_to(e, st)
        else:
            out[name] = last[name][1].copy()
    return out


class Evaluator:
    """Scores candidate weights on val (cached by member set) and optionally test."""

    def __init__(self, ckpts, model, val, test, metric, filter_path=None, batch_size=0, output=None):
        self.ckpts = ckpts
        self.val = ref.Scorer(model, val, metric, filter_path, batch_size, output)
        # the test set has no filter (a KGE filter is per validation row)
        self.test = ref.Scorer(model, test, metric, None, batch_size, output) if test else None
        self.cache: Dict[Tuple[int, ...], float] = {}

    def raw(self, i):
        return {k: v for k, (_, v) in self.ckpts[i].items()}

    def weights(self, members: Sequence[int]) -> Dict[str, np.ndarray]:
        members = sorted(members)
        if len(members) == 1:
            return self.raw(members[0])
        return ref.average(self.ckpts, members)

    def score_members(self, members: Sequence[int]) -> float:
        key = tuple(sorted(members))
        if key not in self.cache:
            self.cache[key] = self.val.score(self.weights(key))
        return self.cache[key]


def run_strategies(ckpt_dir: str, model: str, val: str, test: Optional[str] = None, metric: str = "accuracy",
                   strategies: Sequence[str] = ALL_STRATEGIES, swa_start: float = 0.75,
                   swa_start_at: Optional[int] = None, swa_every: int = 1, last: Optional[int] = None,
                   ema_decay: float = 0.9, k: int = 5, strict: bool = False, accept_ties: bool = False,
                   filter_path: Optional[str] = None, batch_size: int = 0, pattern: str = "*.safetensors",
                   output: Optional[str] = None, verbose: bool = False):
    """Return (result dict, {strategy: final tensors})."""
    for s in strategies:
        if s not in ALL_STRATEGIES:
            raise ValueError(f"unknown strategy {s!r} (known: {', '.join(ALL_STRATEGIES)})")
    canon, _ = ref.canonical_metric(metric)
    higher = canon not in ref.LOWER_IS_BETTER
    names = ref.list_checkpoints(ckpt_dir, pattern)
    ckpts = [ref.read_safetensors(os.path.join(ckpt_dir, n)) for n in names]
    ev = Evaluator(ckpts, model, val, test, metric, filter_path, batch_size, output)
    n = len(names)
    single = [ev.score_members([i]) for i in range(n)]
    order = best_first(single, higher)

    results: Dict[str, dict] = {}
    weights: Dict[str, Dict[str, np.ndarray]] = {}

    def finish(strategy, params, members, w, val_score, extra=None):
        r = {"strategy": strategy, "params": params, "members": [names[i] for i in sorted(members)],
             "val_score": val_score}
        if ev.test is not None:
            r["test_score"] = ev.test.score(w)
        if extra:
            r.update(extra)
        results[strategy] = r
        weights[strategy] = w
        if verbose:
            print(f"{strategy:>12s}: members {[names[i] for i in sorted(members)]} val={val_score!r}"
                  + (f" test={r['test_score']!r}" if 'test_score' in r else ""), file=sys.stderr)

    for s in strategies:
        if s == "aswa":
            r, w = ref.run_aswa(ckpt_dir, model, val, metric, accept_ties, filter_path, batch_size, pattern, output)
            idx = [names.index(m) for m in r["members"]]
            finish("aswa", {"accept_ties": bool(accept_ties)}, idx, w, r["val_score"], {"steps": r["steps"]})
        elif s == "swa":
            m = swa_members(names, swa_start, swa_start_at, swa_every)
            params = ({"swa_start_at": swa_start_at} if swa_start_at is not None else {"swa_start": swa_start})
            params["swa_every"] = swa_every
            finish("swa", params, m, ev.weights(m), ev.score_members(m))
        elif s == "uniform":
            if last is not None and last < 1:
                raise ValueError("last must be >= 1")
            m = list(range(n)) if last is None else list(range(max(0, n - last), n))
            finish("uniform", {"last": last}, m, ev.weights(m), ev.score_members(m))
        elif s == "ema":
            if not (0.0 <= ema_decay <= 1.0):
                raise ValueError("ema_decay must be in [0, 1]")
            w = ema_weights(ckpts, ema_decay)
            finish("ema", {"ema_decay": ema_decay}, list(range(n)), w, ev.val.score(w))
        elif s == "top-k":
            if k < 1:
                raise ValueError("k must be >= 1")
            m = sorted(order[: min(k, n)])
            finish("top-k", {"k": k}, m, ev.weights(m), ev.score_members(m))
        elif s == "greedy-soup":
            soup = [order[0]]
            v = single[order[0]]
            steps = [{"checkpoint": names[order[0]], "score": v, "added": True}]
            for c in order[1:]:
                v2 = ev.score_members(soup + [c])
                add = ref._better(v2, v, higher, allow_eq=not strict)
                steps.append({"checkpoint": names[c], "score": v2, "added": add})
                if add:
                    soup.append(c)
                    v = v2
            finish("greedy-soup", {"strict": bool(strict)}, soup, ev.weights(soup), v, {"steps": steps})
        elif s == "best":
            b = order[0]
            finish("best", {}, [b], ev.raw(b), single[b])
        elif s == "last":
            finish("last", {}, [n - 1], ev.raw(n - 1), single[n - 1])

    result = {
        "metric": ref.metric_display(metric),
        "higher_is_better": higher,
        "checkpoints": names,
        "checkpoint_scores": single,
        "strategies": results,
    }
    return result, weights


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt_dir")
    ap.add_argument("--model", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--test")
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--strategies", default=",".join(ALL_STRATEGIES))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--swa-start", type=float, default=0.75)
    g.add_argument("--swa-start-at", type=int)
    ap.add_argument("--swa-every", type=int, default=1)
    ap.add_argument("--last", type=int)
    ap.add_argument("--ema-decay", type=float, default=0.9)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--strict", action="store_true", help="greedy-soup: add only on a strict improvement")
    ap.add_argument("--accept-ties", action="store_true", help="aswa: soft update on an equal score")
    ap.add_argument("--filter")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--pattern", default="*.safetensors")
    ap.add_argument("--output", help="ONNX output name (default: first output)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights-dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    result, weights = run_strategies(a.ckpt_dir, a.model, a.val, a.test, a.metric, strategies, a.swa_start,
                                     a.swa_start_at, a.swa_every, a.last, a.ema_decay, a.k, a.strict,
                                     a.accept_ties, a.filter, a.batch_size, a.pattern, a.output, a.verbose)
    ref.write_json(a.out, result)
    if a.weights_dir:
        os.makedirs(a.weights_dir, exist_ok=True)
        for s, w in weights.items():
            ref.write_safetensors(os.path.join(a.weights_dir, f"{s}.safetensors"), w)
    for s, r in result["strategies"].items():
        t = f" test={r['test_score']!r}" if "test_score" in r else ""
        print(f"{s}: {[m.replace('.safetensors', '') for m in r['members']]} val={r['val_score']!r}{t}")


if __name__ == "__main__":
    main()
