/**
 * Adapter residency rules: byte budget + LRU eviction of idle adapters, reference counts that
 * keep busy adapters installed through unload/reload/eviction, load deduplication, errors.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { ResourceExhausted, InvalidArgument } from "@qlora/core";
import { AdapterCache, type AdapterBackend, type AdapterCacheEvent } from "../src/worker/adapter-cache.js";
import type { AdapterRef } from "../src/protocol.js";

interface Files {
  bytes: number;
  sha256: string;
  fail?: Error;
}

class FakeEngine implements AdapterBackend<string> {
  /** slot → installed weights tag; what the engine would apply. */
  readonly slots = new Map<number, string>();
  reads = 0;
  delayMs = 0;
  constructor(readonly files: Map<string, Files>) {}
  async read(ref: AdapterRef) {
    this.reads++;
    if (this.delayMs) await new Promise((r) => setTimeout(r, this.delayMs));
    const f = this.files.get(ref.name);
    if (!f) throw new InvalidArgument(`no adapter ${ref.name}`);
    if (f.fail) throw f.fail;
    const meta = { baseModel: "m", rank: 4, alpha: 8, targetModules: ["q_proj"], useRslora: false };
    return { weights: `${ref.name}@${f.sha256}`, meta, bytes: f.bytes, sha256: f.sha256 };
  }
  install(slot: number, w: string): void {
    assert.ok(!this.slots.has(slot), `slot ${slot} installed twice`);
    this.slots.set(slot, w);
  }
  remove(slot: number): void {
    assert.ok(this.slots.delete(slot), `remove of empty slot ${slot}`);
  }
}

const ref = (name: string): AdapterRef => ({ name, dir: `/store/adapters/${name}` });

function setup(budget: number, files: Record<string, Files>) {
  let t = 0;
  const engine = new FakeEngine(new Map(Object.entries(files)));
  const cache = new AdapterCache(engine, budget, { name: "m", quant: "nf4" }, () => ++t);
  return { engine, cache };
}

test("LRU eviction keeps the byte budget and never evicts a busy adapter", async () => {
  const { engine, cache } = setup(300, {
    a: { bytes: 100, sha256: "a1" },
    b: { bytes: 100, sha256: "b1" },
    c: { bytes: 100, sha256: "c1" },
    d: { bytes: 100, sha256: "d1" },
  });
  const a = await cache.acquire(ref("a"));
  const b = await cache.acquire(ref("b"));
  const c = await cache.acquire(ref("c"));
  cache.endStep();
  cache.release(b);
  cache.release(c);
  cache.release(a); // a is now the most recently used idle adapter; b the least
  await cache.acquire(ref("d")).then((d) => cache.release(d));
  assert.deepEqual(cache.list().map((e) => e.name).sort(), ["a", "c", "d"]);
  assert.equal(cache.residentBytes, 300);
  assert.equal(cache.evictions, 1);

  // All busy: a 4th adapter goes over budget rather than failing or breaking a user …
  const held = await Promise.all(["a", "c", "d"].map((n) => cache.acquire(ref(n))));
  const b2 = await cache.acquire(ref("b"));
  assert.equal(cache.residentBytes, 400);
  assert.equal(engine.slots.size, 4);
  cache.endStep();
  // … and comes back under budget as soon as adapters go idle.
  cache.release(held[0]!);
  assert.equal(cache.residentBytes, 300);
  for (const e of [...held.slice(1), b2]) cache.release(e);
  assert.ok(cache.residentBytes <= 300);
});

test("unload while in use: the slot stays until the last user releases it", async () => {
  const { engine, cache } = setup(1000, { a: { bytes: 10, sha256: "a1" } });
  const u1 = await cache.acquire(ref("a"));
  const u2 = await cache.acquire(ref("a"));
  assert.equal(u1, u2);
  assert.equal(engine.reads, 1);
  assert.equal(cache.unload("a"), true);
  assert.equal(engine.slots.get(u1.slot), "a@a1", "still installed for running requests");
  assert.equal(cache.list()[0]!.unloading, true);
  // A new request after the unload reads the files again into a different slot.
  const u3 = await cache.acquire(ref("a"));
  assert.notEqual(u3.slot, u1.slot);
  assert.equal(engine.reads, 2);
  cache.release(u1);
  assert.ok(engine.slots.has(u1.slot));
  cache.release(u2);
  assert.ok(!engine.slots.has(u1.slot), "removed with its last user");
  assert.ok(engine.slots.has(u3.slot));
  assert.equal(cache.unload("nope"), false);
  assert.throws(() => cache.release(u1), /release without acquire/);
});

test("LoadAdapter is keyed by sha256: same files are a no-op, changed files replace the copy", async () => {
  const files = { a: { bytes: 10, sha256: "v1" } };
  const { engine, cache } = setup(1000, files);
  const first = await cache.load(ref("a"));
  const same = await cache.load(ref("a"));
  assert.equal(first, same);
  assert.equal(engine.slots.size, 1);
  const user = await cache.acquire(ref("a"));
  engine.files.set("a", { bytes: 12, sha256: "v2" });
  const second = await cache.load(ref("a"));
  assert.notEqual(second.slot, first.slot);
  assert.equal(engine.slots.get(first.slot), "a@v1", "old copy kept for the running request");
  const next = await cache.acquire(ref("a"));
  assert.equal(next.sha256, "v2");
  cache.release(user);
  assert.ok(!engine.slots.has(first.slot));
  cache.release(next);
  assert.equal(cache.residentBytes, 12);
});

test("concurrent first uses read the files once; failures reach every waiter and are not cached", async () => {
  const { engine, cache } = setup(1000, {
    a: { bytes: 10, sha256: "a1" },
    bad: { bytes: 10, sha256: "x", fail: new InvalidArgument("corrupt") },
  });
  engine.delayMs = 10;
  const users = await Promise.all(Array.from({ length: 6 }, () => cache.acquire(ref("a"))));
  assert.equal(engine.reads, 1);
  assert.equal(users[0]!.refs, 6);
  assert.ok(users.every((u) => u === users[0]));
  const bad = await Promise.allSettled([cache.acquire(ref("bad")), cache.acquire(ref("bad"))]);
  assert.ok(bad.every((r) => r.status === "rejected" && r.reason instanceof InvalidArgument));
  await assert.rejects(cache.acquire(ref("bad")), InvalidArgument);
  assert.equal(engine.reads, 3, "a failed load is retried by the next request");
  users.forEach((u) => cache.release(u));
});

test("an adapter larger than the whole budget is RESOURCE_EXHAUSTED", async () => {
  const { cache, engine } = setup(100, { big: { bytes: 101, sha256: "b" } });
  await assert.rejects(cache.acquire(ref("big")), ResourceExhausted);
  assert.equal(engine.slots.size, 0);
});

test("a just-installed adapter survives until the next step, so concurrent loads cannot thrash", async () => {
  const { engine, cache } = setup(100, { a: { bytes: 60, sha256: "a" }, b: { bytes: 60, sha256: "b" } });
  engine.delayMs = 5;
  // Two queued requests made their adapters resident; neither is admitted yet (no refs).
  await Promise.all([cache.ensure(ref("a")), cache.ensure(ref("b"))]);
  const a = cache.tryAcquire("a");
  const b = cache.tryAcquire("b");
  assert.ok(a && b, "both still resident at admission");
  assert.equal(cache.residentBytes, 120, "over budget while both are fresh/busy");
  cache.endStep();
  cache.release(a);
  assert.ok(!engine.slots.has(a.slot), "a evicted once idle and no longer fresh (over budget)");
  cache.release(b);
  assert.equal(cache.residentBytes, 60);
});

test("queued requests do not pin adapters: only references (running requests) do", async () => {
  const { engine, cache } = setup(100, { a: { bytes: 60, sha256: "a" }, b: { bytes: 60, sha256: "b" } });
  await cache.ensure(ref("a")); // a queued request for a
  cache.endStep();
  await cache.ensure(ref("b")); // … then one for b: a is idle, so it is evicted for b
  assert.equal(cache.tryAcquire("a"), null, "a must be loaded again when its request is admitted");
  assert.equal(cache.evictions, 1);
  assert.equal(engine.slots.size, 1);
});

test("unload during a load: the load installs nothing; later requests read the files again", async () => {
  const { engine, cache } = setup(1000, { a: { bytes: 10, sha256: "a1" } });
  engine.delayMs = 10;
  const pending = cache.ensure(ref("a"));
  assert.equal(cache.unload("a"), true);
  assert.equal(await pending, null);
  assert.equal(engine.slots.size, 0);
  const e = await cache.acquire(ref("a"));
  assert.equal(engine.reads, 2);
  assert.ok(engine.slots.has(e.slot));
  cache.release(e);
});

test("a failing engine install keeps the previous copy serving", async () => {
  const { engine, cache } = setup(1000, { a: { bytes: 10, sha256: "v1" } });
  const first = await cache.load(ref("a"));
  engine.files.set("a", { bytes: 10, sha256: "v2" });
  const install = engine.install.bind(engine);
  engine.install = () => {
    throw new Error("engine refused");
  };
  await assert.rejects(cache.load(ref("a")), /engine refused/);
  engine.install = install;
  assert.equal(cache.tryAcquire("a"), first);
  assert.equal(engine.slots.size, 1);
});

test("events: one per load the cache starts itself (shared reads, failures), evictions; none for hits or explicit loads", async () => {
  let t = 0;
  const engine = new FakeEngine(
    new Map(Object.entries({ a: { bytes: 100, sha256: "a1" }, b: { bytes: 100, sha256: "b1" }, c: { bytes: 100, sha256: "c1" }, bad: { bytes: 1, sha256: "x", fail: new InvalidArgument("broken adapter") } })),
  );
  engine.delayMs = 5;
  const events: AdapterCacheEvent[] = [];
  const cache = new AdapterCache(engine, 200, { name: "m", quant: "nf4" }, () => ++t, (e) => events.push(e));
  const summary = () => events.map((e) => (e.kind === "evicted" ? `evicted ${e.entry.name}` : `${e.kind} ${e.ref.name} by ${e.trigger}`));

  // Three requests for one cold adapter share one read: one event, naming the first.
  await Promise.all([cache.ensure(ref("a"), 1), cache.ensure(ref("a"), 2), cache.acquire(ref("a"), 3).then((e) => cache.release(e))]);
  assert.equal(engine.reads, 1);
  assert.deepEqual(summary(), ["loaded a by 1"]);
  // Resident: no event.
  await cache.ensure(ref("a"), 4);
  assert.deepEqual(summary(), ["loaded a by 1"]);
  // A failing read: one event for the requests that shared it.
  const failed = await Promise.allSettled([cache.ensure(ref("bad"), 5), cache.ensure(ref("bad"), 6)]);
  assert.ok(failed.every((r) => r.status === "rejected"));
  assert.equal(events.length, 2);
  const f = events[1]!;
  assert.ok(f.kind === "loadFailed" && f.trigger === 5 && f.error instanceof InvalidArgument);
  // An explicit load is audited as its RPC, not here.
  await cache.load(ref("b"));
  cache.endStep();
  assert.equal(events.length, 2);
  // c does not fit next to a and b: the least recently used idle one (a) is evicted for it.
  await cache.ensure(ref("c"), 7);
  assert.deepEqual(summary().slice(2), ["evicted a", "loaded c by 7"]);
  const loaded = events[3]!;
  assert.ok(loaded.kind === "loaded" && loaded.entry.bytes === 100 && loaded.ref.dir === "/store/adapters/c");
});
