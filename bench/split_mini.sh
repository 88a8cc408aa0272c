#!/usr/bin/env bash
# Builds, as symlink class folders (no image is copied), the splits used to choose training recipes
# without tuning to the mini val set (bench/RESULTS.md §3):
#   $OUT/fit/<wnid>/…  the first 80 train images of each class (sorted by name): what a run trains on
#   $OUT/sel/<wnid>/…  the other 20 of each class: the selection queries (`--val $OUT/sel`)
# and, for the unseen-classes check, by class (the first 150 wnids of wnids.txt vs the other 50):
#   $OUT/seen/<wnid>/…          all 100 train images of the 150 seen classes (training)
#   $OUT/unseen-db/<wnid>/…     the 100 train images of the 50 unseen classes (their own DB)
#   $OUT/unseen-q/<wnid>/…      the 10 val images of each unseen class (its queries)
# Usage: bench/split_mini.sh [MINI_ROOT] [OUT]  (defaults: ../shared/data/tiny-imagenet-200-mini,
# /tmp/mini-split). Deterministic: the same input gives the same split.
set -euo pipefail
MINI=$(realpath "${1:-../shared/data/tiny-imagenet-200-mini}")
OUT=${2:-/tmp/mini-split}
FIT=${FIT:-80}
SEEN=${SEEN:-150}
for f in "$MINI/wnids.txt" "$MINI/val/val_annotations.txt"; do
  [ -f "$f" ] || { echo "split_mini.sh: $f is missing: give the Tiny ImageNet mini root as the first argument" >&2; exit 1; }
done
rm -rf "$OUT"
mkdir -p "$OUT"/{fit,sel,seen,unseen-db,unseen-q}
n=0
while read -r wnid; do
  [ -n "$wnid" ] || continue
  n=$((n + 1))
  dir="$MINI/train/$wnid/images"
  [ -d "$dir" ] || { echo "split_mini.sh: $dir is missing (wnids.txt names $wnid)" >&2; exit 1; }
  mkdir -p "$OUT/fit/$wnid" "$OUT/sel/$wnid"
  i=0
  while read -r f; do
    if [ "$i" -lt "$FIT" ]; then ln -s "$dir/$f" "$OUT/fit/$wnid/$f"; else ln -s "$dir/$f" "$OUT/sel/$wnid/$f"; fi
    i=$((i + 1))
  done < <(ls "$dir" | LC_ALL=C sort)
  if [ "$n" -le "$SEEN" ]; then
    ln -s "$dir" "$OUT/seen/$wnid"
  else
    ln -s "$dir" "$OUT/unseen-db/$wnid"
    mkdir -p "$OUT/unseen-q/$wnid"
  fi
done < "$MINI/wnids.txt"
# Val images of the unseen classes (val_annotations.txt: file<TAB>wnid<TAB>box).
while IFS=$'\t' read -r f wnid _; do
  if [ -d "$OUT/unseen-q/$wnid" ]; then ln -s "$MINI/val/images/$f" "$OUT/unseen-q/$wnid/$f"; fi
done < "$MINI/val/val_annotations.txt"
for d in fit sel seen unseen-db unseen-q; do
  echo "$d: $(find -L "$OUT/$d" -type f | wc -l) images in $(ls "$OUT/$d" | wc -l) classes"
done
