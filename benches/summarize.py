#!/usr/bin/env python3
"""Prints the summary of a scripts/bench.sh run as markdown (standard library only).

    python benches/summarize.py RESULTS_DIR [--threads T] [--reps R] [--elapsed SECONDS]

Reads RESULTS_DIR/results.jsonl (benches/measure.py), averaging.jsonl (benches/averaging.rs),
py-*.json (scripts/bench_python_pipeline.py --json) and perf_*.txt. Every figure is the
median over the repetitions; the goals of the issue are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--threads", default="?")
    ap.add_argument("--reps", default="?")
    ap.add_argument("--elapsed", type=int, default=None)
    args = ap.parse_args()
    res = args.results
    recs = []
    path = os.path.join(res, "results.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    out = []
    p = out.append
    goals = []

    p("# aswa-merge benchmark summary\n")
    mt = os.path.join(res, "machine.txt")
    if os.path.exists(mt):
        p("```")
        p(open(mt).read().rstrip())
        if args.elapsed is not None:
            p(f"benchmark wall time: {args.elapsed // 60} min {args.elapsed % 60} s")
        p("```\n")
    failed = [r for r in recs if r.get("rc")]
    if failed:
        p(f"**{len(failed)} command(s) failed:** " + "; ".join(f"{r['label']} (exit {r['rc']})" for r in failed) + "\n")

    # 1. Averaging.
    avg_path = os.path.join(res, "averaging.jsonl")
    if os.path.exists(avg_path):
        with open(avg_path) as f:
            avg = [json.loads(line) for line in f if line.strip()]
        if avg:
            a0 = avg[0]
            p(f"## 1. Averaging throughput vs memcpy\n")
            p(f"N = {int(a0['n'])} checkpoints of {int(a0['params'])} parameters; GB/s of checkpoint bytes "
              "(N × model bytes / time); ratio = memcpy time / averaging time; median of 3; "
              f"vector level {a0.get('simd', 'not recorded')}; to f32: converting one checkpoint to f32 "
              "(binding it to an f32 model).\n")
            p("| dtype | threads | memcpy GB/s | read-only GB/s | mean (Weights::build) GB/s | ratio | ASWA path GB/s | ratio | one look-ahead ms | one add ms | reference kernel GB/s | ratio | reference = mean | to f32 ms |")
            p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for a in avg:
                p(f"| {a['dtype']} | {int(a['threads'])} | {a['memcpy_gbs']:.2f} | {a['read_gbs']:.2f} | "
                  f"{a['mean_gbs']:.2f} | **{a['mean_ratio']:.2f}** | {a['aswa_gbs']:.2f} | {a['aswa_ratio']:.2f} | "
                  f"{a['lookahead_ms']:.1f} | {a['add_ms']:.1f} | {a.get('reference_gbs', 0):.2f} | "
                  f"{a.get('reference_ratio', 0):.2f} | {'bit for bit' if a.get('reference_same_bits') else 'NO'} | "
                  f"{a.get('to_f32_ms', float('nan')):.1f} |")
            p("")
            for a in avg:
                goals.append((f"averaging {a['dtype']}, {int(a['threads'])} thread(s): mean/memcpy ≥ 0.7",
                              a["mean_ratio"], a["mean_ratio"] >= 0.7))

    # 2. End to end.
    e2e = [r for r in recs if r.get("group") == "e2e"]
    if e2e:
        p("## 2. End to end: aswa-merge vs the Python pipeline\n")
        by = {}
        for r in e2e:
            by.setdefault(r["variant"], []).append(r)
        rust = med([r["wall"] for r in by.get("rust", [])])
        py_parts = {}
        ratios_best = []
        for v in ("py-inputs", "py-sessions"):
            parts = []
            for r in by.get(v, []):
                try:
                    with open(r["pyjson"]) as f:
                        parts.append(json.load(f))
                except (OSError, KeyError, json.JSONDecodeError):
                    pass
            py_parts[v] = parts
        first = (py_parts.get("py-inputs") or py_parts.get("py-sessions") or [{}])[0]
        if first:
            p(f"{first.get('checkpoints')} checkpoints ({first.get('evaluations')} candidates), "
              f"{first.get('rows')} validation rows, batches of {first.get('batch_size')}, "
              f"{args.threads} threads; wall time of the whole command, median of {args.reps} "
              f"(interleaved runs). Python reads checkpoints with {first.get('reader')}.\n")
        cpu = lambda rs: med([r.get("user", 0) + r.get("sys", 0) for r in rs])  # noqa: E731
        rust_cpu = cpu(by.get("rust", []))
        rust_run = med([r.get("run_seconds") for r in by.get("rust", [])])
        rust_out = med([r["wall"] - r["run_seconds"] for r in by.get("rust", []) if "run_seconds" in r])
        p("| pipeline | median wall s | runs (wall s) | Python / aswa-merge (median wall) | CPU s (user+sys) | in ORT Run / session.run s | outside them s | session builds s | averaging s | reading s | decisions | weights |")
        p("|---|---|---|---|---|---|---|---|---|---|---|---|")
        rust_min = min([r["wall"] for r in by.get("rust", [])], default=None)
        p(f"| aswa-merge | {fmt(rust)} | {', '.join(fmt(r['wall']) for r in by.get('rust', []))} | 1 | {fmt(rust_cpu, '.1f')} | {fmt(rust_run)} | {fmt(rust_out)} | | | | | |")
        for v, name in (("py-inputs", "Python, one session, weights as inputs"),
                        ("py-sessions", "Python, a session per candidate")):
            rs = by.get(v, [])
            if not rs:
                continue
            w = med([r["wall"] for r in rs])
            parts = py_parts.get(v, [])
            pm = lambda k: med([x["parts"].get(k, 0.0) for x in parts])  # noqa: E731
            checks = [x.get("check", {}) for x in parts]
            dec = "same" if checks and all(c.get("decisions_differ") == 0 for c in checks) else "DIFFER"
            wts = "same bits" if checks and all(c.get("weights_differ") == 0 for c in checks) else "DIFFER"
            ratio = w / rust if rust else None
            best = min(r["wall"] for r in rs) / rust_min if rust_min else None
            outs = []
            for r in rs:
                try:
                    with open(r["pyjson"]) as fh:
                        outs.append(r["wall"] - json.load(fh)["parts"].get("run", 0.0))
                except (OSError, KeyError, json.JSONDecodeError):
                    pass
            p(f"| {name} | {fmt(w)} | {', '.join(fmt(r['wall']) for r in rs)} | **{fmt(ratio)}** | {fmt(cpu(rs), '.1f')} | {fmt(pm('run'))} | {fmt(med(outs))} | "
              f"{fmt(pm('session'))} | {fmt(pm('average'))} | {fmt(pm('read'))} | {dec} | {wts} |")
            if ratio is not None:
                goals.append((f"end to end vs {name}: aswa-merge ≥ 3× faster", ratio, ratio >= 3))
            ratios_best.append(f"{name}: {fmt(best)}")
        p("")
        p("Ratio of the fastest runs (best of each, less sensitive to other load): " + "; ".join(ratios_best) + ".\n")

    # 2b. End to end on a CNN.
    cnn = [r for r in recs if r.get("group") == "e2e-cnn"]
    if cnn:
        p("## 2b. End to end on a CNN: weights as constants vs inputs\n")
        by = {}
        for r in cnn:
            by.setdefault(r["variant"], []).append(r)
        base = med([r["wall"] for r in by.get("rust-auto", [])])
        pj = {}
        for v in ("py-inputs", "py-sessions"):
            pj[v] = []
            for r in by.get(v, []):
                try:
                    with open(r["pyjson"]) as f:
                        pj[v].append(json.load(f))
                except (OSError, KeyError, json.JSONDecodeError):
                    pass
        first = (pj.get("py-inputs") or pj.get("py-sessions") or [{}])[0]
        if first:
            p(f"{first.get('checkpoints')} checkpoints ({first.get('evaluations')} candidates), "
              f"{first.get('rows')} validation rows, batches of {first.get('batch_size')}, "
              f"{args.threads} threads; median of {args.reps} interleaved runs.\n")
        p("| pipeline | median wall s | runs (wall s) | its wall / aswa-merge (default) | in ORT Run / session.run s | outside them s | decisions |")
        p("|---|---|---|---|---|---|---|")
        names = (("rust-auto", "aswa-merge (default: --weights-as constants here)"),
                 ("rust-inputs", "aswa-merge --weights-as inputs"),
                 ("py-inputs", "Python, one session, weights as inputs"),
                 ("py-sessions", "Python, a session per candidate"))
        for v, name in names:
            rs = by.get(v, [])
            if not rs:
                continue
            w = med([r["wall"] for r in rs])
            if v.startswith("rust"):
                run = med([r.get("run_seconds") for r in rs])
                dec = ""
            else:
                run = med([x["parts"].get("run", 0.0) for x in pj[v]])
                checks = [x.get("check", {}) for x in pj[v]]
                dec = "same" if checks and all(c.get("decisions_differ") == 0 for c in checks) else "DIFFER"
            ratio = w / base if base else None
            p(f"| {name} | {fmt(w)} | {', '.join(fmt(r['wall']) for r in rs)} | **{fmt(ratio)}** | {fmt(run)} | "
              f"{fmt(None if run is None else w - run)} | {dec} |")
            if v.startswith("py") and ratio is not None:
                goals.append((f"end to end on a CNN vs {name}: aswa-merge ≥ 3× faster", ratio, ratio >= 3))
        p("")

    # 3. Outside ORT.
    fr = [r for r in recs if r.get("group") == "e2e" and r.get("variant") == "rust" and "run_seconds" in r]
    if fr:
        p("## 3. Time outside ONNX Runtime's forward passes\n")
        p("The tool's runs of section 2, which load benches/ort_timer.c as their ONNX Runtime library: "
          "it forwards every call to the real one and adds up the wall time of every OrtApi::Run call "
          "(and of building the session). Outside = total wall − Σ Run.\n")
        p("| run | wall s | Σ Run s | Run calls | session build s | outside s | outside / total |")
        p("|---|---|---|---|---|---|---|")
        fracs = []
        for r in fr:
            outside = r["wall"] - r["run_seconds"]
            fracs.append(outside / r["wall"])
            p(f"| {r.get('rep')} | {r['wall']:.2f} | {r['run_seconds']:.2f} | {r['run_calls']} | "
              f"{r.get('session_create_seconds', 0):.3f} | {outside:.2f} | {100 * outside / r['wall']:.1f}% |")
        f = med(fracs)
        p(f"\nMedian fraction outside ORT's Run: **{100 * f:.1f}%** (goal ≤ 10%).")
        ph = [r for r in fr if r.get("t_ort_loaded") and r.get("t_first_run") and r.get("t_start")]
        if ph:
            def phase(r):
                end = r["t_start"] + r["wall"]
                span = r["t_last_run_end"] - r["t_first_run"]
                return {
                    "start → ORT loaded (read, map and check inputs, load the validation set, SHA-256 of every checkpoint)":
                        r["t_ort_loaded"] - r["t_start"],
                    "ORT loaded → first Run (environment, rewrite, session)": r["t_first_run"] - r["t_ort_loaded"],
                    "between Runs (averaging, feeding candidates, metric)": span - r["run_seconds"],
                    "last Run → exit (checks, write output with fsync, report)": r["t_exit"] - r["t_last_run_end"],
                    "process exit": end - r["t_exit"],
                    "inside Run": r["run_seconds"],
                }
            phases = [phase(r) for r in ph]
            p("\nWhere the time goes (wall-clock marks from the shim; median over the runs):\n")
            p("| phase | seconds | share of wall |")
            p("|---|---|---|")
            wall_m = med([r["wall"] for r in ph])
            for k in phases[0]:
                v = med([x[k] for x in phases])
                p(f"| {k} | {v:.2f} | {100 * v / wall_m:.1f}% |")
        pyi = [x for x in py_parts.get("py-inputs", [])] if e2e else []
        if pyi:
            run_py = med([x["parts"].get("run", 0) for x in pyi])
            p(f"\nFor comparison, the Python pipeline (weights as inputs, same batches) spends "
              f"{run_py:.2f} s in session.run; aswa-merge's Σ Run median is {med([r['run_seconds'] for r in fr]):.2f} s.")
        goals.append(("time outside ORT forward passes ≤ 10%", 100 * f, f <= 0.10))
        ex = [r for r in recs if r.get("group") == "extra" and "run_seconds" in r]
        if ex:
            base_w = med([r["wall"] for r in fr])
            base_run = med([r["run_seconds"] for r in fr])
            p(f"\nOther settings, same run (one run each; the reference is the median above: "
              f"{base_w:.2f} s wall, {base_run:.2f} s in Run):\n")
            p("| setting | wall s | Σ Run s | Run calls | outside / total |")
            p("|---|---|---|---|---|")
            for r in ex:
                p(f"| {r['setting']} | {r['wall']:.2f} | {r['run_seconds']:.2f} | {r['run_calls']} | "
                  f"{100 * (r['wall'] - r['run_seconds']) / r['wall']:.1f}% |")
        for name in ("perf_dso.txt", "perf_outside_ort.txt"):
            fp = os.path.join(res, name)
            if os.path.exists(fp) and os.path.getsize(fp):
                p(f"\n{name} (perf record -F 499, CPU samples of all threads):\n```\n{open(fp).read().rstrip()}\n```")
        p("")

    # 3c. Wide outputs.
    wide = [r for r in recs if r.get("group") == "wide" and "run_seconds" in r]
    if wide:
        p("## 3c. Wide outputs: time outside ONNX Runtime's forward passes\n")
        p(f"A model with thousands of classes ({wide[0].get('n')} checkpoints, {wide[0].get('params')} "
          "parameters), where the metric compares every output value with the true one; "
          "outside = total wall − Σ Run, as in section 3.\n")
        p("| metric | median wall s | runs (wall s) | median Σ Run s | median outside / total |")
        p("|---|---|---|---|---|")
        by = {}
        for r in wide:
            by.setdefault(r["variant"], []).append(r)
        for metric, rs in by.items():
            p(f"| {metric} | {fmt(med([r['wall'] for r in rs]))} | {', '.join(fmt(r['wall']) for r in rs)} | "
              f"{fmt(med([r['run_seconds'] for r in rs]))} | "
              f"{fmt(100 * med([(r['wall'] - r['run_seconds']) / r['wall'] for r in rs]), '.1f')}% |")
        p("")

    # 5. Scaling.
    sc = [r for r in recs if r.get("group") == "scale"]
    ref = [r for r in recs if r.get("group") == "e2e" and r.get("variant") == "rust" and "n" in r]
    if sc and ref:  # the reference point belongs to both the N and the rows axis
        sc = sc + [dict(r, axis="N") for r in ref] + [dict(r, axis="rows") for r in ref]
    order = {"N": 0, "rows": 1, "params": 2}
    sc.sort(key=lambda r: (order.get(r["axis"], 9), r["n"] if r["axis"] == "N" else
                           r["rows"] if r["axis"] == "rows" else r["params"]))
    if sc:
        p("## 5. How time grows (aswa-merge, with the timing shim)\n")
        p(f"Median and fastest of {args.reps} runs; `load` is the median 1-minute load average when the "
          "runs started (the machine has 2 CPUs; other work was running).\n")
        p("| axis | checkpoints | candidates | parameters | validation rows | median wall s | fastest s | Σ Run s (median) | outside ORT | per candidate ms (fastest) | load |")
        p("|---|---|---|---|---|---|---|---|---|---|---|")
        groups = {}
        for r in sc:
            groups.setdefault((r["axis"], r["n"], r["params"], r["rows"]), []).append(r)
        for (axis, n, params, rows), rs in groups.items():
            w = med([r["wall"] for r in rs])
            best = min(r["wall"] for r in rs)
            run = med([r.get("run_seconds") for r in rs])
            out_f = med([(r["wall"] - r["run_seconds"]) / r["wall"] for r in rs if "run_seconds" in r])
            cands = 2 * n - 1
            p(f"| {axis} | {n} | {cands} | {params / 1e6:.1f} M | {rows} | {fmt(w)} | {fmt(best)} | {fmt(run)} | "
              f"{fmt(None if out_f is None else 100 * out_f, '.1f')}% | {fmt(1000 * best / cands, '.0f')} | "
              f"{fmt(med([r.get('load') for r in rs]), '.1f')} |")
        p("")
        spy = [r for r in recs if r.get("group") == "scale-py"]
        pye = [r for r in recs if r.get("group") == "e2e" and r.get("variant", "").startswith("py-")]
        if spy:
            p("Python pipeline along the validation-size axis (same checkpoints; decisions checked against the "
              "tool's report of the same configuration):\n")
            p("| validation rows | aswa-merge median s | Python inputs median s | ratio | Python sessions median s | ratio | decisions |")
            p("|---|---|---|---|---|---|---|")
            rows_all = sorted({r["rows"] for r in spy} | {r["rows"] for r in ref})
            for rows in rows_all:
                rr = [r for r in sc if r["axis"] == "rows" and r["rows"] == rows]
                rw = med([r["wall"] for r in rr])
                cells = []
                checks = []
                for v in ("py-inputs", "py-sessions"):
                    rs = [r for r in spy if r["rows"] == rows and r["variant"] == v]
                    if not rs and ref and rows == ref[0]["rows"]:
                        rs = [r for r in pye if r["variant"] == v]
                    w = med([r["wall"] for r in rs])
                    cells += [fmt(w), fmt(w / rw if w and rw else None)]
                    for r in rs:
                        try:
                            with open(r["pyjson"]) as f:
                                checks.append(json.load(f).get("check", {}).get("decisions_differ"))
                        except (OSError, KeyError, json.JSONDecodeError):
                            checks.append(None)
                dec = "same" if checks and all(c == 0 for c in checks) else "DIFFER/unknown"
                p(f"| {rows} | {fmt(rw)} | " + " | ".join(cells) + f" | {dec} |")
            p("")

    # 4. RSS.
    rss = [r for r in recs if r.get("group") == "rss"]
    if rss:
        p("## 4. Peak memory (/usr/bin/time -f %M)\n")
        p("`max RSS` is what /usr/bin/time reports (kernel maxrss: heap *and* resident pages of the "
          "memory-mapped checkpoints). `anon` and `file` are the largest RssAnon / RssFile sampled "
          "every 10 ms from /proc (heap vs mapped files).\n")
        p("| axis | strategy | checkpoints | parameters | model MB (f32) | wall s | max RSS MiB | anon MiB | file MiB | anon / model |")
        p("|---|---|---|---|---|---|---|---|---|---|")
        for r in rss:
            model_mb = r["params"] * 4 / 2**20
            p(f"| {r['axis']} | {r['strategy']} | {r['n']} | {r['params'] / 1e6:.1f} M | {model_mb:.0f} | {r['wall']:.1f} | "
              f"{r.get('max_rss_kb', 0) / 1024:.0f} | {r['rss_anon_kb'] / 1024:.0f} | {r['rss_file_kb'] / 1024:.0f} | "
              f"{r['rss_anon_kb'] / 1024 / model_mb:.1f} |")
        p("")

    if goals:
        p("## Goals\n")
        p("| goal | measured | met |")
        p("|---|---|---|")
        for name, value, ok in goals:
            p(f"| {name} | {value:.2f}{'%' if '%' in name or 'ORT' in name else ''} | {'yes' if ok else '**no**'} |")
        p("")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
