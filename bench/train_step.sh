#!/usr/bin/env bash
# Training step, deeprank vs PyTorch, side by side: the seed recipe's step (EfficientNet-Lite0 + 128-d
# head, full fine-tuning, BatchNorm in training mode, 16 triplets = 48 images, ranking loss gap 1.0,
# SGD Nesterov 0.9, lr 1e-3, weight decay 1e-5) on the same fixed batch of mini val images, 2 threads
# each, 2 warm-up steps then the mean of 5.
#   bench/train_step.sh [SIZES...]     (default: 64 128)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${*:-64 128}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
export THREADS=${THREADS:-2}
STEPS=${STEPS:-5}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
BENCH=${CARGO_TARGET_DIR:-target}/release/deeprank-bench
W=$("$BIN" weights fetch)
echo "| size | deeprank img/s | PyTorch img/s | ratio |"
echo "|---|---|---|---|"
for s in $SIZES; do
  d=$("$BENCH" --threads "$THREADS" train --data "$DATA/val" --size "$s" --steps "$STEPS" | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p')
  t=$("$PYTHON" bench/torch_train_step.py ../shared/reference/torch_reference.py "$W" "$DATA/val" "$s" 16 128 2 "$STEPS" | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p')
  echo "| $s | $d | $t | $(python3 -c "print(f'{$d/$t:.2f}x')") |"
done
