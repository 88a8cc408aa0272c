#!/usr/bin/env bash
# Every speed row of issues 4 and 13, side by side with its anchors in one run, 2 threads each:
#   1. embed throughput vs ONNX Runtime, torch.compile,
#      PyTorch eager and channels_last (64/128/224 px)      bench/embed_throughput.sh
#   1b. batch-1 latency vs ONNX Runtime (128/224 px)      bench/latency.sh
#   2. training step vs PyTorch eager, channels_last,
#      torch.compile (64/128 px)                          bench/train_step.sh
#   3. exact search vs FAISS IndexFlatL2, 3 runs          bench/search.sh
#   4. decode + resize + normalise vs PIL + numpy         bench/decode.sh
#   5. time-to-quality vs the same recipe in PyTorch      bench/time_to_quality.sh
# Sets up the anchors itself (bench/setup.sh: a venv with torch, faiss-cpu, pillow) unless PYTHON
# points at one. Writes the report to bench/out/report-DATE.md and prints it. About an hour;
# ROWS="1 1b 2 3" runs only those rows (issue 13's: everything but the 20-minute time-to-quality).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  [ -x bench/.venv/bin/python ] || bench/setup.sh
  export PYTHON=bench/.venv/bin/python
fi
export THREADS=${THREADS:-2}
mkdir -p bench/out
REPORT=bench/out/report-$(date +%Y%m%d-%H%M).md
ROWS=${ROWS:-1 1b 2 3 4 5}
row() {  # ID TITLE SCRIPT: runs bench/SCRIPT.sh when ROWS names ID
  case " $ROWS " in *" $1 "*) ;; *) return 0 ;; esac
  echo "## $1. $2 (bench/$3.sh, started $(date -u +%H:%MZ))"; "bench/$3.sh"; echo
}
cargo build --release --quiet
{
  echo "# deeprank vs anchors, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $THREADS threads each"
  echo "$(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo
  row 1 "Embed throughput" embed_throughput
  row 1b "Batch-1 latency" latency
  row 2 "Training step" train_step
  row 3 "Exact top-10 search" search
  row 4 "Decode pipeline" decode
  row 5 "Time-to-quality" time_to_quality
} | tee "$REPORT"
echo "report: $REPORT" >&2
