#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests: data in a temp dir, listening on 127.0.0.1 only, on a
# free port, fsync on (the journal's durability is what the tests check), removed afterwards.
#
#   .ci/postgres.sh run CMD [ARGS...]   start, run CMD with WEBHOOKD_TEST_PG_URL set, stop
#                                       (also when CMD fails or the script is interrupted)
#   eval "$(.ci/postgres.sh start)"     start and print the exports for an interactive shell
#   .ci/postgres.sh stop [DIR]          stop the server started that way ($WEBHOOKD_TEST_PG_DIR)
#
# Uses Debian's `postgresql` package, installed with apt-get when missing and run as root.
# initdb refuses to run as root, so as root the server runs as the `postgres` user.
#
# Beside the server, a PgBouncer in transaction mode (Debian's `pgbouncer`, installed the same
# way) pools connections to every database on it: WEBHOOKD_TEST_PGBOUNCER_URL is the same
# server through it, for the tests of the journal behind a pooler.
set -euo pipefail

find_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  return 1
}

pg_bin() {
  local bin
  if bin="$(find_bin)"; then
    echo "$bin"
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "postgres.sh: installing Debian's postgresql package" >&2
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
      pgbouncer >/dev/null 2>&1 || true
  fi
  if bin="$(find_bin)"; then
    echo "$bin"
    return 0
  fi
  echo "postgres.sh: initdb/pg_ctl not found and postgresql could not be installed" >&2
  return 1
}

# As root, run the server's tools as `postgres`; as anyone else, as themselves.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pgbouncer_bin() {
  if ! command -v pgbouncer >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
    echo "postgres.sh: installing Debian's pgbouncer package" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer \
      >/dev/null 2>&1 || true
  fi
  command -v pgbouncer
}

# PgBouncer in transaction mode in front of the server on $2, for every database on it.
# Prints its export line; prints nothing (and says why) when PgBouncer is not to be had.
start_pgbouncer() {
  local dir="$1" pg_port="$2" bin port attempt
  bin="$(pgbouncer_bin)" || { echo "postgres.sh: no pgbouncer; its tests will say so" >&2; return 0; }
  echo '"postgres" ""' >"$dir/userlist.txt"
  for attempt in 1 2 3; do
    port="$(free_port)"
    cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 10
max_client_conn = 500
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
    [ "$(id -u)" = 0 ] && chown postgres: "$dir/pgbouncer.ini" "$dir/userlist.txt"
    # PgBouncer will not run as root; -d returns once it listens.
    if as_owner "$bin" -d -q "$dir/pgbouncer.ini"; then
      echo "export WEBHOOKD_TEST_PGBOUNCER_URL=postgresql://postgres@127.0.0.1:$port/postgres"
      return 0
    fi
    echo "postgres.sh: pgbouncer on port $port failed (attempt $attempt)" >&2
  done
  cat "$dir/pgbouncer.log" >&2 || true
  return 0
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  local bin dir port attempt
  bin="$(pg_bin)"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/webhookd-pg.XXXXXX")"
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$dir"
  fi
  as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; return 1; }
  # A free port can be taken between the probe and the bind: try a few.
  for attempt in 1 2 3; do
    port="$(free_port)"
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o \
      "-p $port -c listen_addresses=127.0.0.1 -k $dir -c fsync=on -c max_connections=200" \
      start >/dev/null; then
      echo "$bin" >"$dir/bin"
      echo "export WEBHOOKD_TEST_PG_URL=postgresql://postgres@127.0.0.1:$port/postgres"
      echo "export WEBHOOKD_TEST_PG_DIR=$dir"
      start_pgbouncer "$dir" "$port"
      return 0
    fi
    echo "postgres.sh: start on port $port failed (attempt $attempt)" >&2
  done
  cat "$dir/server.log" >&2 || true
  rm -rf "$dir"
  return 1
}

stop() {
  local dir="${1:-${WEBHOOKD_TEST_PG_DIR:-}}"
  if [ -z "$dir" ] || [ ! -d "$dir" ]; then
    return 0
  fi
  if [ -f "$dir/pgbouncer.pid" ]; then
    kill -INT "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
  fi
  if [ -f "$dir/bin" ] && [ -f "$dir/data/postmaster.pid" ]; then
    as_owner "$(cat "$dir/bin")/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
  fi
  # Never leave a server running on a removed directory: if pg_ctl could not stop it, the
  # postmaster gets SIGINT (fast shutdown) directly.
  if [ -f "$dir/data/postmaster.pid" ]; then
    local pid
    pid="$(head -n 1 "$dir/data/postmaster.pid")"
    if kill -INT "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
      done
    fi
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start)
    start
    ;;
  stop)
    stop "${2:-}"
    ;;
  run)
    shift
    exports="$(start)"
    eval "$exports"
    trap 'stop "$WEBHOOKD_TEST_PG_DIR"' EXIT
    trap 'exit 130' INT TERM
    set +e
    "$@"
    status=$?
    set -e
    exit "$status"
    ;;
  *)
    echo "usage: $0 run CMD [ARGS...] | start | stop [DIR]" >&2
    exit 2
    ;;
esac
