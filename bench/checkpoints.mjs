// Where the benchmarks keep their random-weight checkpoints, shared by every bench/*.bench.mjs.
// The checkpoints themselves come from bench/make-random-checkpoint.mjs (its PRESETS and its
// generator, unchanged); this file only fixes one cache directory so that a checkpoint is written
// once and reused by every benchmark and every run (Llama-3.2-1B in BF16 is 2.5 GB: ~1 min to write).
//
//   QLORA_BENCH_DIR   cache directory (default: bench/out/, which is gitignored)
//
//   node bench/checkpoints.mjs [preset ...]     generates (or finds) them and prints the directories
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { makeRandomCheckpoint, PRESETS } from "./make-random-checkpoint.mjs";

export { PRESETS };

/** The benchmarks' cache directory (checkpoints, stores, profiles). */
export function benchCacheDir() {
  return process.env.QLORA_BENCH_DIR ?? fileURLToPath(new URL("./out/", import.meta.url));
}

/** Directory of the random checkpoint for `preset` (whether or not it exists yet). */
export function checkpointDir(preset) {
  return join(benchCacheDir(), `${preset}-random`);
}

/**
 * The random checkpoint for `preset`, written on first use (make-random-checkpoint.mjs: BF16,
 * real shapes, synthetic byte-level tokenizer). Returns { dir, generatedMs, bytes }; generatedMs
 * is 0 when the cached copy was reused.
 */
export async function ensureCheckpoint(preset) {
  if (!PRESETS[preset]) throw new Error(`unknown preset ${preset} (have: ${Object.keys(PRESETS).join(", ")})`);
  const dir = checkpointDir(preset);
  const fresh = !existsSync(join(dir, "model.safetensors")) || !existsSync(join(dir, "tokenizer.json"));
  const t0 = performance.now();
  await makeRandomCheckpoint(preset, dir);
  const bytes = statSync(join(dir, "model.safetensors")).size;
  return { dir, generatedMs: fresh ? performance.now() - t0 : 0, bytes };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  for (const p of process.argv.length > 2 ? process.argv.slice(2) : Object.keys(PRESETS)) {
    const r = await ensureCheckpoint(p);
    console.error(`${p}: ${(r.bytes / 1e9).toFixed(2)} GB${r.generatedMs ? `, written in ${(r.generatedMs / 1000).toFixed(1)} s` : ", cached"}`);
    console.log(r.dir);
  }
}
