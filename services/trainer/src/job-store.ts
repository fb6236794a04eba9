/**
 * The durable job table behind TrainerService: jobs, their event log (what WatchJob replays) and
 * their checkpoints.
 *
 * The interface is written for several trainer replicas sharing one database (docs/trainer.md):
 * - A replica takes work with `claimNext`, which atomically moves ONE job to `running`, stamps it
 *   with the replica's id and a lease expiry, and bumps `attempts`. A job is claimable when it is
 *   `queued`, or `running` with an expired lease (its replica died): such a job is taken over and
 *   resumes from its last checkpoint. PostgreSQL does the same with `FOR UPDATE SKIP LOCKED`, SQLite
 *   with a `BEGIN IMMEDIATE` transaction (one writer at a time).
 * - While it runs, the owner renews the lease (`heartbeat`). Every write a runner makes afterwards
 *   (progress, checkpoints, the final state) is conditional on still owning the job, so a replica
 *   that lost its lease (paused too long, network split) cannot overwrite the new owner's work.
 * - Every state change appends its event in the same transaction, so a watcher that replays the
 *   log never misses the terminal event.
 *
 * All methods are async even though SQLite answers synchronously, because a network database
 * cannot. Times are milliseconds since the epoch from the store's clock.
 */

export const JOB_STATES = ["queued", "running", "succeeded", "failed", "cancelled"] as const;
export type JobStateName = (typeof JOB_STATES)[number];
export type TerminalState = "succeeded" | "failed" | "cancelled";

export function isTerminal(s: JobStateName): s is TerminalState {
  return s === "succeeded" || s === "failed" || s === "cancelled";
}

/** The training metrics of one logging step (JobMetrics in the proto). */
export interface MetricsRecord {
  step: number;
  totalSteps: number;
  epoch: number;
  loss: number;
  learningRate: number;
  gradNorm: number;
  tokensPerSecond: number;
  evalLoss?: number;
}

export type JsonObject = { [key: string]: unknown };

export interface JobRecord {
  id: string;
  state: JobStateName;
  /** The effective CreateJobRequest (defaults filled in) in protobuf JSON form. */
  request: JsonObject;
  createdAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  /** Why the job failed ("" otherwise). */
  error: string;
  metrics: MetricsRecord | null;
  outputAdapter: string;
  /** Where it runs: "cpu" (or "cuda" once that path exists). */
  device: string;
  resumedFromStep: number;
  /** How many times a replica claimed it (1 for a run that was never interrupted). */
  attempts: number;
  /** The replica holding the lease while running; null otherwise. */
  owner: string | null;
  leaseExpiresAt: number | null;
  /** CancelJob asked a running job to stop; its owner sees this on its next heartbeat. */
  cancelRequested: boolean;
}

export interface CheckpointRecord {
  jobId: string;
  step: number;
  /** Artifact name in the store's "checkpoints" kind. */
  name: string;
  sizeBytes: number;
  createdAt: number;
}

export type JobEventData =
  | { kind: "state"; state: JobStateName; message: string }
  | { kind: "metrics"; metrics: MetricsRecord }
  | { kind: "checkpoint"; checkpoint: Omit<CheckpointRecord, "jobId"> };

/** One entry of a job's event log; `seq` counts from 1 per job. */
export type JobEvent = JobEventData & { jobId: string; seq: number; time: number };

export interface NewJob {
  id: string;
  request: JsonObject;
  outputAdapter: string;
  device: string;
  /** The first event's message ("queued"). */
  message: string;
}

export interface Claim {
  job: JobRecord;
  /** The "running" state event appended by the claim. */
  event: JobEvent;
  /** The job was `running` under another (or a previous) owner whose lease had expired. */
  takenOver: boolean;
}

export interface HeartbeatResult {
  /** False when the lease was lost (taken over, or the job ended meanwhile): stop working on it. */
  owned: boolean;
  cancelRequested: boolean;
}

export type CancelOutcome =
  /** It was queued (or its owner is gone): it is cancelled now. */
  | "cancelled"
  /** It is running: its owner was asked to stop at the next step boundary. */
  | "requested"
  /** Nothing to do: it had already ended. */
  | "final";

export interface JobStore {
  /** "sqlite", later "postgres". */
  readonly kind: string;
  /** Inserts a queued job and its first event. */
  create(job: NewJob): Promise<{ job: JobRecord; event: JobEvent }>;
  get(id: string): Promise<JobRecord | undefined>;
  /** Oldest first; all jobs, or those in `states`. */
  list(filter?: { states?: readonly JobStateName[] }): Promise<JobRecord[]>;
  /**
   * Atomically takes the next job for `replicaId`: running jobs with an expired lease first (they
   * hold progress), then queued ones in creation order. Never hands one job to two replicas.
   */
  claimNext(replicaId: string, leaseMs: number): Promise<Claim | undefined>;
  /** Renews the lease of a job this replica runs. */
  heartbeat(id: string, replicaId: string, leaseMs: number): Promise<HeartbeatResult>;
  /**
   * Progress of an owned running job: metrics and/or the step it resumed from, optionally with an
   * event. Returns the event appended, or undefined (and changes nothing) when not the owner.
   */
  recordProgress(
    id: string,
    replicaId: string,
    patch: { metrics?: MetricsRecord; resumedFromStep?: number },
    event?: JobEventData,
  ): Promise<{ owned: boolean; event?: JobEvent }>;
  /** Records a published checkpoint of an owned job (and its event). */
  addCheckpoint(replicaId: string, checkpoint: CheckpointRecord): Promise<JobEvent | undefined>;
  removeCheckpoint(id: string, step: number): Promise<void>;
  /** Oldest step first. */
  listCheckpoints(id: string): Promise<CheckpointRecord[]>;
  /** Ends an owned running job. Undefined when not the owner (nothing changes). */
  finish(
    id: string,
    replicaId: string,
    outcome: { state: TerminalState; message: string; error?: string; metrics?: MetricsRecord },
  ): Promise<JobEvent | undefined>;
  /** Puts an owned running job back in the queue (graceful shutdown): it resumes when claimed again. */
  release(id: string, replicaId: string, message: string): Promise<JobEvent | undefined>;
  /** See CancelOutcome. NotFound is the caller's business: undefined for an unknown id. */
  cancel(id: string, message: string): Promise<{ job: JobRecord; outcome: CancelOutcome; event?: JobEvent } | undefined>;
  /**
   * After a restart: this replica's running jobs belong to a process that is gone, so their leases
   * are expired at once (instead of waiting) and the next claim resumes them. Returns how many.
   */
  expireLeasesOf(replicaId: string): Promise<number>;
  /** Events with seq > afterSeq, in order, at most `limit`. */
  listEvents(id: string, afterSeq: number, limit?: number): Promise<JobEvent[]>;
  close(): Promise<void>;
}
