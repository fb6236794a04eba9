#!/usr/bin/env bash
# Starts a private PostgreSQL server for the tests: initdb into $ROOT, listen on 127.0.0.1:$PG_PORT and
# a socket in $ROOT/sock, create the database. Installs nothing; needs Debian's postgresql package
# (apt-get install -y --no-install-recommends postgresql). As root, the server runs as the `postgres`
# user (initdb and postgres refuse root), through runuser.
#
# Environment (all optional):
#   ROOT=/tmp/qlora-pg     cluster, socket and log (wiped on start)
#   PG_PORT=55432          TCP port on 127.0.0.1
#   PG_DB=qlora_test       database to create
# Prints the variable the tests read and writes it to $ROOT/env (`. $ROOT/env`):
#   QLORA_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB
# Stop with tests/support/stop-postgres.sh (same ROOT).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${ROOT:-/tmp/qlora-pg}
PORT=${PG_PORT:-55432}
DB=${PG_DB:-qlora_test}

BIN=${PG_BIN:-}
if [ -z "$BIN" ]; then
  if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then BIN=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
  else BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  fi
fi
[ -n "$BIN" ] && [ -x "$BIN/initdb" ] && [ -x "$BIN/pg_ctl" ] || {
  echo "start-postgres: initdb/pg_ctl not found (apt-get install -y --no-install-recommends postgresql, or set PG_BIN)" >&2; exit 1; }

ROOT="$ROOT" "$HERE/stop-postgres.sh" >/dev/null 2>&1 || true
rm -rf "$ROOT"
mkdir -p "$ROOT/sock"

as_owner=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || { echo "start-postgres: running as root, but there is no postgres user to run the server" >&2; exit 1; }
  chown -R postgres:postgres "$ROOT"
  as_owner=(runuser -u postgres --)
fi

"${as_owner[@]}" "$BIN/initdb" -D "$ROOT/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >"$ROOT/initdb.log" 2>&1 || {
  cat "$ROOT/initdb.log" >&2; exit 1; }
# A throwaway test server: no fsync (the data dies with ROOT), small footprint, enough connections
# for several store instances (each a pool) at once.
"${as_owner[@]}" "$BIN/pg_ctl" -D "$ROOT/data" -l "$ROOT/server.log" -w -t 60 start -o \
  "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$ROOT/sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100 -c shared_buffers=32MB" >/dev/null || {
  tail -n 30 "$ROOT/server.log" >&2; exit 1; }
PSQL="$BIN/psql"
[ -x "$PSQL" ] || PSQL=$(command -v psql) || { echo "start-postgres: psql not found" >&2; exit 1; }
"${as_owner[@]}" "$PSQL" -h "$ROOT/sock" -p "$PORT" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE $DB"

URL="postgres://postgres@127.0.0.1:$PORT/$DB"
echo "export QLORA_TEST_DATABASE_URL=$URL" > "$ROOT/env"
echo "start-postgres: database $DB ready at 127.0.0.1:$PORT (socket $ROOT/sock)"
cat "$ROOT/env"
