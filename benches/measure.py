#!/usr/bin/env python3
"""Runs one command of the benchmark and records what it cost, as one JSON line.

    python benches/measure.py --out RESULTS.jsonl --label LABEL [--tag k=v ...]
        [--ort-times] [--log FILE] -- COMMAND ARGS...

Standard library only. Records:

* `wall`: wall-clock seconds of the command (started and waited for here);
* `max_rss_kb`: peak resident set size as `/usr/bin/time -f %M` reports it (the command
  runs under /usr/bin/time; this is the kernel's maxrss of the process, which counts
  file-backed pages of memory-mapped checkpoints as well as heap);
* `rss_anon_kb`, `rss_file_kb`: the largest RssAnon (heap, stacks, anonymous maps) and
  RssFile (mapped file pages: checkpoints, libraries) seen in /proc/PID/status, sampled
  every 10 ms, to tell the two apart (a sample can miss a short peak);
* `user`, `sys`: CPU seconds (from /usr/bin/time);
* `load`: the 1-minute load average when the command started (other work on the machine);
* with `--ort-times`: the command runs with ASWA_BENCH_ORT_TIMES set to a temporary file,
  and the figures the ONNX Runtime timing shim (benches/ort_timer.c) writes there are
  merged in (`run_calls`, `run_seconds`, ...).

The command's stdout and stderr go to --log (default: discarded). A failing command
makes this script exit with its status after recording it (`rc`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def status_kb(pid: int) -> "dict[str, int]":
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def child_of(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None
    except (FileNotFoundError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--tag", action="append", default=[], help="k=v recorded with the result")
    ap.add_argument("--ort-times", action="store_true")
    ap.add_argument("--log", default=os.devnull)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        sys.exit("measure.py: no command")

    env = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="aswa-measure-")
    time_file = os.path.join(tmp, "time")
    ort_file = os.path.join(tmp, "ort.json")
    if args.ort_times:
        env["ASWA_BENCH_ORT_TIMES"] = ort_file
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    peak = {"RssAnon": 0, "RssFile": 0}
    with open(args.log, "ab") as log:
        t_start = time.time()
        start = time.perf_counter()
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M %U %S", "-o", time_file, *cmd],
                             stdout=log, stderr=log, env=env)
        target = None
        while p.poll() is None:
            if target is None:
                target = child_of(p.pid)
            if target is not None:
                s = status_kb(target)
                for k in peak:
                    peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.01)
        wall = time.perf_counter() - start
    rec = {"label": args.label, "cmd": " ".join(cmd), "rc": p.returncode, "wall": round(wall, 4),
           "t_start": t_start,
           "load": load, "rss_anon_kb": peak["RssAnon"], "rss_file_kb": peak["RssFile"]}
    for kv in args.tag:
        k, _, v = kv.partition("=")
        try:
            rec[k] = json.loads(v)
        except json.JSONDecodeError:
            rec[k] = v
    try:
        with open(time_file) as f:
            last = f.read().strip().splitlines()[-1].split()
        rec["max_rss_kb"] = int(last[0])
        rec["user"] = float(last[1])
        rec["sys"] = float(last[2])
    except (OSError, IndexError, ValueError):
        pass
    if args.ort_times:
        try:
            with open(ort_file) as f:
                rec.update(json.load(f))
        except (OSError, json.JSONDecodeError):
            rec["ort_times_missing"] = True
    for f in (time_file, ort_file):
        if os.path.exists(f):
            os.remove(f)
    os.rmdir(tmp)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    extra = ""
    if "run_seconds" in rec:
        extra = f", {rec['run_seconds']:.2f} s in ORT Run ({rec['run_calls']} calls)"
    print(f"  {args.label}: {wall:.2f} s wall, peak RSS {rec.get('max_rss_kb', 0) / 1024:.0f} MiB "
          f"(anon {peak['RssAnon'] / 1024:.0f}, file {peak['RssFile'] / 1024:.0f}){extra}, load {load:.1f}"
          + ("" if p.returncode == 0 else f", EXIT {p.returncode}"), file=sys.stderr)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
