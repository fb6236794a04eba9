/**
 * `--device auto|cpu|cuda` on generate / eval / train / serve (docs/cuda.md §6): the real entry
 * point spawned as a process. On a machine without a usable GPU "auto" resolves to cpu and "cuda" is
 * a FailedPrecondition (exit 1) naming the reason; training refuses "cuda" everywhere.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { FailedPrecondition } from "@qlora/core";
import { cudaInfo } from "@qlora/kernels";
import { SERVICES } from "../src/services.js";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const main = join(repoRoot, "cli/dist/src/main.js");
const stories = process.env.QLORA_STORIES_DIR ?? resolve(repoRoot, "../shared/models/stories260K");
const skip = existsSync(join(stories, "model.safetensors")) ? false : `stories260K not found at ${stories}`;
const info = cudaInfo();

function qlora(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((done, fail) => {
    const env = { ...process.env, QLORA_DEBUG: "", QLORA_THREADS: process.env.QLORA_THREADS ?? "1" };
    const p = spawn(process.execPath, [main, ...args], { cwd: repoRoot, env });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    p.on("error", fail);
    p.on("close", (code) => done({ code, stdout, stderr }));
  });
}

test("qlora generate / eval --device cpu and auto report the device they ran on", { skip }, async () => {
  const gen = await qlora(["generate", "--model", stories, "--prompt", "Once", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu", "--json"]);
  assert.equal(gen.code, 0, gen.stderr);
  assert.equal((JSON.parse(gen.stdout) as { device: string }).device, "cpu");
  const dir = mkdtempSync(join(tmpdir(), "qlora-device-"));
  try {
    const data = join(dir, "eval.txt");
    writeFileSync(data, "Once upon a time there was a cat.\n");
    const ev = await qlora(["eval", "--model", stories, "--data", data, "--device", "auto", "--json"]);
    assert.equal(ev.code, 0, ev.stderr);
    assert.equal((JSON.parse(ev.stdout) as { device: string }).device, info.available ? "cuda" : "cpu");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("qlora generate --device cuda without a GPU: exit 1 with the driver's reason", { skip }, async (t) => {
  if (info.available) {
    t.skip("a CUDA device is present");
    return;
  }
  const run = await qlora(["generate", "--model", stories, "--prompt", "Once", "--max-new-tokens", "2", "--device", "cuda"]);
  assert.equal(run.code, 1, run.stderr);
  assert.ok(run.stderr.includes(info.reason), run.stderr);
  const bad = await qlora(["eval", "--model", stories, "--data", "x.txt", "--device", "gpu"]);
  assert.equal(bad.code, 2, bad.stderr);
});

test("training refuses --device cuda: qlora train and the trainer service", async () => {
  const run = await qlora(["train", "--model", "m", "--data", "d.txt", "--out", "o", "--device", "cuda"]);
  assert.equal(run.code, 1, run.stderr);
  assert.match(run.stderr, /training on CUDA is not implemented yet/);
  const trainer = SERVICES.trainer;
  assert.equal(typeof trainer, "function");
  const factory = trainer as Extract<typeof trainer, Function>;
  await assert.rejects(
    async () => factory({ store: {} as never, dataDir: "/nonexistent", device: "cuda", config: { device: "cuda" } }),
    (e: unknown) => e instanceof FailedPrecondition && /training on CUDA is not implemented yet/.test(e.message),
  );
});
