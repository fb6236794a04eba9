/**
 * `--device auto|cpu|cuda` on generate / eval / train / serve (docs/cuda.md §6): the real entry
 * point spawned as a process. On a machine without a usable GPU "auto" resolves to cpu and "cuda" is
 * a FailedPrecondition (exit 1) naming the reason — for training too (qlora train trains on the GPU
 * with --device cuda, docs/cuda.md §7).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { cudaInfo } from "@qlora/kernels";

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

test("qlora train --device cuda without a GPU: exit 1, FailedPrecondition naming the reason, before reading anything", async (t) => {
  if (info.available) {
    t.skip("a CUDA device is present");
    return;
  }
  // --model / --data do not exist: the device is resolved first, so the error is about CUDA.
  const run = await qlora(["train", "--model", "m", "--data", "d.txt", "--out", "o", "--device", "cuda"]);
  assert.equal(run.code, 1, run.stderr);
  assert.match(run.stderr, /CUDA is not available/);
  if (info.compiled) assert.ok(run.stderr.includes(info.reason), run.stderr);
});

/** One optimizer step of `qlora train --json` on stories260K; returns the start event. */
async function trainOnce(device: string): Promise<{ device: string; events: Array<Record<string, unknown>> }> {
  const dir = mkdtempSync(join(tmpdir(), "qlora-train-device-"));
  try {
    const data = join(dir, "story.txt");
    writeFileSync(data, "Once upon a time there was a little cat. The cat liked to play in the sun.\n".repeat(4));
    const run = await qlora([
      "train", "--model", stories, "--data", data, "--out", join(dir, "out"), "--block-size", "16", "--max-steps", "2",
      "--target", "all-linear", "--save-steps", "0", "--logging-steps", "1", "--device", device, "--json",
    ]);
    assert.equal(run.code, 0, run.stderr);
    const events = run.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    const start = events.find((e) => e.event === "start");
    assert.ok(start, run.stdout);
    assert.ok(existsSync(join(dir, "out", "adapter_model.safetensors")), "the adapter is written");
    return { device: String(start.device), events };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("qlora train --device auto trains where CUDA allows and the start event says where", { skip }, async () => {
  assert.equal((await trainOnce("auto")).device, info.available ? "cuda" : "cpu");
  assert.equal((await trainOnce("cpu")).device, "cpu");
});

test("qlora train --device cuda end to end on stories260K (GPU)", { skip: skip || (info.available ? false : `no CUDA device: ${info.reason}`) }, async () => {
  const { device, events } = await trainOnce("cuda");
  assert.equal(device, "cuda");
  const logs = events.filter((e) => e.event === "log");
  assert.equal(logs.length, 2);
  for (const l of logs) assert.ok(Number.isFinite(l.loss as number) && (l.loss as number) > 0, JSON.stringify(l));
});
