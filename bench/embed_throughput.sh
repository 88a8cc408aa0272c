#!/usr/bin/env bash
# embed throughput, deeprank vs PyTorch, side by side: the 2,000 mini val images, same weights,
# same size, batch 64, 2 threads each. Needs bench/setup.sh first (or PYTHON pointing at a venv with torch).
#   bench/embed_throughput.sh [SIZES...]     (default: 64 128 224)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${*:-64 128 224}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
export THREADS=${THREADS:-2}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
W=$("$BIN" weights fetch)
OUT=${OUT:-/tmp/deeprank-bench}
mkdir -p "$OUT"
echo "| size | deeprank img/s | PyTorch img/s | ratio |"
echo "|---|---|---|---|"
for s in $SIZES; do
  d=$("$BIN" --threads "$THREADS" embed --data "$DATA/val" --out "$OUT/val-db-$s" --size "$s" --batch 64 2>/dev/null | sed -n 's/.*(\([0-9.]*\) img\/s).*/\1/p')
  t=$("$PYTHON" bench/torch_embed.py ../shared/reference/torch_reference.py "$W" "$DATA/val" "$s" 2>/dev/null | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p')
  echo "| $s | $d | $t | $(python3 -c "print(f'{$d/$t:.2f}x')") |"
done
