import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readdir, readFile, stat } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { health, QuantizerService } from "@qlora/proto";
import { CANCELLABLE_LLAMA_CONFIG, writeFastCheckpoint } from "@qlora/quantizer/test-support";
import { commands, runCli } from "../src/cli.js";
import { progressReporter } from "../src/output.js";
import type { Io } from "../src/command.js";
import { availableServices, SERVICES } from "../src/services.js";

const MAIN = fileURLToPath(new URL("../src/main.js", import.meta.url));
/** ../shared/models/stories260K relative to the repository root (this file is cli/dist/test/). */
const STORIES = fileURLToPath(new URL("../../../../shared/models/stories260K", import.meta.url));

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function runQlora(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], { env: { ...process.env, QLORA_DATA_DIR: "", ...env } });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** The same command line in this process (fast; no process startup), with captured output. */
async function runInProcess(args: string[], env: NodeJS.ProcessEnv = {}, signal?: AbortSignal): Promise<Run> {
  let stdout = "";
  let stderr = "";
  const io: Io = {
    stdout: { write: (s: string) => (stdout += s) },
    stderr: { write: (s: string) => (stderr += s) },
    isTTY: false,
    columns: 80,
    env: { QLORA_DATA_DIR: "", ...env },
    cwd: process.cwd(),
  };
  const code = await runCli(args, io, signal);
  return { code, signal: null, stdout, stderr };
}

const tmp = (prefix: string) => mkdtemp(path.join(tmpdir(), prefix));
const exists = (p: string) => stat(p).then(() => true, () => false);

function oneLine(s: string): string {
  const lines = s.trimEnd().split("\n");
  assert.equal(lines.length, 1, `expected one line on stderr, got:\n${s}`);
  return lines[0]!;
}

describe("qlora help and argument errors", () => {
  test("qlora --help lists the commands; qlora <cmd> --help for every registered command", async () => {
    const top = await runQlora(["--help"]);
    assert.equal(top.code, 0);
    assert.match(top.stdout, /^Usage: qlora <command>/);
    for (const c of commands) assert.ok(top.stdout.includes(`  ${c.name} `), c.name);
    assert.ok(commands.some((c) => c.name === "quantize") && commands.some((c) => c.name === "serve"));
    const spawned = await runQlora(["quantize", "--help"]);
    assert.equal(spawned.code, 0);
    assert.match(spawned.stdout, /^Usage: qlora quantize --model DIR --out DIR/);
    for (const c of commands) {
      for (const args of [[c.name, "--help"], [c.name, "-h"], ["help", c.name]]) {
        const r = await runInProcess(args);
        assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
        assert.match(r.stdout, new RegExp(`^Usage: qlora ${c.name}`));
        assert.match(r.stdout, /--json/);
      }
    }
    const q = await runInProcess(["help", "quantize"]);
    assert.match(q.stdout, /--model DIR/);
    assert.match(q.stdout, /--no-double-quant/);
  });

  test("no command, unknown command, --version", async () => {
    const none = await runInProcess([]);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /Usage: qlora/);
    const unknown = await runInProcess(["frobnicate"]);
    assert.equal(unknown.code, 2);
    assert.match(oneLine(unknown.stderr), /unknown command "frobnicate"/);
    const v = await runQlora(["--version"]);
    assert.equal(v.code, 0);
    assert.match(v.stdout, /^qlora \d+\.\d+\.\d+/);
  });

  test("bad flags exit 2 with one clear line, and write nothing", async () => {
    const out = path.join(await tmp("qlora-cli-"), "out");
    const cases: [string[], RegExp][] = [
      [["quantize", "--model", STORIES, "--out", out, "--bogus"], /unknown option '--bogus'/i],
      [["quantize", "--model", STORIES, "--out", out, "--blocksize", "abc"], /--blocksize must be an integer/],
      [["quantize", "--model", STORIES, "--out", out, "--blocksize", "48"], /blocksize must be a power of two/],
      [["quantize", "--model", STORIES, "--out", out, "--compute-dtype", "int8"], /--compute-dtype must be one of bfloat16, float16, float32/],
      [["quantize", "--model", STORIES], /--out is required/],
      [["quantize", "--out", out], /--model is required/],
      [["quantize", "--model", STORIES, "--out", out, "extra"], /unexpected argument "extra"/],
      [["quantize", "--model"], /argument missing/i],
      [["serve", "--port", "99999", "--data-dir", out], /--port must be at most 65535/],
    ];
    // One spawned, for the process-level exit code; the rest in-process.
    const spawned = await runQlora(cases[0]![0]);
    assert.equal(spawned.code, 2);
    assert.match(oneLine(spawned.stderr), cases[0]![1]);
    for (const [args, pattern] of cases) {
      const r = await runInProcess(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(oneLine(r.stderr), pattern);
      assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
    }
    assert.equal(await exists(out), false);
  });
});

describe("qlora quantize", () => {
  test("a missing model directory is one clear line and exit 1", async () => {
    const dir = await tmp("qlora-cli-");
    const r = await runQlora(["quantize", "--model", path.join(dir, "nope"), "--out", path.join(dir, "out")]);
    assert.equal(r.code, 1);
    assert.match(oneLine(r.stderr), /^qlora quantize: .*nope.*no such model directory/);
    assert.deepEqual(await readdir(dir), []);
    const j = await runInProcess(["quantize", "--model", path.join(dir, "nope"), "--out", path.join(dir, "out"), "--json"]);
    assert.equal(j.code, 1);
    assert.deepEqual(Object.keys(JSON.parse(oneLine(j.stderr)).error), ["code", "message"]);
    assert.equal(JSON.parse(j.stderr).error.code, "NOT_FOUND");
  });

  test("--json: progress lines for every tensor, then the result; the checkpoint is complete", async () => {
    const dir = await tmp("qlora-cli-");
    const out = path.join(dir, "stories-nf4");
    const r = await runQlora(["quantize", "--model", STORIES, "--out", out, "--json"]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, "");
    const lines = r.stdout.trimEnd().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    const progress = lines.filter((l) => l.event === "progress");
    const result = lines.at(-1)!;
    assert.equal(result.event, "result");
    assert.equal(progress.length + 1, lines.length);
    assert.equal(progress.length, progress[0]!.tensorsTotal);
    assert.equal(progress.at(-1)!.bytesDone, progress.at(-1)!.bytesTotal);
    assert.equal(result.outDir, out);
    assert.equal(result.architecture, "LlamaForCausalLM");
    assert.deepEqual(result.quantization, { quantType: "nf4", blocksize: 64, doubleQuant: true, computeDtype: "bfloat16", skipModules: [] });
    assert.equal((result.tensorsQuantized as number) + (result.tensorsCopied as number), progress.length);

    for (const f of ["config.json", "model.safetensors", "manifest.json", "tokenizer.json", "tokenizer_config.json"]) {
      assert.ok(await exists(path.join(out, f)), f);
    }
    const config = JSON.parse(await readFile(path.join(out, "config.json"), "utf8")) as { quantization_config: Record<string, unknown> };
    assert.equal(config.quantization_config.bnb_4bit_use_double_quant, true);
    assert.deepEqual(await readdir(dir), ["stories-nf4"], "no temp directories left beside the output");
  });

  test("human output, settings flags, and an existing output without --overwrite", async () => {
    const dir = await tmp("qlora-cli-");
    const out = path.join(dir, "o");
    const r = await runInProcess([
      "quantize", "-m", STORIES, "-o", out, "--blocksize", "128", "--no-double-quant",
      "--compute-dtype", "float16", "--skip-modules", "o_proj,down_proj",
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^Quantized \d+ of \d+ tensors to NF4 \(blocksize 128, no double quant, compute float16\)/);
    const config = JSON.parse(await readFile(path.join(out, "config.json"), "utf8")) as { quantization_config: Record<string, unknown> };
    assert.equal(config.quantization_config.bnb_4bit_compute_dtype, "float16");
    assert.deepEqual(config.quantization_config.llm_int8_skip_modules, ["lm_head", "o_proj", "down_proj"]);

    const again = await runInProcess(["quantize", "-m", STORIES, "-o", out]);
    assert.equal(again.code, 1);
    assert.match(oneLine(again.stderr), /already exists/);
    const over = await runInProcess(["quantize", "-m", STORIES, "-o", out, "--overwrite", "--json"]);
    assert.equal(over.code, 0, over.stderr);
  });
});

describe("qlora quantize cancellation", () => {
  test("SIGINT during a quantization: exit 130 and nothing written (output complete or absent)", async (t) => {
    const dir = await tmp("qlora-cli-sigint-");
    const model = path.join(dir, "big");
    await writeFastCheckpoint(model, CANCELLABLE_LLAMA_CONFIG);
    const out = path.join(dir, "out");
    const child = spawn(process.execPath, [MAIN, "quantize", "--model", model, "--out", out, "--json"]);
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    let stdout = "";
    await new Promise<void>((resolve) => {
      child.stdout.setEncoding("utf8").on("data", (d: string) => {
        stdout += d;
        if (stdout.includes('"event":"progress"')) resolve();
      });
      child.once("close", () => resolve());
    });
    child.kill("SIGINT");
    const code = await exited;
    const left = (await readdir(dir)).sort();
    if (code === 0) {
      // The quantization won the race against the signal: then the output must be complete.
      t.diagnostic("the quantization finished before SIGINT arrived");
      assert.deepEqual(left, ["big", "out"]);
      assert.ok(await exists(path.join(out, "manifest.json")));
    } else {
      assert.equal(code, 130, stderr);
      assert.match(stdout.trimEnd().split("\n").at(-1)!, /"event":"cancelled"/);
      assert.deepEqual(left, ["big"], "no output and no temp directory");
    }
  });
});

describe("qlora serve", () => {
  test("starts, answers health checks and RPCs on one port, stops on SIGTERM", async () => {
    const dataDir = path.join(await tmp("qlora-cli-serve-"), "data");
    const child = spawn(process.execPath, [MAIN, "serve", "--port", "0", "--data-dir", dataDir, "--json"]);
    let stdout = "";
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    try {
      const first = await new Promise<string>((resolve, reject) => {
        child.stdout.setEncoding("utf8").on("data", (d: string) => {
          stdout += d;
          if (stdout.includes("\n")) resolve(stdout.split("\n")[0]!);
        });
        child.once("close", () => reject(new Error(`serve exited early: ${stderr}`)));
      });
      const listening = JSON.parse(first) as { event: string; port: number; url: string; services: string[] };
      assert.equal(listening.event, "listening");
      assert.ok(listening.services.includes("qlora.v1.QuantizerService"));
      assert.equal(listening.services.length, availableServices().length, "every available service starts by default");
      assert.ok(listening.port > 0);

      const grpcHealth = createClient(health.Health, createGrpcTransport({ baseUrl: listening.url }));
      assert.equal((await grpcHealth.check({ service: "" })).status, health.HealthCheckResponse_ServingStatus.SERVING);
      assert.equal(
        (await grpcHealth.check({ service: "qlora.v1.QuantizerService" })).status,
        health.HealthCheckResponse_ServingStatus.SERVING,
      );
      const quantizer = createClient(QuantizerService, createConnectTransport({ baseUrl: listening.url, httpVersion: "1.1" }));
      assert.deepEqual((await quantizer.listModels({})).models, []);
      assert.ok(await exists(dataDir), "the data directory is created");
    } finally {
      child.kill("SIGTERM");
    }
    assert.equal(await exited, 0, stderr);
    assert.match(stdout, /\{"event":"stopped"\}/);
  });

  test("unknown and unavailable services, a missing data dir, a busy port", async () => {
    const dataDir = await tmp("qlora-cli-serve-");
    const unknown = await runInProcess(["serve", "--services", "quantizer,bogus", "--data-dir", dataDir, "--port", "0"]);
    assert.equal(unknown.code, 2);
    assert.match(oneLine(unknown.stderr), /unknown service "bogus" \(known: quantizer, trainer, inference\)/);

    // Names in the table that this build does not provide yet (trainer/inference until they land).
    for (const [name, entry] of Object.entries(SERVICES)) {
      if (typeof entry === "function") continue;
      const r = await runInProcess(["serve", "--services", name, "--data-dir", dataDir, "--port", "0"]);
      assert.equal(r.code, 1);
      assert.match(oneLine(r.stderr), new RegExp(`service "${name}" is not available`));
    }

    const noData = await runInProcess(["serve", "--port", "0"]);
    assert.equal(noData.code, 2);
    assert.match(oneLine(noData.stderr), /--data-dir is required/);

    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, "127.0.0.1", r));
    try {
      const port = (blocker.address() as net.AddressInfo).port;
      const busy = await runInProcess(["serve", "--data-dir", dataDir, "--port", String(port)]);
      assert.equal(busy.code, 1);
      assert.match(oneLine(busy.stderr), /address already in use/);
    } finally {
      blocker.close();
    }
  });
});

describe("progress output", () => {
  const capture = (isTTY: boolean) => {
    let err = "";
    const io: Io = { stdout: { write: () => true }, stderr: { write: (s: string) => (err += s) }, isTTY, columns: 100, env: {}, cwd: "/" };
    return { io, get: () => err };
  };
  const state = (done: number) => ({ done, total: 4, bytesDone: done * 1024, bytesTotal: 4096, label: `t${done}` });

  test("a bar redrawn in place on a terminal, cleared at the end", () => {
    const c = capture(true);
    const p = progressReporter(c.io, { json: false, unit: "tensors", intervalMs: 0 });
    for (let i = 1; i <= 4; i++) p.update(state(i));
    p.finish();
    const frames = c.get().split("\r\x1b[2K").filter(Boolean);
    assert.equal(frames.length, 4);
    assert.match(frames[1]!, /^\[#+-+\]  50% 2\/4 tensors  2\.00 KiB\/4\.00 KiB  t2$/);
    assert.match(frames[3]!, /^\[#+\] 100% 4\/4 tensors/);
    assert.ok(c.get().endsWith("\r\x1b[2K"));
    assert.ok(!c.get().includes("\n"));
  });

  test("plain lines, throttled, when stderr is not a terminal; nothing with --json", () => {
    const c = capture(false);
    const p = progressReporter(c.io, { json: false, unit: "tensors", intervalMs: 60_000 });
    for (let i = 1; i <= 4; i++) p.update(state(i));
    p.finish();
    assert.deepEqual(c.get().split("\n").filter(Boolean), [" 25% 1/4 tensors  1.00 KiB/4.00 KiB  t1"]);
    const j = capture(false);
    const q = progressReporter(j.io, { json: true, unit: "tensors", intervalMs: 0 });
    q.update(state(1));
    q.finish();
    assert.equal(j.get(), "");
  });
});
