import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import path from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import type * as grpc from "@grpc/grpc-js";
import {
  ComputeDtype,
  QuantizeRequestSchema,
  QuantizerService,
  type ListModelsResponse,
  type Model,
  type QuantizeResponse,
} from "@qlora/proto";
import {
  collect,
  grpcJsClient,
  grpcServerStream,
  grpcUnary,
  stagingEntries,
  startHarness,
  STORIES,
  uploadStream,
  type Harness,
} from "./service-helpers.js";

describe("QuantizerService over gRPC", () => {
  let h: Harness;
  before(async () => {
    h = await startHarness();
  });
  after(async () => {
    await h.close();
  });

  test("UploadModel stores stories260K with checked hashes", async () => {
    const res = await h.client.uploadModel(uploadStream("stories", STORIES, { chunkSize: 100_000 }));
    const m = res.model!;
    assert.equal(m.name, "stories");
    assert.equal(m.architecture, "LlamaForCausalLM");
    assert.equal(m.modelType, "llama");
    assert.equal(m.quantized, false);
    assert.equal(m.quantization, undefined);
    assert.ok(m.parameters > 200_000n && m.parameters < 400_000n, `parameters ${m.parameters}`);
    const weights = await readFile(path.join(STORIES, "model.safetensors"));
    const file = m.files.find((f) => f.path === "model.safetensors");
    assert.equal(file?.sizeBytes, BigInt(weights.length));
    assert.equal(file?.sha256, createHash("sha256").update(weights).digest("hex"));
    assert.ok(m.files.some((f) => f.path === "tokenizer.json"));
    assert.ok(m.createdAt && Math.abs(timestampDate(m.createdAt).getTime() - Date.now()) < 60_000);
    // In the store, complete, with its manifest, and no staging leftovers.
    assert.deepEqual(await h.store.list("models"), ["stories"]);
    assert.ok((await h.store.verify("models", "stories")).ok);
    assert.deepEqual(await stagingEntries(h.dataDir), []);
  });

  test("Quantize streams progress for every tensor, then the model (connect client)", async () => {
    const events = await collect(h.client.quantize({ sourceModel: "stories" }));
    const progress = events.slice(0, -1).map((e) => {
      assert.equal(e.event.case, "progress");
      return e.event.value as Extract<QuantizeResponse["event"], { case: "progress" }>["value"];
    });
    const total = progress[0]!.tensorsTotal;
    assert.ok(total > 10);
    assert.equal(progress.length, total);
    progress.forEach((p, i) => {
      assert.equal(p.tensorsDone, i + 1);
      assert.equal(p.tensorsTotal, total);
      assert.ok(p.tensor.length > 0);
    });
    const last = progress.at(-1)!;
    assert.equal(last.bytesDone, last.bytesTotal);
    assert.ok(progress.some((p) => p.quantized) && progress.some((p) => !p.quantized));
    assert.ok(progress.some((p) => p.quantized && p.tensor.endsWith("self_attn.q_proj.weight")));

    const result = events.at(-1)!.event;
    assert.equal(result.case, "result");
    const m = result.value as Model;
    assert.equal(m.name, "stories-nf4");
    assert.equal(m.quantized, true);
    assert.equal(m.sourceModel, "stories");
    assert.equal(m.quantization?.quantType, "nf4");
    assert.equal(m.quantization?.blocksize, 64);
    assert.equal(m.quantization?.doubleQuant, true);
    assert.equal(m.quantization?.computeDtype, ComputeDtype.BFLOAT16);
    assert.ok(m.sizeBytes < (await stat(path.join(STORIES, "model.safetensors"))).size);

    const dir = await h.store.localPath("models", "stories-nf4");
    const config = JSON.parse(await readFile(path.join(dir, "config.json"), "utf8")) as { quantization_config: Record<string, unknown> };
    assert.equal(config.quantization_config.bnb_4bit_quant_type, "nf4");
    assert.equal(config.quantization_config.load_in_4bit, true);
    assert.ok((await h.store.verify("models", "stories-nf4")).ok);
    assert.deepEqual(await stagingEntries(h.dataDir), []);
  });

  test("Quantize from a plain @grpc/grpc-js client, with non-default settings", async () => {
    const client = grpcJsClient(QuantizerService, h.server.address);
    try {
      const events = await grpcServerStream<QuantizeResponse>(
        client,
        "Quantize",
        create(QuantizeRequestSchema, {
          sourceModel: "stories",
          outputModel: "stories-bs128",
          blocksize: 128,
          noDoubleQuant: true,
          computeDtype: ComputeDtype.FLOAT16,
          skipModules: ["o_proj"],
        }),
      );
      assert.ok(events.length > 2);
      assert.ok(events.slice(0, -1).every((e) => e.event.case === "progress"));
      const skipped = events.filter((e) => e.event.case === "progress" && e.event.value.tensor.endsWith("o_proj.weight"));
      assert.ok(skipped.length > 0 && skipped.every((e) => e.event.case === "progress" && !e.event.value.quantized));
      const result = events.at(-1)!.event;
      assert.equal(result.case, "result");
      const q = (result.value as Model).quantization!;
      assert.deepEqual(
        { blocksize: q.blocksize, doubleQuant: q.doubleQuant, computeDtype: q.computeDtype, skip: q.skipModules },
        { blocksize: 128, doubleQuant: false, computeDtype: ComputeDtype.FLOAT16, skip: ["lm_head", "o_proj"] },
      );

      const got = await grpcUnary<{ model: Model }>(client, "GetModel", create(QuantizerService.method.getModel.input, { name: "stories-bs128" }));
      assert.equal(got.model.quantization?.blocksize, 128);
      await assert.rejects(
        grpcUnary(client, "GetModel", create(QuantizerService.method.getModel.input, { name: "missing" })),
        (e: grpc.ServiceError) => e.code === 5 && /model "missing" not found/.test(e.details),
      );
    } finally {
      client.close();
    }
  });

  test("GetModel, ListModels, DeleteModel", async () => {
    const got = await h.client.getModel({ name: "stories-nf4" });
    assert.equal(got.model?.quantized, true);
    assert.ok(got.model!.files.some((f) => f.path === "model.safetensors" && f.sha256.length === 64));

    const list: ListModelsResponse = await h.client.listModels({});
    assert.deepEqual(list.models.map((m) => m.name), ["stories", "stories-bs128", "stories-nf4"]);
    assert.deepEqual(list.models.map((m) => m.quantized), [false, true, true]);

    await h.client.deleteModel({ name: "stories-bs128" });
    await assert.rejects(h.client.getModel({ name: "stories-bs128" }), (e: ConnectError) => e.code === Code.NotFound);
    await assert.rejects(h.client.deleteModel({ name: "stories-bs128" }), (e: ConnectError) => e.code === Code.NotFound);
    assert.deepEqual((await h.client.listModels({})).models.map((m) => m.name), ["stories", "stories-nf4"]);
  });

  test("overwrite replaces an existing output", async () => {
    const before = (await h.client.getModel({ name: "stories-nf4" })).model!;
    const events = await collect(h.client.quantize({ sourceModel: "stories", blocksize: 256, overwrite: true }));
    const m = events.at(-1)!.event.value as Model;
    assert.equal(m.quantization?.blocksize, 256);
    assert.notDeepEqual(m.files.find((f) => f.path === "model.safetensors")?.sha256, before.files.find((f) => f.path === "model.safetensors")?.sha256);
  });
});
