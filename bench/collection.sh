#!/usr/bin/env bash
# A changing DB (issue 10): add throughput (images/s, embedding included) and the cost of one
# `add` of 50 images to a 1M × 128 DB (it appends: the 1M rows are not rewritten).
# Needs the ImageNet weights (`deeprank weights fetch`) and the bundled sample.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-target/release/deeprank}
BENCH=${BENCH:-target/release/deeprank-bench}
W=${W:-/tmp/deeprank-bench/collection}
T=${THREADS:-2}
mkdir -p "$W"
rm -rf "$W/db" "$W/new50" "$W/big"

# 1. Add throughput: the 60 val images as the DB, then `add` the 300 training images (128 px).
"$B" --threads "$T" embed --data data/sample --split val --out "$W/db" --size 128 >/dev/null
/usr/bin/time -f "wall=%e s rss=%M KB" "$B" --threads "$T" add --db "$W/db" data/sample/train
# For comparison: embed the same 300 images into a new DB.
"$B" --threads "$T" embed --data data/sample --out "$W/db-embed" --size 128

# 2. One add of 50 images into a 1M × 128 DB (a 128-d trained run's model).
RUN=${RUN:-$W/run128}
if [ ! -f "$RUN/model.bpk" ]; then
  "$B" --threads "$T" train --data data/sample --out "$RUN" --epochs 1 --steps-per-epoch 2 --size 64 >/dev/null
fi
"$BENCH" --threads "$T" make-db --out "$W/big" --rows 1000000 --model "$RUN"
mkdir -p "$W/new50"
find data/sample/val -name '*.JPEG' | sort | head -50 | xargs -I{} cp {} "$W/new50/"
ls -l "$W/big/vectors.npy"
/usr/bin/time -f "wall=%e s rss=%M KB" "$B" --threads "$T" add --db "$W/big" "$W/new50"
ls -l "$W/big/vectors.npy"
