#!/usr/bin/env bash
# One-shot GPU check of the CUDA layer (docs/cuda.md): build with nvcc, print cudaInfo, run the GPU
# tests (every kernel against the CPU path; the CUDA engine and the CUDA LoRA trainer against the CPU
# ones, incl. stories260K when QLORA_STORIES_DIR or ../shared has it), run the GPU benchmarks (kernels,
# then the engine and the training step on the Llama-3.2-1B shape), and print a short table last. Each
# step is bounded by `timeout`; without the build step the run takes a few minutes (worst case 300 + 300 s).
#   QLORA_GPU_CHECK_BUILD=0  use the addon and dist/ already built (e.g. built here with nvcc and
#                            carried to the GPU machine) instead of building
# Exit status: 0 all passed; 1 a build, test or benchmark step failed; 2 no CUDA device / no CUDA build.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n== %s (t=%ss)\n' "$*" "$(($(date +%s) - start))"; }
fail() { printf '\ngpu-check: FAILED: %s\n' "$1" >&2; exit "${2:-1}"; }

if [ "${QLORA_GPU_CHECK_BUILD:-1}" != 0 ]; then
  step "build (nvcc + addon + TypeScript)"
  timeout 300 npm run build:native || fail "native build (nvcc or g++)"
  timeout 120 npx tsc -b libs/kernels libs/model || fail "TypeScript build"
fi

step "cudaInfo"
node --input-type=module -e '
  import { cudaInfo } from "./libs/kernels/dist/src/index.js";
  const i = cudaInfo();
  console.log(JSON.stringify(i, null, 1));
  if (!i.compiled) { console.log("gpu-check: the addon was built without CUDA (no nvcc?)"); process.exit(2); }
  if (!i.available) { console.log(`no CUDA device: ${i.reason}`); process.exit(2); }
' || fail "no usable CUDA device or CUDA build (see above)" 2

step "GPU tests (libs/kernels/test/cuda.test.ts, cuda-engine.test.ts, cuda-train.test.ts, libs/model/test/device.test.ts)"
tests=(libs/kernels/dist/test/cuda.test.js libs/kernels/dist/test/cuda-engine.test.js libs/kernels/dist/test/cuda-train.test.js)
[ -f libs/model/dist/test/device.test.js ] && tests+=(libs/model/dist/test/device.test.js)
timeout 300 node --test --test-reporter=spec "${tests[@]}" 2>&1 | tee "$work/tests.log"
test_rc=${PIPESTATUS[0]}
pass=$(sed -n 's/^ℹ pass //p' "$work/tests.log"); failn=$(sed -n 's/^ℹ fail //p' "$work/tests.log")
skipped=$(sed -n 's/^ℹ skipped //p' "$work/tests.log")

step "GPU benchmarks (bench/cuda.bench.mjs: kernels, then the engine and the training step)"
timeout 300 node bench/cuda.bench.mjs --require-device --json "$work/bench.json"
bench_rc=$?

step "summary"
node --input-type=module -e '
  import { existsSync, readFileSync } from "node:fs";
  const [file, pass, fail, skipped, testRc, benchRc] = process.argv.slice(1);
  console.log(`GPU tests: ${pass || "?"} passed, ${fail || "?"} failed, ${skipped || "?"} skipped (exit ${testRc})`);
  if (!existsSync(file)) { console.log(`benchmarks: no results (exit ${benchRc})`); process.exit(0); }
  const b = JSON.parse(readFileSync(file, "utf8"));
  console.log(`device: ${b.device} (bf16 peak ${b.peakTflops ?? "?"} TFLOP/s)`);
  console.log("| benchmark | value | unit | note |\n|---|---|---|---|");
  for (const r of b.rows) console.log(`| ${r.name} | ${r.value.toFixed(r.value >= 100 ? 0 : 2)} | ${r.unit} | ${r.note} |`);
  for (const e of b.errors ?? []) console.log(`benchmark section ${e.section} FAILED: ${e.message}`);
' "$work/bench.json" "$pass" "$failn" "$skipped" "$test_rc" "$bench_rc"
echo "total: $(($(date +%s) - start)) s"
[ "$test_rc" = 0 ] || fail "GPU tests (exit $test_rc)"
[ "${failn:-1}" = 0 ] || fail "GPU tests reported failures"
[ "$bench_rc" = 0 ] || fail "benchmarks (exit $bench_rc)"
echo "gpu-check: OK"
