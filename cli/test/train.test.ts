/**
 * `qlora train`: the flag set, argument errors (exit 2 with the reason), dataset errors, and, once the
 * native engine has its LoRA training API, a real run on stories260K whose adapter changes what
 * `qlora generate --adapter` writes.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NativeModel } from "@qlora/kernels";
import { skipNoStories, storiesDir, storyText } from "@qlora/model/test-support";
import { runCli } from "../src/cli.js";
import type { Io } from "../src/command.js";

const hasTrainingApi = typeof (NativeModel.prototype as unknown as Record<string, unknown>)["trainForwardBackward"] === "function";

function memoryIo(cwd: string): Io & { out: () => string; err: () => string } {
  let out = "";
  let err = "";
  return {
    stdout: { write: (s: string) => (out += s) },
    stderr: { write: (s: string) => (err += s) },
    isTTY: false,
    columns: 80,
    env: {},
    cwd,
    out: () => out,
    err: () => err,
  };
}

async function cli(args: string[], cwd = tmpdir()): Promise<{ code: number; out: string; err: string }> {
  const io = memoryIo(cwd);
  const code = await runCli(args, io);
  return { code, out: io.out(), err: io.err() };
}

const STORY = storyText(12);

function workdir(): string {
  const dir = mkdtempSync(join(tmpdir(), "qlora-cli-train-"));
  writeFileSync(join(dir, "story.txt"), STORY);
  return dir;
}

test("train --help lists exactly the documented flags", async () => {
  const r = await cli(["train", "--help"]);
  assert.equal(r.code, 0);
  const flags = r.out
    .split("\n")
    .map((l) => /^\s+(?:-\w, )?--([a-z-]+)/.exec(l)?.[1])
    .filter((f): f is string => f !== undefined);
  const expected = [
    "model", "data", "out", "rank", "alpha", "dropout", "target", "epochs", "max-steps", "batch-size", "grad-accum",
    "block-size", "lr", "scheduler", "warmup-steps", "weight-decay", "max-grad-norm", "seed", "save-steps",
    "save-total-limit", "logging-steps", "eval-data", "eval-steps", "packing", "quant", "device", "resume", "help", "json",
  ];
  assert.deepEqual(flags, expected);
});

test("argument mistakes exit 2 with the reason", { skip: skipNoStories }, async () => {
  const dir = workdir();
  const base = ["train", "--model", storiesDir, "--data", "story.txt", "--out", "out"];
  const cases: [string[], RegExp][] = [
    [["train", "--data", "story.txt", "--out", "out"], /--model is required/],
    [[...base, "--lr", "fast"], /--lr must be a number, got "fast"/],
    [[...base, "--max-steps", "1.5"], /--max-steps must be an integer/],
    [[...base, "--scheduler", "step"], /--scheduler must be one of linear, constant, cosine/],
    [[...base, "--bogus"], /bogus/],
    [[...base, "--rank", "0"], /rank must be an integer ≥ 1, got 0/],
    [[...base, "--lr=-0.001"], /learning rate must be > 0/], // parseArgs needs "=" for a value starting with "-"
    [[...base, "--target", "q_proj,wq"], /unknown target module "wq" for a llama model; valid target modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear/],
    [[...base, "--block-size", "4096"], /block size 4096 exceeds the model's max_position_embeddings \(512\)/],
    [["train", "--model", join(dir, "nowhere"), "--data", "story.txt", "--out", "out"], /not found/],
  ];
  for (const [argv, pattern] of cases) {
    const r = await cli(argv, dir);
    assert.equal(r.code, 2, `${argv.join(" ")}: ${r.err}`);
    assert.match(r.err, pattern);
  }
  const j = await cli([...base, "--rank", "0", "--json"], dir);
  assert.equal(j.code, 2);
  assert.deepEqual(JSON.parse(j.err.trim()).error.code, "INVALID_ARGUMENT");
});

test("dataset problems exit 2 naming the file and line", { skip: skipNoStories }, async () => {
  const dir = workdir();
  writeFileSync(join(dir, "empty.txt"), "");
  writeFileSync(join(dir, "bad.jsonl"), '{"text": "ok"}\n{"text": \n');
  writeFileSync(join(dir, "shape.jsonl"), '{"question": "q"}\n');
  for (const [file, pattern] of [
    ["empty.txt", /empty\.txt is empty/],
    ["bad.jsonl", /bad\.jsonl:2: malformed JSON/],
    ["shape.jsonl", /shape\.jsonl:1: unknown record shape/],
    ["missing.jsonl", /does not exist/],
  ] as const) {
    const r = await cli(["train", "--model", storiesDir, "--data", file, "--out", "out"], dir);
    assert.equal(r.code, 2, r.err);
    assert.match(r.err, pattern);
  }
});

test(
  "a run prints a line per logging step (JSON lines with --json) and its adapter changes generation",
  { skip: skipNoStories || (hasTrainingApi ? false : "the native engine has no LoRA training API yet") },
  async () => {
    const dir = workdir();
    const common = ["--model", storiesDir, "--data", "story.txt", "--block-size", "32", "--max-steps", "30", "--lr", "2e-3", "--target", "all-linear"];
    const human = await cli(["train", ...common, "--out", "human", "--logging-steps", "10"], dir);
    assert.equal(human.code, 0, human.err);
    const stepLines = human.out.split("\n").filter((l) => l.startsWith("step "));
    assert.deepEqual(stepLines.map((l) => l.split(" ")[1]), ["10/30", "20/30", "30/30"]);
    assert.match(human.out, /done: 30 steps/);

    const r = await cli(["train", ...common, "--out", "json", "--logging-steps", "5", "--json"], dir);
    assert.equal(r.code, 0, r.err);
    const events = r.out.trim().split("\n").map((l) => JSON.parse(l));
    assert.equal(events[0].event, "start");
    assert.equal(events.at(-1).event, "end");
    const logs = events.filter((e) => e.event === "log");
    assert.deepEqual(logs.map((e) => e.step), [5, 10, 15, 20, 25, 30]);
    for (const l of logs) for (const k of ["epoch", "loss", "learningRate", "gradNorm", "tokensPerSecond"]) assert.equal(typeof l[k], "number");
    assert.ok(logs.at(-1).loss < logs[0].loss);
    const cfg = JSON.parse(readFileSync(join(dir, "json", "adapter_config.json"), "utf8"));
    assert.equal(cfg.peft_type, "LORA");

    const gen = (extra: string[]) => cli(["generate", "--model", storiesDir, "--prompt", "Tom had a red", "--max-new-tokens", "32", "--temperature", "0", ...extra], dir);
    const before = await gen([]);
    const after = await gen(["--adapter", "json"]);
    assert.equal(before.code, 0, before.err);
    assert.equal(after.code, 0, after.err);
    assert.notEqual(after.out, before.out);
  },
);
