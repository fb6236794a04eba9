/**
 * PostgresJobStore against a real PostgreSQL (tests/support/start-postgres.sh). Without
 * QLORA_TEST_DATABASE_URL the tests are skipped with the reason. Each test works in its own
 * PostgreSQL schema, dropped afterwards.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import pg from "pg";
import { AlreadyExists, FailedPrecondition, InvalidArgument, QloraError } from "@qlora/core";
import { PostgresJobStore, POSTGRES_SCHEMA_VERSION, openPostgresJobStoreFromEnv, type PostgresJobStoreOptions } from "../src/jobstore-postgres.js";
import { SqliteJobStore } from "../src/sqlite-store.js";
import type { JobStore, MetricsRecord } from "../src/job-store.js";

const DB_URL = process.env.QLORA_TEST_DATABASE_URL;
const NO_SERVER = "no PostgreSQL: set QLORA_TEST_DATABASE_URL or run tests/support/start-postgres.sh and source its env file";
// CI sets QLORA_TEST_REQUIRE_SERVERS=1: a missing server is then a failure, not a skip.
const SKIP = DB_URL || process.env.QLORA_TEST_REQUIRE_SERVERS === "1" ? false : NO_SERVER;
const requireServer = () => {
  if (!DB_URL) throw new Error(`QLORA_TEST_REQUIRE_SERVERS=1 but ${NO_SERVER}`);
};

interface Ctx {
  schema: string;
  /** Another store instance on this test's schema: another trainer replica with its own pool. */
  open(extra?: Partial<PostgresJobStoreOptions>): Promise<PostgresJobStore>;
  sql(text: string, params?: unknown[]): Promise<pg.QueryResult>;
}

async function withSchema(fn: (c: Ctx) => Promise<void>): Promise<void> {
  requireServer();
  const schema = `t_${Date.now().toString(36)}_${randomBytes(4).toString("hex")}`;
  const admin = new pg.Client({ connectionString: DB_URL });
  await admin.connect();
  const stores: PostgresJobStore[] = [];
  try {
    await fn({
      schema,
      async open(extra = {}) {
        const s = await PostgresJobStore.open({ connectionString: DB_URL!, schema, ...extra });
        stores.push(s);
        return s;
      },
      sql: (text, params = []) => admin.query(text, params),
    });
  } finally {
    for (const s of stores) await s.close();
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    await admin.end();
  }
}

function clock(start = 1_000_000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

const add = (s: JobStore, id: string, request: Record<string, unknown> = { baseModel: "m", dataset: "d" }) =>
  s.create({ id, request, outputAdapter: `${id}-out`, device: "cpu", message: "queued" });

const metrics = (step: number): MetricsRecord => ({ step, totalSteps: 10, epoch: step / 10, loss: 2.5 - step * 0.1, learningRate: 0.0002, gradNorm: 1.25, tokensPerSecond: 1234.5 });

/**
 * The whole JobStore contract as one scripted scenario on a fake clock; returns every observation.
 * Run on PostgreSQL and on the SQLite reference, the traces must be identical.
 */
async function scenario(s: JobStore, c: ReturnType<typeof clock>): Promise<unknown[]> {
  const t: unknown[] = [];
  const note = (label: string, v: unknown) => t.push([label, v === undefined ? "undefined" : JSON.parse(JSON.stringify(v))]);
  const fail = async (label: string, p: Promise<unknown>) => {
    try {
      await p;
      note(label, "resolved");
    } catch {
      note(label, "rejected");
    }
  };
  note("create a", await add(s, "a", { z: 1, a: [1, 2, { x: "é\n\"q\"" }], m: { lr: 0.0002, big: 1e21, neg: -0.5 } }));
  c.advance(1);
  note("create b", await add(s, "b"));
  c.advance(1);
  note("create c", await add(s, "c"));
  await fail("duplicate", add(s, "a"));
  note("get a", await s.get("a"));
  note("get none", await s.get("none"));
  note("list", await s.list());
  note("list queued", await s.list({ states: ["queued"] }));
  note("list empty filter", await s.list({ states: [] }));
  note("claim r1", await s.claimNext("r1", 1000));
  note("claim r2", await s.claimNext("r2", 1000));
  note("list running", await s.list({ states: ["running", "failed"] }));
  c.advance(500);
  note("hb r1 a", await s.heartbeat("a", "r1", 1000));
  note("hb wrong owner", await s.heartbeat("a", "r2", 1000));
  note("hb unknown", await s.heartbeat("zzz", "r1", 1000));
  note("progress", await s.recordProgress("a", "r1", { metrics: metrics(3), resumedFromStep: 2 }, { kind: "metrics", metrics: metrics(3) }));
  note("progress no event", await s.recordProgress("a", "r1", { resumedFromStep: 2 }));
  note("progress not owner", await s.recordProgress("a", "r2", { metrics: metrics(9) }));
  for (const step of [20, 10, 30]) note(`ckpt ${step}`, await s.addCheckpoint("r1", { jobId: "a", step, name: `a.checkpoint-${step}`, sizeBytes: step * 1000, createdAt: step }));
  note("ckpt replace", await s.addCheckpoint("r1", { jobId: "a", step: 20, name: "a.checkpoint-20b", sizeBytes: 7, createdAt: 21 }));
  note("ckpt not owner", await s.addCheckpoint("r2", { jobId: "a", step: 40, name: "x", sizeBytes: 1, createdAt: 1 }));
  await s.removeCheckpoint("a", 10);
  note("ckpts", await s.listCheckpoints("a"));
  note("cancel running", await s.cancel("b", "please stop"));
  note("hb sees cancel", await s.heartbeat("b", "r2", 1000));
  note("finish b cancelled", await s.finish("b", "r2", { state: "cancelled", message: "stopped at step 1" }));
  note("cancel ended", await s.cancel("b", "again"));
  note("cancel queued", await s.cancel("c", "never mind"));
  note("cancel unknown", await s.cancel("nope", "x"));
  note("claim none", await s.claimNext("r3", 1000));
  c.advance(1600); // a's lease (renewed at +500 for 1000) has expired
  note("claim takeover", await s.claimNext("r3", 1000));
  note("old owner finish", await s.finish("a", "r1", { state: "failed", message: "late", error: "late" }));
  note("old owner release", await s.release("a", "r1", "late"));
  note("release", await s.release("a", "r3", "shutting down"));
  note("reclaim", await s.claimNext("r3", 1000));
  note("expire r3", await s.expireLeasesOf("r3"));
  note("expire nobody", await s.expireLeasesOf("r9"));
  note("restarted replica reclaims", await s.claimNext("r3", 1000));
  note("expire r3 again", await s.expireLeasesOf("r3"));
  note("claim after expire", await s.claimNext("r4", 1000));
  c.advance(5);
  note("finish", await s.finish("a", "r4", { state: "succeeded", message: "done", metrics: metrics(10) }));
  note("finish twice", await s.finish("a", "r4", { state: "failed", message: "x" }));
  await add(s, "d");
  await s.claimNext("dead", 100);
  c.advance(1000);
  note("cancel expired owner", await s.cancel("d", "by request"));
  note("events a", await s.listEvents("a", 0));
  note("events a after 3 limit 2", await s.listEvents("a", 3, 2));
  note("events none", await s.listEvents("nope", 0));
  note("final list", await s.list());
  return t;
}

test("PostgresJobStore behaves exactly like the SQLite reference over the whole contract", { skip: SKIP }, async () => {
  const liteClock = clock();
  const lite = new SqliteJobStore(":memory:", { now: liteClock.now });
  const expected = await scenario(lite, liteClock);
  await lite.close();
  await withSchema(async ({ open }) => {
    const c = clock();
    const s = await open({ now: c.now });
    assert.equal(s.kind, "postgres");
    const got = await scenario(s, c);
    assert.equal(got.length, expected.length);
    for (let i = 0; i < got.length; i++) assert.deepEqual(got[i], expected[i], `observation ${i}: ${JSON.stringify((expected[i] as unknown[])[0])}`);
  });
});

test("spot checks of the contract on PostgreSQL (independent of the SQLite reference)", { skip: SKIP }, async () => {
  await withSchema(async ({ open }) => {
    const c = clock();
    const s = await open({ now: c.now });
    const { job, event } = await add(s, "a", { baseModel: "m", nested: { k: [1, 2] } });
    assert.deepEqual(job.request, { baseModel: "m", nested: { k: [1, 2] } });
    assert.equal(job.createdAt, 1_000_000);
    assert.deepEqual([event.seq, event.kind], [1, "state"]);
    await assert.rejects(add(s, "a"), AlreadyExists);
    const cl = await s.claimNext("r1", 1000);
    assert.equal(cl?.job.leaseExpiresAt, 1_001_000);
    assert.equal(cl?.job.attempts, 1);
    assert.equal(cl?.takenOver, false);
    c.advance(1001);
    const t = await s.claimNext("r2", 1000);
    assert.equal(t?.takenOver, true);
    assert.equal(t?.job.attempts, 2);
    assert.match(t!.event.kind === "state" ? t!.event.message : "", /taken over by r2/);
    assert.deepEqual(await s.heartbeat("a", "r1", 1000), { owned: false, cancelRequested: false });
    assert.deepEqual((await s.listEvents("a", 0)).map((e) => e.seq), [1, 2, 3]);
  });
});

test("two replicas racing to claim N jobs never claim the same job twice", { skip: SKIP }, async () => {
  await withSchema(async ({ open, sql, schema }) => {
    const A = await open({ maxConnections: 4 });
    const B = await open({ maxConnections: 4 });
    const N = 120;
    for (let i = 0; i < N; i++) await add(A, `j${String(i).padStart(3, "0")}`);
    // Warm both pools so the race starts with every connection open.
    await Promise.all([A, B].flatMap((s) => [0, 1, 2, 3].map(() => s.list({ states: ["succeeded"] }))));
    let go!: () => void;
    const start = new Promise<void>((r) => (go = r));
    const loop = async (s: PostgresJobStore, replica: string): Promise<string[]> => {
      await start;
      const mine: string[] = [];
      for (;;) {
        const cl = await s.claimNext(replica, 60_000);
        if (!cl) return mine;
        assert.equal(cl.job.owner, replica);
        mine.push(cl.job.id);
      }
    };
    const runs = [...[0, 1, 2, 3].map(() => loop(A, "replica-a")), ...[0, 1, 2, 3].map(() => loop(B, "replica-b"))];
    go();
    const results = await Promise.all(runs);
    const a = results.slice(0, 4).flat();
    const b = results.slice(4).flat();
    const all = [...a, ...b];
    assert.equal(all.length, N, "every job claimed");
    assert.equal(new Set(all).size, N, "no job claimed twice");
    assert.ok(a.length > 0 && b.length > 0, `both replicas took part: a=${a.length} b=${b.length}`);
    const jobs = await A.list();
    assert.ok(jobs.every((j) => j.state === "running" && j.attempts === 1));
    for (const id of a) assert.equal(jobs.find((j) => j.id === id)?.owner, "replica-a");
    for (const id of b) assert.equal(jobs.find((j) => j.id === id)?.owner, "replica-b");
    // Exactly one "running" event per job: no claim was half-applied.
    const ev = await sql(`SELECT job_id, count(*)::int AS n FROM "${schema}".job_events GROUP BY job_id HAVING count(*) <> 2`);
    assert.deepEqual(ev.rows, []);

    // Now every job's lease expires at once and both replicas race to take them over.
    await sql(`UPDATE "${schema}".jobs SET lease_expires_at = 0`);
    const taken = await Promise.all([A, B, A, B].map(async (s, k) => {
      const mine: string[] = [];
      for (;;) {
        const cl = await s.claimNext(`taker-${k}`, 60_000);
        if (!cl) return mine;
        assert.equal(cl.takenOver, true);
        mine.push(cl.job.id);
      }
    }));
    const again = taken.flat();
    assert.equal(again.length, N);
    assert.equal(new Set(again).size, N, "no job taken over twice");
    assert.ok((await A.list()).every((j) => j.attempts === 2));
  });
});

test("a replica that dies loses its job to another after the lease expires (database clock); heartbeats keep it", { skip: SKIP }, async () => {
  await withSchema(async ({ open }) => {
    const A = await open();
    const B = await open();
    await add(A, "job");
    const LEASE = 600;
    const claimed = await A.claimNext("replica-a", LEASE);
    assert.equal(claimed?.job.id, "job");
    assert.ok(Math.abs(claimed!.job.leaseExpiresAt! - Date.now() - LEASE) < 5_000, "lease times come from the database clock (ms since the epoch)");
    // While A heartbeats, B gets nothing.
    for (let i = 0; i < 4; i++) {
      await new Promise((r) => setTimeout(r, LEASE / 3));
      assert.deepEqual(await A.heartbeat("job", "replica-a", LEASE), { owned: true, cancelRequested: false });
      assert.equal(await B.claimNext("replica-b", LEASE), undefined);
    }
    await A.recordProgress("job", "replica-a", { metrics: metrics(4) });
    await A.addCheckpoint("replica-a", { jobId: "job", step: 4, name: "job.checkpoint-4", sizeBytes: 10, createdAt: Date.now() });
    // A dies: no more heartbeats, its connections go away.
    await A.close();
    assert.equal(await B.claimNext("replica-b", LEASE), undefined, "not before the lease runs out");
    await new Promise((r) => setTimeout(r, LEASE + 100));
    const t = await B.claimNext("replica-b", 60_000);
    assert.equal(t?.job.id, "job");
    assert.equal(t?.takenOver, true);
    assert.equal(t?.job.attempts, 2);
    assert.equal(t?.job.metrics?.step, 4, "progress survives the takeover");
    assert.deepEqual((await B.listCheckpoints("job")).map((c) => c.step), [4], "so does the checkpoint to resume from");
    // A comes back (a new process with the same replica id, or a paused one): refused everywhere.
    const A2 = await open();
    assert.deepEqual(await A2.heartbeat("job", "replica-a", LEASE), { owned: false, cancelRequested: false });
    assert.equal(await A2.finish("job", "replica-a", { state: "failed", message: "x", error: "x" }), undefined);
    assert.equal((await A2.recordProgress("job", "replica-a", { resumedFromStep: 1 })).owned, false);
    assert.equal(await A2.expireLeasesOf("replica-a"), 0);
    await B.recordProgress("job", "replica-b", { resumedFromStep: 4 }, { kind: "state", state: "running", message: "resumed from step 4" });
    const done = await B.finish("job", "replica-b", { state: "succeeded", message: "done" });
    assert.equal(done?.kind === "state" && done.state, "succeeded");
    const j = await A2.get("job");
    assert.equal(j?.state, "succeeded");
    assert.equal(j?.resumedFromStep, 4);
    assert.equal(j?.owner, null);
    const events = await A2.listEvents("job", 0);
    assert.deepEqual(
      events.map((e) => (e.kind === "state" ? `${e.state}` : e.kind)),
      ["queued", "running", "checkpoint", "running", "running", "succeeded"],
    );
    assert.match(events[3]!.kind === "state" ? events[3]!.message : "", /taken over by replica-b \(attempt 2\)/);
  });
});

test("schema migration on open: once under concurrent starts, idempotent, refuses a newer schema", { skip: SKIP }, async () => {
  await withSchema(async ({ open, sql, schema }) => {
    const stores = await Promise.all([open(), open(), open()]);
    const v = await sql(`SELECT version FROM "${schema}".schema_migrations ORDER BY version`);
    assert.deepEqual(v.rows.map((r: { version: number }) => r.version), Array.from({ length: POSTGRES_SCHEMA_VERSION }, (_, i) => i + 1));
    await add(stores[0]!, "kept");
    await stores[0]!.close();
    const again = await open();
    assert.equal((await again.get("kept"))?.id, "kept", "reopening keeps the data");
    await sql(`INSERT INTO "${schema}".schema_migrations (version) VALUES (99)`);
    await assert.rejects(open(), (e: unknown) => e instanceof FailedPrecondition && /version 99/.test(e.message));
  });
});

test("configuration and connection errors", { skip: SKIP }, async () => {
  requireServer();
  await assert.rejects(PostgresJobStore.open({}), InvalidArgument);
  await assert.rejects(PostgresJobStore.open({ connectionString: DB_URL!, schema: "Bad-Name" }), InvalidArgument);
  await assert.rejects(openPostgresJobStoreFromEnv({}), /QLORA_DATABASE_URL/);
  // Nothing listens on port 1: UNAVAILABLE, quickly.
  await assert.rejects(
    PostgresJobStore.open({ connectionString: "postgres://postgres@127.0.0.1:1/x", poolConfig: { connectionTimeoutMillis: 2000 } }),
    (e: unknown) => e instanceof QloraError && e.code === "UNAVAILABLE",
  );
  const schema = `t_env_${randomBytes(4).toString("hex")}`;
  const s = await openPostgresJobStoreFromEnv({ QLORA_DATABASE_URL: DB_URL, QLORA_DATABASE_SCHEMA: schema });
  try {
    assert.equal(s.schema, schema);
    assert.deepEqual(await s.list(), []);
  } finally {
    await s.close();
    const admin = new pg.Client({ connectionString: DB_URL });
    await admin.connect();
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    await admin.end();
  }
  await assert.rejects(s.list(), FailedPrecondition, "a closed store refuses calls");
});
