#!/usr/bin/env bash
# Embed throughput, deeprank vs every inference anchor, side by side on the 2,000 mini val images:
# same weights, same size, batch 64, THREADS (2) compute threads each. deeprank's figure includes its
# own decoding (it overlaps the engine); the anchors (bench/embed_anchors.py) are timed twice:
# "net" = network only on tensors decoded beforehand, "e2e" = end to end with PIL decoding in a
# DataLoader with 2 worker processes. Needs bench/setup.sh first (or PYTHON pointing at a venv with
# torch and onnxruntime).
#   bench/embed_throughput.sh [SIZES...]     (default: 64 128 224)
#   ENGINES=ort,compile,eager_cl,eager (default) chooses the anchors.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${*:-64 128 224}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
ENGINES=${ENGINES:-ort,compile,eager_cl,eager}
export THREADS=${THREADS:-2}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
W=$("$BIN" weights fetch)
OUT=${OUT:-/tmp/deeprank-bench}
mkdir -p "$OUT"
rate() { sed -n "s/.*engine=$1 mode=$2 .*img_per_s=\([0-9.]*\).*/\1/p" "$3"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}x' if '$2' else '—')"; }
echo "| size | deeprank img/s (decode included) | anchor | anchor network only | ratio | anchor end to end (2 decode workers) | ratio |"
echo "|---|---|---|---|---|---|---|"
for s in $SIZES; do
  d=$("$BIN" --threads "$THREADS" embed --data "$DATA/val" --out "$OUT/val-db-$s" --size "$s" --batch 64 2>/dev/null | sed -n 's/.*(\([0-9.]*\) img\/s).*/\1/p')
  "$PYTHON" bench/embed_anchors.py ../shared/reference/torch_reference.py "$W" "$DATA/val" "$s" "$ENGINES" net,e2e 2>/dev/null > "$OUT/anchors-$s.txt"
  grep CHECK "$OUT/anchors-$s.txt" >&2 || true
  for e in ${ENGINES//,/ }; do
    n=$(rate "$e" net "$OUT/anchors-$s.txt"); x=$(rate "$e" e2e "$OUT/anchors-$s.txt")
    echo "| $s | $d | $e | $n | $(ratio "$d" "$n") | $x | $(ratio "$d" "$x") |"
  done
done
