#!/usr/bin/env bash
# Stops the Swift servers started by tests/support/start-s3.sh (same ROOT) and removes ROOT.
set -uo pipefail
ROOT=${ROOT:-/tmp/qlora-s3}
[ -d "$ROOT" ] || exit 0
pids=()
for f in "$ROOT"/*.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null && pids+=("$pid")
  rm -f "$f"
done
for pid in "${pids[@]}"; do
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
done
[ "${KEEP:-}" = 1 ] || rm -rf "$ROOT"
echo "stop-s3: stopped"
