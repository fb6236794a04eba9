/**
 * Continuous batching with mixed adapters, and adapter residency under concurrent load: the
 * results of concurrent requests must equal the same requests run one at a time, token for
 * token, while adapters are loaded, evicted, unloaded and replaced underneath them.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { FinishReason, type GenerateStreamResponse } from "@qlora/proto";
import { MODEL, TestStore, skipNoStories, startInference, waitFor, type Running } from "./fixture.js";

const ADAPTERS = ["b0", "b1", "b2", "b3", "b4", "b5"];
const PROMPTS = [
  "Once upon a time",
  "The little dog",
  "Lily and Tom went to the park. They saw a big tree and",
  "One day,",
  "Sam had a red ball. He liked to",
];
/** Bytes of one test adapter (5 layers × 7 modules, rank 4, float32). */
const ADAPTER_BYTES = 5 * 4 * 4 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 172 + 64 + 172 + 172 + 64);

interface Req {
  adapter: string;
  prompt: string;
  maxNewTokens: number;
}

let ts: TestStore;
const ALL = requestList(30);
/** ALL run one at a time on a service with maxBatch 1 (no batching at all). */
let alone: number[][];

before(async () => {
  if (skipNoStories) return;
  ts = await TestStore.create();
  for (const [i, a] of ADAPTERS.entries()) await ts.addAdapter(a, { seed: 100 + i });
  alone = await sequential(ALL);
});

after(async () => {
  if (skipNoStories) return;
  await ts.dispose();
});

function requestList(n: number): Req[] {
  return Array.from({ length: n }, (_, i) => ({
    adapter: i % 7 === 6 ? "" : ADAPTERS[i % ADAPTERS.length]!,
    prompt: PROMPTS[i % PROMPTS.length]!,
    maxNewTokens: 12 + ((i * 7) % 29),
  }));
}

async function runOne(svc: Running, r: Req): Promise<number[]> {
  const res = await svc.client.generate({ model: MODEL, adapter: r.adapter, prompt: r.prompt, maxNewTokens: r.maxNewTokens });
  return res.tokenIds;
}

/** Greedy outputs of each request run alone on a fresh service (no batching at all). */
async function sequential(reqs: Req[]): Promise<number[][]> {
  const svc = await startInference(ts, { maxBatch: 1 });
  try {
    const out: number[][] = [];
    for (const r of reqs) out.push(await runOne(svc, r));
    return out;
  } finally {
    await svc.close();
  }
}

test("concurrent requests on different adapters equal the same requests one at a time", { skip: skipNoStories }, async () => {
  const reqs = ALL.slice(0, 16);
  const want = alone;
  const svc = await startInference(ts, { maxBatch: 8, maxTokensPerStep: 24 });
  try {
    await svc.client.loadModel({ name: MODEL });
    const got = await Promise.all(reqs.map((r) => runOne(svc, r)));
    reqs.forEach((r, i) => assert.deepEqual(got[i], want[i], `request ${i} (${r.adapter || "base"}, "${r.prompt}")`));
    const { stats } = await svc.reg.engine.call({ op: "stats" });
    assert.ok(stats.maxRowsInStep >= 6, `batched: ${stats.maxRowsInStep} rows in the largest step`);
    assert.ok(stats.maxAdaptersInStep >= 4, `mixed: ${stats.maxAdaptersInStep} adapters in one step`);
    assert.equal(stats.running + stats.waiting, 0);
  } finally {
    await svc.close();
  }
});

test("adapters load, evict, unload and reload under concurrent load without errors", { skip: skipNoStories }, async () => {
  const reqs = ALL;
  const want = alone;
  // Room for 2.5 adapters: six adapters in rotation force evictions all the time.
  const budget = Math.floor(2.5 * ADAPTER_BYTES);
  const svc = await startInference(ts, { maxBatch: 4, maxQueue: 64, adapterBudgetBytes: budget });
  try {
    await svc.client.loadModel({ name: MODEL });
    let stop = false;
    const churnErrors: unknown[] = [];
    // Admin traffic racing the generations: explicit loads, unloads (NOT_FOUND is fine: it may
    // just have been evicted) and listings.
    const churn = (async () => {
      for (let i = 0; !stop; i++) {
        const name = ADAPTERS[i % ADAPTERS.length]!;
        try {
          if (i % 3 === 0) await svc.client.loadAdapter({ name, model: MODEL });
          else if (i % 3 === 1) await svc.client.unloadAdapter({ name }).catch((e: { code?: number }) => {
            if (e.code !== 5 /* NotFound */) throw e;
          });
          else await svc.client.listAdapters({});
        } catch (e) {
          churnErrors.push(e);
        }
        await new Promise((r) => setTimeout(r, 3));
      }
    })();
    const got = await Promise.all(reqs.map((r) => runOne(svc, r)));
    stop = true;
    await churn;
    assert.deepEqual(churnErrors, []);
    reqs.forEach((r, i) => assert.deepEqual(got[i], want[i], `request ${i} (${r.adapter || "base"})`));
    const { stats } = await svc.reg.engine.call({ op: "stats" });
    assert.ok(stats.adapterEvictions > 0, `the budget forced evictions: ${JSON.stringify(stats)}`);
    assert.ok(stats.adapterLoads > ADAPTERS.length, `evicted/unloaded adapters were loaded again: ${JSON.stringify(stats)}`);
    // Idle again: back under the budget, and the listing agrees with the engine.
    assert.ok(stats.adapterBytes <= budget, `${stats.adapterBytes} <= ${budget}`);
    const listed = (await svc.client.listAdapters({})).adapters;
    assert.deepEqual(listed.map((a) => a.name).sort(), [...ADAPTERS].sort(), "every store adapter is listed");
    const resident = listed.filter((a) => a.resident);
    assert.equal(resident.reduce((n, a) => n + Number(a.residentBytes), 0), stats.adapterBytes);
    assert.ok(resident.every((a) => a.sha256.length === 64 && a.lastUsedAt !== undefined && a.lora!.rank === 4));
  } finally {
    await svc.close();
  }
});

test("UnloadAdapter while a request uses it: the request finishes unchanged", { skip: skipNoStories }, async () => {
  const req: Req = { adapter: "b2", prompt: PROMPTS[0]!, maxNewTokens: 200 };
  const [want] = await sequential([req]);
  const svc = await startInference(ts);
  try {
    const msgs: GenerateStreamResponse[] = [];
    let unloaded = false;
    for await (const m of svc.client.generateStream({ model: MODEL, adapter: req.adapter, prompt: req.prompt, maxNewTokens: req.maxNewTokens })) {
      msgs.push(m);
      if (!unloaded && msgs.length === 3) {
        await svc.client.unloadAdapter({ name: "b2" });
        unloaded = true;
        // Gone for new requests at once, while this one keeps running on the old copy.
        const listed = (await svc.client.listAdapters({})).adapters.find((a) => a.name === "b2");
        assert.equal(listed?.resident, false);
      }
    }
    assert.ok(unloaded);
    assert.deepEqual(msgs.flatMap((m) => m.tokenIds), want);
    assert.equal(msgs.at(-1)!.finishReason, FinishReason.LENGTH);
    // The slot was freed with its last user, and a new request loads the files again.
    await waitFor(async () => (await svc.reg.engine.call({ op: "stats" })).stats.adapterBytes === 0, 2000, "slot freed");
    assert.deepEqual(await runOne(svc, { ...req, maxNewTokens: 20 }), want!.slice(0, 20));
    assert.equal((await svc.reg.engine.call({ op: "stats" })).stats.adapterLoads, 2);
  } finally {
    await svc.close();
  }
});

test("LoadAdapter after the files changed replaces the resident copy (keyed by sha256)", { skip: skipNoStories }, async () => {
  await ts.addAdapter("swap", { seed: 1 });
  const svc = await startInference(ts);
  try {
    const first = await svc.client.loadAdapter({ name: "swap" });
    const again = await svc.client.loadAdapter({ name: "swap" });
    assert.equal(again.adapter!.sha256, first.adapter!.sha256);
    const before = await runOne(svc, { adapter: "swap", prompt: PROMPTS[0]!, maxNewTokens: 24 });
    await ts.addAdapter("swap", { seed: 2 }, { overwrite: true });
    // Still resident: requests keep the copy that was loaded until someone reloads it.
    assert.deepEqual(await runOne(svc, { adapter: "swap", prompt: PROMPTS[0]!, maxNewTokens: 24 }), before);
    const replaced = await svc.client.loadAdapter({ name: "swap" });
    assert.notEqual(replaced.adapter!.sha256, first.adapter!.sha256);
    const after = await runOne(svc, { adapter: "swap", prompt: PROMPTS[0]!, maxNewTokens: 24 });
    assert.notDeepEqual(after, before);
    // And it is what a fresh service computes from the new files.
    const fresh = await startInference(ts, { maxBatch: 1 });
    try {
      assert.deepEqual(await runOne(fresh, { adapter: "swap", prompt: PROMPTS[0]!, maxNewTokens: 24 }), after);
    } finally {
      await fresh.close();
    }
  } finally {
    await svc.close();
  }
});
