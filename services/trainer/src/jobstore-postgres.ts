/**
 * JobStore on PostgreSQL (`pg`), for several trainer replicas sharing one queue (docs/store.md,
 * "The job store on PostgreSQL"). Same contract as SqliteJobStore (job-store.ts), with these choices:
 *
 * - Claims: one transaction that picks the next claimable row with `SELECT … FOR UPDATE SKIP LOCKED`
 *   (expired running jobs first, then queued ones oldest first), moves it to `running` under the
 *   replica's lease and appends the event. Two replicas claiming at once lock different rows (a
 *   row another transaction holds is skipped, not waited for), and a row that stopped matching
 *   after its lock was taken is re-checked by PostgreSQL and skipped, so no job is handed out twice.
 * - Every conditional write (`WHERE owner = $replica AND state = 'running'`) and its event commit
 *   together; a replica that lost its lease changes nothing.
 * - Time is the database server's clock (milliseconds since the epoch), read once per transaction,
 *   so replicas with skewed clocks agree on lease expiry. Tests may pass `now` instead.
 * - The schema lives in its own PostgreSQL schema (default `qlora`) and is migrated on open under
 *   an advisory lock, so replicas starting together migrate once; a database migrated by a newer
 *   trainer is refused.
 */
import pg from "pg";
import { AlreadyExists, FailedPrecondition, InvalidArgument, QloraError } from "@qlora/core";
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

export interface PostgresJobStoreOptions {
  /** postgres://user:password@host:port/db (e.g. QLORA_DATABASE_URL); or pass `pool`. */
  connectionString?: string;
  /** Other pg pool settings (host, ssl, …), merged under connectionString. */
  poolConfig?: pg.PoolConfig;
  /** Connections in this store's pool. Default 4. */
  maxConnections?: number;
  /** PostgreSQL schema holding the tables; created if missing. Default "qlora". */
  schema?: string;
  /** Clock in ms (tests); default: the database server's clock. */
  now?: () => number;
}

/** The schema version this code writes; migrations[i] brings a database from version i to i+1. */
export const POSTGRES_SCHEMA_VERSION = 1;

const migrations: ((s: string) => string)[] = [
  (s) => `
CREATE TABLE ${s}.jobs (
  id                text PRIMARY KEY,
  state             text NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
  request           json NOT NULL,
  created_at        bigint NOT NULL,
  started_at        bigint,
  finished_at       bigint,
  error             text NOT NULL DEFAULT '',
  metrics           json,
  output_adapter    text NOT NULL,
  device            text NOT NULL,
  resumed_from_step integer NOT NULL DEFAULT 0,
  attempts          integer NOT NULL DEFAULT 0,
  owner             text,
  lease_expires_at  bigint,
  cancel_requested  boolean NOT NULL DEFAULT false,
  event_seq         integer NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_state ON ${s}.jobs (state, created_at, id);
CREATE INDEX jobs_queued ON ${s}.jobs (created_at, id) WHERE state = 'queued';
CREATE INDEX jobs_leases ON ${s}.jobs (lease_expires_at) WHERE state = 'running';
CREATE TABLE ${s}.job_events (
  job_id text NOT NULL REFERENCES ${s}.jobs(id) ON DELETE CASCADE,
  seq    integer NOT NULL,
  time   bigint NOT NULL,
  data   json NOT NULL,
  PRIMARY KEY (job_id, seq)
);
CREATE TABLE ${s}.job_checkpoints (
  job_id     text NOT NULL REFERENCES ${s}.jobs(id) ON DELETE CASCADE,
  step       integer NOT NULL,
  name       text NOT NULL,
  size_bytes bigint NOT NULL,
  created_at bigint NOT NULL,
  PRIMARY KEY (job_id, step)
);`,
];

/** A `jobs` row as pg returns it: the json and boolean columns decoded. */
interface JobRow extends JobRowColumns {
  request: JsonObject;
  metrics: MetricsRecord | null;
  cancel_requested: boolean;
}

interface EventRow extends EventRowColumns {
  data: JobEventData;
}

function toJob(r: JobRow): JobRecord {
  return jobFromRow(r, { request: r.request, metrics: r.metrics, cancelRequested: r.cancel_requested });
}

/** int8 (bigint: times, sizes) as a JS number; every value stored here is far below 2^53. */
const typeParsers = {
  getTypeParser(oid: number, format?: string): (v: string) => unknown {
    if (oid === pg.types.builtins.INT8) return (v: string) => Number(v);
    return pg.types.getTypeParser(oid, (format ?? "text") as "text") as (v: string) => unknown;
  },
};

const NOW_MS = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now";

/** SQLSTATEs worth retrying the whole transaction for. */
const RETRYABLE = new Set(["40001", "40P01"]);

function isConnectionError(e: unknown): boolean {
  const code = (e as { code?: string } | null)?.code ?? "";
  return (
    code.startsWith("08") ||
    code === "57P01" ||
    code === "57P02" ||
    code === "57P03" ||
    code === "53300" ||
    ["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND", "EHOSTUNREACH"].includes(code) ||
    /Connection terminated|timeout exceeded when trying to connect|Client has encountered a connection error/i.test((e as Error)?.message ?? "")
  );
}

function wrap(e: unknown): unknown {
  if (e instanceof QloraError) return e;
  if (isConnectionError(e)) return new QloraError("UNAVAILABLE", `job database unavailable: ${(e as Error).message}`, { cause: e });
  return e;
}

export class PostgresJobStore implements JobStore {
  readonly kind = "postgres";
  readonly schema: string;
  private readonly pool: pg.Pool;
  private readonly clock: (() => number) | undefined;
  private readonly s: string;
  private closed = false;

  /** Use `PostgresJobStore.open`, which also migrates the schema. */
  private constructor(opts: PostgresJobStoreOptions) {
    const schema = opts.schema ?? "qlora";
    if (!/^[a-z_][a-z0-9_]{0,62}$/.test(schema)) throw new InvalidArgument(`job store schema ${JSON.stringify(schema)}: use lowercase letters, digits and "_"`);
    this.schema = schema;
    this.s = `"${schema}"`;
    this.clock = opts.now;
    const cfg: pg.PoolConfig = { max: opts.maxConnections ?? 4, connectionTimeoutMillis: 10_000, ...(opts.poolConfig ?? {}), types: typeParsers };
    if (opts.connectionString) cfg.connectionString = opts.connectionString;
    this.pool = new pg.Pool(cfg);
    // An idle connection that breaks (server restart) is dropped from the pool; the next query opens
    // a new one. Without a listener the error would crash the process.
    this.pool.on("error", () => undefined);
  }

  /** Connects, migrates the schema (once, under an advisory lock) and returns the store. */
  static async open(opts: PostgresJobStoreOptions): Promise<PostgresJobStore> {
    if (!opts.connectionString && !opts.poolConfig) throw new InvalidArgument("PostgresJobStore needs a connectionString (QLORA_DATABASE_URL)");
    const store = new PostgresJobStore(opts);
    try {
      await store.migrate();
    } catch (e) {
      await store.pool.end().catch(() => undefined);
      throw wrap(e);
    }
    return store;
  }

  private async migrate(): Promise<void> {
    const c = await this.pool.connect();
    try {
      await c.query("BEGIN");
      await c.query("SELECT pg_advisory_xact_lock(hashtext($1))", [`qlora.jobstore.${this.schema}`]);
      await c.query(`CREATE SCHEMA IF NOT EXISTS ${this.s}`);
      await c.query(`CREATE TABLE IF NOT EXISTS ${this.s}.schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`);
      const { rows } = await c.query<{ v: number | null }>(`SELECT max(version) AS v FROM ${this.s}.schema_migrations`);
      const current = rows[0]?.v ?? 0;
      if (current > POSTGRES_SCHEMA_VERSION) {
        throw new FailedPrecondition(
          `job database schema "${this.schema}" is at version ${current}, newer than this trainer understands (${POSTGRES_SCHEMA_VERSION})`,
        );
      }
      for (let v = current; v < POSTGRES_SCHEMA_VERSION; v++) {
        await c.query(migrations[v]!(this.s));
        await c.query(`INSERT INTO ${this.s}.schema_migrations (version) VALUES ($1)`, [v + 1]);
      }
      await c.query("COMMIT");
    } catch (e) {
      await c.query("ROLLBACK").catch(() => undefined);
      throw e;
    } finally {
      c.release();
    }
  }

  private async now(c: pg.PoolClient | pg.Pool): Promise<number> {
    if (this.clock) return this.clock();
    const { rows } = await c.query<{ now: number }>(NOW_MS);
    return rows[0]!.now;
  }

  /** Runs `fn` in a READ COMMITTED transaction (retried on serialization failures and deadlocks). */
  private async tx<T>(fn: (c: pg.PoolClient, now: number) => Promise<T>): Promise<T> {
    if (this.closed) throw new FailedPrecondition("the job store is closed");
    for (let attempt = 1; ; attempt++) {
      let c: pg.PoolClient;
      try {
        c = await this.pool.connect();
      } catch (e) {
        throw wrap(e);
      }
      let broken = false;
      try {
        await c.query("BEGIN");
        const out = await fn(c, await this.now(c));
        await c.query("COMMIT");
        return out;
      } catch (e) {
        broken = isConnectionError(e);
        if (!broken) await c.query("ROLLBACK").catch(() => (broken = true));
        const code = (e as { code?: string }).code ?? "";
        if (RETRYABLE.has(code) && attempt < 5) continue;
        throw wrap(e);
      } finally {
        c.release(broken);
      }
    }
  }

  private async q<R extends pg.QueryResultRow>(sql: string, params: unknown[] = []): Promise<pg.QueryResult<R>> {
    if (this.closed) throw new FailedPrecondition("the job store is closed");
    try {
      return await this.pool.query<R>(sql, params);
    } catch (e) {
      throw wrap(e);
    }
  }

  /** Appends an event in the transaction that made the change it describes. */
  private async appendEvent(c: pg.PoolClient, jobId: string, data: JobEventData, time: number): Promise<JobEvent> {
    const { rows } = await c.query<{ seq: number }>(
      `WITH s AS (UPDATE ${this.s}.jobs SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq)
       INSERT INTO ${this.s}.job_events (job_id, seq, time, data) SELECT $1, event_seq, $2, $3::json FROM s RETURNING seq`,
      [jobId, time, JSON.stringify(data)],
    );
    if (!rows[0]) throw new Error(`job ${jobId} vanished while appending an event`);
    return { ...data, jobId, seq: rows[0].seq, time };
  }

  async create(job: NewJob): Promise<{ job: JobRecord; event: JobEvent }> {
    return this.tx(async (c, now) => {
      let rows: JobRow[];
      try {
        ({ rows } = await c.query<JobRow>(
          `INSERT INTO ${this.s}.jobs (id, state, request, created_at, output_adapter, device)
           VALUES ($1, 'queued', $2::json, $3, $4, $5) RETURNING *`,
          [job.id, JSON.stringify(job.request), now, job.outputAdapter, job.device],
        ));
      } catch (e) {
        if ((e as { code?: string }).code === "23505") throw new AlreadyExists(`job ${JSON.stringify(job.id)} already exists`, { cause: e });
        throw e;
      }
      const event = await this.appendEvent(c, job.id, { kind: "state", state: "queued", message: job.message }, now);
      return { job: toJob(rows[0]!), event };
    });
  }

  async get(id: string): Promise<JobRecord | undefined> {
    const { rows } = await this.q<JobRow>(`SELECT * FROM ${this.s}.jobs WHERE id = $1`, [id]);
    return rows[0] && toJob(rows[0]);
  }

  async list(filter: { states?: readonly JobStateName[] } = {}): Promise<JobRecord[]> {
    const states = filter.states;
    const { rows } =
      states && states.length > 0
        ? await this.q<JobRow>(`SELECT * FROM ${this.s}.jobs WHERE state = ANY($1::text[]) ORDER BY created_at, id`, [states])
        : await this.q<JobRow>(`SELECT * FROM ${this.s}.jobs ORDER BY created_at, id`);
    return rows.map(toJob);
  }

  async claimNext(replicaId: string, leaseMs: number): Promise<Claim | undefined> {
    return this.tx(async (c, now) => {
      // SKIP LOCKED: a row that another replica is claiming right now is passed over instead of waited for.
      const pick = await c.query<{ id: string; state: JobStateName; owner: string | null }>(
        `SELECT id, state, owner FROM ${this.s}.jobs WHERE ${claimableWhere("$1")} ${CLAIM_ORDER} LIMIT 1 FOR UPDATE SKIP LOCKED`,
        [now],
      );
      const r = pick.rows[0];
      if (!r) return undefined;
      const takenOver = r.state === "running";
      const { rows } = await c.query<JobRow>(
        `UPDATE ${this.s}.jobs SET state = 'running', owner = $1, lease_expires_at = $2, attempts = attempts + 1,
                started_at = COALESCE(started_at, $3)
          WHERE id = $4 RETURNING *`,
        [replicaId, now + leaseMs, now, r.id],
      );
      const job = toJob(rows[0]!);
      const message = claimMessage(replicaId, job.attempts, takenOver, r.owner);
      const event = await this.appendEvent(c, r.id, { kind: "state", state: "running", message }, now);
      return { job, event, takenOver };
    });
  }

  async heartbeat(id: string, replicaId: string, leaseMs: number): Promise<HeartbeatResult> {
    const now = this.clock ? this.clock() : undefined;
    const { rows } = await this.q<{ cancel_requested: boolean }>(
      `UPDATE ${this.s}.jobs
          SET lease_expires_at = COALESCE($4::bigint, (extract(epoch FROM clock_timestamp()) * 1000)::bigint) + $3
        WHERE id = $1 AND owner = $2 AND state = 'running'
        RETURNING cancel_requested`,
      [id, replicaId, leaseMs, now ?? null],
    );
    return rows[0] ? { owned: true, cancelRequested: rows[0].cancel_requested } : { owned: false, cancelRequested: false };
  }

  async recordProgress(
    id: string,
    replicaId: string,
    patch: { metrics?: MetricsRecord; resumedFromStep?: number },
    event?: JobEventData,
  ): Promise<{ owned: boolean; event?: JobEvent }> {
    return this.tx(async (c, now) => {
      const res = await c.query(
        `UPDATE ${this.s}.jobs SET metrics = COALESCE($1::json, metrics), resumed_from_step = COALESCE($2, resumed_from_step)
          WHERE id = $3 AND owner = $4 AND state = 'running'`,
        [patch.metrics ? JSON.stringify(patch.metrics) : null, patch.resumedFromStep ?? null, id, replicaId],
      );
      if (res.rowCount === 0) return { owned: false };
      return event ? { owned: true, event: await this.appendEvent(c, id, event, now) } : { owned: true };
    });
  }

  async addCheckpoint(replicaId: string, cp: CheckpointRecord): Promise<JobEvent | undefined> {
    return this.tx(async (c, now) => {
      // Lock the job row: the ownership check holds until the checkpoint and its event are in.
      const own = await c.query(`SELECT 1 FROM ${this.s}.jobs WHERE id = $1 AND owner = $2 AND state = 'running' FOR UPDATE`, [cp.jobId, replicaId]);
      if (own.rowCount === 0) return undefined;
      await c.query(
        `INSERT INTO ${this.s}.job_checkpoints (job_id, step, name, size_bytes, created_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (job_id, step) DO UPDATE SET name = EXCLUDED.name, size_bytes = EXCLUDED.size_bytes, created_at = EXCLUDED.created_at`,
        [cp.jobId, cp.step, cp.name, cp.sizeBytes, cp.createdAt],
      );
      const { jobId: _, ...checkpoint } = cp;
      return this.appendEvent(c, cp.jobId, { kind: "checkpoint", checkpoint }, now);
    });
  }

  async removeCheckpoint(id: string, step: number): Promise<void> {
    await this.q(`DELETE FROM ${this.s}.job_checkpoints WHERE job_id = $1 AND step = $2`, [id, step]);
  }

  async listCheckpoints(id: string): Promise<CheckpointRecord[]> {
    const { rows } = await this.q<CheckpointRow>(`SELECT * FROM ${this.s}.job_checkpoints WHERE job_id = $1 ORDER BY step`, [id]);
    return rows.map(checkpointFromRow);
  }

  async finish(
    id: string,
    replicaId: string,
    outcome: { state: TerminalState; message: string; error?: string; metrics?: MetricsRecord },
  ): Promise<JobEvent | undefined> {
    return this.tx(async (c, now) => {
      const res = await c.query(
        `UPDATE ${this.s}.jobs SET state = $1, finished_at = $2, error = $3, metrics = COALESCE($4::json, metrics), owner = NULL, lease_expires_at = NULL
          WHERE id = $5 AND owner = $6 AND state = 'running'`,
        [outcome.state, now, outcome.error ?? "", outcome.metrics ? JSON.stringify(outcome.metrics) : null, id, replicaId],
      );
      if (res.rowCount === 0) return undefined;
      return this.appendEvent(c, id, { kind: "state", state: outcome.state, message: outcome.message }, now);
    });
  }

  async release(id: string, replicaId: string, message: string): Promise<JobEvent | undefined> {
    return this.tx(async (c, now) => {
      const res = await c.query(
        `UPDATE ${this.s}.jobs SET state = 'queued', owner = NULL, lease_expires_at = NULL WHERE id = $1 AND owner = $2 AND state = 'running'`,
        [id, replicaId],
      );
      if (res.rowCount === 0) return undefined;
      return this.appendEvent(c, id, { kind: "state", state: "queued", message }, now);
    });
  }

  async cancel(id: string, message: string): Promise<{ job: JobRecord; outcome: CancelOutcome; event?: JobEvent } | undefined> {
    return this.tx(async (c, now) => {
      // FOR UPDATE waits for a claim in flight on this row, then sees its result.
      const { rows } = await c.query<JobRow>(`SELECT * FROM ${this.s}.jobs WHERE id = $1 FOR UPDATE`, [id]);
      const r = rows[0];
      if (!r) return undefined;
      let outcome: CancelOutcome;
      let event: JobEvent | undefined;
      if (cancelsAtOnce(r.state, r.lease_expires_at, now)) {
        await c.query(
          `UPDATE ${this.s}.jobs SET state = 'cancelled', finished_at = $1, owner = NULL, lease_expires_at = NULL, cancel_requested = true WHERE id = $2`,
          [now, id],
        );
        event = await this.appendEvent(c, id, { kind: "state", state: "cancelled", message }, now);
        outcome = "cancelled";
      } else if (r.state === "running") {
        await c.query(`UPDATE ${this.s}.jobs SET cancel_requested = true WHERE id = $1`, [id]);
        outcome = "requested";
      } else {
        outcome = "final";
      }
      const job = toJob((await c.query<JobRow>(`SELECT * FROM ${this.s}.jobs WHERE id = $1`, [id])).rows[0]!);
      return event ? { job, outcome, event } : { job, outcome };
    });
  }

  async expireLeasesOf(replicaId: string): Promise<number> {
    const res = await this.q(`UPDATE ${this.s}.jobs SET lease_expires_at = 0 WHERE owner = $1 AND state = 'running'`, [replicaId]);
    return res.rowCount ?? 0;
  }

  async listEvents(id: string, afterSeq: number, limit = 1000): Promise<JobEvent[]> {
    const { rows } = await this.q<EventRow>(`SELECT * FROM ${this.s}.job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`, [id, afterSeq, limit]);
    return rows.map((r) => eventFromRow(r, r.data));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.pool.end();
  }
}

/** Opens the PostgreSQL job store named by QLORA_DATABASE_URL (and optionally QLORA_DATABASE_SCHEMA). */
export async function openPostgresJobStoreFromEnv(
  env: Record<string, string | undefined> = process.env,
  opts: Omit<PostgresJobStoreOptions, "connectionString"> = {},
): Promise<PostgresJobStore> {
  const url = env.QLORA_DATABASE_URL?.trim();
  if (!url) throw new InvalidArgument("the PostgreSQL job store needs QLORA_DATABASE_URL");
  const schema = env.QLORA_DATABASE_SCHEMA?.trim();
  return PostgresJobStore.open({ ...opts, connectionString: url, ...(schema ? { schema } : {}) });
}
