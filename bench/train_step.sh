#!/usr/bin/env bash
# Training step, deeprank vs PyTorch, side by side: the seed recipe's step (EfficientNet-Lite0 + 128-d
# head, full fine-tuning, BatchNorm in training mode, 16 triplets = 48 images, ranking loss gap 1.0,
# SGD Nesterov 0.9, lr 1e-3, weight decay 1e-5) on the same fixed batch of mini val images, 2 threads
# each, 2 warm-up steps (5 for torch.compile) then the mean of STEPS (5). PyTorch runs in each of its
# variants: eager, channels_last, torch.compile, and both (VARIANTS chooses). Each side runs ROUNDS
# times (3), deeprank and the variants alternating, and each row gives each side's best round (a
# run's mean moved by up to 20% between identical runs on this kind of shared machine), with every
# round's figure after it.
#   bench/train_step.sh [SIZES...]     (default: 64 128)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${*:-64 128}
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
PYTHON=${PYTHON:-bench/.venv/bin/python}
export THREADS=${THREADS:-2}
STEPS=${STEPS:-5}
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
BENCH=${CARGO_TARGET_DIR:-target}/release/deeprank-bench
W=$("$BIN" weights fetch)
VARIANTS=${VARIANTS:-eager channels_last compile compile+channels_last}
anchor() {  # VARIANT SIZE -> img/s
  local cl="" co=""
  case "$1" in *channels_last*) cl=1 ;; esac
  case "$1" in *compile*) co=1 ;; esac
  CHANNELS_LAST=$cl COMPILE=$co "$PYTHON" bench/torch_train_step.py ../shared/reference/torch_reference.py "$W" "$DATA/val" "$2" 16 128 2 "$STEPS" 2>/dev/null | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p'
}
best() { tr ' ' '\n' | grep -v '^$' | sort -g | tail -1; }
echo "| size | deeprank img/s (best of $ROUNDS) | PyTorch variant | PyTorch img/s (best of $ROUNDS) | ratio | rounds: deeprank / PyTorch |"
echo "|---|---|---|---|---|---|"
for s in $SIZES; do
  declare -A runs=()
  d_runs=""
  for r in $(seq "$ROUNDS"); do
    d_runs="$d_runs $("$BENCH" --threads "$THREADS" train --data "$DATA/val" --size "$s" --steps "$STEPS" | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p')"
    for v in $VARIANTS; do
      runs[$v]="${runs[$v]:-} $(anchor "$v" "$s")"
    done
  done
  d=$(echo "$d_runs" | best)
  for v in $VARIANTS; do
    t=$(echo "${runs[$v]}" | best)
    echo "| $s | $d | $v | ${t:-failed} | $([ -n "$t" ] && python3 -c "print(f'{$d/$t:.2f}x')" || echo —) |${d_runs} /${runs[$v]} |"
  done
  unset runs
done
