// The GPU tests on the CUDA emulator (docs/cuda.md §8): builds the addon against the emulator
// (libs/kernels/scripts/build-emu.mjs; needs the CUDA toolkit's headers, not a GPU), then runs every
// test file that exercises the CUDA path with QLORA_KERNELS_ADDON pointing at it — the kernels, the
// CUDA engine, the CUDA trainer, the model / CLI / trainer / inference-service device paths. Then the kernel tests
// once more with the fibers scheduled in reverse order: a kernel whose result depends on the order
// of its threads between barriers has a race.
//   QLORA_EMU_PATTERN=regex   only tests whose name matches (node --test-name-pattern)
// Exit 0 with a SKIPPED line where there is no CUDA toolkit.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";

const root = join(new URL(".", import.meta.url).pathname, "..");
const t0 = Date.now();
const build = spawnSync(process.execPath, [join(root, "libs", "kernels", "scripts", "build-emu.mjs")], { stdio: "inherit" });
if (build.status === 2) {
  console.log("CUDA emulator tests: SKIPPED: no CUDA toolkit on this machine");
  process.exit(0);
}
if (build.status !== 0) process.exit(build.status ?? 1);
const addon = join(root, "libs", "kernels", "build-emu", "pkg", "build", "Release", "qlora_kernels.node");

const files = [
  "libs/kernels/dist/test/cuda.test.js",
  "libs/kernels/dist/test/cuda-engine.test.js",
  "libs/kernels/dist/test/cuda-train.test.js",
  "libs/model/dist/test/device.test.js",
  "cli/dist/test/device.test.js",
  "services/trainer/dist/test/service-errors.test.js",
  "services/inference/dist/test/device.test.js",
].map((f) => join(root, f));
const missing = files.filter((f) => !existsSync(f));
if (missing.length) {
  console.error(`test-cuda-emu: missing ${missing.join(", ")} (did the TypeScript build run?)`);
  process.exit(1);
}
const pattern = process.env.QLORA_EMU_PATTERN ? [`--test-name-pattern=${process.env.QLORA_EMU_PATTERN}`] : [];
const run = (what, list, env) => {
  console.log(`== CUDA emulator: ${what}`);
  const r = spawnSync(process.execPath, ["--test", "--test-reporter=spec", "--test-timeout=1200000", ...pattern, ...list], {
    stdio: "inherit",
    cwd: root,
    env: { ...process.env, QLORA_KERNELS_ADDON: addon, ...env },
  });
  return r.status ?? 1;
};
let status = run("the GPU tests", files, {});
if (status === 0) status = run("the kernel tests, fibers in reverse order (races)", [files[0]], { QLORA_CUDA_EMU_ORDER: "reverse" });
console.log(`CUDA emulator tests: ${status === 0 ? "passed" : "FAILED"} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
process.exit(status);
