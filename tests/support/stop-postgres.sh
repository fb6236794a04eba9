#!/usr/bin/env bash
# Stops the server started by tests/support/start-postgres.sh (same ROOT) and removes ROOT.
set -uo pipefail
ROOT=${ROOT:-/tmp/qlora-pg}
[ -f "$ROOT/data/postmaster.pid" ] || { [ "${KEEP:-}" = 1 ] || rm -rf "$ROOT"; exit 0; }
BIN=${PG_BIN:-}
if [ -z "$BIN" ]; then
  if command -v pg_ctl >/dev/null; then BIN=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
  else BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  fi
fi
as_owner=()
[ "$(id -u)" = 0 ] && as_owner=(runuser -u postgres --)
"${as_owner[@]}" "$BIN/pg_ctl" -D "$ROOT/data" -m fast -w -t 30 stop >/dev/null 2>&1 || {
  pid=$(head -1 "$ROOT/data/postmaster.pid" 2>/dev/null); [ -n "$pid" ] && kill "$pid" 2>/dev/null; sleep 1; }
[ "${KEEP:-}" = 1 ] || rm -rf "$ROOT"
echo "stop-postgres: stopped"
