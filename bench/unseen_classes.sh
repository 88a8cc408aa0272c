#!/usr/bin/env bash
# Unseen classes (bench/RESULTS.md §3, session 7): train on the 150 seen classes of
# bench/split_mini.sh's split, then rank the other 50 classes (DB = their 5,000 train images,
# queries = their 500 val images) with the trained run and with the pretrained features.
# Usage: bench/unseen_classes.sh [MINI_ROOT] [extra train flags...]   (about 20 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
MINI=${1:-../shared/data/tiny-imagenet-200-mini}
shift || true
FLAGS=("$@")
OUT=${OUT:-/tmp/deeprank-unseen}
T=${THREADS:-2}
cargo build --release --quiet
B=${CARGO_TARGET_DIR:-target}/release/deeprank
S=$OUT/split
bench/split_mini.sh "$MINI" "$S" >/dev/null
ev() { "$B" --threads "$T" eval --db "$1" --queries "$S/unseen-q" --labels folders --k 1,10,30 --json |
  python3 -c 'import json,sys; r=json.load(sys.stdin); p=r["precision_at_k"]; print("P@1 %.3f P@10 %.3f P@30 %.3f MAP@R %.3f" % (p["1"], p["10"], p["30"], r["map_at_r"]))'; }
for bs in "lite0 224" "lite2 256"; do
  read -r bb side <<<"$bs"
  rm -rf "$OUT/db-pre-$bb"
  "$B" --threads "$T" embed --data "$S/unseen-db" --labels folders --out "$OUT/db-pre-$bb" --backbone "$bb" --size "$side" >/dev/null
  echo "pretrained $bb $side px: $(ev "$OUT/db-pre-$bb")"
done
rm -rf "$OUT/run" "$OUT/db-run"
"$B" --threads "$T" train --data "$S/seen" --out "$OUT/run" ${FLAGS[@]+"${FLAGS[@]}"} >/dev/null
"$B" --threads "$T" embed --model "$OUT/run" --data "$S/unseen-db" --labels folders --out "$OUT/db-run" >/dev/null
echo "trained on the seen classes (${FLAGS[*]:-default recipe}): $(ev "$OUT/db-run")"
