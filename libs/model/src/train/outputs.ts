/**
 * Run outputs besides checkpoints: metrics.jsonl (one JSON object per log/eval entry), the
 * TensorBoard directory `runs/`, loss.png, and the final adapter placed into `out` itself.
 */
import { appendFile, mkdir, readdir, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { tempSibling } from "@qlora/core";
import { writePeftAdapter, type LoraConfigInput, type ModelFamily } from "@qlora/formats";
import type { LogEntry } from "./checkpoint.js";
import { lossChartPng } from "./png.js";

export const METRICS_FILE = "metrics.jsonl";
export const RUNS_DIR = "runs";
export const LOSS_PNG = "loss.png";

/** Rewrites metrics.jsonl from a log history (a resumed run drops what the crashed run logged after its checkpoint). */
export async function rewriteMetrics(out: string, history: LogEntry[]): Promise<void> {
  const path = join(out, METRICS_FILE);
  const tmp = tempSibling(path);
  await writeFile(tmp, history.map((e) => JSON.stringify(e) + "\n").join(""));
  await rename(tmp, path);
}

export async function appendMetrics(out: string, entry: LogEntry): Promise<void> {
  await appendFile(join(out, METRICS_FILE), JSON.stringify(entry) + "\n");
}

/** Draws loss.png from the log history (written to a temp name, then renamed). */
export async function writeLossPng(out: string, history: LogEntry[]): Promise<void> {
  const train: { step: number; loss: number }[] = [];
  const evals: { step: number; loss: number }[] = [];
  for (const e of history) {
    if ("loss" in e) train.push({ step: e.step, loss: e.loss });
    else evals.push({ step: e.step, loss: e.eval_loss });
  }
  const path = join(out, LOSS_PNG);
  const tmp = tempSibling(path);
  await writeFile(tmp, lossChartPng(train, evals));
  await rename(tmp, path);
}

/**
 * The final adapter goes into `out` next to checkpoints and logs, so it cannot be a directory swap:
 * it is written complete into a hidden staging directory, then each file is renamed into `out`
 * (each rename is atomic; adapter_model.safetensors moves last, config first).
 */
export async function writeFinalAdapter(
  out: string,
  adapter: { config: LoraConfigInput; family: ModelFamily; tensors: ReadonlyMap<string, { a: Float32Array; b: Float32Array }> },
): Promise<string[]> {
  await mkdir(out, { recursive: true });
  const stage = tempSibling(join(out, "adapter"));
  try {
    const { files } = await writePeftAdapter(stage, adapter);
    for (const f of files) await rename(join(stage, f), join(out, f));
    return files.map((f) => join(out, f));
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}

/** Removes leftovers of interrupted output writes (hidden temp siblings). */
export async function removeStaleTemps(out: string): Promise<void> {
  let names: string[];
  try {
    names = await readdir(out);
  } catch {
    return;
  }
  for (const n of names) {
    if (/^\.+(adapter|metrics\.jsonl|loss\.png)\.tmp-/.test(n)) await rm(join(out, n), { recursive: true, force: true });
  }
}
