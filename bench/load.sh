#!/usr/bin/env bash
# Load benchmark of `deeprank serve`: 100 concurrent clients for 30 s POSTing a mini-val image to
# /api/search on loopback (wrk, from Debian's package), reporting requests/s, p50/p99 latency, the
# server's peak RSS, and how requests ended (the server's own counters).
#   bench/load.sh [DB] [SECONDS] [CLIENTS]     (DB default: a 128-px DB of the mini train set)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
DATA=${DATA:-../shared/data/tiny-imagenet-200-mini}
OUT=${OUT:-/tmp/deeprank-bench}
DB=${1:-$OUT/db-128}
SECS=${2:-30}
CLIENTS=${3:-100}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/deeprank
[ -f "$DB/meta.json" ] || "$BIN" embed --data "$DATA" --out "$DB" --size 128
PORT=18123
"$BIN" serve --db "$DB" --addr 127.0.0.1:$PORT > "$OUT/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.2; done
imgs=("$DATA"/val/images/*.JPEG)
IMAGE=${imgs[0]}
export IMAGE
wrk -t2 -c"$CLIENTS" -d"${SECS}s" --latency -s bench/post.lua "http://127.0.0.1:$PORT/api/search?top=10" | tee "$OUT/wrk.txt"
echo "server peak RSS: $(grep VmHWM /proc/$PID/status | awk '{print $2, $3}')"
echo "server counters: $(curl -s http://127.0.0.1:$PORT/api/stats)"
