/**
 * Scheduler logic against a toy engine whose logits are a hash of each sequence's whole token
 * history and its adapter: any mix-up of rows, sequences, adapters or chunk boundaries changes
 * the output. (The real-model equivalence is in service.test.ts.)
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { Scheduler, type BatchModel, type ForwardRow, type SchedRequest, type TokenSampler } from "../src/worker/scheduler.js";
import type { RowSampling } from "@qlora/kernels";
import type { DoneEvent, TokenEvent } from "../src/protocol.js";

const VOCAB = 32;
const EOS = 0;

class ToyModel implements BatchModel {
  private readonly seqs = new Map<number, number[]>();
  private next = 0;
  forwards: ForwardRow[][] = [];
  /** Per sequence, its rows in step order: tokens fed, and whether the row was sampled. */
  rowsOf = new Map<number, { n: number; sampled: boolean }[]>();
  dropped: number[] = [];
  constructor(private readonly maxSeqs = Infinity) {}
  get live(): number {
    return this.seqs.size;
  }
  createSequence(): number {
    if (this.seqs.size >= this.maxSeqs) throw new Error("no KV slot");
    const id = this.next++;
    this.seqs.set(id, []);
    return id;
  }
  dropSequence(seq: number): void {
    assert.ok(this.seqs.delete(seq), `drop of unknown seq ${seq}`);
    this.dropped.push(seq);
  }
  /** Greedy over logits that are one-hot at a hash of the row's history and adapter. */
  forwardSample(rows: ForwardRow[], sampling: (RowSampling | null)[]): Int32Array {
    assert.equal(sampling.length, rows.length);
    this.forwards.push(rows.map((r) => ({ ...r, tokens: Int32Array.from(r.tokens) })));
    rows.forEach((r, i) => this.rowsOf.set(r.seq, [...(this.rowsOf.get(r.seq) ?? []), { n: r.tokens.length, sampled: sampling[i] !== null }]));
    const out = new Int32Array(rows.length).fill(-1);
    const seen = new Set<number>();
    rows.forEach((r, i) => {
      assert.ok(!seen.has(r.seq), "a sequence appears twice in one step");
      seen.add(r.seq);
      const h = this.seqs.get(r.seq);
      assert.ok(h, `forward on unknown seq ${r.seq}`);
      h.push(...r.tokens);
      let x = 2166136261 ^ (r.adapter + 7);
      for (const t of h) x = Math.imul(x ^ t, 16777619) >>> 0;
      // Token 0 (EOS) is rare; everything else spread over the vocabulary.
      if (sampling[i]) out[i] = x % 97 === 0 ? EOS : 1 + (x % (VOCAB - 1));
    });
    return out;
  }
}

class GreedySampler implements TokenSampler {
  sampling(): RowSampling {
    return { params: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 }, recent: null, rng: new BigUint64Array(4) };
  }
  accept(token: number) {
    if (token === EOS) return { delta: "", finished: true, finishReason: "stop" as const };
    return { delta: `<${token}>`, finished: false };
  }
}

interface Spec {
  prompt: number[];
  adapter: number;
  maxNew: number;
}

function makeReq(id: number, s: Spec, released: Map<number, number>, extra: Partial<SchedRequest> = {}): SchedRequest {
  return {
    id,
    promptIds: Int32Array.from(s.prompt),
    acquire: () => s.adapter,
    sampler: new GreedySampler(),
    maxNewTokens: s.maxNew,
    deadline: 0,
    receivedAt: Date.now(),
    release: () => released.set(id, (released.get(id) ?? 0) + 1),
    ...extra,
  };
}

function runAll(sched: Scheduler, maxSteps = 10_000) {
  const tokens = new Map<number, number[]>();
  const done = new Map<number, DoneEvent>();
  const failed = new Map<number, string>();
  for (let i = 0; i < maxSteps && sched.hasWork(); i++) {
    const out = sched.step();
    out.tokens.forEach((t: TokenEvent) => tokens.set(t.id, [...(tokens.get(t.id) ?? []), ...t.tokenIds]));
    out.done.forEach((d) => done.set(d.id, d));
    out.failed.forEach((f) => failed.set(f.id, f.error.message));
  }
  assert.ok(!sched.hasWork(), "scheduler did not drain");
  return { tokens, done, failed };
}

function prompt(seed: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => 1 + ((seed * 31 + i * 7) % (VOCAB - 1)));
}

const specs: Spec[] = [
  { prompt: prompt(1, 5), adapter: -1, maxNew: 12 },
  { prompt: prompt(2, 40), adapter: 0, maxNew: 9 },
  { prompt: prompt(3, 3), adapter: 1, maxNew: 20 },
  { prompt: prompt(4, 17), adapter: 2, maxNew: 7 },
  { prompt: prompt(5, 1), adapter: 1, maxNew: 15 },
  { prompt: prompt(6, 64), adapter: 3, maxNew: 5 },
  { prompt: prompt(7, 9), adapter: -1, maxNew: 30 },
];

function solo(s: Spec) {
  const model = new ToyModel();
  const sched = new Scheduler(model, { maxBatch: 1, maxTokensPerStep: 1024, maxContext: 1024 });
  const rel = new Map<number, number>();
  sched.submit(makeReq(1, s, rel));
  return runAll(sched);
}

test("a mixed-adapter continuous batch equals each request run alone", () => {
  const model = new ToyModel();
  const limits = { maxBatch: 4, maxTokensPerStep: 16, maxContext: 1024 };
  const sched = new Scheduler(model, limits);
  const released = new Map<number, number>();
  specs.forEach((s, i) => sched.submit(makeReq(i, s, released)));
  const { tokens, done, failed } = runAll(sched);
  assert.equal(failed.size, 0);
  specs.forEach((s, i) => {
    const alone = solo(s);
    assert.deepEqual(tokens.get(i), alone.tokens.get(1), `request ${i}`);
    assert.equal(done.get(i)!.finishReason, alone.done.get(1)!.finishReason);
    assert.equal(done.get(i)!.usage.promptTokens, s.prompt.length);
    assert.equal(done.get(i)!.usage.completionTokens, tokens.get(i)!.length);
    assert.equal(released.get(i), 1, `release() once for request ${i}`);
  });
  // Limits held on every step, batches really were shared, and every KV slot was returned.
  for (const rows of model.forwards) {
    assert.ok(rows.reduce((n, r) => n + r.tokens.length, 0) <= limits.maxTokensPerStep);
    assert.ok(rows.length <= limits.maxBatch);
  }
  assert.ok(sched.maxRowsInStep >= 3, "requests were batched together");
  assert.ok(sched.maxAdaptersInStep >= 3, "different adapters shared a step");
  assert.equal(model.live, 0);
  // The 64-token prompt was fed in chunks no larger than the step budget.
  const longSeqRows = model.forwards.flat().filter((r) => r.tokens.length > 1 && r.adapter === 3);
  assert.ok(longSeqRows.length >= 4, "long prompt was chunked");
  // Per sequence (created in arrival order: seq i serves request i): its prompt chunks are not
  // sampled except the last; every decode row after is.
  for (const [seq, list] of model.rowsOf) {
    const first = list.findIndex((x) => x.sampled);
    assert.ok(first >= 0, `seq ${seq} sampled once its prompt was in`);
    assert.ok(list.slice(first).every((x) => x.sampled) && list.slice(first + 1).every((x) => x.n === 1), `seq ${seq}: ${JSON.stringify(list)}`);
    const fed = list.slice(0, first + 1).reduce((n, x) => n + x.n, 0);
    assert.equal(fed, specs[seq]!.prompt.length, `seq ${seq}: sampled first right after its whole prompt`);
  }
});

test("decode rows always run: a long prefill never starves running sequences", () => {
  const model = new ToyModel();
  const sched = new Scheduler(model, { maxBatch: 2, maxTokensPerStep: 8, maxContext: 1024 });
  const rel = new Map<number, number>();
  sched.submit(makeReq(1, { prompt: prompt(1, 2), adapter: -1, maxNew: 40 }, rel));
  sched.step(); // prefill of request 1 (and its first token)
  sched.submit(makeReq(2, { prompt: prompt(2, 100), adapter: 0, maxNew: 2 }, rel));
  for (let i = 0; i < 10; i++) {
    const out = sched.step();
    assert.ok(out.tokens.some((t) => t.id === 1), `request 1 decoded in step ${i}`);
  }
});

test("cancel and deadline retire sequences between steps and free their resources", () => {
  const model = new ToyModel();
  const sched = new Scheduler(model, { maxBatch: 4, maxTokensPerStep: 64, maxContext: 1024 });
  const rel = new Map<number, number>();
  sched.submit(makeReq(1, { prompt: prompt(1, 4), adapter: -1, maxNew: 1000 }, rel));
  sched.submit(makeReq(2, { prompt: prompt(2, 4), adapter: 0, maxNew: 1000 }, rel, { deadline: Date.now() + 30 }));
  sched.submit(makeReq(3, { prompt: prompt(3, 4), adapter: 0, maxNew: 3 }, rel));
  for (let i = 0; i < 3; i++) sched.step();
  assert.ok(sched.cancel(1));
  const out = sched.step();
  const d1 = out.done.find((d) => d.id === 1);
  assert.equal(d1?.finishReason, "cancelled");
  assert.ok(!out.tokens.some((t) => t.id === 1), "no token after cancel");
  assert.equal(sched.cancel(1), false, "unknown after it left");
  const until = Date.now() + 40;
  while (Date.now() < until) {
    /* let the deadline of request 2 pass */
  }
  const out2 = sched.step();
  assert.equal(out2.done.find((d) => d.id === 2)?.finishReason, "cancelled");
  assert.ok(!sched.hasWork());
  assert.deepEqual([...rel.entries()].sort(), [[1, 1], [2, 1], [3, 1]]);
  assert.equal(model.dropped.length, 3);
});

test("EOS and the context limit end a sequence; tokens/s and TTFT are reported", () => {
  const model = new ToyModel();
  const sched = new Scheduler(model, { maxBatch: 8, maxTokensPerStep: 64, maxContext: 12 });
  const rel = new Map<number, number>();
  // Find a prompt whose greedy continuation hits EOS early under the toy model.
  sched.submit(makeReq(1, { prompt: prompt(9, 10), adapter: -1, maxNew: 100 }, rel));
  const { tokens, done } = runAll(sched);
  const d = done.get(1)!;
  assert.equal(d.finishReason, "length");
  assert.equal(tokens.get(1)!.length, 2, "10 prompt + 2 new = the 12-token context");
  assert.ok(d.timings.timeToFirstTokenMs >= 0 && d.timings.totalMs >= d.timings.timeToFirstTokenMs);

  let eosFound = false;
  for (let seed = 0; seed < 200 && !eosFound; seed++) {
    const s = new Scheduler(new ToyModel(), { maxBatch: 1, maxTokensPerStep: 64, maxContext: 4096 });
    s.submit(makeReq(1, { prompt: prompt(seed, 3), adapter: -1, maxNew: 300 }, new Map()));
    const r = runAll(s);
    if (r.done.get(1)!.finishReason === "stop") {
      eosFound = true;
      assert.equal(r.tokens.get(1)!.at(-1), EOS);
    }
  }
  assert.ok(eosFound, "some toy sequence ends with EOS");
});

test("when the engine has fewer KV slots than maxBatch, requests wait instead of failing", () => {
  const model = new ToyModel(2);
  const sched = new Scheduler(model, { maxBatch: 4, maxTokensPerStep: 64, maxContext: 1024 });
  const rel = new Map<number, number>();
  for (let i = 0; i < 5; i++) sched.submit(makeReq(i, specs[i]!, rel));
  const { tokens, failed } = runAll(sched);
  assert.equal(failed.size, 0);
  for (let i = 0; i < 5; i++) assert.deepEqual(tokens.get(i), solo(specs[i]!).tokens.get(1));
  assert.ok(Math.max(...model.forwards.map((f) => f.length)) <= 2);
});

test("a failing forward fails only that step's requests, with INTERNAL", () => {
  const model = new ToyModel();
  let calls = 0;
  const real = model.forwardSample.bind(model);
  model.forwardSample = (rows, sampling) => {
    if (++calls === 3) throw new Error("boom");
    return real(rows, sampling);
  };
  const sched = new Scheduler(model, { maxBatch: 4, maxTokensPerStep: 64, maxContext: 1024 });
  const rel = new Map<number, number>();
  sched.submit(makeReq(1, { prompt: prompt(1, 3), adapter: -1, maxNew: 50 }, rel));
  sched.step();
  sched.step();
  const out = sched.step();
  assert.equal(out.failed.length, 1);
  assert.equal(out.failed[0]!.error.code, "INTERNAL");
  assert.equal(rel.get(1), 1);
  assert.ok(!sched.hasWork());
});

test("a request whose adapter is not resident waits while later requests pass; fail() ends it", () => {
  const model = new ToyModel();
  const sched = new Scheduler(model, { maxBatch: 4, maxTokensPerStep: 64, maxContext: 1024 });
  const rel = new Map<number, number>();
  let ready = false;
  let asked = 0;
  sched.submit(makeReq(1, { prompt: prompt(1, 4), adapter: 5, maxNew: 3 }, rel, {
    acquire: () => (asked++, ready ? 5 : null),
  }));
  sched.submit(makeReq(2, { prompt: prompt(2, 4), adapter: -1, maxNew: 3 }, rel));
  sched.submit(makeReq(3, { prompt: prompt(3, 4), adapter: 6, maxNew: 3 }, rel, { acquire: () => null }));
  let out = sched.step();
  assert.ok(out.tokens.some((t) => t.id === 2), "request 2 went ahead");
  assert.ok(!out.tokens.some((t) => t.id === 1));
  assert.equal(model.live, 1, "only the admitted request holds a KV slot");
  ready = true;
  out = sched.step();
  assert.ok(out.tokens.some((t) => t.id === 1), "admitted once its adapter is resident");
  assert.ok(asked >= 2);
  assert.ok(sched.fail(3, { code: "NOT_FOUND", message: "adapter files are gone" }));
  out = sched.step();
  assert.deepEqual(out.failed, [{ id: 3, error: { code: "NOT_FOUND", message: "adapter files are gone" } }]);
  const rest = runAll(sched);
  assert.equal(rest.failed.size, 0);
  assert.deepEqual([...rel.keys()].sort(), [1, 2, 3]);
  const rows = model.forwards.flat();
  assert.ok(rows.some((r) => r.adapter === 5) && !rows.some((r) => r.adapter === 6));
});
