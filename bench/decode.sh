#!/usr/bin/env bash
# Input pipeline, deeprank vs PIL + numpy: decode + resize + normalise of the 2,000 mini val JPEGs
# (in memory) at 64/128/224 px, 2 threads each, best of 3.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-bench/.venv/bin/python}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
export THREADS=${THREADS:-2}
cargo build --release --quiet
BENCH=${CARGO_TARGET_DIR:-target}/release/deeprank-bench
echo "| size | deeprank img/s | PIL + numpy img/s | ratio |"
echo "|---|---|---|---|"
for s in 64 128 224; do
  d=$("$BENCH" --threads "$THREADS" decode --data "$DATA/val" --size "$s" | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p')
  p=$("$PYTHON" bench/pil_decode.py "$DATA/val" "$s" | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p')
  echo "| $s | $d | $p | $(python3 -c "print(f'{$d/$p:.2f}x')") |"
done
