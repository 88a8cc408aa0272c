#!/usr/bin/env bash
# Near-duplicates on a planted set: ORIGINALS distinct images spread over a dataset (default: the
# Tiny ImageNet mini set), PLANTED of them copied each of KINDS ways (half and double size, JPEG
# quality 50 and 75, 90 % and 95 % crops, a horizontal flip), embedded unlabelled at 128 px with the
# pretrained features, then
# `deeprank duplicates` at each threshold, scored against the planted pairs
# (bench/score_duplicates.py: precision, recall per kind).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/shared/data/tiny-imagenet-200-mini}
OUT=${OUT:-/tmp/deeprank-bench/duplicates}
ORIGINALS=${ORIGINALS:-500}
PLANTED=${PLANTED:-100}
KINDS=${KINDS:-half,double,jpeg50,jpeg75,crop90,crop95,flip}
THRESHOLDS=${THRESHOLDS:-"0.3 0.4 0.45 0.5 0.55 0.6 0.7"}
if [ -z "${BIN:-}" ]; then   # BIN=folder with deeprank and deeprank-bench skips the build
  cargo build --release --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release
fi
rm -rf "$OUT"
"$BIN/deeprank-bench" plant --data "$DATA" --out "$OUT/set" --originals "$ORIGINALS" --planted "$PLANTED" --kinds "$KINDS"
"$BIN/deeprank" --threads "${THREADS:-2}" embed --data "$OUT/set" --labels none --out "$OUT/db" --size 128
header=--header
for t in $THRESHOLDS; do
  "$BIN/deeprank" --threads "${THREADS:-2}" duplicates --db "$OUT/db" --threshold "$t" --json > "$OUT/found-$t.json" 2>/dev/null
  python3 bench/score_duplicates.py $header "$OUT/set/truth.tsv" "$OUT/found-$t.json"
  header=
done
