#!/usr/bin/env bash
# Embed throughput, deeprank vs every inference anchor, side by side on the 2,000 mini val images:
# same weights, same size, batch 64, THREADS (2) compute threads each. deeprank's figure includes its
# own decoding (it overlaps the engine); the anchors (bench/embed_anchors.py) are timed twice:
# "net" = network only on tensors decoded beforehand, "e2e" = end to end with PIL decoding in a
# DataLoader with 2 worker processes. Needs bench/setup.sh first (or PYTHON pointing at a venv with
# torch and onnxruntime).
#
# deeprank and ONNX Runtime (the bar's anchor) run ROUNDS times (3), back to back and in turn
# first; the other anchors run in the first round only (they are 2x and more behind, and eager at
# 224 px takes minutes a round). Each row gives each side's best round, as bench/train_step.sh
# does (one 224 px embed moved by 26% between runs 20 minutes apart on this kind of shared
# machine), then every round's figure.
#   bench/embed_throughput.sh [SIZES...]     (default: 64 128 224)
#   ENGINES=ort,compile,eager_cl,eager (default) chooses the anchors.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${*:-64 128 224}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
ENGINES=${ENGINES:-ort,compile,eager_cl,eager}
ROUNDS=${ROUNDS:-3}
export THREADS=${THREADS:-2}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
W=$("$BIN" weights fetch)
OUT=${OUT:-/tmp/deeprank-bench}
mkdir -p "$OUT"
rates() { sed -n "s/.*engine=$1 mode=$2 .*img_per_s=\([0-9.]*\).*/\1/p" "$3" | tr '\n' ' '; }
best() { tr ' ' '\n' | grep -v '^$' | sort -g | tail -1; }
ratio() { python3 -c "print(f'{$1/$2:.2f}x' if '$2' else '—')"; }
ours() {
  "$BIN" --threads "$THREADS" embed --data "$DATA/val" --out "$OUT/val-db-$1" --size "$1" --batch 64 2>/dev/null | sed -n 's/.*(\([0-9.]*\) img\/s).*/\1/p'
}
theirs() {  # SIZE ENGINES: appends their RESULT lines to the size's log
  "$PYTHON" bench/embed_anchors.py ../shared/reference/torch_reference.py "$W" "$DATA/val" "$1" "$2" net,e2e 2>/dev/null >> "$OUT/anchors-$1.txt"
}
echo "| size | deeprank img/s (decode included, best of rounds) | anchor | anchor network only | ratio | anchor end to end (2 decode workers) | ratio | rounds: deeprank / network only / end to end |"
echo "|---|---|---|---|---|---|---|---|"
for s in $SIZES; do
  : > "$OUT/anchors-$s.txt"
  d_runs=""
  for r in $(seq "$ROUNDS"); do
    if [ "$r" = 1 ]; then e=$ENGINES; else case ",$ENGINES," in *,ort,*) e=ort ;; *) e="" ;; esac; fi
    if [ $((r % 2)) = 1 ]; then
      d_runs="$d_runs $(ours "$s")"
      [ -z "$e" ] || theirs "$s" "$e"
    else
      [ -z "$e" ] || theirs "$s" "$e"
      d_runs="$d_runs $(ours "$s")"
    fi
  done
  grep CHECK "$OUT/anchors-$s.txt" | sort -u >&2 || true
  d=$(echo "$d_runs" | best)
  for e in ${ENGINES//,/ }; do
    nr=$(rates "$e" net "$OUT/anchors-$s.txt"); xr=$(rates "$e" e2e "$OUT/anchors-$s.txt")
    n=$(echo "$nr" | best); x=$(echo "$xr" | best)
    echo "| $s | $d | $e | $n | $(ratio "$d" "$n") | $x | $(ratio "$d" "$x") |${d_runs} / ${nr}/ ${xr}|"
  done
done
