import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type * as grpc from "@grpc/grpc-js";
import { health, QuantizeRequestSchema, QuantizerService, type ComputeDtype, type QuantizeResponse } from "@qlora/proto";
import {
  CANCELLABLE_LLAMA_CONFIG,
  collect,
  grpcJsClient,
  stagingEntries,
  startHarness,
  STORIES,
  uploadStream,
  writeFastCheckpoint,
  type Harness,
} from "./service-helpers.js";

function rejectsWith(code: Code, pattern?: RegExp, notContaining?: string) {
  return (e: unknown) => {
    assert.ok(e instanceof ConnectError, `expected a ConnectError, got ${String(e)}`);
    assert.equal(Code[e.code], Code[code], e.rawMessage);
    if (pattern) assert.match(e.rawMessage, pattern);
    if (notContaining) assert.ok(!e.rawMessage.includes(notContaining), `message leaks ${notContaining}: ${e.rawMessage}`);
    return true;
  };
}

describe("QuantizerService errors", () => {
  let h: Harness;
  before(async () => {
    h = await startHarness();
    await h.client.uploadModel(uploadStream("stories", STORIES));
  });
  after(async () => {
    await h.close();
  });

  test("INVALID_ARGUMENT: names, blocksize, compute dtype, skip modules", async () => {
    const q = (init: Parameters<typeof h.client.quantize>[0]) => collect(h.client.quantize(init));
    await assert.rejects(q({}), rejectsWith(Code.InvalidArgument, /source_model is required/));
    await assert.rejects(q({ sourceModel: "../etc" }), rejectsWith(Code.InvalidArgument, /source_model/));
    await assert.rejects(q({ sourceModel: "/abs" }), rejectsWith(Code.InvalidArgument));
    await assert.rejects(q({ sourceModel: "stories", outputModel: "a/b" }), rejectsWith(Code.InvalidArgument, /output_model/));
    await assert.rejects(q({ sourceModel: "stories", outputModel: "stories" }), rejectsWith(Code.InvalidArgument, /must differ/));
    for (const blocksize of [16, 48, 100, 8192]) {
      await assert.rejects(q({ sourceModel: "stories", blocksize }), rejectsWith(Code.InvalidArgument, /power of two in 32\.\.4096/));
    }
    await assert.rejects(q({ sourceModel: "stories", computeDtype: 99 as ComputeDtype }), rejectsWith(Code.InvalidArgument, /compute_dtype/));
    await assert.rejects(q({ sourceModel: "stories", skipModules: ["../x"] }), rejectsWith(Code.InvalidArgument, /skip_modules/));
    await assert.rejects(h.client.getModel({ name: "" }), rejectsWith(Code.InvalidArgument));
    await assert.rejects(h.client.getModel({ name: "a/../b" }), rejectsWith(Code.InvalidArgument));
    await assert.rejects(h.client.deleteModel({ name: ".." }), rejectsWith(Code.InvalidArgument));
    assert.deepEqual(await h.store.list("models"), ["stories"], "nothing was created");
  });

  test("NOT_FOUND: unknown models", async () => {
    await assert.rejects(collect(h.client.quantize({ sourceModel: "nope" })), rejectsWith(Code.NotFound, /model "nope" not found/));
    await assert.rejects(h.client.getModel({ name: "nope" }), rejectsWith(Code.NotFound));
    await assert.rejects(h.client.deleteModel({ name: "nope" }), rejectsWith(Code.NotFound));
  });

  test("ALREADY_EXISTS: output taken without overwrite, upload over an existing model", async () => {
    await collect(h.client.quantize({ sourceModel: "stories", outputModel: "taken" }));
    await assert.rejects(
      collect(h.client.quantize({ sourceModel: "stories", outputModel: "taken" })),
      rejectsWith(Code.AlreadyExists, /model "taken" already exists/),
    );
    await assert.rejects(h.client.uploadModel(uploadStream("stories", STORIES)), rejectsWith(Code.AlreadyExists));
    assert.deepEqual(await stagingEntries(h.dataDir), []);
  });

  test("FAILED_PRECONDITION: quantizing an already quantized model", async () => {
    await assert.rejects(
      collect(h.client.quantize({ sourceModel: "taken", outputModel: "twice" })),
      rejectsWith(Code.FailedPrecondition, /already quantized/, h.dataDir),
    );
    assert.equal(await h.store.exists("models", "twice"), false);
    assert.deepEqual(await stagingEntries(h.dataDir), []);
  });

  test("a source that is not a valid checkpoint: a clear reason, no host paths, nothing written", async () => {
    // Placed in the store directly (as by hand): config.json, but a truncated safetensors file.
    const w = await h.store.beginWrite("models", "broken");
    await w.writeFile("config.json", await readFile(path.join(STORIES, "config.json")));
    await w.writeFile("model.safetensors", (await readFile(path.join(STORIES, "model.safetensors"))).subarray(0, 4000));
    await w.commit();
    await assert.rejects(collect(h.client.quantize({ sourceModel: "broken" })), (e: unknown) => {
      assert.ok(e instanceof ConnectError);
      assert.ok(e.code === Code.InvalidArgument || e.code === Code.FailedPrecondition, Code[e.code]);
      assert.match(e.rawMessage, /safetensors|header|truncated|past the end|offset/i);
      assert.ok(!e.rawMessage.includes(h.dataDir), e.rawMessage);
      return true;
    });
    assert.equal(await h.store.exists("models", "broken-nf4"), false);
    await assert.rejects(h.client.getModel({ name: "broken" }), rejectsWith(Code.FailedPrecondition, /not a readable checkpoint/, h.dataDir));
    // Still listed (so that it can be found and deleted), without the checkpoint details.
    const listed = (await h.client.listModels({})).models.find((m) => m.name === "broken");
    assert.ok(listed && listed.architecture === "" && listed.files.length === 2);
    await h.client.deleteModel({ name: "broken" });
  });

  test("UploadModel rejects paths, hash mismatches and non-checkpoints, leaving nothing", async () => {
    const up = (msgs: ReturnType<typeof one>) => h.client.uploadModel(msgs);
    async function* one(name: string, p: string, data: string, sha256 = "") {
      yield { name, chunk: { path: p, data: Buffer.from(data), last: true, sha256 } };
    }
    await assert.rejects(up(one("", "config.json", "{}")), rejectsWith(Code.InvalidArgument, /must set name/));
    await assert.rejects(up(one("m", "../config.json", "{}")), rejectsWith(Code.InvalidArgument, /invalid file path/));
    await assert.rejects(up(one("m", "/etc/passwd", "{}")), rejectsWith(Code.InvalidArgument));
    await assert.rejects(up(one("m", "manifest.json", "{}")), rejectsWith(Code.InvalidArgument, /written by the store/));
    await assert.rejects(up(one("m", "config.json", "{}", "0".repeat(64))), rejectsWith(Code.InvalidArgument, /sha256 mismatch/));
    await assert.rejects(
      h.client.uploadModel(uploadStream("readme-only", STORIES, { only: ["README.md"] })),
      rejectsWith(Code.InvalidArgument, /not a usable Hugging Face checkpoint/, h.dataDir),
    );
    await assert.rejects(up(one("bad name!", "config.json", "{}")), rejectsWith(Code.InvalidArgument));
    assert.deepEqual(await h.store.list("models"), ["stories", "taken"]);
    assert.deepEqual(await stagingEntries(h.dataDir), []);
  });

  test("CANCELLED: a client cancel stops the worker and leaves no output (grpc-js and connect)", async () => {
    // Big enough that quantizing takes far longer than a cancel takes to arrive.
    const w = await h.store.beginWrite("models", "big");
    await writeFastCheckpoint(w.dir, CANCELLABLE_LLAMA_CONFIG);
    await w.commit();

    const client = grpcJsClient(QuantizerService, h.server.address);
    try {
      const call = client.Quantize!(create(QuantizeRequestSchema, { sourceModel: "big" })) as grpc.ClientReadableStream<QuantizeResponse>;
      const ended = new Promise<grpc.ServiceError>((resolve) => call.on("error", resolve));
      await new Promise<void>((resolve) => call.once("data", () => resolve()));
      call.cancel();
      assert.equal((await ended).code, 1 /* CANCELLED */);
    } finally {
      client.close();
    }
    // The handler discards the staging directory only after the worker is gone.
    await waitFor(async () => (await stagingEntries(h.dataDir)).length === 0);
    assert.equal(await h.store.exists("models", "big-nf4"), false);

    const ctrl = new AbortController();
    const it = h.client.quantize({ sourceModel: "big" }, { signal: ctrl.signal })[Symbol.asyncIterator]();
    assert.equal((await it.next()).value?.event.case, "progress");
    ctrl.abort();
    await assert.rejects(it.next(), rejectsWith(Code.Canceled));
    await waitFor(async () => (await stagingEntries(h.dataDir)).length === 0);
    assert.equal(await h.store.exists("models", "big-nf4"), false);

    // The slot and the output name were released: the same request now completes. Meanwhile the
    // server's event loop stays free (the work is in a worker thread): a health check is answered
    // before the quantization ends.
    const events: QuantizeResponse[] = [];
    let resultAt = 0;
    const quantizing = (async () => {
      for await (const e of h.client.quantize({ sourceModel: "big" })) {
        events.push(e);
        if (e.event.case === "result") resultAt = performance.now();
      }
    })();
    await waitFor(async () => events.length > 0);
    const healthClient = createClient(health.Health, createGrpcTransport({ baseUrl: h.server.url }));
    assert.equal((await healthClient.check({ service: "qlora.v1.QuantizerService" })).status, health.HealthCheckResponse_ServingStatus.SERVING);
    const checkedAt = performance.now();
    await quantizing;
    assert.ok(resultAt > checkedAt, "the health check was answered while the quantization ran");
    assert.equal(events.at(-1)?.event.case, "result");
    assert.equal(await h.store.exists("models", "big-nf4"), true);
  });
});

describe("QuantizerService limits", () => {
  test("RESOURCE_EXHAUSTED: an upload over the size limit is refused and discarded", async () => {
    const h = await startHarness({ maxUploadBytes: 50_000 });
    try {
      await assert.rejects(h.client.uploadModel(uploadStream("stories", STORIES)), rejectsWith(Code.ResourceExhausted, /larger than/));
      assert.deepEqual(await h.store.list("models"), []);
      assert.deepEqual(await stagingEntries(h.dataDir), []);
    } finally {
      await h.close();
    }
  });
});

async function waitFor(cond: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 20));
  }
}
