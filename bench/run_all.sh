#!/usr/bin/env bash
# Every speed row of issue 4, side by side with its anchor in one run, 2 threads each:
#   1. embed throughput vs PyTorch (64/128/224 px)      bench/embed_throughput.sh
#   1b. batch-1 latency vs ONNX Runtime (128/224 px)      bench/latency.sh
#   2. training step vs PyTorch (64/128 px)               bench/train_step.sh
#   3. exact search vs FAISS IndexFlatL2                  bench/search.sh
#   4. decode + resize + normalise vs PIL + numpy         bench/decode.sh
#   5. time-to-quality vs the same recipe in PyTorch      bench/time_to_quality.sh
# Sets up the anchors itself (bench/setup.sh: a venv with torch, faiss-cpu, pillow) unless PYTHON
# points at one. Writes the report to bench/out/report-DATE.md and prints it. About 45 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  [ -x bench/.venv/bin/python ] || bench/setup.sh
  export PYTHON=bench/.venv/bin/python
fi
export THREADS=${THREADS:-2}
mkdir -p bench/out
REPORT=bench/out/report-$(date +%Y%m%d-%H%M).md
cargo build --release --quiet
{
  echo "# deeprank vs anchors, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $THREADS threads each"
  echo "$(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo
  echo "## 1. Embed throughput (bench/embed_throughput.sh)"; bench/embed_throughput.sh; echo
  echo "## 1b. Batch-1 latency (bench/latency.sh)"; bench/latency.sh; echo
  echo "## 2. Training step (bench/train_step.sh)"; bench/train_step.sh; echo
  echo "## 3. Exact top-10 search (bench/search.sh)"; bench/search.sh; echo
  echo "## 4. Decode pipeline (bench/decode.sh)"; bench/decode.sh; echo
  echo "## 5. Time-to-quality (bench/time_to_quality.sh)"; bench/time_to_quality.sh; echo
} | tee "$REPORT"
echo "report: $REPORT" >&2
