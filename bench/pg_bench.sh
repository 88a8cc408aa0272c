#!/usr/bin/env bash
# PostgreSQL store benchmark: insert rate into one server, into 2 shards through a coordinator
# (rows straight to the shards, binary COPY) and into a local DB folder; then single-query latency
# (p50/p99, queries/s) exact and with pgvector's HNSW at several ef_search, recall@10 against
# exact, with the EXPLAIN plans of the first query. Synthetic clustered vectors (100 classes).
#
#   bench/pg_bench.sh [N] [DIM]            defaults: 100000 128
#
# Env: PGDIR (default /tmp/deeprank-pg-bench; not under /root), PORTS (3, default 55501-55503),
# QUERIES (100), EF (40,100,200), PGSH_VENV (the wheel's venv, see bench/pg.sh), BIN (target dir).
# The servers it starts are stopped (bench/pg.sh stop) when it ends, also on error.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
DIM=${2:-128}
PGDIR=${PGDIR:-/tmp/deeprank-pg-bench}
read -r P0 P1 P2 <<<"${PORTS:-55501 55502 55503}"
QUERIES=${QUERIES:-100}
EF=${EF:-40,100,200}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
[ -x "$BIN/deeprank-bench" ] || cargo build --release --bin deeprank-bench --bin deeprank
trap 'bash bench/pg.sh stop "$PGDIR"' EXIT
bash bench/pg.sh start "$PGDIR" "$P0" "$P1" "$P2"
u() { echo "postgres://postgres@127.0.0.1:$1/postgres?table=$2"; }
T="b${DIM}_$(date +%s)"
LOCAL="$PGDIR/local-$T"
echo "== $N x $DIM, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN/deeprank-bench" pg-insert --local "$LOCAL" --n "$N" --dim "$DIM"
"$BIN/deeprank-bench" pg-insert --url "$(u "$P0" "$T")" --n "$N" --dim "$DIM"
"$BIN/deeprank-bench" pg-insert --url "$(u "$P0" "s$T")" --shards "$(u "$P1" "s$T"),$(u "$P2" "s$T")" --n "$N" --dim "$DIM"
for t in "$T" "s$T"; do
  /usr/bin/time -f "index $t: %e s" "$BIN/deeprank" index --db "$(u "$P0" "$t")" --ef 40 --ef-construction 64
done
"$BIN/deeprank-bench" pg-query --local "$LOCAL" --n "$N" --dim "$DIM" --queries "$QUERIES"
"$BIN/deeprank-bench" pg-query --url "$(u "$P0" "$T")" --n "$N" --dim "$DIM" --queries "$QUERIES" --ef "$EF" --explain
"$BIN/deeprank-bench" pg-query --url "$(u "$P0" "s$T")" --n "$N" --dim "$DIM" --queries "$QUERIES" --ef "$EF" --explain
rm -rf "$LOCAL"
