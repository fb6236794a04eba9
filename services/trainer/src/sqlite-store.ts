/**
 * JobStore on an embedded SQLite file (better-sqlite3), the default for one trainer process.
 *
 * WAL mode: readers (GetJob, WatchJob replays) never wait for the writer, and a crash loses at most
 * the transaction in flight. synchronous=NORMAL is durable across process crashes in WAL mode (what
 * a killed trainer needs); only an OS crash may lose the last commits, which the next run redoes
 * from its checkpoint anyway. Claims run in `BEGIN IMMEDIATE` transactions, which take the write
 * lock up front, so two processes on one file can never claim the same job.
 */
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import Database from "better-sqlite3";
import type {
  CancelOutcome,
  CheckpointRecord,
  Claim,
  HeartbeatResult,
  JobEvent,
  JobEventData,
  JobRecord,
  JobStateName,
  JobStore,
  JsonObject,
  MetricsRecord,
  NewJob,
  TerminalState,
} from "./job-store.js";
import {
  cancelsAtOnce,
  checkpointFromRow,
  CLAIM_ORDER,
  claimableWhere,
  claimMessage,
  eventFromRow,
  jobFromRow,
  type CheckpointRow,
  type EventRowColumns,
  type JobRowColumns,
} from "./job-rows.js";

export interface SqliteJobStoreOptions {
  /** Clock in ms (tests move it to expire leases). Default Date.now. */
  now?: () => number;
}

const SCHEMA_VERSION = 1;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS jobs (
  id                TEXT PRIMARY KEY,
  state             TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
  request           TEXT NOT NULL,
  created_at        INTEGER NOT NULL,
  started_at        INTEGER,
  finished_at       INTEGER,
  error             TEXT NOT NULL DEFAULT '',
  metrics           TEXT,
  output_adapter    TEXT NOT NULL,
  device            TEXT NOT NULL,
  resumed_from_step INTEGER NOT NULL DEFAULT 0,
  attempts          INTEGER NOT NULL DEFAULT 0,
  owner             TEXT,
  lease_expires_at  INTEGER,
  cancel_requested  INTEGER NOT NULL DEFAULT 0,
  event_seq         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS job_events (
  job_id  TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  seq     INTEGER NOT NULL,
  time    INTEGER NOT NULL,
  data    TEXT NOT NULL,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_checkpoints (
  job_id     TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  step       INTEGER NOT NULL,
  name       TEXT NOT NULL,
  size_bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
`;

/** A `jobs` row as better-sqlite3 returns it: JSON as text, the flag as 0/1. */
interface JobRow extends JobRowColumns {
  request: string;
  metrics: string | null;
  cancel_requested: number;
}

interface EventRow extends EventRowColumns {
  data: string;
}

function toJob(r: JobRow): JobRecord {
  return jobFromRow(r, {
    request: JSON.parse(r.request) as JsonObject,
    metrics: r.metrics ? (JSON.parse(r.metrics) as MetricsRecord) : null,
    cancelRequested: r.cancel_requested !== 0,
  });
}

function toEvent(r: EventRow): JobEvent {
  return eventFromRow(r, JSON.parse(r.data) as JobEventData);
}

export class SqliteJobStore implements JobStore {
  readonly kind = "sqlite";
  private readonly db: Database.Database;
  private readonly now: () => number;
  private closed = false;

  /** Opens (creating if needed) the database file; `path` ":memory:" works for tests. */
  constructor(readonly path: string, opts: SqliteJobStoreOptions = {}) {
    this.now = opts.now ?? Date.now;
    if (path !== ":memory:") mkdirSync(dirname(path), { recursive: true });
    this.db = new Database(path);
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.db.pragma("foreign_keys = ON");
    // Another process holding the write lock (a second trainer on the same file) is waited for.
    this.db.pragma("busy_timeout = 5000");
    const version = this.db.pragma("user_version", { simple: true }) as number;
    if (version > SCHEMA_VERSION) {
      throw new Error(`${path}: job database schema ${version} is newer than this trainer understands (${SCHEMA_VERSION})`);
    }
    this.db.exec(SCHEMA);
    this.db.pragma(`user_version = ${SCHEMA_VERSION}`);
  }

  private one(sql: string, ...params: unknown[]): JobRow | undefined {
    return this.db.prepare(sql).get(...params) as JobRow | undefined;
  }

  /** Appends an event; must run inside a transaction that also made the change it describes. */
  private appendEventTx(jobId: string, data: JobEventData, time: number): JobEvent {
    const row = this.db.prepare("UPDATE jobs SET event_seq = event_seq + 1 WHERE id = ? RETURNING event_seq").get(jobId) as
      | { event_seq: number }
      | undefined;
    if (!row) throw new Error(`job ${jobId} vanished while appending an event`);
    this.db.prepare("INSERT INTO job_events (job_id, seq, time, data) VALUES (?, ?, ?, ?)").run(jobId, row.event_seq, time, JSON.stringify(data));
    return { ...data, jobId, seq: row.event_seq, time };
  }

  async create(job: NewJob): Promise<{ job: JobRecord; event: JobEvent }> {
    const now = this.now();
    return this.db
      .transaction(() => {
        this.db
          .prepare("INSERT INTO jobs (id, state, request, created_at, output_adapter, device) VALUES (?, 'queued', ?, ?, ?, ?)")
          .run(job.id, JSON.stringify(job.request), now, job.outputAdapter, job.device);
        const event = this.appendEventTx(job.id, { kind: "state", state: "queued", message: job.message }, now);
        return { job: toJob(this.one("SELECT * FROM jobs WHERE id = ?", job.id)!), event };
      })
      .immediate();
  }

  async get(id: string): Promise<JobRecord | undefined> {
    const r = this.one("SELECT * FROM jobs WHERE id = ?", id);
    return r && toJob(r);
  }

  async list(filter: { states?: readonly JobStateName[] } = {}): Promise<JobRecord[]> {
    const states = filter.states;
    const rows =
      states && states.length > 0
        ? (this.db
            .prepare(`SELECT * FROM jobs WHERE state IN (${states.map(() => "?").join(",")}) ORDER BY created_at, id`)
            .all(...states) as JobRow[])
        : (this.db.prepare("SELECT * FROM jobs ORDER BY created_at, id").all() as JobRow[]);
    return rows.map(toJob);
  }

  async claimNext(replicaId: string, leaseMs: number): Promise<Claim | undefined> {
    const now = this.now();
    return this.db
      .transaction((): Claim | undefined => {
        const r = this.one(
          `SELECT * FROM jobs WHERE ${claimableWhere("?")} ${CLAIM_ORDER} LIMIT 1`,
          now,
        );
        if (!r) return undefined;
        const takenOver = r.state === "running";
        this.db
          .prepare(
            `UPDATE jobs SET state = 'running', owner = ?, lease_expires_at = ?, attempts = attempts + 1,
                    started_at = COALESCE(started_at, ?)
              WHERE id = ?`,
          )
          .run(replicaId, now + leaseMs, now, r.id);
        const job = toJob(this.one("SELECT * FROM jobs WHERE id = ?", r.id)!);
        const message = claimMessage(replicaId, job.attempts, takenOver, r.owner);
        const event = this.appendEventTx(r.id, { kind: "state", state: "running", message }, now);
        return { job, event, takenOver };
      })
      .immediate();
  }

  async heartbeat(id: string, replicaId: string, leaseMs: number): Promise<HeartbeatResult> {
    const r = this.db
      .prepare("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND owner = ? AND state = 'running' RETURNING cancel_requested")
      .get(this.now() + leaseMs, id, replicaId) as { cancel_requested: number } | undefined;
    return r ? { owned: true, cancelRequested: r.cancel_requested !== 0 } : { owned: false, cancelRequested: false };
  }

  async recordProgress(
    id: string,
    replicaId: string,
    patch: { metrics?: MetricsRecord; resumedFromStep?: number },
    event?: JobEventData,
  ): Promise<{ owned: boolean; event?: JobEvent }> {
    const now = this.now();
    return this.db
      .transaction(() => {
        const res = this.db
          .prepare(
            `UPDATE jobs SET metrics = COALESCE(?, metrics), resumed_from_step = COALESCE(?, resumed_from_step)
              WHERE id = ? AND owner = ? AND state = 'running'`,
          )
          .run(patch.metrics ? JSON.stringify(patch.metrics) : null, patch.resumedFromStep ?? null, id, replicaId);
        if (res.changes === 0) return { owned: false };
        return event ? { owned: true, event: this.appendEventTx(id, event, now) } : { owned: true };
      })
      .immediate();
  }

  async addCheckpoint(replicaId: string, c: CheckpointRecord): Promise<JobEvent | undefined> {
    const now = this.now();
    return this.db
      .transaction(() => {
        if (!this.one("SELECT * FROM jobs WHERE id = ? AND owner = ? AND state = 'running'", c.jobId, replicaId)) return undefined;
        this.db
          .prepare("INSERT OR REPLACE INTO job_checkpoints (job_id, step, name, size_bytes, created_at) VALUES (?, ?, ?, ?, ?)")
          .run(c.jobId, c.step, c.name, c.sizeBytes, c.createdAt);
        const { jobId: _, ...checkpoint } = c;
        return this.appendEventTx(c.jobId, { kind: "checkpoint", checkpoint }, now);
      })
      .immediate();
  }

  async removeCheckpoint(id: string, step: number): Promise<void> {
    this.db.prepare("DELETE FROM job_checkpoints WHERE job_id = ? AND step = ?").run(id, step);
  }

  async listCheckpoints(id: string): Promise<CheckpointRecord[]> {
    return (this.db.prepare("SELECT * FROM job_checkpoints WHERE job_id = ? ORDER BY step").all(id) as CheckpointRow[]).map(checkpointFromRow);
  }

  async finish(
    id: string,
    replicaId: string,
    outcome: { state: TerminalState; message: string; error?: string; metrics?: MetricsRecord },
  ): Promise<JobEvent | undefined> {
    const now = this.now();
    return this.db
      .transaction(() => {
        const res = this.db
          .prepare(
            `UPDATE jobs SET state = ?, finished_at = ?, error = ?, metrics = COALESCE(?, metrics), owner = NULL, lease_expires_at = NULL
              WHERE id = ? AND owner = ? AND state = 'running'`,
          )
          .run(outcome.state, now, outcome.error ?? "", outcome.metrics ? JSON.stringify(outcome.metrics) : null, id, replicaId);
        if (res.changes === 0) return undefined;
        return this.appendEventTx(id, { kind: "state", state: outcome.state, message: outcome.message }, now);
      })
      .immediate();
  }

  async release(id: string, replicaId: string, message: string): Promise<JobEvent | undefined> {
    const now = this.now();
    return this.db
      .transaction(() => {
        const res = this.db
          .prepare("UPDATE jobs SET state = 'queued', owner = NULL, lease_expires_at = NULL WHERE id = ? AND owner = ? AND state = 'running'")
          .run(id, replicaId);
        if (res.changes === 0) return undefined;
        return this.appendEventTx(id, { kind: "state", state: "queued", message }, now);
      })
      .immediate();
  }

  async cancel(id: string, message: string): Promise<{ job: JobRecord; outcome: CancelOutcome; event?: JobEvent } | undefined> {
    const now = this.now();
    return this.db
      .transaction(() => {
        const r = this.one("SELECT * FROM jobs WHERE id = ?", id);
        if (!r) return undefined;
        let outcome: CancelOutcome;
        let event: JobEvent | undefined;
        if (cancelsAtOnce(r.state, r.lease_expires_at, now)) {
          this.db
            .prepare("UPDATE jobs SET state = 'cancelled', finished_at = ?, owner = NULL, lease_expires_at = NULL, cancel_requested = 1 WHERE id = ?")
            .run(now, id);
          event = this.appendEventTx(id, { kind: "state", state: "cancelled", message }, now);
          outcome = "cancelled";
        } else if (r.state === "running") {
          this.db.prepare("UPDATE jobs SET cancel_requested = 1 WHERE id = ?").run(id);
          outcome = "requested";
        } else {
          outcome = "final";
        }
        const job = toJob(this.one("SELECT * FROM jobs WHERE id = ?", id)!);
        return event ? { job, outcome, event } : { job, outcome };
      })
      .immediate();
  }

  async expireLeasesOf(replicaId: string): Promise<number> {
    return this.db.prepare("UPDATE jobs SET lease_expires_at = 0 WHERE owner = ? AND state = 'running'").run(replicaId).changes;
  }

  async listEvents(id: string, afterSeq: number, limit = 1000): Promise<JobEvent[]> {
    return (
      this.db.prepare("SELECT * FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?").all(id, afterSeq, limit) as EventRow[]
    ).map(toEvent);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.db.close();
  }
}
