#!/usr/bin/env python3
"""Would scoring two candidates at once (two ONNX Runtime sessions, one thread each) beat
one session with two intra-op threads?  Measures both on a benchmark set.

    python benches/parallel_sessions.py target/bench/small --rows 1000
    python benches/parallel_sessions.py target/bench/e2e --rows 1000

DIR holds model.onnx (+ model.onnx.data) and val.npz as scripts/bench_make.py writes them.
Each "candidate" is one pass over the first ROWS validation rows in batches of 256, with
the model's own weights: the forward passes are what the tool's scoring does, without the
weight swapping. Prints the two wall times and their ratio (docs/performance.md,
Observations).
"""

import argparse
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=12, help="an even number")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    model = onnx.load(f"{args.dir}/model.onnx").SerializeToString()
    x = np.load(f"{args.dir}/val.npz")["x"][: args.rows]

    def session(threads: int) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def score(s: ort.InferenceSession) -> None:
        for b in range(0, len(x), args.batch_size):
            s.run(None, {"x": x[b : b + args.batch_size]})

    one = session(2)
    score(one)  # warm-up
    t = time.perf_counter()
    for _ in range(args.candidates):
        score(one)
    sequential = time.perf_counter() - t

    pair = [session(1), session(1)]
    for s in pair:
        score(s)
    t = time.perf_counter()
    threads = [
        threading.Thread(target=lambda s=s: [score(s) for _ in range(args.candidates // 2)])
        for s in pair
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    parallel = time.perf_counter() - t
    print(
        f"{args.dir}: {args.candidates} candidates of {len(x)} rows: one session x 2 threads "
        f"{sequential:.2f} s, two sessions x 1 thread at once {parallel:.2f} s, "
        f"ratio {sequential / parallel:.2f}"
    )


if __name__ == "__main__":
    main()
