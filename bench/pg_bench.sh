#!/usr/bin/env bash
# PostgreSQL store benchmark: insert rate into one server, into 2 shards through a coordinator
# (rows straight to the shards, binary COPY) and into a local DB folder; then single-query latency
# (p50/p99, queries/s) exact and with pgvector's HNSW at several ef_search, recall@10 against
# exact, with the EXPLAIN plans of the first query. Synthetic clustered vectors (100 classes).
#
#   bench/pg_bench.sh [N] [DIM]            defaults: 100000 128
#
# The local DB folder also gets deeprank's own ANN index (`deeprank index`, M 16, ef_construction
# 64, like the pgvector indexes), timed at the same ef values.
#
# Env: PGDIR (default /tmp/deeprank-pg-bench; not under /root), PORTS (3, default 55501-55503),
# QUERIES (100), EF (40,100,200), PGSH_VENV (the wheel's venv, see bench/pg.sh), BIN (target dir),
# PHASE: all (default), load (insert + index builds, then leave the servers running and the
# table name in $PGDIR/bench-table) or query (the queries of the last load, then stop): so the
# slow load can share the machine while the latencies are timed on a quiet one.
# The servers it starts are stopped (bench/pg.sh stop) when it ends, also on error (not after a
# successful PHASE=load).
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
PHASE=${PHASE:-all}
trap 'bash bench/pg.sh stop "$PGDIR"' EXIT
u() { echo "postgres://postgres@127.0.0.1:$1/postgres?table=$2"; }
if [ "$PHASE" != query ]; then
  bash bench/pg.sh start "$PGDIR" "$P0" "$P1" "$P2"
  T="b${DIM}_$(date +%s)"
  LOCAL="$PGDIR/local-$T"
  echo "== load $N x $DIM, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$BIN/deeprank-bench" pg-insert --local "$LOCAL" --n "$N" --dim "$DIM"
  "$BIN/deeprank-bench" pg-insert --url "$(u "$P0" "$T")" --n "$N" --dim "$DIM"
  "$BIN/deeprank-bench" pg-insert --url "$(u "$P0" "s$T")" --shards "$(u "$P1" "s$T"),$(u "$P2" "s$T")" --n "$N" --dim "$DIM"
  for t in "$T" "s$T"; do
    /usr/bin/time -f "index $t: %e s wall, %U s user, %S s sys (client)" "$BIN/deeprank" index --db "$(u "$P0" "$t")" --ef 40 --ef-construction 64
  done
  /usr/bin/time -f "index local: %e s wall, %U s user, %S s sys" "$BIN/deeprank" index --db "$LOCAL" --m 16 --ef-construction 64
  echo "$T" > "$PGDIR/bench-table"
  if [ "$PHASE" = load ]; then trap - EXIT; echo "servers left running; PHASE=query next"; exit 0; fi
else
  T=$(cat "$PGDIR/bench-table")
  LOCAL="$PGDIR/local-$T"
fi
echo "== query $N x $DIM, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN/deeprank-bench" pg-query --local "$LOCAL" --n "$N" --dim "$DIM" --queries "$QUERIES" --ef "$EF"
"$BIN/deeprank-bench" pg-query --url "$(u "$P0" "$T")" --n "$N" --dim "$DIM" --queries "$QUERIES" --ef "$EF" --explain
"$BIN/deeprank-bench" pg-query --url "$(u "$P0" "s$T")" --n "$N" --dim "$DIM" --queries "$QUERIES" --ef "$EF" --explain
rm -rf "$LOCAL"
