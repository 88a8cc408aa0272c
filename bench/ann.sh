#!/usr/bin/env bash
# ANN comparison for issue 10 (bench/RESULTS.md §12): deeprank's HNSW against FAISS IndexHNSWFlat,
# hnswlib and usearch (all PyPI), plus FAISS IndexFlatL2 and deeprank's exact scan, on the same
# vectors: M = 16, efConstruction = 200, 2 threads each, all 1,000 queries in one call per ef,
# recall@10 against FAISS IndexFlatL2's top-10.
#
#   bench/ann.sh [SET.npy ...]     default: $DATA/synth1m_128.npy $DATA/real64.npy
#
# Per set: (1) exact top-10 (FAISS) -> SET.npy.truth10.bin; (2) one build per index, each in its own
# process (build seconds, index file size, peak RSS), saved under $IDX/<set>/; (3) ROUNDS search rounds:
# in each round every side loads its saved index and runs the ef ladder (REPEAT calls per ef), the
# sides back to back, and deeprank's exact scan and FAISS's exact search once; (4) the tables
# (bench/ann_table.py). Every line carries the load average; the raw lines go to $OUT/ann-*.txt.
#
# Data (made once, not in git; about 2 GB under $DATA, default bench/out/ann):
#   synth1m_128.npy  bench/ann_synth.py: 1M + 1,000 clustered synthetic vectors, 128-d
#   real64.npy       Tiny ImageNet mini (../shared) x 11 variants (bench/ann_augment.py), embedded by
#                    `deeprank embed --size 64` (pretrained, 1280-d), then bench/ann_prep_real.py:
#                    1,000 held-out originals as queries, every variant of them out of the DB.
# The real set is made only when MAKE_REAL=1 (the embed of 242k images takes 45-80 min on 2 cores).
#
# deeprank's side: `deeprank-bench ann` (src/search/ann, the shipped code; built here, or an existing
# binary given as DEEPRANK_BENCH=path): built once (--save, 1,000 rows held out as queries, 50 rows
# added by `extend` after the build), then each round loads the saved graph (--load) and runs the
# ladder REPEAT times, like the anchors; or PROTO=path/to/annbench/bench (the prototype of
# docs/groundwork/ann, in git history at commit 309620f). The anchors come from
# bench/setup.sh (PYTHON, default bench/.venv/bin/python). FAISS runs with OMP_NUM_THREADS=2 and
# OMP_WAIT_POLICY=PASSIVE (on a shared 2-core box its spinning OpenMP threads otherwise lose badly).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-bench/.venv/bin/python}
DATA=${DATA:-bench/out/ann}
IDX=${IDX:-$DATA/idx}
OUT=${OUT:-bench/out}
ROUNDS=${ROUNDS:-3}
EFS=${EFS:-16,24,32,36,40,48,64,128}
ANCHORS=${ANCHORS:-faiss hnswlib usearch}
export THREADS=2 OMP_NUM_THREADS=2 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} RAYON_NUM_THREADS=2
export REPEAT=${REPEAT:-3} EFS
mkdir -p "$DATA" "$IDX" "$OUT"
LOG=$OUT/ann-$(date -u +%Y%m%d-%H%M).txt
say() { echo "# $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) $*" | tee -a "$LOG" >&2; }
run() { "$@" 2>&1 | tee -a "$LOG"; }

[ -x "$PYTHON" ] || { echo "no anchors venv at $PYTHON: run bench/setup.sh (or set PYTHON)" >&2; exit 1; }
BIN=${CARGO_TARGET_DIR:-target}/release
if [ -z "${PROTO:-}" ]; then
  if [ -z "${DEEPRANK_BENCH:-}" ]; then
    cargo build --release --quiet --bin deeprank --bin deeprank-bench
    DEEPRANK_BENCH=$BIN/deeprank-bench
  fi
  "$DEEPRANK_BENCH" ann --help > /dev/null 2>&1 ||
    { echo "$DEEPRANK_BENCH has no 'ann' command; set PROTO=path/to/annbench/bench" >&2; exit 1; }
fi

# Data.
[ -f "$DATA/synth1m_128.npy" ] || "$PYTHON" bench/ann_synth.py "$DATA/synth1m_128.npy"
if [ "${MAKE_REAL:-0}" = 1 ] && [ ! -f "$DATA/real64.npy" ]; then
  [ -d "$DATA/aug" ] || "$PYTHON" bench/ann_augment.py ../shared/data/tiny-imagenet-200-mini "$DATA/aug" 11
  [ -d "$DATA/db_real64" ] || nice -n 5 "$BIN/deeprank" embed --data "$DATA/aug" --out "$DATA/db_real64" --size 64
  "$PYTHON" bench/ann_prep_real.py "$DATA/real64.npy" "$DATA/db_real64"
fi
if [ $# -gt 0 ]; then SETS=("$@"); else
  SETS=("$DATA/synth1m_128.npy"); [ -f "$DATA/real64.npy" ] && SETS+=("$DATA/real64.npy")
fi

# deeprank's HNSW: build and save the graph, or search the saved one.
own() { # own SET DIR build|search
  local set=$1 dir=$2
  if [ -n "${PROTO:-}" ]; then
    if [ "$3" = build ]; then BUILD_ONLY=1 SAVE=$dir/own.hnsw run "$PROTO" "$set" own
    else LOAD=$dir/own.hnsw run "$PROTO" "$set" own "$EFS"; fi
  elif [ "$3" = build ]; then
    /usr/bin/time -f "# deeprank build process: peak RSS %M KB" \
      "$DEEPRANK_BENCH" ann --db-npy "$set" --nq 1000 --m 16 --ef-construction 200 \
      --ef 64 --k 10 --threads 2 --add 50 --save "$dir/deeprank.hnsw" 2>&1 | tee -a "$LOG"
  else
    run "$DEEPRANK_BENCH" ann --db-npy "$set" --nq 1000 --k 10 --threads 2 \
      --ef "$EFS" --repeat "$REPEAT" --load "$dir/deeprank.hnsw"
  fi
}

for set in "${SETS[@]}"; do
  name=$(basename "$set" .npy); dir=$IDX/$name; mkdir -p "$dir"
  say "set $set"
  [ -f "$set.truth10.bin" ] || REPEAT=1 run "$PYTHON" bench/ann_anchors.py truth "$set"
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    for a in $ANCHORS; do say "build $a"; run "$PYTHON" bench/ann_anchors.py build "$a" "$set" "$dir"; done
    say "build deeprank"; own "$set" "$dir" build
  fi
  for r in $(seq "$ROUNDS"); do
    say "round $r"
    for a in $ANCHORS; do run "$PYTHON" bench/ann_anchors.py search "$a" "$set" "$dir"; done
    own "$set" "$dir" search
    [ -n "${PROTO:-}" ] && REPEAT=1 run "$PROTO" "$set" exact
    REPEAT=1 run "$PYTHON" bench/ann_anchors.py truth "$set"
  done
done
say "done"
"$PYTHON" bench/ann_table.py "$LOG"
echo "raw lines: $LOG" >&2
