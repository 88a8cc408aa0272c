#!/usr/bin/env bash
# Back-to-back final runs: anchors (PyPI) then the Rust candidates, same vectors, 2 threads each.
# Usage: scripts/run_final.sh SET.npy TAG [impls...]
set -u
cd /work/scratch-ann
npy=$1; tag=$2; shift 2
impls=${*:-own}
out=results/final_$tag.txt
: > "$out"
echo "# $(date -u) load: $(cat /proc/loadavg)" >> "$out"
if [ "${SKIP_ANCHORS:-0}" != 1 ]; then
  /usr/bin/time -f "anchors peak RSS %M KB, wall %e s" nice -n 10 env THREADS=2 OMP_NUM_THREADS=2 env EFS=${EFS:-16,32,64,128} ONLY=${ONLY:-faiss,hnswlib,usearch} venv/bin/python scripts/ann_anchors_sel.py "$npy" >> "$out" 2>&1
fi
for i in $impls; do
  echo "# $(date -u) load: $(cat /proc/loadavg)" >> "$out"
  /usr/bin/time -f "$i peak RSS %M KB, wall %e s" nice -n 10 env THREADS=2 ./target/release/bench "$npy" "$i" >> "$out" 2>&1
done
echo "# end $(date -u) load: $(cat /proc/loadavg)" >> "$out"
