#!/usr/bin/env bash
# Pretrained-feature retrieval baseline on the mini Tiny ImageNet: DB = its 20,000 train images,
# queries = its 2,000 val images, at 64, 128 and 224 px; and the ImageNet top-1 check.
#   bench/retrieval.sh [DATA] [SIZES...]      (default: ../shared/data/tiny-imagenet-200-mini 64 128 224)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/tiny-imagenet-200-mini}
shift || true
SIZES=${*:-64 128 224}
THREADS=${THREADS:-2}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
OUT=${OUT:-/tmp/deeprank-bench}
mkdir -p "$OUT"
for s in $SIZES; do
  echo "== size $s"
  /usr/bin/time -f "embed wall %e s, peak RSS %M KB" "$BIN" --threads "$THREADS" embed --data "$DATA" --out "$OUT/db-$s" --size "$s"
  "$BIN" --threads "$THREADS" eval --db "$OUT/db-$s" --queries "$DATA" --k 1,10,30 --json | tee "$OUT/eval-$s.json"
  "$BIN" --threads "$THREADS" classify --data "$DATA" --imagenet-wnids ../shared/data/imagenet1k_wnids.txt --size "$s"
done
