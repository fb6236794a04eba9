/** The queue: cancellation (queued and running), the concurrency limit, failures, graceful shutdown + resume. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { JobState } from "@qlora/proto";
import { addConfigOnlyModel, collect, datasetUpload, describeEvents, sleep, startHarness, terminal, TEXT_LINES, waitForJob, type Harness } from "./helpers.js";

async function setup(h: Harness): Promise<void> {
  await addConfigOnlyModel(h.store, "tiny");
  await h.client.uploadDataset(datasetUpload("good", "good.txt", TEXT_LINES));
}

async function adapterBytes(h: Harness, name: string): Promise<Buffer> {
  return readFile(path.join(await h.store.localPath("adapters", name), "adapter_model.safetensors"));
}

test("cancelling a queued job is immediate; a running one stops at a step boundary; neither writes an adapter", async () => {
  const h = await startHarness({ fake: { stepMs: 10 }, concurrency: 1 });
  try {
    await setup(h);
    const a = (await h.client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "a", training: { maxSteps: 10_000, loggingSteps: 1, saveSteps: 5000 } })).job!;
    const b = (await h.client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "b", training: { maxSteps: 5 } })).job!;
    await waitForJob(h.client, a.id, (j) => j.state === JobState.RUNNING && (j.lastMetrics?.step ?? 0) >= 3);
    assert.equal((await h.client.getJob({ id: b.id })).job?.state, JobState.QUEUED, "concurrency 1: b waits");

    const cb = (await h.client.cancelJob({ id: b.id })).job!;
    assert.equal(cb.state, JobState.CANCELLED);
    assert.equal(cb.attempts, 0);
    assert.equal(cb.startedAt, undefined);
    assert.ok(cb.finishedAt);
    assert.deepEqual(describeEvents(await collect(h.client.watchJob({ id: b.id }))), ["state:QUEUED", "state:CANCELLED"]);

    const watching = collect(h.client.watchJob({ id: a.id }));
    const t0 = Date.now();
    const ca = (await h.client.cancelJob({ id: a.id })).job!;
    assert.equal(ca.state, JobState.CANCELLED, "CancelJob waits for the step boundary");
    assert.ok(Date.now() - t0 < 2000);
    assert.ok(ca.lastMetrics!.step > 0 && ca.lastMetrics!.step < 10_000);
    const evs = describeEvents(await watching);
    assert.equal(evs.at(-1), "state:CANCELLED");
    assert.ok(!evs.some((e) => e.startsWith("checkpoint")), "the checkpoint written on the way out is not published");
    assert.deepEqual(await h.store.list("adapters"), []);
    // The slot is free again: a new job runs to the end.
    const c = (await h.client.createJob({ baseModel: "tiny", dataset: "good", training: { maxSteps: 3 } })).job!;
    assert.equal((await waitForJob(h.client, c.id, terminal)).state, JobState.SUCCEEDED);
  } finally {
    await h.close();
  }
});

test("no more jobs run at once than the concurrency limit, and they start in order", async () => {
  const h = await startHarness({ fake: { stepMs: 8 }, concurrency: 2 });
  try {
    await setup(h);
    // The first job outlasts the creation of the others (CreateJob reads the dataset with the
    // tokenizer, which takes a while on a busy machine), so the second one runs beside it.
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      ids.push((await h.client.createJob({ baseModel: "tiny", dataset: "good", training: { maxSteps: i === 0 ? 400 : 12 } })).job!.id);
    }
    let maxSampled = 0;
    for (;;) {
      const jobs = (await h.client.listJobs({})).jobs;
      maxSampled = Math.max(maxSampled, jobs.filter((j) => j.state === JobState.RUNNING).length);
      if (jobs.every(terminal)) break;
      await sleep(5);
    }
    assert.ok(maxSampled <= 2, `${maxSampled} running at once`);
    const jobs = (await h.client.listJobs({})).jobs;
    assert.ok(jobs.every((j) => j.state === JobState.SUCCEEDED));
    const ms = (t: { seconds: bigint; nanos: number }) => Number(t.seconds) * 1e3 + t.nanos / 1e6;
    // Overlap of the [started, finished] intervals: exactly the limit at the busiest moment.
    const edges = jobs.flatMap((j) => [[ms(j.startedAt!), 1] as const, [ms(j.finishedAt!), -1] as const]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    let now = 0;
    let max = 0;
    for (const [, d] of edges) max = Math.max(max, (now += d));
    assert.equal(max, 2);
    const started = jobs.map((j) => [j.id, ms(j.startedAt!)] as const);
    assert.deepEqual([...started].sort((x, y) => x[1] - y[1]).map((x) => x[0]), ids);
  } finally {
    await h.close();
  }
});

test("a runner error fails the job with the reason, naming the dataset instead of a host path", async () => {
  const h = await startHarness({ fake: { stepMs: 2, failAtStep: 4 } });
  try {
    await setup(h);
    const { job } = await h.client.createJob({ baseModel: "tiny", dataset: "good", training: { maxSteps: 10, saveSteps: 2, loggingSteps: 1 } });
    const evs = await collect(h.client.watchJob({ id: job!.id }));
    assert.equal(describeEvents(evs).at(-1), "state:FAILED");
    const failed = (await h.client.getJob({ id: job!.id })).job!;
    assert.equal(failed.state, JobState.FAILED);
    assert.equal(failed.error, 'synthetic failure at step 4 reading dataset "good"');
    assert.ok(!failed.error.includes(h.dataDir));
    assert.equal(failed.lastMetrics?.step, 3);
    assert.equal(await h.store.exists("adapters", job!.id), false);
    // Its checkpoints stay listed (they were published before the failure).
    assert.deepEqual((await h.client.listCheckpoints({ jobId: job!.id })).checkpoints.map((c) => c.step), [2]);
  } finally {
    await h.close();
  }
});

test("graceful shutdown checkpoints running jobs and re-queues them; the next start resumes them to the same adapter", async () => {
  const total = 200;
  const training = { maxSteps: total, saveSteps: 25, loggingSteps: 2, learningRate: 0.01 };
  const h1 = await startHarness({ fake: { stepMs: 15 } });
  await setup(h1);
  const { job } = await h1.client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "resumed", training });
  const queuedBehind = (await h1.client.createJob({ baseModel: "tiny", dataset: "good", training: { maxSteps: 3 } })).job!;
  await waitForJob(h1.client, job!.id, (j) => (j.lastMetrics?.step ?? 0) >= 8);
  // Settled into a value at once: the stream fails while close() is still being awaited.
  const watcher = collect(h1.client.watchJob({ id: job!.id })).then(
    () => new Error("the watch ended without an error"),
    (e: unknown) => e,
  );
  await sleep(50);
  const t0 = Date.now();
  await h1.close();
  assert.ok(Date.now() - t0 < 900, "watchers do not hold the shutdown up for the grace period");
  const err = (await watcher) as ConnectError;
  assert.ok(err instanceof ConnectError && err.code === Code.Unavailable && /shutting down/.test(err.rawMessage), String(err));

  const h2 = await startHarness({ fake: { stepMs: 2 } }, h1.dataDir);
  try {
    assert.equal(h2.service.replicaId, h1.service.replicaId, "the data directory keeps the replica's identity");
    const evs = await collect(h2.client.watchJob({ id: job!.id }));
    const states = evs.flatMap((e) => (e.event.case === "state" ? [`${JobState[e.event.value.state]}: ${e.event.value.message}`] : []));
    assert.equal(states[0], "QUEUED: queued");
    assert.match(states[1]!, /^RUNNING: running on /);
    // Stopped wherever the shutdown found it, and checkpointed right there.
    assert.match(states[2]!, /^QUEUED: interrupted by a shutdown at step (\d+); resumes from step \1$/, states.join(" | "));
    const stoppedAt = Number(/step (\d+);/.exec(states[2]!)![1]);
    assert.ok(stoppedAt >= 8 && stoppedAt < total, `stopped at ${stoppedAt}`);
    assert.match(states[3]!, /^RUNNING: running on .* \(attempt 2\)$/);
    assert.equal(states[4], `RUNNING: resumed from the checkpoint at step ${stoppedAt} of ${total}`);
    assert.match(states[5]!, new RegExp(`^SUCCEEDED: adapter "resumed" written after ${total} steps`));
    // Every save step, plus the stop's own checkpoint, in step order (one, if the stop fell on a save step).
    const steps = [...new Set([...Array.from({ length: total / 25 }, (_, i) => (i + 1) * 25), stoppedAt])].sort((a, b) => a - b);
    assert.deepEqual(describeEvents(evs).filter((e) => e.startsWith("checkpoint")), steps.map((x) => `checkpoint:${x}`));

    const done = (await h2.client.getJob({ id: job!.id })).job!;
    assert.equal(done.state, JobState.SUCCEEDED);
    assert.equal(done.attempts, 2);
    assert.equal(done.resumedFromStep, stoppedAt);
    assert.equal((await waitForJob(h2.client, queuedBehind.id, terminal)).state, JobState.SUCCEEDED);

    // The same job uninterrupted: the same adapter, byte for byte.
    const { job: ref } = await h2.client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "uninterrupted", training });
    await waitForJob(h2.client, ref!.id, terminal);
    assert.ok((await adapterBytes(h2, "resumed")).equals(await adapterBytes(h2, "uninterrupted")));
    assert.deepEqual(await readdir(path.join(h2.dataDir, "trainer", "jobs")).then((d) => d.filter((x) => x === job!.id)), []);
  } finally {
    await h2.close();
  }
});
