/**
 * What the two JobStore implementations (sqlite-store.ts, jobstore-postgres.ts) share above their
 * drivers: the rows of the three tables as the drivers return them, their mapping to the records of
 * job-store.ts, the claim order, and the decisions a claim and a cancel make. Only the column types
 * differ between the engines: SQLite returns JSON as text and booleans as 0/1, PostgreSQL (json,
 * boolean columns) returns them decoded, so each store decodes those three columns and hands the
 * rest to `jobFromRow`.
 */
import type { CheckpointRecord, JobEvent, JobEventData, JobRecord, JobStateName, JsonObject, MetricsRecord } from "./job-store.js";

/** A `jobs` row, but for the columns whose type depends on the engine (request, metrics, cancel_requested). */
export interface JobRowColumns {
  id: string;
  state: JobStateName;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  error: string;
  output_adapter: string;
  device: string;
  resumed_from_step: number;
  attempts: number;
  owner: string | null;
  lease_expires_at: number | null;
}

/** The engine-typed columns of a `jobs` row, decoded. */
export interface DecodedJobColumns {
  request: JsonObject;
  metrics: MetricsRecord | null;
  cancelRequested: boolean;
}

export function jobFromRow(r: JobRowColumns, decoded: DecodedJobColumns): JobRecord {
  return {
    id: r.id,
    state: r.state,
    request: decoded.request,
    createdAt: r.created_at,
    startedAt: r.started_at,
    finishedAt: r.finished_at,
    error: r.error,
    metrics: decoded.metrics,
    outputAdapter: r.output_adapter,
    device: r.device,
    resumedFromStep: r.resumed_from_step,
    attempts: r.attempts,
    owner: r.owner,
    leaseExpiresAt: r.lease_expires_at,
    cancelRequested: decoded.cancelRequested,
  };
}

/** A `job_events` row, but for `data` (JSON text in SQLite, decoded in PostgreSQL). */
export interface EventRowColumns {
  job_id: string;
  seq: number;
  time: number;
}

export function eventFromRow(r: EventRowColumns, data: JobEventData): JobEvent {
  return { ...data, jobId: r.job_id, seq: r.seq, time: r.time };
}

/** A `job_checkpoints` row (the same types in both engines). */
export interface CheckpointRow {
  job_id: string;
  step: number;
  name: string;
  size_bytes: number;
  created_at: number;
}

export function checkpointFromRow(r: CheckpointRow): CheckpointRecord {
  return { jobId: r.job_id, step: r.step, name: r.name, sizeBytes: r.size_bytes, createdAt: r.created_at };
}

/**
 * The WHERE clause of a claim, `now` being the engine's placeholder for the store's clock: queued
 * jobs, and running ones whose lease ran out (their replica died).
 */
export function claimableWhere(now: string): string {
  return `state = 'queued' OR (state = 'running' AND lease_expires_at < ${now})`;
}

/** Claim order: expired leases first (they hold progress), then the queue, oldest first. */
export const CLAIM_ORDER = "ORDER BY CASE state WHEN 'running' THEN 0 ELSE 1 END, created_at, id";

/** The message of the `running` event a claim appends. */
export function claimMessage(replicaId: string, attempts: number, takenOver: boolean, previousOwner: string | null): string {
  if (!takenOver) return attempts > 1 ? `running on ${replicaId} (attempt ${attempts})` : `running on ${replicaId}`;
  return previousOwner === replicaId
    ? `running again on ${replicaId} after it restarted (attempt ${attempts})`
    : `taken over by ${replicaId} (attempt ${attempts}) after its previous runner stopped responding`;
}

/**
 * Whether a cancel finishes the job at once: it is queued, or running under an owner whose lease ran
 * out (nobody would see the request). A running job with a live lease is asked to stop instead.
 */
export function cancelsAtOnce(state: JobStateName, leaseExpiresAt: number | null, now: number): boolean {
  return state === "queued" || (state === "running" && (leaseExpiresAt ?? 0) < now);
}
