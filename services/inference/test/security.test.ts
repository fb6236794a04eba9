/**
 * The inference service under tokens and an audit log: adapters the engine loads on its own (a
 * Generate, GenerateStream, Score or OpenAI request names a cold adapter) are audited once per
 * load with the request's caller and ids, evictions too; per-token list filtering (ListAdapters,
 * ListLoadedModels, /v1/models, /ui/api/state); and the adapter rank/size limits, checked from
 * adapter_config.json and the safetensors header before the engine is asked for anything.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { InferenceService } from "@qlora/proto";
import { AuditLog, Authenticator, jsonLogger, parseAuthConfig, startServer, type RunningServer } from "@qlora/rpc";
import { inferenceService, type InferenceServiceRegistration } from "../src/index.js";
import { MODEL, STORIES_SHAPES, TestStore, skipNoStories } from "./fixture.js";

const T = { admin: "admin-token-0123456789abcdef", teamA: "team-a-token-0123456789abcd", teamB: "team-b-token-0123456789abcd" };
const TOKENS = parseAuthConfig({
  tokens: [
    { name: "admin", token: T.admin, rpcs: ["*"] },
    { name: "team-a", token: T.teamA, rpcs: ["*"], models: ["stories*"], adapters: ["a-*"] },
    { name: "team-b", token: T.teamB, rpcs: ["*"], models: ["nothing-*"], adapters: ["b-*"] },
  ],
});
const MAX_RANK = 8;
const MAX_BYTES = 150_000; // a rank-4 adapter of stories260K has ~93 kB, a rank-8 one ~185 kB

type Rec = Record<string, unknown>;

let ts: TestStore;
let server: RunningServer;
let reg: InferenceServiceRegistration;
const audit: Rec[] = [];

function client(token: string, requestId?: string): Client<typeof InferenceService> {
  return createClient(
    InferenceService,
    createConnectTransport({
      baseUrl: server.url,
      httpVersion: "1.1",
      interceptors: [
        (next) => (req) => {
          req.header.set("authorization", `Bearer ${token}`);
          if (requestId) req.header.set("x-request-id", requestId);
          return next(req);
        },
      ],
    }),
  );
}

const loads = (adapter?: string) => audit.filter((r) => r.event === "adapter_load" && (!adapter || (r.resources as Rec).adapters!.toString() === adapter));
const isCode = (code: Code, re?: RegExp) => (e: unknown) => e instanceof ConnectError && e.code === code && (!re || re.test(e.rawMessage));

before(async () => {
  if (skipNoStories) return;
  ts = await TestStore.create();
  for (const [i, n] of ["a-one", "a-two", "a-three", "a-four", "a-five", "b-one"].entries()) await ts.addAdapter(n, { seed: 100 + i });
  // Built for another base's shapes (and naming none): only the engine's loader can tell.
  const wrong = Object.fromEntries(Object.entries(STORIES_SHAPES).map(([k, [o, i]]) => [k, [o + 8, i] as [number, number]]));
  await ts.addAdapter("a-wrong", { seed: 7, shapes: wrong, base: null });
  await ts.addAdapter("a-big", { seed: 8, rank: 16 });
  await ts.addAdapter("a-huge", { seed: 9, rank: 8 });
  // Rank 16 in the tensors, 4 in the config.
  await ts.addAdapter("a-liar", { seed: 10, rank: 16, layers: 1, targets: ["self_attn.q_proj"] }); // small: under MAX_BYTES
  const liarCfg = join(await ts.adapterDir("a-liar"), "adapter_config.json");
  await writeFile(liarCfg, JSON.stringify({ ...JSON.parse(await readFile(liarCfg, "utf8")), r: 4, lora_alpha: 8 }));
  await ts.addAdapter("a-corrupt", { seed: 11 });
  const corrupt = join(await ts.adapterDir("a-corrupt"), "adapter_model.safetensors");
  const bytes = await readFile(corrupt);
  bytes.writeBigUInt64LE(BigInt(bytes.length * 4), 0); // header length past the end of the file
  await writeFile(corrupt, bytes);

  reg = inferenceService({ store: ts.store, maxBatch: 8, maxQueue: 32, threads: 1, maxAdapterRank: MAX_RANK, maxAdapterBytes: MAX_BYTES });
  server = await startServer({
    services: [reg],
    auth: Authenticator.fromConfig(TOKENS),
    audit: AuditLog.toFunction((l) => audit.push(JSON.parse(l) as Rec)),
    log: jsonLogger({ level: "error" }),
    gracePeriodMs: 500,
  });
});

after(async () => {
  if (skipNoStories) return;
  await server.close();
  await ts.dispose();
});

describe("implicit adapter loads in the audit log", { skip: skipNoStories }, () => {
  test("a Generate that loads a cold adapter writes one record with the caller and request ids; cache hits write none", async () => {
    const a = client(T.teamA, "req-implicit-1");
    const r1 = await a.generate({ model: MODEL, adapter: "a-one", prompt: "Once", maxNewTokens: 4 });
    assert.ok(r1.text.length > 0);
    const recs = loads("a-one");
    assert.equal(recs.length, 1);
    const rec = recs[0]!;
    assert.equal(rec.rpc, "qlora.v1.InferenceService/Generate");
    assert.equal(rec.outcome, "ok");
    assert.equal(rec.principal, "team-a");
    assert.equal(rec.request_id, "req-implicit-1");
    assert.match(String(rec.trace_id), /^[0-9a-f]{32}$/);
    assert.deepEqual(rec.resources, { adapters: ["a-one"], models: [MODEL] });
    assert.equal(rec.source, await ts.adapterDir("a-one"));
    assert.equal(rec.rank, 4);
    assert.match(String(rec.sha256), /^[0-9a-f]{64}$/);
    // Resident now: more requests are not loads.
    await client(T.teamA, "req-implicit-2").generate({ model: MODEL, adapter: "a-one", prompt: "Once", maxNewTokens: 2 });
    await client(T.admin).score({ model: MODEL, adapter: "a-one", texts: ["Once upon a time"] });
    assert.equal(loads("a-one").length, 1);
  });

  test("concurrent streams for one cold adapter: one load, one record; Score and the OpenAI API are audited too", async () => {
    const before = (await reg.engine.call({ op: "stats" })).stats.adapterLoads;
    const a = client(T.teamA, "req-stream");
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        for await (const _ of a.generateStream({ model: MODEL, adapter: "a-two", prompt: "Lily", maxNewTokens: 3 })) void _;
      }),
    );
    assert.equal((await reg.engine.call({ op: "stats" })).stats.adapterLoads, before + 1);
    assert.deepEqual(loads("a-two").map((r) => [r.rpc, r.principal, r.request_id]), [["qlora.v1.InferenceService/GenerateStream", "team-a", "req-stream"]]);

    await client(T.teamA, "req-score").score({ model: MODEL, adapter: "a-three", texts: ["Once upon a time"] });
    assert.deepEqual(loads("a-three").map((r) => [r.rpc, r.principal, r.request_id]), [["qlora.v1.InferenceService/Score", "team-a", "req-score"]]);

    const res = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${T.teamA}`, "content-type": "application/json", "x-request-id": "req-openai" },
      body: JSON.stringify({ model: `${MODEL}:a-four`, prompt: "Once", max_tokens: 3, temperature: 0 }),
    });
    assert.equal(res.status, 200);
    assert.deepEqual(loads("a-four").map((r) => [r.rpc, r.principal, r.request_id]), [["qlora.v1.InferenceService/Generate", "team-a", "req-openai"]]);
  });

  test("an explicit LoadAdapter is audited as its RPC only; a load the engine refuses is audited with its outcome", async () => {
    await client(T.admin).loadAdapter({ name: "a-five", model: MODEL });
    assert.equal(loads("a-five").length, 0);
    assert.equal(audit.filter((r) => r.event === "rpc" && r.rpc === "qlora.v1.InferenceService/LoadAdapter" && r.outcome === "ok").length, 1);

    await assert.rejects(client(T.teamA, "req-wrong").generate({ model: MODEL, adapter: "a-wrong", prompt: "x", maxNewTokens: 1 }), (e: unknown) => e instanceof ConnectError);
    const recs = loads("a-wrong");
    assert.equal(recs.length, 1);
    assert.notEqual(recs[0]!.outcome, "ok");
    assert.equal(typeof recs[0]!.message, "string");
    assert.equal(recs[0]!.request_id, "req-wrong");
    assert.equal(recs[0]!.principal, "team-a");
  });
});

describe("adapter limits at load time", { skip: skipNoStories }, () => {
  test("rank (config or tensor shapes), file size and a corrupt header → INVALID_ARGUMENT before the engine sees the adapter", async () => {
    const admin = client(T.admin);
    const baseline = await admin.generate({ model: MODEL, prompt: "Once upon a time", maxNewTokens: 8 });
    const statsBefore = (await reg.engine.call({ op: "stats" })).stats;
    const auditBefore = loads().length;
    const cases: [string, RegExp][] = [
      ["a-big", new RegExp(`adapter a-big: LoRA rank 16 \\(adapter_config.json\\) is above this server's limit of ${MAX_RANK}`)],
      ["a-liar", new RegExp(`adapter a-liar: LoRA rank 16 \\(.*lora_[AB].* in adapter_model.safetensors\\) is above this server's limit of ${MAX_RANK}`)],
      ["a-huge", new RegExp(`adapter a-huge: adapter_model.safetensors has \\d+ bytes, above this server's limit of ${MAX_BYTES} bytes`)],
      ["a-corrupt", /invalid safetensors file: header length \d+ is past the end of the file/],
    ];
    for (const [name, re] of cases) {
      await assert.rejects(admin.generate({ model: MODEL, adapter: name, prompt: "x", maxNewTokens: 1 }), isCode(Code.InvalidArgument, re), name);
      await assert.rejects(admin.loadAdapter({ name, model: MODEL }), isCode(Code.InvalidArgument, re), name);
      await assert.rejects(admin.score({ model: MODEL, adapter: name, texts: ["Once upon a time"] }), isCode(Code.InvalidArgument, re), name);
    }
    const openai = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${T.admin}`, "content-type": "application/json" },
      body: JSON.stringify({ model: `${MODEL}:a-big`, prompt: "Once", max_tokens: 3 }),
    });
    assert.equal(openai.status, 400);
    // The engine never read them, and the base serves as before.
    const statsAfter = (await reg.engine.call({ op: "stats" })).stats;
    assert.equal(statsAfter.adapterLoads, statsBefore.adapterLoads);
    assert.equal(loads().length, auditBefore);
    const again = await admin.generate({ model: MODEL, prompt: "Once upon a time", maxNewTokens: 8 });
    assert.deepEqual(again.tokenIds, baseline.tokenIds);
    assert.equal((await admin.listAdapters({})).adapters.find((a) => a.name === "a-big")?.resident, false, "listed, not served");
  });
});

describe("per-token lists", { skip: skipNoStories }, () => {
  test("ListAdapters, ListLoadedModels, /v1/models and /ui/api/state show each token what it may use", async () => {
    const names = async (token: string) => (await client(token).listAdapters({})).adapters.map((a) => a.name).sort();
    const all = await names(T.admin);
    assert.ok(all.includes("b-one") && all.includes("a-one"));
    assert.deepEqual(await names(T.teamA), all.filter((n) => n.startsWith("a-")));
    assert.deepEqual(await names(T.teamB), ["b-one"]);

    const models = async (token: string) => (await client(token).listLoadedModels({})).models.map((m) => m.name);
    assert.deepEqual(await models(T.admin), [MODEL]);
    assert.deepEqual(await models(T.teamA), [MODEL]);
    assert.deepEqual(await models(T.teamB), []);

    const openaiIds = async (token: string) =>
      ((await (await fetch(`${server.url}/v1/models`, { headers: { authorization: `Bearer ${token}` } })).json()) as { data: { id: string }[] }).data.map((d) => d.id);
    assert.ok((await openaiIds(T.teamA)).every((id) => id === MODEL || id.startsWith(`${MODEL}:a-`)));
    assert.deepEqual(await openaiIds(T.teamB), [], "b-one's base is not a model team-b may use");

    const ui = async (token: string) =>
      (await (await fetch(`${server.url}/ui/api/state`, { headers: { authorization: `Bearer ${token}` } })).json()) as { inference: { models: { name: string }[]; adapters: { name: string }[] } };
    const stA = await ui(T.teamA);
    assert.ok(stA.inference.adapters.length > 0 && stA.inference.adapters.every((a) => a.name.startsWith("a-")));
    const stB = await ui(T.teamB);
    assert.deepEqual([stB.inference.models, stB.inference.adapters], [[], []]);
  });
});

describe("evictions in the audit log", { skip: skipNoStories }, () => {
  test("an adapter evicted for the budget is recorded after the load that needed the room", async () => {
    const bytes = Number((await client(T.admin).listAdapters({})).adapters.find((a) => a.name === "a-one")!.residentBytes);
    assert.ok(bytes > 0);
    const lines: Rec[] = [];
    const small = inferenceService({ store: ts.store, maxBatch: 2, maxQueue: 4, threads: 1, adapterBudgetBytes: Math.floor(bytes * 1.5) });
    const s = await startServer({ services: [small], audit: AuditLog.toFunction((l) => lines.push(JSON.parse(l) as Rec)), log: jsonLogger({ level: "error" }), gracePeriodMs: 500 });
    try {
      const c = createClient(InferenceService, createConnectTransport({ baseUrl: s.url, httpVersion: "1.1" }));
      await c.generate({ model: MODEL, adapter: "a-one", prompt: "Once", maxNewTokens: 2 });
      await c.generate({ model: MODEL, adapter: "a-two", prompt: "Once", maxNewTokens: 2 });
      const seq = lines.filter((r) => r.event === "adapter_load" || r.event === "adapter_evict").map((r) => `${r.event} ${(r.resources as Rec).adapters}`);
      assert.deepEqual(seq, ["adapter_load a-one", "adapter_evict a-one", "adapter_load a-two"]);
      const evict = lines.find((r) => r.event === "adapter_evict")!;
      assert.equal(evict.bytes, bytes);
      assert.equal(evict.principal, undefined, "the server's decision, not a caller's");
    } finally {
      await s.close();
    }
  });
});
