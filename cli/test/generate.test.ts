/**
 * `qlora generate` and `qlora eval` end to end: the real entry point spawned as a process, on the
 * shared stories260K checkpoint (skipped when that material is absent).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const main = join(repoRoot, "cli/dist/src/main.js");
const stories = process.env.QLORA_STORIES_DIR ?? resolve(repoRoot, "../shared/models/stories260K");
const skip = existsSync(join(stories, "model.safetensors")) ? false : `stories260K not found at ${stories}`;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function qlora(args: string[], cwd = repoRoot): Promise<Run> {
  return new Promise((done, fail) => {
    // One kernel thread unless the caller chose: these runs check the command line, and a tiny
    // model gains nothing from threads on a shared 2-core machine.
    const env = { ...process.env, QLORA_DEBUG: "", QLORA_THREADS: process.env.QLORA_THREADS ?? "1" };
    const p = spawn(process.execPath, [main, ...args], { cwd, env });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    p.on("error", fail);
    p.on("close", (code) => done({ code, stdout, stderr }));
  });
}

interface Reference {
  greedy: { prompt: string; new_ids: number[]; text: string };
  cross_entropy: { text: string; ids: number[]; mean_next_token_ce: number };
}
const ref = (): Reference => JSON.parse(readFileSync(join(stories, "reference.json"), "utf8")) as Reference;

test("qlora generate --json: the greedy reference continuation", { skip }, async () => {
  const r = ref();
  const run = await qlora(["generate", "--model", stories, "--prompt", r.greedy.prompt, "--max-new-tokens", "64", "--temperature", "0", "--quant", "none", "--json"]);
  assert.equal(run.code, 0, run.stderr);
  const lines = run.stdout.trim().split("\n");
  assert.equal(lines.length, 1, "one JSON object");
  const out = JSON.parse(lines[0]!) as { text: string; token_ids: number[]; finish_reason: string; usage: { prompt_tokens: number; completion_tokens: number } };
  assert.deepEqual(out.token_ids, r.greedy.new_ids);
  assert.equal(r.greedy.prompt + out.text, r.greedy.text);
  assert.equal(out.finish_reason, "length");
  assert.deepEqual(out.usage, { prompt_tokens: 5, completion_tokens: 64 });
});

test("qlora generate streams the completion to stdout (nf4, relative model path)", { skip }, async () => {
  const r = ref();
  const json = await qlora(["generate", "--model", stories, "--prompt", r.greedy.prompt, "--max-new-tokens", "12", "--temperature", "0", "--json"]);
  assert.equal(json.code, 0, json.stderr);
  const expected = (JSON.parse(json.stdout) as { text: string }).text;
  const plain = await qlora(["generate", "--model", basename(stories), "--prompt", r.greedy.prompt, "--max-new-tokens", "12", "--temperature", "0"], dirname(stories));
  assert.equal(plain.code, 0, plain.stderr);
  assert.equal(plain.stdout, expected + "\n");
});

test("qlora eval --json: the reference cross-entropy", { skip }, async () => {
  const r = ref();
  const dir = mkdtempSync(join(tmpdir(), "qlora-cli-eval-"));
  try {
    const jsonl = join(dir, "data.jsonl");
    writeFileSync(jsonl, JSON.stringify({ text: r.cross_entropy.text }) + "\n\n");
    const run = await qlora(["eval", "--model", stories, "--data", jsonl, "--quant", "none", "--json"]);
    assert.equal(run.code, 0, run.stderr);
    const out = JSON.parse(run.stdout) as { loss: number; perplexity: number; tokens: number; examples: number };
    assert.ok(Math.abs(out.loss - r.cross_entropy.mean_next_token_ce) < 1e-4, `${out.loss}`);
    assert.ok(Math.abs(out.perplexity - Math.exp(out.loss)) < 1e-9);
    assert.equal(out.tokens, r.cross_entropy.ids.length - 1);
    assert.equal(out.examples, 1);

    const txt = join(dir, "data.txt");
    writeFileSync(txt, `${r.cross_entropy.text}\n\nThe cat sat.\n`);
    const t = await qlora(["eval", "--model", stories, "--data", txt, "--json"]);
    assert.equal(t.code, 0, t.stderr);
    assert.equal(JSON.parse(t.stdout).examples, 2);

    const bad = join(dir, "bad.jsonl");
    writeFileSync(bad, '{"text": "ok"}\n{"txt": "typo"}\n');
    const b = await qlora(["eval", "--model", stories, "--data", bad, "--json"]);
    assert.equal(b.code, 2);
    const err = JSON.parse(b.stderr) as { error: { code: string; message: string } };
    assert.equal(err.error.code, "INVALID_ARGUMENT");
    assert.match(err.error.message, /line 2/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** In-process run (error paths need no fresh process): exit code and captured output. */
async function qloraInProcess(args: string[]): Promise<Run> {
  const { runCli } = (await import(pathToFileURL(join(repoRoot, "cli/dist/src/cli.js")).href)) as {
    runCli(argv: string[], io: unknown, signal?: AbortSignal): Promise<number>;
  };
  let stdout = "";
  let stderr = "";
  const io = {
    stdout: { write: (s: string) => (stdout += s) },
    stderr: { write: (s: string) => (stderr += s) },
    isTTY: false,
    columns: 80,
    env: { ...process.env, QLORA_DEBUG: "" },
    cwd: repoRoot,
  };
  const code = await runCli(args, io);
  return { code, stdout, stderr };
}

test("bad input: missing model, missing prompt, bad option values", async () => {
  const missing = await qlora(["generate", "--model", "/nonexistent/model", "--prompt", "hi", "--json"]);
  assert.equal(missing.code, 1);
  assert.equal((JSON.parse(missing.stderr) as { error: { code: string } }).error.code, "NOT_FOUND");
  const human = await qloraInProcess(["eval", "--model", "/nonexistent/model", "--data", join(repoRoot, "package.json")]);
  assert.notEqual(human.code, 0);
  assert.match(human.stderr, /^qlora eval: /);

  const noPrompt = await qloraInProcess(["generate", "--model", stories]);
  assert.equal(noPrompt.code, 2);
  assert.match(noPrompt.stderr, /--prompt is required/);
  const badTemp = await qloraInProcess(["generate", "--model", stories, "--prompt", "x", "--temperature", "hot"]);
  assert.equal(badTemp.code, 2);
  assert.match(badTemp.stderr, /--temperature must be a number/);
  const badQuant = await qloraInProcess(["generate", "--model", stories, "--prompt", "x", "--quant", "int8"]);
  assert.equal(badQuant.code, 2);
  const badSeed = await qloraInProcess(["generate", "--model", stories, "--prompt", "x", "--seed", "-3"]);
  assert.equal(badSeed.code, 2);
});

test("qlora generate --adapter: a broken adapter is a clear error", { skip }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "qlora-cli-adapter-"));
  try {
    writeFileSync(join(dir, "adapter_config.json"), JSON.stringify({ peft_type: "LORA", r: 2, lora_alpha: 4, target_modules: ["q_proj"] }));
    writeFileSync(join(dir, "adapter_model.safetensors"), Buffer.from("not a safetensors file"));
    const run = await qloraInProcess(["generate", "--model", stories, "--adapter", dir, "--prompt", "x", "--json"]);
    assert.equal(run.code, 2, run.stderr);
    assert.equal((JSON.parse(run.stderr) as { error: { code: string } }).error.code, "INVALID_ARGUMENT");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
