#!/usr/bin/env bash
# A private PostgreSQL cluster on loopback, for `make dev` and the benchmarks (the integration tests start
# their own from Rust, see tests/src/postgres.rs). Debian's server binaries; as root the cluster belongs to,
# and the server runs as, the user postgres (the server refuses root).
#
#   postgres.sh start DIR PORT [name=value ...]   # initdb DIR once (user umw, password umw, database umw),
#                                                 # then run in the foreground until SIGTERM/SIGINT
#
# PG_HOST=address listens there instead of 127.0.0.1; PG_CLIENTS=cidr also accepts password logins from
# those addresses (the real node's pods).
set -euo pipefail
HOST="${PG_HOST:-127.0.0.1}"
BIN="${UMW_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
[ -x "$BIN/postgres" ] || { echo "[postgres] no server under /usr/lib/postgresql: apt-get install postgresql (make testenv does)" >&2; exit 1; }
OWNER=()
[ "$(id -u)" = 0 ] && OWNER=(setpriv --reuid postgres --regid postgres --init-groups)
case "${1:-}" in
  start)
    DIR=$2; PORT=$3; shift 3
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then
      chown postgres: "$DIR"
      chmod a+x "$(dirname "$DIR")"   # the server's user must reach DIR (e.g. inside a mktemp -d directory)
    fi
    if [ ! -f "$DIR/data/PG_VERSION" ]; then
      echo umw > "$DIR/password"
      [ "$(id -u)" = 0 ] && chown postgres: "$DIR/password"
      "${OWNER[@]}" "$BIN/initdb" -D "$DIR/data" -U umw --pwfile="$DIR/password" --auth=scram-sha-256 -E UTF8 \
        --no-instructions > "$DIR/initdb.log"
    fi
    if [ -n "${PG_CLIENTS:-}" ] && ! grep -qF "host all all $PG_CLIENTS " "$DIR/data/pg_hba.conf"; then
      echo "host all all $PG_CLIENTS scram-sha-256" >> "$DIR/data/pg_hba.conf"
    fi
    settings=()
    for s in "$@"; do settings+=(-c "$s"); done
    "${OWNER[@]}" "$BIN/postgres" -D "$DIR/data" -p "$PORT" -c listen_addresses="$HOST" \
      -c unix_socket_directories="$DIR" "${settings[@]}" > "$DIR/server.log" 2>&1 &
    server=$!
    # The server stops with this script, however it ends (a signal, or an error below).
    trap 'kill -INT $server 2>/dev/null; wait $server' EXIT
    trap 'exit 0' TERM INT
    for _ in $(seq 1 300); do "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" && break; sleep 0.1; done
    PGPASSWORD=umw psql -h "$HOST" -p "$PORT" -U umw -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'umw'" | grep -q 1 ||
      PGPASSWORD=umw psql -h "$HOST" -p "$PORT" -U umw -d postgres -qc "CREATE DATABASE umw"
    echo "[postgres] ready: postgres://umw:umw@$HOST:$PORT/umw"
    wait $server
    ;;
  *) echo "usage: $0 start DIR PORT [name=value ...]" >&2; exit 2 ;;
esac
