/** SqliteJobStore: the claim/lease protocol, conditional writes, events, checkpoints, persistence. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { Worker } from "node:worker_threads";
import { SqliteJobStore, type JobStore } from "../src/index.js";

async function dbPath(): Promise<string> {
  return path.join(await mkdtemp(path.join(tmpdir(), "qlora-jobstore-")), "jobs.db");
}

function clock(start = 1_000_000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

async function add(s: JobStore, id: string) {
  return s.create({ id, request: { baseModel: "m", dataset: "d" }, outputAdapter: `${id}-out`, device: "cpu", message: "queued" });
}

test("create, get and list keep the request and start the event log", async () => {
  const c = clock();
  const s = new SqliteJobStore(await dbPath(), { now: c.now });
  const { job, event } = await add(s, "a");
  assert.equal(job.state, "queued");
  assert.deepEqual(job.request, { baseModel: "m", dataset: "d" });
  assert.equal(job.createdAt, 1_000_000);
  assert.equal(job.attempts, 0);
  assert.deepEqual({ kind: event.kind, seq: event.seq }, { kind: "state", seq: 1 });
  c.advance(1);
  await add(s, "b");
  assert.deepEqual((await s.list()).map((j) => j.id), ["a", "b"]);
  assert.deepEqual((await s.list({ states: ["running"] })).map((j) => j.id), []);
  assert.equal(await s.get("nope"), undefined);
  await assert.rejects(add(s, "a"), /UNIQUE/);
  await s.close();
});

test("claims go oldest first, one job per claim, and bump attempts", async () => {
  const c = clock();
  const s = new SqliteJobStore(await dbPath(), { now: c.now });
  await add(s, "a");
  c.advance(1);
  await add(s, "b");
  const first = await s.claimNext("r1", 1000);
  assert.equal(first?.job.id, "a");
  assert.equal(first?.job.state, "running");
  assert.equal(first?.job.owner, "r1");
  assert.equal(first?.job.attempts, 1);
  assert.equal(first?.job.leaseExpiresAt, c.now() + 1000);
  assert.equal(first?.takenOver, false);
  assert.equal(first?.event.kind === "state" && first.event.state, "running");
  assert.equal((await s.claimNext("r2", 1000))?.job.id, "b");
  assert.equal(await s.claimNext("r3", 1000), undefined);
  await s.close();
});

test("connections on separate threads claiming from one file never get the same job", async () => {
  const file = await dbPath();
  const s = new SqliteJobStore(file);
  for (let i = 0; i < 60; i++) await add(s, `j${String(i).padStart(2, "0")}`);
  const url = new URL("./fixtures/claim-worker.js", import.meta.url);
  const results = await Promise.all(
    [0, 1, 2].map(
      (k) =>
        new Promise<string[]>((resolve, reject) => {
          const w = new Worker(url, { workerData: { file, replica: `r${k}` } });
          w.once("message", resolve);
          w.once("error", reject);
        }),
    ),
  );
  const claimed = results.flat();
  assert.equal(claimed.length, 60);
  assert.equal(new Set(claimed).size, 60);
  const jobs = await s.list();
  assert.ok(jobs.every((j) => j.state === "running" && j.attempts === 1));
  // Each job's owner is the thread that reported it.
  results.forEach((ids, k) => ids.forEach((id) => assert.equal(jobs.find((j) => j.id === id)?.owner, `r${k}`)));
  await s.close();
});

test("a lease that is not renewed expires and the job is taken over; the old owner's writes are refused", async () => {
  const c = clock();
  const s = new SqliteJobStore(await dbPath(), { now: c.now });
  await add(s, "a");
  await s.claimNext("r1", 1000);
  c.advance(900);
  assert.deepEqual(await s.heartbeat("a", "r1", 1000), { owned: true, cancelRequested: false });
  c.advance(900); // renewed: still r1's
  assert.equal(await s.claimNext("r2", 1000), undefined);
  c.advance(200); // 1100 after the renewal: expired
  const taken = await s.claimNext("r2", 1000);
  assert.equal(taken?.job.id, "a");
  assert.equal(taken?.takenOver, true);
  assert.equal(taken?.job.attempts, 2);
  assert.match(taken!.event.kind === "state" ? taken!.event.message : "", /taken over by r2/);

  // r1 comes back: every write is conditional on ownership.
  assert.deepEqual(await s.heartbeat("a", "r1", 1000), { owned: false, cancelRequested: false });
  assert.equal((await s.recordProgress("a", "r1", { resumedFromStep: 3 })).owned, false);
  assert.equal(await s.addCheckpoint("r1", { jobId: "a", step: 5, name: "a.checkpoint-5", sizeBytes: 1, createdAt: 0 }), undefined);
  assert.equal(await s.finish("a", "r1", { state: "failed", message: "x", error: "x" }), undefined);
  assert.equal(await s.release("a", "r1", "x"), undefined);
  const job = await s.get("a");
  assert.equal(job?.owner, "r2");
  assert.equal(job?.state, "running");
  assert.deepEqual(await s.listCheckpoints("a"), []);

  // The owner's writes go through.
  const p = await s.recordProgress("a", "r2", { resumedFromStep: 3, metrics: { step: 4, totalSteps: 9, epoch: 0.5, loss: 1, learningRate: 0.1, gradNorm: 2, tokensPerSecond: 3 } }, {
    kind: "state",
    state: "running",
    message: "resumed",
  });
  assert.equal(p.owned, true);
  assert.equal(p.event?.seq, 4);
  const ev = await s.finish("a", "r2", { state: "succeeded", message: "done" });
  assert.equal(ev?.kind === "state" && ev.state, "succeeded");
  const done = await s.get("a");
  assert.equal(done?.state, "succeeded");
  assert.equal(done?.owner, null);
  assert.equal(done?.resumedFromStep, 3);
  assert.equal(done?.metrics?.step, 4);
  assert.equal(done?.finishedAt, c.now());
  assert.deepEqual((await s.listEvents("a", 0)).map((e) => e.seq), [1, 2, 3, 4, 5]);
  assert.deepEqual((await s.listEvents("a", 3)).map((e) => e.seq), [4, 5]);
  await s.close();
});

test("expireLeasesOf hands a restarted replica's jobs back at once; release re-queues for resumption", async () => {
  const c = clock();
  const s = new SqliteJobStore(await dbPath(), { now: c.now });
  await add(s, "a");
  await add(s, "b");
  await s.claimNext("me", 60_000);
  await s.claimNext("other", 60_000);
  assert.equal(await s.expireLeasesOf("me"), 1);
  const again = await s.claimNext("me", 60_000);
  assert.equal(again?.job.id, "a");
  assert.equal(again?.job.attempts, 2);
  const ev = await s.release("a", "me", "interrupted by a shutdown");
  assert.equal(ev?.kind === "state" && ev.state, "queued");
  const q = await s.get("a");
  assert.equal(q?.state, "queued");
  assert.equal(q?.owner, null);
  assert.equal((await s.claimNext("x", 1000))?.job.attempts, 3);
  await s.close();
});

test("cancel: queued → cancelled now, running → requested (seen by heartbeat), ended → nothing, expired owner → cancelled", async () => {
  const c = clock();
  const s = new SqliteJobStore(await dbPath(), { now: c.now });
  await add(s, "q");
  c.advance(1);
  await add(s, "r");
  c.advance(1);
  await add(s, "gone");
  const q = await s.cancel("q", "by request");
  assert.equal(q?.outcome, "cancelled");
  assert.equal(q?.job.state, "cancelled");
  assert.ok(q?.event);
  await s.claimNext("r1", 1000); // r
  const r = await s.cancel("r", "by request");
  assert.equal(r?.outcome, "requested");
  assert.equal(r?.job.state, "running");
  assert.equal(r?.job.cancelRequested, true);
  assert.deepEqual(await s.heartbeat("r", "r1", 1000), { owned: true, cancelRequested: true });
  assert.equal((await s.cancel("q", "again"))?.outcome, "final");
  await s.claimNext("dead", 1000); // gone
  c.advance(5000);
  assert.equal((await s.cancel("gone", "by request"))?.outcome, "cancelled");
  assert.equal(await s.cancel("missing", "x"), undefined);
  await s.close();
});

test("checkpoints: recorded with an event, listed by step, removable; everything survives a reopen", async () => {
  const file = await dbPath();
  const s = new SqliteJobStore(file);
  await add(s, "a");
  await s.claimNext("r1", 60_000);
  for (const step of [20, 10, 30]) {
    const ev = await s.addCheckpoint("r1", { jobId: "a", step, name: `a.checkpoint-${step}`, sizeBytes: step * 10, createdAt: step });
    assert.equal(ev?.kind, "checkpoint");
  }
  await s.removeCheckpoint("a", 10);
  assert.deepEqual((await s.listCheckpoints("a")).map((c) => c.step), [20, 30]);
  await s.close();

  const again = new SqliteJobStore(file);
  const job = await again.get("a");
  assert.equal(job?.state, "running");
  assert.equal(job?.owner, "r1");
  assert.deepEqual((await again.listCheckpoints("a")).map((c) => [c.step, c.name, c.sizeBytes]), [
    [20, "a.checkpoint-20", 200],
    [30, "a.checkpoint-30", 300],
  ]);
  const events = await again.listEvents("a", 0);
  assert.deepEqual(events.map((e) => e.kind), ["state", "state", "checkpoint", "checkpoint", "checkpoint"]);
  await again.close();
});
