// Two trainer replicas (containers) on one PostgreSQL job queue and one S3 bucket: several jobs,
// created through both; every job runs exactly once (one claim, one success), both replicas work,
// and they work at the same time.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { clients, database, datasetUpload, s3Store, skipReason, startService, STORIES, waitForJob } from "./support.mjs";

const PREFIX = "replicas";
const SCHEMA = "it_replicas";
const ENV = { QLORA_S3_PREFIX: PREFIX, QLORA_DATABASE_SCHEMA: SCHEMA };
const JOBS = 6;
const TRAINING = { maxSteps: 30, saveSteps: 15, loggingSteps: 10, blockSize: 32, learningRate: 2e-3 };
const TEXT = ["Lily found a shiny stone by the river.", "She showed it to her brother Max.", "Max said it looked like a star.", "They put it on the window so it could shine at night."].join("\n") + "\n";

const proto = await import("@qlora/proto").catch(() => null);
const { JobState } = proto ?? {};

describe("two trainer replicas on one PostgreSQL queue", { skip: skipReason, timeout: 15 * 60_000 }, () => {
  let replicas = [];
  let c = [];
  let store;

  before(async () => {
    // The base model goes into the bucket directly (this file is about the queue, not uploads).
    store = await s3Store(PREFIX);
    const w = await store.beginWrite("models", "stories");
    for (const f of await readdir(STORIES)) if (!["README.md", "reference.json"].includes(f)) await w.writeFile(f, await readFile(join(STORIES, f)));
    await w.commit();

    replicas = await Promise.all([startService("trainer", { label: "replica-1", env: ENV }), startService("trainer", { label: "replica-2", env: ENV })]);
    c = await Promise.all(replicas.map(async (r) => (await clients({ trainer: r.url })).trainer));
  });

  after(async () => {
    await Promise.all(replicas.map((r) => r.stop()));
  });

  test(`${JOBS} jobs created through both replicas: each runs exactly once, both replicas run jobs, in parallel`, async () => {
    await c[0].uploadDataset(datasetUpload("stone", "stone.txt", TEXT));
    // Visible through the other replica at once: the dataset is in S3, not on a replica's disk.
    assert.deepEqual((await c[1].listDatasets({})).datasets.map((d) => d.name), ["stone"]);

    const ids = [];
    for (let i = 0; i < JOBS; i++) {
      const { job } = await c[i % 2].createJob({ baseModel: "stories", dataset: "stone", outputAdapter: `stone-${i}`, lora: { rank: 4 }, training: { ...TRAINING, seed: BigInt(i + 1) } });
      ids.push(job.id);
    }
    // Both replicas see every job (one table).
    for (const client of c) assert.deepEqual((await client.listJobs({})).jobs.map((j) => j.id).sort(), [...ids].sort());

    const done = [];
    for (const id of ids) done.push(await waitForJob(c[0], id, (j) => [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED].includes(j.state), 8 * 60_000, "an end"));
    for (const j of done) {
      assert.equal(j.state, JobState.SUCCEEDED, `${j.id}: ${j.error}\n${replicas.map((r) => r.tail()).join("\n")}`);
      assert.equal(j.attempts, 1, `${j.id} was claimed ${j.attempts} times`);
    }

    const db = await database();
    let rows;
    try {
      ({ rows } = await db.query(
        `SELECT j.id, j.attempts, j.started_at, j.finished_at,
                array_agg(e.data->>'message' ORDER BY e.seq) FILTER (WHERE e.data->>'kind' = 'state' AND e.data->>'state' = 'running') AS claims,
                count(*) FILTER (WHERE e.data->>'kind' = 'state' AND e.data->>'state' = 'succeeded') AS successes
           FROM ${SCHEMA}.jobs j JOIN ${SCHEMA}.job_events e ON e.job_id = j.id
          GROUP BY j.id ORDER BY j.created_at`,
      ));
    } finally {
      await db.end();
    }
    assert.equal(rows.length, JOBS);
    const replicaIds = replicas.map((r) => r.id.slice(0, 12));
    const ranOn = new Map();
    for (const r of rows) {
      assert.equal(r.attempts, 1, r.id);
      assert.equal(Number(r.successes), 1, `${r.id}: ${r.successes} successes`);
      assert.equal(r.claims.length, 1, `${r.id} claimed more than once: ${r.claims.join(" | ")}`);
      const owner = replicaIds.find((id) => r.claims[0] === `running on ${id}`);
      assert.ok(owner, `${r.id}: ${r.claims[0]} (replicas ${replicaIds.join(", ")})`);
      ranOn.set(r.id, { owner, start: Number(r.started_at), end: Number(r.finished_at) });
    }
    const counts = replicaIds.map((id) => [...ranOn.values()].filter((x) => x.owner === id).length);
    console.log(`# jobs per replica: ${counts.join(" + ")}`);
    assert.ok(counts.every((n) => n >= 1), `both replicas ran jobs: ${counts.join(" + ")}`);
    const runs = [...ranOn.values()];
    const overlap = runs.some((a) => runs.some((b) => a.owner !== b.owner && a.start < b.end && b.start < a.end));
    assert.ok(overlap, "the two replicas ran jobs at the same time");

    // Every adapter is in the bucket once, written by its own job.
    for (let i = 0; i < JOBS; i++) {
      const m = await store.readManifest("adapters", `stone-${i}`);
      assert.equal(m.meta.job_id, ids[i]);
    }
    assert.deepEqual((await store.list("adapters")).sort(), Array.from({ length: JOBS }, (_, i) => `stone-${i}`).sort());
  });

  test("docker stop (SIGTERM, as on a rolling update) mid-job: the replica checkpoints and requeues it, the other one resumes it at once", async () => {
    const { job } = await c[0].createJob({ baseModel: "stories", dataset: "stone", outputAdapter: "stone-long", lora: { rank: 4 }, training: { ...TRAINING, maxSteps: 400, saveSteps: 100, loggingSteps: 5 } });
    const running = await waitForJob(c[0], job.id, (j) => j.state === JobState.RUNNING && (j.lastMetrics?.step ?? 0) >= 10, 3 * 60_000, "step 10");
    assert.ok(running.lastMetrics.step < 400);
    const db = await database();
    let owner;
    try {
      owner = (await db.query(`SELECT owner FROM ${SCHEMA}.jobs WHERE id = $1`, [job.id])).rows[0].owner;
    } finally {
      await db.end();
    }
    const i = replicas.findIndex((r) => r.id.startsWith(owner));
    assert.ok(i >= 0, `owner ${owner}`);
    const [stopped, other] = [replicas[i], replicas[1 - i]];
    const t = Date.now();
    const exitCode = await stopped.terminate(60);
    assert.equal(exitCode, 0, `the server exits 0 after a graceful shutdown\n${stopped.tail()}`);
    assert.ok(Date.now() - t < 60_000, "stopped within the grace period, not killed");

    // No lease to wait for: the job went back to the queue, and the other replica (polling every
    // second) picks it up and continues from the shutdown checkpoint.
    const done = await waitForJob(c[1 - i], job.id, (j) => [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED].includes(j.state), 3 * 60_000, "an end");
    assert.equal(done.state, JobState.SUCCEEDED, `${done.error}\n${other.tail()}`);
    assert.equal(done.attempts, 2);
    assert.ok(done.resumedFromStep >= 10 && done.resumedFromStep < 400, `resumed from ${done.resumedFromStep}`);
    const states = [];
    for await (const e of c[1 - i].watchJob({ id: job.id })) if (e.event.case === "state") states.push(`${JobState[e.event.value.state]} ${e.event.value.message}`);
    const text = states.join("\n");
    assert.match(text, new RegExp(`QUEUED interrupted by a shutdown at step \\d+; resumes from step ${done.resumedFromStep}`), text);
    assert.match(text, new RegExp(`RUNNING running on ${other.id.slice(0, 12)}`), text);
    assert.match(text, new RegExp(`RUNNING resumed from the checkpoint at step ${done.resumedFromStep} of 400`), text);
  });
});
