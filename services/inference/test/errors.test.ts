/**
 * Bad requests get clear status codes; backpressure, cancellation and deadlines stop work in the
 * engine; health is NOT_SERVING while the base model loads.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, readFile, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { startServer } from "@qlora/rpc";
import { GenerateRequestSchema, InferenceService, type GenerateStreamResponse } from "@qlora/proto";
import { inferenceService } from "../src/index.js";
import { MODEL, STORIES_SHAPES, TestStore, grpcClient, skipNoStories, startInference, waitFor, type Running } from "./fixture.js";

let ts: TestStore;
let svc: Running;

before(async () => {
  if (skipNoStories) return;
  ts = await TestStore.create();
  await ts.addAdapter("good", { seed: 1 });
  // Shapes of a wider model (hidden 128): the module names exist, the shapes do not fit.
  const wide = Object.fromEntries(Object.entries(STORIES_SHAPES).map(([k, [o, i]]) => [k, [o * 2, i * 2] as [number, number]]));
  await ts.addAdapter("wide", { seed: 2, shapes: wide });
  // Right shapes, but adapter_config.json says it was trained on another model.
  await ts.addAdapter("other-base", { seed: 3, base: "facebook/opt-125m" });
  // An OPT adapter (fc1/fc2) on a Llama base.
  await ts.addAdapter("opt-modules", { seed: 4, family: "opt", targets: ["fc1"], shapes: { fc1: [172, 64] }, base: null });
  // Corrupt files placed in the store by hand.
  const adir = join(ts.root, "adapters");
  const goodDir = await ts.adapterDir("good");
  await mkdir(join(adir, "truncated"));
  await writeFile(join(adir, "truncated", "adapter_config.json"), await readFile(join(goodDir, "adapter_config.json")));
  await writeFile(join(adir, "truncated", "adapter_model.safetensors"), await readFile(join(goodDir, "adapter_model.safetensors")));
  await truncate(join(adir, "truncated", "adapter_model.safetensors"), 1000);
  await mkdir(join(adir, "bad-json"));
  await writeFile(join(adir, "bad-json", "adapter_config.json"), "{ not json");
  await writeFile(join(adir, "bad-json", "adapter_model.safetensors"), await readFile(join(goodDir, "adapter_model.safetensors")));
  await mkdir(join(adir, "no-config"));
  await writeFile(join(adir, "no-config", "adapter_model.safetensors"), await readFile(join(goodDir, "adapter_model.safetensors")));
  svc = await startInference(ts, { maxBatch: 4 });
});

after(async () => {
  if (skipNoStories) return;
  await svc.close();
  await ts.dispose();
});

async function codeOf(p: Promise<unknown>): Promise<Code | "ok"> {
  try {
    await p;
    return "ok";
  } catch (e) {
    return ConnectError.from(e).code;
  }
}

const gen = (over: Record<string, unknown> = {}) => svc.client.generate({ model: MODEL, prompt: "Once upon a time", maxNewTokens: 8, ...over });

test("unknown model / adapter → NOT_FOUND", { skip: skipNoStories }, async () => {
  assert.equal(await codeOf(gen({ model: "nope" })), Code.NotFound);
  assert.equal(await codeOf(gen({ adapter: "nope" })), Code.NotFound);
  assert.equal(await codeOf(svc.client.score({ model: "nope", texts: ["a b c"] })), Code.NotFound);
  assert.equal(await codeOf(svc.client.loadModel({ name: "nope" })), Code.NotFound);
  assert.equal(await codeOf(svc.client.loadAdapter({ name: "nope" })), Code.NotFound);
  assert.equal(await codeOf(svc.client.unloadAdapter({ name: "good" })), Code.NotFound, "not loaded");
  assert.equal(await codeOf(gen({ model: "../etc" })), Code.InvalidArgument, "not a valid store name");
});

test("bad requests → INVALID_ARGUMENT", { skip: skipNoStories }, async () => {
  assert.equal(await codeOf(gen({ prompt: "" })), Code.InvalidArgument, "empty prompt");
  assert.equal(await codeOf(gen({ messages: [{ role: "user", content: "hi" }] })), Code.InvalidArgument, "prompt and messages");
  assert.equal(
    await codeOf(gen({ prompt: "", messages: [{ role: "user", content: "hi" }] })),
    Code.InvalidArgument,
    "stories260K has no chat template",
  );
  // 5 prompt tokens + 508 > the 512-token context; 507 would fit.
  assert.equal(await codeOf(gen({ maxNewTokens: 508 })), Code.InvalidArgument, "max_new_tokens beyond context");
  assert.equal(await codeOf(gen({ maxNewTokens: 4_000_000_000 })), Code.InvalidArgument, "huge max_new_tokens");
  assert.equal(await codeOf(gen({ prompt: "x ".repeat(600) })), Code.InvalidArgument, "prompt longer than the context");
  assert.equal(await codeOf(gen({ sampling: { temperature: -1 } })), Code.InvalidArgument);
  assert.equal(await codeOf(gen({ sampling: { topP: 1.5 } })), Code.InvalidArgument);
  assert.equal(await codeOf(gen({ stop: [""] })), Code.InvalidArgument);
  assert.equal(await codeOf(svc.client.score({ model: MODEL, texts: [] })), Code.InvalidArgument);
  assert.equal(await codeOf(svc.client.loadAdapter({ name: "" })), Code.InvalidArgument);
  // max_new_tokens 0 is "unset": the default (64) applies.
  const d = await gen({ maxNewTokens: 0 });
  assert.equal(d.usage!.completionTokens, 64);
});

test("a negative max_new_tokens sent as Connect JSON → INVALID_ARGUMENT", { skip: skipNoStories }, async () => {
  const res = await fetch(`${svc.server.url}/${InferenceService.typeName}/Generate`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: MODEL, prompt: "Once upon a time", maxNewTokens: -1 }),
  });
  assert.equal(res.status, 400);
  assert.equal(((await res.json()) as { code: string }).code, "invalid_argument");
});

test("adapters for another base or with corrupt files get clear codes; the service keeps serving", { skip: skipNoStories }, async () => {
  assert.equal(await codeOf(gen({ adapter: "wide" })), Code.InvalidArgument, "shapes do not fit");
  assert.equal(await codeOf(svc.client.loadAdapter({ name: "wide" })), Code.InvalidArgument);
  assert.equal(await codeOf(gen({ adapter: "opt-modules" })), Code.InvalidArgument, "modules of another architecture");
  assert.equal(await codeOf(gen({ adapter: "other-base" })), Code.FailedPrecondition, "config names another base");
  assert.equal(await codeOf(svc.client.loadAdapter({ name: "other-base", model: MODEL })), Code.FailedPrecondition);
  assert.equal(await codeOf(svc.client.loadAdapter({ name: "other-base" })), Code.FailedPrecondition, "its base is not in the store");
  assert.equal(await codeOf(gen({ adapter: "truncated" })), Code.InvalidArgument, "truncated safetensors");
  assert.equal(await codeOf(gen({ adapter: "bad-json" })), Code.InvalidArgument, "adapter_config.json is not JSON");
  assert.equal(await codeOf(gen({ adapter: "no-config" })), Code.InvalidArgument, "adapter_config.json missing");
  const err = await gen({ adapter: "wide" }).catch((e: unknown) => ConnectError.from(e));
  assert.match((err as ConnectError).rawMessage, /do(es)? not fit/);
  const ok = await gen({ adapter: "good" });
  assert.equal(ok.usage!.completionTokens, 8);
  const listed = (await svc.client.listAdapters({})).adapters;
  assert.deepEqual(listed.filter((a) => a.resident).map((a) => a.name), ["good"]);
});

test("a full queue → RESOURCE_EXHAUSTED; accepted requests still complete", { skip: skipNoStories }, async () => {
  const small = await startInference(ts, { maxBatch: 2, maxQueue: 1 });
  try {
    await small.client.loadModel({ name: MODEL });
    const results = await Promise.all(
      Array.from({ length: 6 }, () => codeOf(small.client.generate({ model: MODEL, prompt: "Once upon a time", maxNewTokens: 400 }))),
    );
    const rejected = results.filter((c) => c === Code.ResourceExhausted).length;
    const ok = results.filter((c) => c === "ok").length;
    assert.ok(rejected >= 1, `some refused: ${results}`);
    assert.ok(ok >= 3, `capacity (2 running + 1 queued) served: ${results}`);
    assert.equal(ok + rejected, 6, `${results}`);
    // Capacity is free again afterwards.
    assert.equal(await codeOf(small.client.generate({ model: MODEL, prompt: "Once", maxNewTokens: 4 })), "ok");
  } finally {
    await small.close();
  }
});

async function stats(r: Running) {
  return (await r.reg.engine.call({ op: "stats" })).stats;
}

test("client cancellation stops the sequence in the engine (Connect and grpc-js)", { skip: skipNoStories }, async () => {
  // On a loaded machine the worker can finish all 500 tokens before the starved main thread has
  // relayed the first message and the abort: such an attempt proves nothing either way, so it is
  // retried (a broken cancel path never counts a cancellation, and fails after the attempts).
  let before = await stats(svc);
  for (let attempt = 1; ; attempt++) {
    before = await stats(svc);
    const ac = new AbortController();
    let got = 0;
    const stream = svc.client.generateStream({ model: MODEL, prompt: "Once upon a time", maxNewTokens: 500 }, { signal: ac.signal });
    await assert.rejects(
      (async () => {
        for await (const _ of stream) if (++got === 1) ac.abort();
      })(),
      (e: unknown) => ConnectError.from(e).code === Code.Canceled,
    );
    await waitFor(async () => {
      const s = await stats(svc);
      return s.cancelled === before.cancelled + 1 || s.running + s.waiting === 0;
    }, 15000, "the sequence to leave the engine");
    const s = await stats(svc);
    if (s.cancelled === before.cancelled + 1) break;
    assert.ok(attempt < 3, "the cancellation never reached the worker in 3 attempts");
    assert.equal(s.tokensGenerated - before.tokensGenerated, 500, "not cancelled, so it ran to max_new_tokens");
  }
  const s1 = await stats(svc);
  assert.equal(s1.running + s1.waiting, 0);
  await new Promise((r) => setTimeout(r, 100));
  const s2 = await stats(svc);
  assert.equal(s2.tokensGenerated, s1.tokensGenerated, "no more tokens after cancel");
  assert.ok(s2.tokensGenerated - before.tokensGenerated < 500, "stopped well before max_new_tokens");

  // The same through a plain @grpc/grpc-js client, with the same retry for a lost race.
  const client = grpcClient(svc.server.address);
  try {
    for (let attempt = 1; ; attempt++) {
      const b = await stats(svc);
      const call = client.GenerateStream!(
        create(GenerateRequestSchema, { model: MODEL, prompt: "Once upon a time", maxNewTokens: 500 }),
      ) as grpc.ClientReadableStream<GenerateStreamResponse>;
      await new Promise<void>((resolve) => {
        let n = 0;
        call.on("data", () => {
          if (++n === 1) call.cancel();
        });
        call.on("error", () => resolve());
        call.on("end", () => resolve());
      });
      await waitFor(async () => {
        const s = await stats(svc);
        return s.cancelled === b.cancelled + 1 || s.running + s.waiting === 0;
      }, 15000, "the grpc-js sequence to leave the engine");
      const s = await stats(svc);
      if (s.cancelled === b.cancelled + 1) break;
      assert.ok(attempt < 3, "the grpc-js cancellation never reached the worker in 3 attempts");
      assert.equal(s.tokensGenerated - b.tokensGenerated, 500, "not cancelled, so it ran to max_new_tokens");
    }
  } finally {
    client.close();
  }
});

test("a deadline → DEADLINE_EXCEEDED, and the work stops", { skip: skipNoStories }, async () => {
  const before = await stats(svc);
  // Far too short for 507 tokens (~5000 tok/s would be needed), even on an idle machine.
  let got = 0;
  const stream = svc.client.generateStream({ model: MODEL, prompt: "Once upon a time", maxNewTokens: 507 }, { timeoutMs: 100 });
  const code = await codeOf(
    (async () => {
      for await (const _ of stream) got++;
    })(),
  );
  assert.equal(code, Code.DeadlineExceeded);
  // On a loaded machine the first token may not come within 100 ms; what matters is that the
  // stream ends with DEADLINE_EXCEEDED before max_new_tokens and the engine stops the work.
  assert.ok(got < 507, `${got} messages before the deadline`);
  await waitFor(async () => (await stats(svc)).cancelled === before.cancelled + 1, 15000, "deadline to stop the sequence");
  const s1 = await stats(svc);
  assert.equal(s1.running + s1.waiting, 0);
  assert.ok(s1.tokensGenerated - before.tokensGenerated < 507);
  // Expired before it reached the engine: refused without any work.
  assert.equal(
    await codeOf(svc.client.generate({ model: MODEL, prompt: "Once upon a time", maxNewTokens: 507 }, { timeoutMs: 1 })),
    Code.DeadlineExceeded,
  );
});

test("health is NOT_SERVING while the preloaded base model loads, then SERVING", { skip: skipNoStories }, async () => {
  const name = InferenceService.typeName;
  const reg = inferenceService({ store: ts.store, preload: [{ name: MODEL }], threads: 1 });
  const server = await startServer({ services: [reg], gracePeriodMs: 200 });
  try {
    assert.equal(server.health.get(name), 2 /* NOT_SERVING */);
    await waitFor(() => server.health.get(name) === 1 /* SERVING */, 10_000, "SERVING");
    const models = await reg.engine.call({ op: "listModels" });
    assert.deepEqual(models.models.map((m) => [m.name, m.quant]), [[MODEL, "nf4"]]);
  } finally {
    await server.close();
  }
  const lines: string[] = [];
  const bad = inferenceService({ store: ts.store, preload: [{ name: "missing" }], log: (l) => lines.push(l) });
  const s2 = await startServer({ services: [bad], gracePeriodMs: 200 });
  try {
    await waitFor(() => lines.length > 0, 5000, "the preload failure to be logged");
    assert.equal(s2.health.get(name), 2, "stays NOT_SERVING");
    assert.match(lines[0]!, /missing/);
  } finally {
    await s2.close();
  }
});
