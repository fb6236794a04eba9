/** Bad input, cancellation and mid-way failures: a clear typed error and nothing left behind. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { truncateSync } from "node:fs";
import { cp, mkdir, mkdtemp, readdir, readFile, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import { TINY_CONFIGS, writeSyntheticCheckpoint } from "@qlora/formats";
import { LocalStore } from "@qlora/store";
import { quantizeCheckpoint, writeQuantizedCheckpoint } from "../src/quantize.js";

const STORIES = join(import.meta.dirname, "../../../../../shared/models/stories260K");

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "qlora-qerr-"));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Asserts the promise rejects with `type` (message matching `re`) and `parent` holds exactly `entries` afterwards. */
async function failsClean(p: Promise<unknown>, type: new (...a: never[]) => Error, re: RegExp | null, parent: string, entries: string[]): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof type, `expected ${type.name}, got ${String(e)}`);
    if (re) assert.match((e as Error).message, re);
    return true;
  });
  assert.deepEqual((await readdir(parent)).sort(), entries.sort(), "nothing half written");
}

test("bad options and bad input: typed errors, no output", async () => {
  await withTmp(async (dir) => {
    const out = join(dir, "out");
    const q = (o: Partial<Parameters<typeof quantizeCheckpoint>[0]>) => quantizeCheckpoint({ modelDir: STORIES, outDir: out, ...o });
    for (const bs of [16, 100, 8192, 0, 64.5]) await failsClean(q({ blocksize: bs }), InvalidArgument, /blocksize/, dir, []);
    await failsClean(q({ computeDtype: "int8" as never }), InvalidArgument, /compute dtype/, dir, []);
    await failsClean(q({ skipModules: ["../x"] }), InvalidArgument, /skip modules/, dir, []);
    await failsClean(q({ maxShardSize: 0 }), InvalidArgument, /shard size/, dir, []);
    await failsClean(q({ modelDir: join(dir, "missing") }), NotFound, /no such model directory/, dir, []);
    await mkdir(join(dir, "empty"));
    await failsClean(q({ modelDir: join(dir, "empty") }), NotFound, /config.json is missing/, dir, ["empty"]);
    await failsClean(q({ modelDir: STORIES, outDir: join(STORIES, "x") }), InvalidArgument, /inside the model directory/, dir, ["empty"]);

    // Unsupported architecture and a config missing a field.
    const m = join(dir, "m");
    await cp(STORIES, m, { recursive: true });
    const cfg = JSON.parse(await readFile(join(STORIES, "config.json"), "utf8"));
    await writeFile(join(m, "config.json"), JSON.stringify({ ...cfg, model_type: "gpt_neox", architectures: ["GPTNeoXForCausalLM"] }));
    await failsClean(q({ modelDir: m }), InvalidArgument, /unsupported model_type "gpt_neox"/, dir, ["empty", "m"]);
    const { hidden_size: _h, ...noHidden } = cfg;
    await writeFile(join(m, "config.json"), JSON.stringify(noHidden));
    await failsClean(q({ modelDir: m }), InvalidArgument, /missing required field "hidden_size"/, dir, ["empty", "m"]);
    await writeFile(join(m, "config.json"), JSON.stringify(cfg));
    // A truncated weights file is caught before anything is written.
    await truncate(join(m, "model.safetensors"), 600_000);
    await failsClean(q({ modelDir: m }), InvalidArgument, /model\.safetensors: invalid safetensors file/, dir, ["empty", "m"]);
  });
});

test("existing output: AlreadyExists unless overwrite; a failed overwrite keeps the old output", async () => {
  await withTmp(async (dir) => {
    const out = join(dir, "out");
    await mkdir(out);
    await writeFile(join(out, "keep.txt"), "old");
    await failsClean(quantizeCheckpoint({ modelDir: STORIES, outDir: out }), AlreadyExists, /already exists/, dir, ["out"]);
    // Cancel an overwrite mid-way: the old directory is untouched.
    const ac = new AbortController();
    await failsClean(
      quantizeCheckpoint({ modelDir: STORIES, outDir: out, overwrite: true, signal: ac.signal, onProgress: (p) => p.tensorsDone === 10 && ac.abort() }),
      Cancelled,
      /cancelled/,
      dir,
      ["out"],
    );
    assert.deepEqual(await readdir(out), ["keep.txt"]);
    await quantizeCheckpoint({ modelDir: STORIES, outDir: out, overwrite: true });
    assert.ok(!(await readdir(out)).includes("keep.txt"));
    assert.deepEqual(await readdir(dir), ["out"]);
    // A pre-quantized checkpoint is not quantized again.
    await failsClean(quantizeCheckpoint({ modelDir: out, outDir: join(dir, "again") }), FailedPrecondition, /already quantized/, dir, ["out"]);
  });
});

test("failures mid-way (a shard truncated while reading, an abort signal) leave no output and no temp dir", async () => {
  await withTmp(async (dir) => {
    const src = join(dir, "src");
    await writeSyntheticCheckpoint(src, TINY_CONFIGS.llama, { seed: 9, maxShardSize: 20_000 });
    const shards = (await readdir(src)).filter((f) => f.endsWith(".safetensors")).sort();
    assert.ok(shards.length >= 3);
    const before = ["src"];
    // Truncate the last shard after the first tensor was processed: its tensors fail to read.
    let truncated = false;
    await failsClean(
      quantizeCheckpoint({
        modelDir: src,
        outDir: join(dir, "out"),
        maxShardSize: 5_000,
        onProgress: () => {
          if (!truncated) {
            truncated = true;
            // Synchronous, so the next read already sees the short file.
            truncateSync(join(src, shards.at(-1)!), 100);
          }
        },
      }),
      InvalidArgument,
      /unexpected end of file/,
      dir,
      before,
    );
    await rm(src, { recursive: true, force: true });
    await writeSyntheticCheckpoint(src, TINY_CONFIGS.llama, { seed: 9, maxShardSize: 20_000 });

    const ac = new AbortController();
    let seen = 0;
    await failsClean(
      quantizeCheckpoint({ modelDir: src, outDir: join(dir, "out"), maxShardSize: 5_000, signal: ac.signal, onProgress: () => ++seen === 3 && ac.abort(new Error("user")) }),
      Cancelled,
      /cancelled: user/,
      dir,
      before,
    );
    assert.equal(seen, 3);
    const pre = new AbortController();
    pre.abort();
    await failsClean(quantizeCheckpoint({ modelDir: src, outDir: join(dir, "out"), signal: pre.signal }), Cancelled, null, dir, before);
  });
});

test("writeQuantizedCheckpoint into an artifact-store staging directory", async () => {
  await withTmp(async (dir) => {
    const store = new LocalStore(join(dir, "data"));
    const w = await store.beginWrite("models", "stories-nf4");
    const r = await writeQuantizedCheckpoint({ modelDir: STORIES, stagingDir: w.dir, sourceModel: "stories260K" });
    assert.equal(r.tensorsQuantized, 35);
    assert.deepEqual(await store.list("models"), []);
    const m = await w.commit();
    assert.equal(m.meta.source_model, "stories260K");
    assert.deepEqual(await store.list("models"), ["stories-nf4"]);
    assert.equal((await store.verify("models", "stories-nf4")).ok, true);
    const w2 = await store.beginWrite("models", "x");
    await writeFile(join(w2.dir, "junk"), "1");
    await assert.rejects(writeQuantizedCheckpoint({ modelDir: STORIES, stagingDir: w2.dir }), FailedPrecondition);
    await w2.abort();
    await assert.rejects(writeQuantizedCheckpoint({ modelDir: STORIES, stagingDir: join(dir, "nope") }), NotFound);
  });
});
