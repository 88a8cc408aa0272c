#!/usr/bin/env bash
# Time-to-quality, deeprank vs PyTorch: wall time from nothing (no cached features, weights already
# downloaded) to P@30 >= 0.40 on the mini val set, DB = mini train, with deeprank's first default
# recipe (Lite0 at 224 px, linear head, 15 epochs: the flags below pin it, since the default is now
# Lite2 with the classes head) and the same recipe ported to PyTorch
# (bench/torch_reference_default.py `default`). 2 threads each. Takes about 25 minutes (PyTorch's 224-px feature pass dominates).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
export THREADS=${THREADS:-2}
TARGET=${TARGET:-0.40}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
W=$("$BIN" weights fetch)
OUT=${OUT:-/tmp/deeprank-bench}
RUN="$OUT/ttq-run"
rm -rf "$RUN" "$OUT/ttq-home"
mkdir -p "$OUT/ttq-home"
# A fresh DEEPRANK_HOME: no feature cache from earlier runs.
t0=$(date +%s.%N)
DEEPRANK_HOME="$OUT/ttq-home" "$BIN" --threads "$THREADS" train --data "$DATA" --val "$DATA" --out "$RUN" --weights "$W" \
  --backbone lite0 --arch lite0 --size 224 --epochs 15 >/dev/null 2>"$OUT/ttq-deeprank.log"
t1=$(date +%s.%N)
# metrics.csv: the first epoch whose P@30 reaches the target, and its wall time.
d=$(python3 - "$RUN/metrics.csv" "$TARGET" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
key = next(k for k in rows[0] if k.lower() in ("p@30", "p_at_30", "p30"))
wall = next(k for k in rows[0] if k.startswith("wall"))
hit = next((r for r in rows if float(r[key]) >= float(sys.argv[2])), None)
print(f"{float(hit[wall]):.1f} {hit['epoch']} {hit[key]}" if hit else "nan - -")
PY
)
tp=$("$PYTHON" bench/torch_reference_default.py default "$W" "$DATA" "$DATA/val" "$TARGET" 2>"$OUT/ttq-torch.log" | tee "$OUT/ttq-torch.out" | sed -n 's/.*reached.*wall=\([0-9.]*\) epoch=\([0-9]*\).*/\1 \2/p')
set -- $d
dw=$1; de=$2; dp=$3
tw=${tp% *}; te=${tp#* }
echo "| recipe | deeprank s (epoch, P@30) | PyTorch s (epoch) | ratio (deeprank / PyTorch) |"
echo "|---|---|---|---|"
echo "| default, P@30 >= $TARGET | $dw ($de, $dp) | $tw ($te) | $(python3 -c "print(f'{$dw/$tw:.2f}x')") |"
echo "(deeprank's whole 15-epoch run took $(python3 -c "print(f'{$t1-$t0:.0f}')") s)"
