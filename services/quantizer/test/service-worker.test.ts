import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readdir, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { QloraError } from "@qlora/core";
import { runQuantizeWorker } from "../src/index.js";
import { STORIES } from "./service-helpers.js";

const staging = () => mkdtemp(path.join(tmpdir(), "qlora-worker-"));

function hasCode(code: string, pattern?: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof QloraError, `expected a QloraError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (pattern) assert.match(e.message, pattern);
    return true;
  };
}

test("runs in a worker thread, reports progress, returns the result", async () => {
  const dir = await staging();
  const seen: number[] = [];
  const r = await runQuantizeWorker(
    { mode: "staging", stagingDir: dir, settings: { modelDir: STORIES, blocksize: 128 } },
    { onProgress: (p) => seen.push(p.tensorsDone) },
  );
  assert.equal(r.quantization.blocksize, 128);
  assert.equal(seen.length, r.tensorsQuantized + r.tensorsCopied);
  assert.deepEqual(seen, seen.map((_, i) => i + 1));
  assert.ok((await readdir(dir)).includes("model.safetensors"));
});

test("aborting stops it: CANCELLED, and no progress after the promise settled", async () => {
  const ctrl = new AbortController();
  let after = 0;
  let settled = false;
  const run = runQuantizeWorker(
    { mode: "staging", stagingDir: await staging(), settings: { modelDir: STORIES } },
    {
      signal: ctrl.signal,
      onProgress: () => {
        if (settled) after++;
        ctrl.abort();
      },
    },
  );
  await assert.rejects(run, hasCode("CANCELLED"));
  settled = true;
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(after, 0);
  const pre = new AbortController();
  pre.abort();
  await assert.rejects(
    runQuantizeWorker({ mode: "staging", stagingDir: await staging(), settings: { modelDir: STORIES } }, { signal: pre.signal }),
    hasCode("CANCELLED"),
  );
});

test("errors cross the thread boundary with their codes", async () => {
  const missing = path.join(await staging(), "none");
  await assert.rejects(
    runQuantizeWorker({ mode: "staging", stagingDir: await staging(), settings: { modelDir: missing } }),
    hasCode("NOT_FOUND", /no such model directory/),
  );
  await assert.rejects(
    runQuantizeWorker({ mode: "staging", stagingDir: await staging(), settings: { modelDir: STORIES, blocksize: 48 } }),
    hasCode("INVALID_ARGUMENT", /power of two/),
  );
  const busy = await staging();
  await writeFile(path.join(busy, "x"), "");
  await assert.rejects(
    runQuantizeWorker({ mode: "staging", stagingDir: busy, settings: { modelDir: STORIES } }),
    hasCode("FAILED_PRECONDITION", /not empty/),
  );
});
