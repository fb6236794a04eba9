/**
 * KServe Open Inference Protocol on the inference port: gRPC inference.GRPCInferenceService
 * (connect's gRPC transport and @grpc/grpc-js) and the REST health/readiness routes, with one
 * model name per base and per adapter.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { kserve } from "@qlora/proto";
import { grpcServiceDefinition } from "@qlora/rpc";
import { MODEL, TestStore, skipNoStories, startInference, type Running } from "./fixture.js";

let ts: TestStore;
let svc: Running;
let oip: Client<typeof kserve.GRPCInferenceService>;

before(async () => {
  if (skipNoStories) return;
  ts = await TestStore.create();
  await ts.addAdapter("ad1", { seed: 11 });
  await ts.addAdapter("foreign", { seed: 12, base: "some-other-model" });
  svc = await startInference(ts);
  oip = createClient(kserve.GRPCInferenceService, createGrpcTransport({ baseUrl: svc.server.url }));
});

after(async () => {
  if (skipNoStories) return;
  await svc.close();
  await ts.dispose();
});

async function get(path: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const r = await fetch(`${svc.server.url}${path}`);
  return { status: r.status, body: (await r.json()) as Record<string, unknown> };
}

test("liveness and readiness (gRPC and REST) follow the server's health", { skip: skipNoStories }, async () => {
  assert.deepEqual(await get("/v2/health/live"), { status: 200, body: { live: true } });
  assert.deepEqual(await get("/v2/health/ready"), { status: 200, body: { ready: true } });
  assert.equal((await oip.serverLive({})).live, true);
  assert.equal((await oip.serverReady({})).ready, true);
  // A base model loading (the service NOT_SERVING) makes the server not ready, but still live.
  svc.server.health.set("qlora.v1.InferenceService", "NOT_SERVING");
  try {
    assert.deepEqual(await get("/v2/health/ready"), { status: 503, body: { ready: false } });
    assert.equal((await oip.serverReady({})).ready, false);
    assert.equal((await oip.serverLive({})).live, true);
  } finally {
    svc.server.health.set("qlora.v1.InferenceService", "SERVING");
  }
  assert.equal((await oip.serverReady({})).ready, true);
});

test("ModelReady per base and per BASE:ADAPTER; unknown names are NOT_FOUND", { skip: skipNoStories }, async () => {
  // Nothing is loaded yet: the base exists but is not resident.
  assert.equal((await oip.modelReady({ name: MODEL })).ready, false);
  assert.deepEqual(await get(`/v2/models/${MODEL}/ready`), { status: 503, body: { name: MODEL, ready: false } });
  await svc.client.generate({ model: MODEL, prompt: "Hi", maxNewTokens: 2 });
  assert.equal((await oip.modelReady({ name: MODEL })).ready, true);
  assert.equal((await oip.modelReady({ name: `${MODEL}:ad1` })).ready, true);
  assert.deepEqual(await get(`/v2/models/${MODEL}:ad1/ready`), { status: 200, body: { name: `${MODEL}:ad1`, ready: true } });
  assert.deepEqual(await get(`/v2/models/${encodeURIComponent(`${MODEL}:ad1`)}/versions/1/ready`), { status: 200, body: { name: `${MODEL}:ad1`, ready: true } });
  // An adapter trained on another base is not servable on this one.
  assert.equal((await oip.modelReady({ name: `${MODEL}:foreign` })).ready, false);
  for (const name of ["nope", `${MODEL}:nope`]) {
    await assert.rejects(oip.modelReady({ name }), (e: unknown) => e instanceof ConnectError && e.code === Code.NotFound);
    assert.equal((await get(`/v2/models/${name}/ready`)).status, 404);
  }
  await assert.rejects(oip.modelReady({ name: "" }), (e: unknown) => e instanceof ConnectError && e.code === Code.InvalidArgument);
});

test("metadata, and ModelInfer on a BYTES text tensor", { skip: skipNoStories }, async () => {
  const meta = await oip.serverMetadata({});
  assert.equal(meta.name, "qlora");
  assert.match(meta.version, /^\d+\.\d+\.\d+/);
  assert.deepEqual((await get("/v2")).body, { name: "qlora", version: meta.version, extensions: [] });
  const mm = await oip.modelMetadata({ name: `${MODEL}:ad1` });
  assert.equal(mm.name, `${MODEL}:ad1`);
  assert.deepEqual(mm.inputs.map((t) => [t.name, t.datatype]), [["text_input", "BYTES"]]);
  assert.deepEqual(mm.outputs.map((t) => [t.name, t.datatype]), [["text_output", "BYTES"]]);
  assert.equal((await get(`/v2/models/${MODEL}`)).body.platform, "qlora");

  const want = await svc.client.generate({ model: MODEL, adapter: "ad1", prompt: "Once upon a time", maxNewTokens: 12 });
  const res = await oip.modelInfer({
    modelName: `${MODEL}:ad1`,
    id: "req-1",
    parameters: { max_tokens: { parameterChoice: { case: "int64Param", value: 12n } } },
    inputs: [{ name: "text_input", datatype: "BYTES", shape: [1n], contents: { bytesContents: [new TextEncoder().encode("Once upon a time")] } }],
  });
  assert.equal(res.id, "req-1");
  const out = res.outputs.find((o) => o.name === "text_output");
  assert.equal(new TextDecoder().decode(out!.contents!.bytesContents[0]), want.text);
  assert.equal(res.parameters.completion_tokens?.parameterChoice.value, 12n);
  // Triton's raw BYTES form: a 4-byte little-endian length, then the bytes.
  const text = new TextEncoder().encode("Once upon a time");
  const raw = new Uint8Array(4 + text.length);
  new DataView(raw.buffer).setUint32(0, text.length, true);
  raw.set(text, 4);
  const res2 = await oip.modelInfer({
    modelName: `${MODEL}:ad1`,
    parameters: { max_tokens: { parameterChoice: { case: "int64Param", value: 12n } } },
    inputs: [{ name: "text_input", datatype: "BYTES", shape: [1n] }],
    rawInputContents: [raw],
  });
  assert.equal(new TextDecoder().decode(res2.outputs[0]!.contents!.bytesContents[0]), want.text);
  await assert.rejects(
    oip.modelInfer({ modelName: MODEL, inputs: [{ name: "x", datatype: "FP32", shape: [1n] }] }),
    (e: unknown) => e instanceof ConnectError && e.code === Code.InvalidArgument,
  );
});

test("a plain @grpc/grpc-js client sees the same service (what KServe/Triton tooling uses)", { skip: skipNoStories }, async () => {
  const Ctor = grpc.makeGenericClientConstructor(grpcServiceDefinition(kserve.GRPCInferenceService) as grpc.ServiceDefinition, "GRPCInferenceService");
  const c = new Ctor(svc.server.address, grpc.credentials.createInsecure()) as unknown as Record<string, (req: unknown, cb: (e: grpc.ServiceError | null, r: unknown) => void) => void> & grpc.Client;
  try {
    const call = <T>(m: string, req: unknown) => new Promise<T>((resolve, reject) => c[m]!(req, (e, r) => (e ? reject(e) : resolve(r as T))));
    assert.equal((await call<kserve.ServerLiveResponse>("ServerLive", create(kserve.ServerLiveRequestSchema))).live, true);
    assert.equal((await call<kserve.ModelReadyResponse>("ModelReady", create(kserve.ModelReadyRequestSchema, { name: `${MODEL}:ad1` }))).ready, true);
    await assert.rejects(call("ModelReady", create(kserve.ModelReadyRequestSchema, { name: "nope" })), (e: grpc.ServiceError) => e.code === grpc.status.NOT_FOUND);
  } finally {
    c.close();
  }
});
