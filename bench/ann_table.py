#!/usr/bin/env python3
"""Markdown tables from the raw lines of bench/ann.sh (one or more log files).

  ann_table.py LOG [LOG...]

Reads the anchors' and the prototype's `RESULT set=... key=value` / `BUILD ...` lines, the shipped
`deeprank-bench ann` lines (`RESULT deeprank_ann_*`), and the `# HH:MM:SS load A B C set PATH` lines
ann.sh writes between runs (they give the set and the load average to the lines that carry none).
Per set: the ef ladder (median q/s over all timed calls, [min-max], calls, the cores the call kept
busy, queries per CPU-second of the process, load average range), then the builds.
"""
import os
import re
import statistics
import sys
from collections import defaultdict


def kv(line):
    return dict(re.findall(r"(\w+)=(\S+)", line))


def main():
    ladder = defaultdict(list)  # (set, impl, ef) -> [(recall, qps, cpu, load)]
    builds = defaultdict(list)  # (set, impl) -> [dict]
    cur_set, cur_load = "?", "?"
    for path in sys.argv[1:]:
        for line in open(path):
            m = re.match(r"# \S+ load (\S+) .*?set (\S+)", line)
            if m:
                cur_set = os.path.splitext(os.path.basename(m.group(2)))[0]
            m = re.match(r"# \S+ load (\S+)", line)
            if m:
                cur_load = m.group(1)
            if line.startswith("RESULT deeprank_ann_"):
                d = kv(line)
                s = d.get("set", cur_set)
                if "deeprank_ann_build" in line:
                    builds[(s, "deeprank-hnsw-shipped")].append({
                        "build_s": float(d["build_seconds"]), "cpu": d.get("cpu"), "index_mb": int(d["index_bytes"]) / 1048576,
                        "load": cur_load, "add": f"{d['add_rows']} rows in {float(d['add_seconds']) * 1e3:.0f} ms"})
                elif "deeprank_ann_exact" in line:
                    cpu = float(d["cpu"]) if "cpu" in d else None
                    ladder[(s, "exact-deeprank-shipped", "-")].append((1.0, float(d["qps"]), cpu, cur_load))
                elif "deeprank_ann_search" in line:
                    cpu = float(d["cpu"]) if "cpu" in d else None
                    ladder[(s, "deeprank-hnsw-shipped", int(d["ef"]))].append(
                        (float(d["recall"]), float(d["qps"]), cpu, cur_load))
                    b = builds.get((s, "deeprank-hnsw-shipped"))
                    if b and "peak_rss_mb" not in b[-1]:  # the build run's own search lines
                        b[-1]["peak_rss_mb"] = int(d["peak_rss_bytes"]) / 1048576
            elif line.startswith("RESULT set="):
                d = kv(line)
                ef = int(d["ef"]) if d["ef"] != "-" else "-"
                ladder[(d["set"], d["impl"], ef)].append(
                    (float(d["recall10"]), float(d["qps"]), float(d["cpu"]) if "cpu" in d else None,
                     d.get("load", cur_load)))
            elif line.startswith("BUILD set="):
                d = kv(line)
                builds[(d["set"], d["impl"])].append({
                    "build_s": float(d["build_s"]), "cpu": d.get("cpu"), "index_mb": float(d["index_mb"]),
                    "peak_rss_mb": float(d["peak_rss_mb"]), "load": d.get("load", cur_load)})
    for s in sorted({k[0] for k in ladder} | {k[0] for k in builds}):
        print(f"\n### {s}\n")
        print("| index | ef | recall@10 | q/s median | q/s min–max | calls | cores busy | q per CPU-s | load avg |")
        print("|---|---|---|---|---|---|---|---|---|")
        keys = sorted((k for k in ladder if k[0] == s), key=lambda k: (k[1], -1 if k[2] == "-" else k[2]))
        for k in keys:
            v = ladder[k]
            rec = statistics.median(x[0] for x in v)
            q = [x[1] for x in v]
            cpu = [x[2] for x in v if x[2] is not None]
            loads = [float(x[3]) for x in v if x[3] not in ("?", None)]
            # queries per CPU-second: q/s divided by the cores the call kept busy (load-robust)
            qc = [x[1] / x[2] for x in v if x[2]]
            busy = f"{statistics.median(cpu):.2f} | {statistics.median(qc):,.0f}" if cpu else "– | –"
            print(f"| {k[1]} | {k[2]} | {rec:.4f} | {statistics.median(q):,.0f} | {min(q):,.0f}–{max(q):,.0f} | "
                  f"{len(q)} | {busy} | ", end="")
            print(f"{min(loads):.1f}–{max(loads):.1f} |" if loads else "? |")
        print("\n| index | build s (wall) | cores busy | build CPU-s | index file MB | peak RSS MB (build process) | load avg | notes |")
        print("|---|---|---|---|---|---|---|---|")
        for k in sorted(k for k in builds if k[0] == s):
            for b in builds[k]:
                cpus = f"{b['build_s'] * float(b['cpu']):.0f}" if b.get("cpu") else "–"
                print(f"| {k[1]} | {b['build_s']:.1f} | {b.get('cpu') or '–'} | {cpus} | {b['index_mb']:.1f} | "
                      f"{b.get('peak_rss_mb', float('nan')):.0f} | {b['load']} | {b.get('add', '')} |")


if __name__ == "__main__":
    main()
