#!/usr/bin/env bash
# Checks the Tiltfile without Tilt (which cannot be installed here):
#   1. buildifier: Starlark syntax and canonical formatting (fix with: -mode=fix);
#   2. ../shared/tools/tiltfile-check.py: runs the Tiltfile against stubs of the Tilt API
#      (unknown functions, bad or missing arguments, undefined names);
#   3. consistency with the repository: the kustomize overlay, Dockerfile and dev target exist,
#      every workspace's package.json triggers an image rebuild, each service is port-forwarded;
#   4. self-test: both checkers must reject a broken Tiltfile, so a pass means something.
# Usage: bash tests/deploy/check-tiltfile.sh   (from anywhere; exit status 0 = all good)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILDIFIER_VERSION=8.2.1
CHECKER=${TILTFILE_CHECK:-../shared/tools/tiltfile-check.py}

# The project's devDependency when installed, else the pinned version through npx (registry).
if [ -x node_modules/.bin/buildifier ]; then
  buildifier() { node_modules/.bin/buildifier "$@"; }
else
  buildifier() { npx --yes "@bazel/buildifier@$BUILDIFIER_VERSION" "$@"; }
fi
[ -f "$CHECKER" ] || { echo "check-tiltfile: $CHECKER not found (set TILTFILE_CHECK)"; exit 1; }

echo "== buildifier (format + syntax)"
if ! buildifier -type=default -mode=check -lint=off Tiltfile; then
  echo "check-tiltfile: Tiltfile is not buildifier-formatted; run:"
  echo "  npx @bazel/buildifier@$BUILDIFIER_VERSION -type=default -mode=fix -lint=off Tiltfile"
  exit 1
fi
echo "ok"

echo "== Tilt API stubs"
python3 "$CHECKER" Tiltfile

echo "== consistency with the repository"
node --input-type=module - <<'JS'
import { readFileSync, existsSync } from "node:fs";
const tilt = readFileSync("Tiltfile", "utf8");
const problems = [];
const { workspaces } = JSON.parse(readFileSync("package.json", "utf8"));
for (const w of workspaces) if (!tilt.includes(`"${w}/package.json"`)) problems.push(`REBUILD_ON lacks ${w}/package.json`);
for (const m of tilt.matchAll(/kustomize\("([^"]+)"\)/g)) if (!existsSync(`${m[1]}/kustomization.yaml`)) problems.push(`no overlay ${m[1]}`);
const df = tilt.match(/dockerfile = "([^"]+)"/)?.[1];
const target = tilt.match(/target = "([^"]+)"/)?.[1];
if (!df || !existsSync(df)) problems.push(`dockerfile ${df} missing`);
else if (!new RegExp(`^FROM \\S+ AS ${target}$`, "m").test(readFileSync(df, "utf8"))) problems.push(`${df} has no stage ${target}`);
for (const top of new Set(workspaces.map((w) => w.split("/")[0])))
  if (!tilt.includes(`sync("${top}", "/app/${top}")`)) problems.push(`no live_update sync of ${top}/`);
for (const s of ["quantizer", "trainer", "inference"]) if (!new RegExp(`\\("${s}", \\d+\\)`).test(tilt)) problems.push(`no port forward for ${s}`);
if (problems.length) { console.error(problems.join("\n")); process.exit(1); }
console.log("ok");
JS

echo "== self-test: the checkers reject broken Tiltfiles"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
printf 'docker_build("x", ".",\n' > "$tmp/syntax"
printf 'k8s_resource("x", port_forward=[8080])\n' > "$tmp/badarg"
printf 'k8s_yaml(kustomise("deploy"))\n' > "$tmp/unknown"
if buildifier -type=default -mode=check -lint=off "$tmp/syntax" >/dev/null 2>&1; then echo "buildifier accepted a syntax error"; exit 1; fi
for f in badarg unknown; do
  if python3 "$CHECKER" "$tmp/$f" >/dev/null 2>&1; then echo "tiltfile-check accepted $f"; exit 1; fi
done
echo "ok"
echo "check-tiltfile: all checks passed"
