#!/usr/bin/env bash
# Starts a local S3-compatible server for the tests: single-node OpenStack Swift with its s3api layer
# (../shared/tools/setup-swift.sh), waits until it answers, and creates the test bucket.
# Installs nothing. Needs node with the repository's node_modules (npm ci) and the Debian packages:
#   apt-get install -y --no-install-recommends swift-proxy swift-account swift-container swift-object python3-swift
#
# Environment (all optional):
#   ROOT=/tmp/qlora-s3      data, logs, pid files (wiped on start; needs an xattr-capable fs such as ext4)
#   S3_PORT=18080           port of the S3 endpoint on 127.0.0.1
#   S3_BUCKET=qlora-test    bucket to create
# Prints the variables the tests read and writes them to $ROOT/env (`. $ROOT/env` to use them):
#   QLORA_TEST_S3_ENDPOINT, QLORA_TEST_S3_BUCKET, QLORA_TEST_S3_ACCESS_KEY_ID, QLORA_TEST_S3_SECRET_ACCESS_KEY
# Stop with tests/support/stop-s3.sh (same ROOT).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export ROOT=${ROOT:-/tmp/qlora-s3}
export S3_PORT=${S3_PORT:-18080}
BUCKET=${S3_BUCKET:-qlora-test}
SETUP=${SWIFT_SETUP:-$REPO/../shared/tools/setup-swift.sh}

for bin in swift-proxy-server swift-object-server swift-container-server swift-account-server swift-ring-builder curl node; do
  command -v "$bin" >/dev/null || { echo "start-s3: $bin not found (apt-get install -y --no-install-recommends swift-proxy swift-account swift-container swift-object python3-swift curl)" >&2; exit 1; }
done
[ -f "$SETUP" ] || { echo "start-s3: $SETUP not found (set SWIFT_SETUP)" >&2; exit 1; }

# A previous server on this ROOT is stopped first (setup-swift.sh wipes ROOT).
"$HERE/stop-s3.sh" >/dev/null 2>&1 || true
bash "$SETUP" || echo "start-s3: setup-swift.sh gave up waiting (slow machine?); probing the server for longer" >&2

BASE="http://127.0.0.1:$S3_PORT"
# setup-swift.sh waits for the proxy's /healthcheck only; the account/container/object servers may still
# be starting. Create the bucket through the S3 API and probe a write/read/delete until it works.
# (Swift's own token auth needs memcached, which the S3 path does not, so this goes through S3.)
if ! AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED=true node "$HERE/s3-bucket.mjs" "$BASE" "$BUCKET" test:tester testing 60; then
  echo "start-s3: the server did not come up; logs in $ROOT/log:" >&2
  tail -n 20 "$ROOT"/log/*.log >&2 || true
  exit 1
fi

cat > "$ROOT/env" <<ENV
export QLORA_TEST_S3_ENDPOINT=$BASE
export QLORA_TEST_S3_BUCKET=$BUCKET
export QLORA_TEST_S3_ACCESS_KEY_ID=test:tester
export QLORA_TEST_S3_SECRET_ACCESS_KEY=testing
ENV
echo "start-s3: bucket $BUCKET ready at $BASE"
cat "$ROOT/env"
