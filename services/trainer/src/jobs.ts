/**
 * The job runner of one trainer replica: claims jobs from the JobStore up to `concurrency`, runs
 * each in a worker thread, relays its events into the store (where watchers read them), publishes
 * checkpoints to the artifact store, and commits the final adapter.
 *
 * Durability, in order of what can go wrong:
 * - The process dies: its jobs stay `running` with a lease that is no longer renewed. When the same
 *   replica starts again it expires its own leases at once; any other replica takes them over when
 *   the lease runs out. Either way the next run resumes from the newest checkpoint, which lives in
 *   the job's work directory and (for another machine) in the store's "checkpoints" kind.
 * - Graceful shutdown: claiming stops, every running job checkpoints at its next step boundary and
 *   is put back in the queue; whoever claims it next resumes it.
 * - This replica loses its lease (stalled, partitioned): every write is conditional on ownership,
 *   and the first failed heartbeat terminates the worker.
 * - A crash after the adapter was committed but before the job was marked succeeded: the rerun
 *   finds the adapter it wrote (manifest meta job_id) and just records the success.
 */
import { mkdir, readdir, rename, rm, copyFile } from "node:fs/promises";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { errorMessage, isQloraError, NotFound, pathExists, QloraError } from "@qlora/core";
import type { CreateJobRequest } from "@qlora/proto";
import { MANIFEST_FILE, type ArtifactStore } from "@qlora/store";
import { datasetFile } from "./datasets.js";
import { isTerminal, type CancelOutcome, type Claim, type JobEvent, type JobRecord, type JobStore, type MetricsRecord, type TerminalState } from "./job-store.js";
import { ADAPTER_OUTPUT_DIRS, ADAPTER_OUTPUT_FILES, ADAPTER_REQUIRED_FILES, type JobRunSpec, type RunnerEvent, type RunResult } from "./runner-api.js";
import { requestFromJson, runnerOptions } from "./spec.js";
import { startJobWorker, type JobWorker } from "./worker-client.js";

export interface JobManagerOptions {
  store: ArtifactStore;
  jobs: JobStore;
  /** Local directory holding one work directory per job. */
  workRoot: string;
  replicaId: string;
  concurrency: number;
  leaseMs: number;
  /** How often to look for work queued elsewhere and for events written by other replicas. */
  pollMs: number;
  /** File URL of the runner module (runner-api.ts). */
  runnerModule: string;
  runnerConfig?: unknown;
  /** Graceful shutdown: how long running jobs get to checkpoint and stop. */
  shutdownTimeoutMs: number;
  /** CancelJob waits this long for a local running job to reach CANCELLED before answering. */
  cancelWaitMs: number;
  log: (line: string) => void;
}

type StopReason = "cancel" | "shutdown";

interface RunningJob {
  readonly id: string;
  readonly request: CreateJobRequest;
  worker?: JobWorker;
  stopReason?: StopReason;
  /** Lost the lease, or the manager closed abruptly: never write anything for this run again. */
  abandoned: boolean;
  /** Its outcome is being recorded (ownership ends with it: a failed heartbeat then is expected). */
  ending: boolean;
  outDir: string;
  /** Events are handled strictly in order, one at a time. */
  relay: Promise<void>;
  metrics: MetricsRecord;
  lastFlush: number;
  /** Host paths → names, so that messages reaching clients name artifacts, never paths. */
  replacements: [string, string][];
  finished?: Promise<void>;
}

/** Flushing per-step progress more often than this would make the database the bottleneck. */
const STEP_FLUSH_MS = 1000;

export const checkpointArtifactName = (jobId: string, step: number): string => `${jobId}.checkpoint-${step}`;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref?.());
}

/** Recursive copy of a directory's regular files (skipping a manifest), for checkpoints and outputs. */
async function copyTree(from: string, to: string, skip: (rel: string) => boolean = () => false, rel = ""): Promise<void> {
  await mkdir(to, { recursive: true });
  for (const e of await readdir(from, { withFileTypes: true })) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    if (skip(r)) continue;
    if (e.isDirectory()) await copyTree(join(from, e.name), join(to, e.name), skip, r);
    else if (e.isFile()) await copyFile(join(from, e.name), join(to, e.name));
  }
}


/** Steps of the complete checkpoints in a run's output directory (the runner writes them atomically). */
async function localCheckpointSteps(outDir: string): Promise<number[]> {
  let names: string[];
  try {
    names = await readdir(outDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw e;
  }
  return names
    .map((n) => /^checkpoint-(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

export class JobManager {
  private readonly running = new Map<string, RunningJob>();
  private readonly waiters = new Map<string, Set<() => void>>();
  /** Bumped on every local event of a job, so a watcher cannot miss a wake-up between read and wait. */
  private readonly versions = new Map<string, number>();
  private started = false;
  private stopping = false;
  private closed = false;
  private closing: Promise<void> | undefined;
  private pumping = false;
  private pumpAgain = false;
  private pumpDone: Promise<void> = Promise.resolve();
  private timers: NodeJS.Timeout[] = [];

  /**
   * Where logged steps and job ends are reported for Prometheus (the server's `ctx.metrics.training`,
   * set when the service starts); none: not reported.
   */
  trainingMetrics: {
    observeStep(s: { jobId: string; step: number; loss: number; tokensPerSecond: number; learningRate?: number }): void;
    jobEnded(jobId: string): void;
  } | undefined;

  constructor(private readonly o: JobManagerOptions) {}

  get replicaId(): string {
    return this.o.replicaId;
  }

  /** Jobs this replica is running right now. */
  get runningIds(): string[] {
    return [...this.running.keys()];
  }

  /** Recovers this replica's interrupted jobs, then starts claiming. Idempotent. */
  async start(): Promise<void> {
    if (this.started || this.stopping) return;
    this.started = true;
    const n = await this.o.jobs.expireLeasesOf(this.o.replicaId);
    if (n > 0) this.o.log(`resuming ${n} job(s) interrupted when this replica (${this.o.replicaId}) last stopped`);
    const every = (ms: number, f: () => void) => {
      const t = setInterval(f, ms);
      t.unref();
      this.timers.push(t);
    };
    every(this.o.pollMs, () => this.notify());
    every(Math.max(50, Math.floor(this.o.leaseMs / 3)), () => void this.heartbeat());
    this.notify();
  }

  /** Something may be claimable (a job was created here, or a slot freed up). */
  notify(): void {
    if (!this.started || this.stopping) return;
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    this.pumpDone = this.pump().finally(() => {
      this.pumping = false;
    });
  }

  private async pump(): Promise<void> {
    try {
      do {
        this.pumpAgain = false;
        while (!this.stopping && this.running.size < this.o.concurrency) {
          const claim = await this.o.jobs.claimNext(this.o.replicaId, this.o.leaseMs);
          if (!claim) break;
          this.launch(claim);
        }
      } while (this.pumpAgain && !this.stopping);
    } catch (e) {
      this.o.log(`claiming jobs failed: ${errorMessage(e)}`);
    }
  }

  private launch(claim: Claim): void {
    const job = claim.job;
    let request: CreateJobRequest;
    try {
      request = requestFromJson(job.request);
    } catch (e) {
      // Unreadable (written by an incompatible version?): fail it rather than claim it forever.
      const error = `the stored job request cannot be read: ${errorMessage(e)}`;
      void this.o.jobs
        .finish(job.id, this.o.replicaId, { state: "failed", message: `failed: ${error}`, error })
        .then((ev) => ev && this.wake(job.id))
        .catch((err: unknown) => this.o.log(`job ${job.id}: ${errorMessage(err)}`));
      return;
    }
    const r: RunningJob = {
      id: job.id,
      request,
      abandoned: false,
      ending: false,
      outDir: join(this.o.workRoot, job.id, "out"),
      relay: Promise.resolve(),
      metrics: job.metrics ?? { step: 0, totalSteps: 0, epoch: 0, loss: 0, learningRate: 0, gradNorm: 0, tokensPerSecond: 0 },
      lastFlush: 0,
      replacements: [],
    };
    this.running.set(job.id, r);
    this.wake(job.id);
    r.finished = this.execute(r, job)
      .catch((e: unknown) => this.o.log(`job ${job.id}: ${errorMessage(e)}`))
      .finally(() => {
        this.running.delete(job.id);
        this.notify();
      });
  }

  // ---- one run -----------------------------------------------------------------------------

  private async execute(r: RunningJob, job: JobRecord): Promise<void> {
    if (job.cancelRequested) {
      await this.end(r, { state: "cancelled", message: "cancelled before it started" });
      return;
    }
    let spec: JobRunSpec;
    try {
      spec = await this.prepare(r, job);
    } catch (e) {
      await this.fail(r, e);
      return;
    }
    // A CancelJob that raced the claim is only visible in the store.
    const hb = await this.o.jobs.heartbeat(r.id, this.o.replicaId, this.o.leaseMs);
    if (!hb.owned) return this.abandon(r, "lost its lease before starting");
    if (hb.cancelRequested) r.stopReason ??= "cancel";
    if (r.stopReason === "cancel") return this.end(r, { state: "cancelled", message: "cancelled before training started" });
    if (r.stopReason === "shutdown") return this.requeue(r, "interrupted by a shutdown before training started");

    r.worker = startJobWorker(this.o.runnerModule, spec, (e) => {
      r.relay = r.relay.then(() => this.onRunnerEvent(r, e)).catch((err: unknown) => this.o.log(`job ${r.id}: event ${e.type}: ${errorMessage(err)}`));
    });
    let result: RunResult | undefined;
    let error: unknown;
    try {
      result = await r.worker.done;
    } catch (e) {
      error = e;
    }
    await r.relay;
    if (r.abandoned) return;
    if (result) return this.complete(r, result, spec);
    if (r.stopReason === "cancel") {
      return this.end(r, { state: "cancelled", message: `cancelled at step ${r.metrics.step} of ${r.metrics.totalSteps}` });
    }
    if (r.stopReason === "shutdown" && isQloraError(error) && error.code === "CANCELLED") {
      const latest = (await this.o.jobs.listCheckpoints(r.id)).at(-1);
      return this.requeue(r, `interrupted by a shutdown at step ${r.metrics.step}; resumes from ${latest ? `step ${latest.step}` : "the start"}`);
    }
    return this.fail(r, error);
  }

  /** Resolves the job's inputs to local paths and readies its work directory. */
  private async prepare(r: RunningJob, job: JobRecord): Promise<JobRunSpec> {
    const req = r.request;
    const workDir = join(this.o.workRoot, job.id);
    const outDir = r.outDir;
    r.replacements.push([outDir, `the output of job ${job.id}`], [workDir, `the work directory of job ${job.id}`]);
    let modelDir: string;
    try {
      modelDir = await this.o.store.localPath("models", req.baseModel);
    } catch (e) {
      if (e instanceof NotFound) throw new QloraError("FAILED_PRECONDITION", `base model "${req.baseModel}" no longer exists`);
      throw e;
    }
    r.replacements.push([modelDir, `model "${req.baseModel}"`]);
    const data = await this.inputDataset(req.dataset);
    r.replacements.push([data, `dataset "${req.dataset}"`]);
    const evalData = req.evalDataset ? await this.inputDataset(req.evalDataset) : undefined;
    if (evalData) r.replacements.push([evalData, `dataset "${req.evalDataset}"`]);

    // attempts counts claims: anything above 1 means an earlier run of this job got somewhere.
    const resume = job.attempts > 1;
    if (resume) {
      await this.restoreCheckpoint(job.id, outDir);
    } else {
      await rm(workDir, { recursive: true, force: true });
    }
    await mkdir(outDir, { recursive: true });
    return {
      jobId: job.id,
      attempt: job.attempts,
      resume,
      modelDir,
      dataPath: data,
      ...(evalData ? { evalDataPath: evalData } : {}),
      outDir,
      baseModelName: req.baseModel,
      options: runnerOptions(req),
      ...(this.o.runnerConfig !== undefined ? { config: this.o.runnerConfig } : {}),
    };
  }

  private async inputDataset(name: string): Promise<string> {
    try {
      return (await datasetFile(this.o.store, name)).path;
    } catch (e) {
      if (e instanceof NotFound) throw new QloraError("FAILED_PRECONDITION", `dataset "${name}" no longer exists`);
      throw e;
    }
  }

  /**
   * Makes sure the newest published checkpoint is in the local output directory: it is not when the
   * job moves to another machine (or the local disk was lost). A local one that is newer (written
   * but not yet published when the process died) wins, as the runner picks the newest.
   */
  private async restoreCheckpoint(jobId: string, outDir: string): Promise<void> {
    const local = (await localCheckpointSteps(outDir)).at(-1) ?? -1;
    const published = (await this.o.jobs.listCheckpoints(jobId)).at(-1);
    if (!published || published.step <= local) return;
    let src: string;
    try {
      src = await this.o.store.localPath("checkpoints", published.name);
    } catch (e) {
      if (e instanceof NotFound) return; // deleted by hand: resume from whatever is local
      throw e;
    }
    await mkdir(outDir, { recursive: true });
    const target = join(outDir, `checkpoint-${published.step}`);
    // Copied under a hidden name and renamed, so a crash here never leaves a partial checkpoint
    // that the runner would take for a complete one.
    const tmp = join(outDir, `.restore-${published.step}-${randomBytes(4).toString("hex")}`);
    await copyTree(src, tmp, (rel) => rel === MANIFEST_FILE);
    await rm(target, { recursive: true, force: true });
    await rename(tmp, target);
    this.o.log(`job ${jobId}: restored checkpoint ${published.step} from the store`);
  }

  // ---- events from the runner ----------------------------------------------------------------

  private async onRunnerEvent(r: RunningJob, e: RunnerEvent): Promise<void> {
    if (r.abandoned) return;
    switch (e.type) {
      case "start": {
        r.metrics = { ...r.metrics, step: e.resumedFromStep, totalSteps: e.totalSteps };
        if (e.resumedFromStep > 0) {
          await this.progress(r, { metrics: r.metrics, resumedFromStep: e.resumedFromStep }, {
            kind: "state",
            state: "running",
            message: `resumed from the checkpoint at step ${e.resumedFromStep} of ${e.totalSteps}`,
          });
        } else {
          await this.progress(r, { metrics: r.metrics });
        }
        return;
      }
      case "step": {
        r.metrics = { ...r.metrics, step: e.step, totalSteps: e.totalSteps, epoch: e.epoch };
        const now = Date.now();
        if (now - r.lastFlush >= STEP_FLUSH_MS) {
          r.lastFlush = now;
          await this.progress(r, { metrics: r.metrics });
        }
        return;
      }
      case "log": {
        const metrics: MetricsRecord = {
          step: e.step,
          totalSteps: e.totalSteps,
          epoch: e.epoch,
          loss: e.loss,
          learningRate: e.learningRate,
          gradNorm: e.gradNorm,
          tokensPerSecond: e.tokensPerSecond,
        };
        // The job keeps the last eval loss next to the newest training metrics.
        r.metrics = r.metrics.evalLoss !== undefined ? { ...metrics, evalLoss: r.metrics.evalLoss } : metrics;
        r.lastFlush = Date.now();
        this.trainingMetrics?.observeStep({
          jobId: r.id, step: e.step, loss: e.loss, tokensPerSecond: e.tokensPerSecond, learningRate: e.learningRate,
        });
        await this.progress(r, { metrics: r.metrics }, { kind: "metrics", metrics });
        return;
      }
      case "eval": {
        r.metrics = { ...r.metrics, step: e.step, epoch: e.epoch, evalLoss: e.evalLoss };
        await this.progress(r, { metrics: r.metrics }, { kind: "metrics", metrics: r.metrics });
        return;
      }
      case "checkpoint":
        // The checkpoint a user cancel writes on its way out is of no use to anyone.
        if (r.stopReason === "cancel") return;
        await this.publishCheckpoint(r, e.step, e.path);
        return;
      case "end":
        return;
    }
  }

  private async progress(
    r: RunningJob,
    patch: { metrics?: MetricsRecord; resumedFromStep?: number },
    event?: Parameters<JobStore["recordProgress"]>[3],
  ): Promise<void> {
    if (r.abandoned) return;
    const res = await this.o.jobs.recordProgress(r.id, this.o.replicaId, patch, event);
    if (!res.owned) return this.abandon(r, "lost its lease");
    if (res.event) this.wake(r.id);
  }

  /** Copies a checkpoint into the store (for takeover by another machine), records it, rotates. */
  private async publishCheckpoint(r: RunningJob, step: number, path: string): Promise<void> {
    const name = checkpointArtifactName(r.id, step);
    const w = await this.o.store.beginWrite("checkpoints", name, { overwrite: true });
    try {
      await copyTree(path, w.dir, (rel) => rel === MANIFEST_FILE);
      await w.commit({ meta: { job_id: r.id, step: String(step), base_model: r.request.baseModel } });
    } catch (e) {
      await w.abort();
      throw e;
    }
    if (r.abandoned) return;
    const st = await this.o.store.stat("checkpoints", name);
    const ev = await this.o.jobs.addCheckpoint(this.o.replicaId, {
      jobId: r.id,
      step,
      name,
      sizeBytes: st.sizeBytes,
      createdAt: Date.parse(st.createdAt) || Date.now(),
    });
    if (!ev) return this.abandon(r, "lost its lease");
    this.wake(r.id);
    await this.rotate(r);
  }

  /** save_total_limit over the published checkpoints, the store's artifacts and the local copies. */
  private async rotate(r: RunningJob): Promise<void> {
    const outDir = r.outDir;
    const limit = Math.max(1, r.request.training?.saveTotalLimit ?? 1);
    const published = await this.o.jobs.listCheckpoints(r.id);
    const keep = published.slice(-limit);
    const oldestKept = keep[0]?.step ?? 0;
    for (const c of published.slice(0, published.length - keep.length)) {
      await this.o.jobs.removeCheckpoint(r.id, c.step);
      await this.o.store.delete("checkpoints", c.name).catch((e: unknown) => {
        if (!(e instanceof NotFound)) throw e;
      });
    }
    // Strays: artifacts published by a run that died before recording them.
    const prefix = `${r.id}.checkpoint-`;
    for (const n of await this.o.store.list("checkpoints")) {
      if (!n.startsWith(prefix)) continue;
      const step = Number(n.slice(prefix.length));
      if (Number.isInteger(step) && step < oldestKept) await this.o.store.delete("checkpoints", n).catch(() => undefined);
    }
    for (const step of await localCheckpointSteps(outDir)) {
      if (step < oldestKept) await rm(join(outDir, `checkpoint-${step}`), { recursive: true, force: true });
    }
  }

  // ---- outcomes --------------------------------------------------------------------------------

  /** Commits the adapter under output_adapter (atomically), then marks the job succeeded. */
  private async complete(r: RunningJob, result: RunResult, spec: JobRunSpec): Promise<void> {
    const name = r.request.outputAdapter;
    const metrics = { ...r.metrics, step: result.globalStep, totalSteps: result.totalSteps };
    const summary = `adapter "${name}" written after ${result.globalStep} steps (train loss ${result.trainLoss.toFixed(4)}${
      result.evalLoss !== null ? `, eval loss ${result.evalLoss.toFixed(4)}` : ""
    })`;
    try {
      if (await this.o.store.exists("adapters", name)) {
        const meta = (await this.o.store.readManifest("adapters", name).catch(() => undefined))?.meta;
        if (meta?.["job_id"] !== r.id) throw new QloraError("ALREADY_EXISTS", `adapter "${name}" was created by someone else while the job ran`);
        // Ours, from a run that died right after committing it.
      } else {
        for (const f of ADAPTER_REQUIRED_FILES) {
          if (!(await pathExists(join(spec.outDir, f)))) throw new QloraError("INTERNAL", `the run finished without writing ${f}`);
        }
        const w = await this.o.store.beginWrite("adapters", name);
        try {
          for (const f of ADAPTER_OUTPUT_FILES) if (await pathExists(join(spec.outDir, f))) await copyFile(join(spec.outDir, f), join(w.dir, f));
          for (const d of ADAPTER_OUTPUT_DIRS) if (await pathExists(join(spec.outDir, d))) await copyTree(join(spec.outDir, d), join(w.dir, d));
          await w.commit({
            meta: {
              job_id: r.id,
              base_model: r.request.baseModel,
              dataset: r.request.dataset,
              steps: String(result.globalStep),
              train_loss: String(result.trainLoss),
            },
          });
        } catch (e) {
          await w.abort();
          throw e;
        }
      }
    } catch (e) {
      return this.fail(r, e);
    }
    await this.end(r, { state: "succeeded", message: summary, metrics });
  }

  private async fail(r: RunningJob, e: unknown): Promise<void> {
    let msg = errorMessage(e);
    for (const [from, to] of r.replacements) if (from) msg = msg.split(from).join(to);
    if (!isQloraError(e)) this.o.log(`job ${r.id} failed: ${e instanceof Error ? (e.stack ?? msg) : msg}`);
    await this.end(r, { state: "failed", message: `failed: ${msg}`, error: msg });
  }

  private async end(r: RunningJob, outcome: { state: TerminalState; message: string; error?: string; metrics?: MetricsRecord }): Promise<void> {
    if (r.abandoned) return;
    r.ending = true;
    this.trainingMetrics?.jobEnded(r.id);
    const ev = await this.o.jobs.finish(r.id, this.o.replicaId, { ...outcome, ...(outcome.metrics ? {} : { metrics: r.metrics }) });
    if (!ev) return this.abandon(r, "lost its lease before it could record the outcome");
    this.wake(r.id);
    // The store now holds what outlives the job (adapter, checkpoints); the work directory goes.
    await rm(join(this.o.workRoot, r.id), { recursive: true, force: true });
  }

  private async requeue(r: RunningJob, message: string): Promise<void> {
    if (r.abandoned) return;
    r.ending = true;
    const ev = await this.o.jobs.release(r.id, this.o.replicaId, message);
    if (!ev) return this.abandon(r, "lost its lease before it could be re-queued");
    this.wake(r.id);
  }

  private abandon(r: RunningJob, why: string): void {
    if (r.abandoned) return;
    r.abandoned = true;
    this.o.log(`job ${r.id}: ${why}; stopping its worker here`);
    void r.worker?.terminate();
  }

  private stopRun(r: RunningJob, reason: StopReason): void {
    r.stopReason ??= reason;
    r.worker?.stop();
  }

  private async heartbeat(): Promise<void> {
    for (const r of [...this.running.values()]) {
      if (r.abandoned || r.ending) continue;
      try {
        const hb = await this.o.jobs.heartbeat(r.id, this.o.replicaId, this.o.leaseMs);
        if (!hb.owned) {
          if (!r.ending && !this.closed) this.abandon(r, "lost its lease");
          continue;
        }
        if (hb.cancelRequested) this.stopRun(r, "cancel");
      } catch (e) {
        if (!this.closed) this.o.log(`heartbeat of job ${r.id} failed: ${errorMessage(e)}`);
      }
    }
  }

  // ---- requests ----------------------------------------------------------------------------------

  /**
   * Cancels a job: a queued one at once; a running one at its next step boundary (waited for up to
   * cancelWaitMs when it runs here; on another replica its owner sees the request on its next
   * heartbeat). Returns the job as it is then, and what happened.
   */
  async cancel(id: string): Promise<{ job: JobRecord; outcome: CancelOutcome }> {
    const res = await this.o.jobs.cancel(id, "cancelled by request");
    if (!res) throw new NotFound(`job "${id}" not found`);
    if (res.event) this.wake(id);
    // A job re-queued by a shutdown has a work directory here that nobody will resume from now.
    if (res.outcome === "cancelled") await rm(join(this.o.workRoot, id), { recursive: true, force: true });
    if (res.outcome !== "requested") return { job: res.job, outcome: res.outcome };
    const r = this.running.get(id);
    if (r) {
      this.stopRun(r, "cancel");
      await Promise.race([r.finished, sleep(this.o.cancelWaitMs)]);
    }
    return { job: (await this.o.jobs.get(id)) ?? res.job, outcome: res.outcome };
  }

  /**
   * A job's events: everything stored so far, then new ones as they are appended, until a terminal
   * state. Local events wake watchers at once; events written by other replicas are picked up by
   * polling every pollMs. Ends with UNAVAILABLE when the trainer shuts down.
   */
  async *watch(id: string, signal: AbortSignal): AsyncGenerator<JobEvent> {
    if (!(await this.o.jobs.get(id))) throw new NotFound(`job "${id}" not found`);
    let after = 0;
    for (;;) {
      if (this.stopping) throw new QloraError("UNAVAILABLE", "the trainer is shutting down; watch again to continue");
      if (signal.aborted) return;
      const version = this.versions.get(id) ?? 0;
      const events = await this.o.jobs.listEvents(id, after, 256);
      for (const e of events) {
        after = e.seq;
        yield e;
        if (e.kind === "state" && isTerminal(e.state)) return;
      }
      if (events.length === 0) await this.waitForEvent(id, version, signal);
    }
  }

  private waitForEvent(id: string, version: number, signal: AbortSignal): Promise<void> {
    if ((this.versions.get(id) ?? 0) !== version || this.stopping) return Promise.resolve();
    return new Promise<void>((resolve) => {
      let set = this.waiters.get(id);
      if (!set) this.waiters.set(id, (set = new Set()));
      const done = (): void => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        set!.delete(done);
        if (set!.size === 0 && this.waiters.get(id) === set) this.waiters.delete(id);
        resolve();
      };
      const timer = setTimeout(done, this.o.pollMs);
      signal.addEventListener("abort", done, { once: true });
      set.add(done);
    });
  }

  /** Wakes the watchers of a job after an event was appended here. */
  wake(id: string): void {
    this.versions.set(id, (this.versions.get(id) ?? 0) + 1);
    for (const w of [...(this.waiters.get(id) ?? [])]) w();
  }

  private wakeAll(): void {
    for (const id of [...this.waiters.keys()]) this.wake(id);
  }

  // ---- shutdown ----------------------------------------------------------------------------------

  /**
   * The first half of a graceful shutdown, started as soon as the server begins to drain: no more
   * claims, watchers end (UNAVAILABLE, so clients re-watch elsewhere), running jobs checkpoint and stop.
   */
  beginShutdown(): void {
    if (this.stopping) return;
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    this.wakeAll();
    for (const r of this.running.values()) this.stopRun(r, "shutdown");
  }

  /**
   * Stops this replica. Graceful (default): running jobs checkpoint and go back to the queue; any
   * still running after shutdownTimeoutMs are killed and left `running`, to be resumed from their
   * last checkpoint. `abrupt` kills the workers at once and writes nothing, as a crash would (tests).
   * Closes the job store.
   */
  close(opts: { abrupt?: boolean } = {}): Promise<void> {
    return (this.closing ??= this.doClose(opts.abrupt ?? false));
  }

  private async doClose(abrupt: boolean): Promise<void> {
    if (abrupt) {
      for (const r of this.running.values()) this.abandon(r, "the trainer stopped abruptly");
    }
    this.beginShutdown();
    await this.pumpDone;
    const all = () => Promise.allSettled([...this.running.values()].map((r) => r.finished));
    if (!abrupt && this.running.size > 0) {
      await Promise.race([all(), sleep(this.o.shutdownTimeoutMs)]);
      for (const r of this.running.values()) this.abandon(r, "did not stop within the shutdown timeout (it resumes on restart)");
    }
    await all();
    this.closed = true;
    await this.o.jobs.close();
  }
}
