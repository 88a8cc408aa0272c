#!/usr/bin/env bash
# Batch-1 latency (issue 13): one pre-decoded image at a time through deeprank's embedder (what a
# search request runs: `deeprank-bench latency`, 200 val images after 10 warm-up calls) with 1 and
# 2 threads, against ONNX Runtime batch-1 with THREADS (2) intra-op threads
# (bench/embed_anchors.py MODES=b1, the same 200 images). p50 / p99 in milliseconds.
#
# Each side runs ROUNDS times (5), the two sides back to back in each round and in turn first (a
# p50 moved by up to 1.6x between rounds minutes apart on this kind of shared machine, on both
# sides alike). The summary gives each side's best and median p50 over the rounds (2 threads);
# the bar is deeprank's best p50 at or under ORT's best, and the medians are shown beside it.
#
#   bench/latency.sh [SIZES]        default: 128 224
#
# Env: DATA (the mini set), PYTHON (bench/setup.sh's venv), ENGINES (anchors, default ort),
# ROUNDS (5).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${*:-128 224}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
ENGINES=${ENGINES:-ort}
ROUNDS=${ROUNDS:-5}
export THREADS=${THREADS:-2} LAT_N=${LAT_N:-200}
cargo build --release --quiet --bin deeprank --bin deeprank-bench
BIN=${CARGO_TARGET_DIR:-target}/release
W=$("$BIN/deeprank" weights fetch)
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
ours() {
  for t in 1 "$THREADS"; do
    "$BIN/deeprank-bench" --threads "$t" latency --data "$DATA/val" --size "$1" --n "$LAT_N"
  done
}
theirs() {
  "$PYTHON" bench/embed_anchors.py ../shared/reference/torch_reference.py "$W" "$DATA/val" "$1" "$ENGINES" b1 2>/dev/null | grep '^RESULT'
}
for r in $(seq "$ROUNDS"); do
  for s in $SIZES; do
    echo "# round $r, $s px, load $(cut -d' ' -f1-3 /proc/loadavg)"
    if [ $((r % 2)) = 1 ]; then ours "$s"; theirs "$s"; else theirs "$s"; ours "$s"; fi
  done
done | tee "$LOG"
echo
python3 - "$LOG" "$THREADS" <<'PY'
import re, statistics, sys
log, threads = sys.argv[1], sys.argv[2]
runs = {}
for line in open(log):
    if not line.startswith("RESULT"):
        continue
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    if kv.get("threads") != threads:
        continue
    side = "deeprank" if "deeprank_b1" in line else kv.get("engine", "?")
    runs.setdefault((int(kv["size"]), side), []).append(float(kv["p50_ms"]))
print(f"| size | side | p50 ms, best of rounds | p50 ms, median of rounds | every round |")
print("|---|---|---|---|---|")
for (size, side), v in sorted(runs.items()):
    print(f"| {size} | {side} | {min(v):.2f} | {statistics.median(v):.2f} | {' / '.join(f'{x:.2f}' for x in v)} |")
print()
for size in sorted({s for s, _ in runs}):
    d = runs.get((size, "deeprank"))
    for (s2, side), v in sorted(runs.items()):
        if s2 != size or side == "deeprank" or not d:
            continue
        best, med = min(d) / min(v), statistics.median(d) / statistics.median(v)
        met = "met" if min(d) <= min(v) else "NOT met"
        print(f"{size} px vs {side}: deeprank/anchor p50 best {best:.2f}x, median {med:.2f}x; "
              f"bar (best p50 <= anchor's best): {met}")
PY
