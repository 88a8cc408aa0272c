#!/usr/bin/env bash
# Batch-1 latency (issue 13): one pre-decoded image at a time through deeprank's embedder (what a
# search request runs: `deeprank-bench latency`, 200 val images after 10 warm-up calls) with 1 and
# 2 threads, against ONNX Runtime batch-1 with THREADS (2) intra-op threads
# (bench/embed_anchors.py MODES=b1, the same 200 images). p50 / p99 in milliseconds.
#
#   bench/latency.sh [SIZES]        default: 128 224
#
# Env: DATA (the mini set), PYTHON (bench/setup.sh's venv), ENGINES (anchors, default ort),
# ROUNDS (2: both sides back to back each round).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${*:-128 224}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
ENGINES=${ENGINES:-ort}
ROUNDS=${ROUNDS:-2}
export THREADS=${THREADS:-2} LAT_N=${LAT_N:-200}
cargo build --release --quiet --bin deeprank --bin deeprank-bench
BIN=${CARGO_TARGET_DIR:-target}/release
W=$("$BIN/deeprank" weights fetch)
for r in $(seq "$ROUNDS"); do
  for s in $SIZES; do
    echo "# round $r, $s px, load $(cut -d' ' -f1-3 /proc/loadavg)"
    for t in 1 "$THREADS"; do
      "$BIN/deeprank-bench" --threads "$t" latency --data "$DATA/val" --size "$s" --n "$LAT_N"
    done
    "$PYTHON" bench/embed_anchors.py ../shared/reference/torch_reference.py "$W" "$DATA/val" "$s" "$ENGINES" b1 2>/dev/null | grep '^RESULT'
  done
done
