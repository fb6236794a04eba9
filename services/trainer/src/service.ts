/**
 * qlora.v1.TrainerService: durable QLoRA fine-tuning jobs over an artifact store.
 *
 * Handlers are plain functions over the generated messages; they throw typed errors (libs/core) and
 * libs/rpc maps them to status codes. The job table is a JobStore (SQLite under
 * `<dataDir>/trainer/jobs.db` by default); JobManager (jobs.ts) claims and runs the jobs, one
 * worker thread each. See docs/trainer.md.
 */
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, unlinkSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { AlreadyExists, FailedPrecondition, InvalidArgument, isQloraError, NotFound } from "@qlora/core";
import { DatasetSchema, Device, TrainerService, type Dataset } from "@qlora/proto";
import { callerOf, checkVisible, defineService, jobResources, receiveUpload, visibleOnly, type ServiceRegistration } from "@qlora/rpc";
import { validateName, type ArtifactStore } from "@qlora/store";
import { create } from "@bufbuild/protobuf";
import type { HandlerContext } from "@connectrpc/connect";
import { datasetFormatOf, describeDataset, scanDataset } from "./datasets.js";
import { fromProtoState, toCheckpointMessage, toJobMessage as convertJob, toWatchResponse } from "./convert.js";
import type { JobStore } from "./job-store.js";
import { JobManager } from "./jobs.js";
import { SqliteJobStore } from "./sqlite-store.js";
import { checkAgainstStore, requestToJson, withDefaults } from "./spec.js";

/** Where the runner module comes from: a file URL/path, optionally with JSON config handed to it. */
export type RunnerRef = string | URL | { module: string | URL; config?: unknown };

export interface TrainerServiceOptions {
  store: ArtifactStore;
  /** Local data directory (the store's root for a LocalStore): the job database and work directories live in `<dataDir>/trainer/`. */
  dataDir: string;
  /** Jobs running at once on this replica (default 1: training is compute-bound). */
  concurrency?: number;
  /** The runner module (runner-api.ts); default: the QLoRA training loop of @qlora/model. */
  runner?: RunnerRef;
  /** Another job store (PostgreSQL later); default: SQLite at `<dataDir>/trainer/jobs.db`. */
  jobStore?: JobStore;
  /**
   * This replica's identity in the job table. Give each replica a stable one (e.g. a StatefulSet
   * pod name) so that a restarted replica resumes its own jobs at once. Default: an id kept in
   * `<dataDir>/trainer/replica-id`, unless another live process already uses it.
   */
  replicaId?: string;
  /** Lease of a running job; another replica takes the job over once it expires (default 30 s). */
  leaseMs?: number;
  /** Polling for work queued by other replicas and events they write (default 1 s). */
  pollMs?: number;
  /** Graceful shutdown: how long running jobs get to checkpoint and stop (default 60 s). */
  shutdownTimeoutMs?: number;
  /** CancelJob waits this long for a running job here to end (default 10 s). */
  cancelWaitMs?: number;
  /** Largest UploadDataset (default 16 GiB). */
  maxUploadBytes?: number;
  /**
   * Largest LoRA rank a job may ask for (default 256, the inference service's default limit on
   * adapters it serves, so that what is trained here can be served); beyond it CreateJob answers
   * INVALID_ARGUMENT.
   */
  maxLoraRank?: number;
  /**
   * Where jobs train (default "cpu"): a resolved device — `qlora serve --device` resolves auto. A job
   * asking for DEVICE_CUDA on a CPU trainer is FailedPrecondition; AUTO / unspecified take this device.
   */
  device?: "cpu" | "cuda";
  /** Where operational messages go (default: stderr, prefixed "[trainer]"). */
  log?: (line: string) => void;
}

/** A ServiceRegistration (startServer runs onStart/onClose) with the job system's own handles. */
export interface TrainerServiceHandle extends ServiceRegistration {
  readonly replicaId: string;
  readonly jobs: JobStore;
  readonly manager: JobManager;
  /** Recovers interrupted jobs and starts claiming; startServer calls it (onStart). */
  start(): Promise<void>;
  /** Graceful stop (see JobManager.close); startServer calls it on close. */
  close(opts?: { abrupt?: boolean }): Promise<void>;
}

/** TrainerServiceOptions.maxLoraRank by default. */
export const DEFAULT_MAX_LORA_RANK = 256;

const DEFAULT_RUNNER = new URL("./runners/train.js", import.meta.url);

function runnerOf(ref: RunnerRef | undefined): { module: string; config?: unknown } {
  const toHref = (m: string | URL): string => (m instanceof URL ? m.href : /^[a-z]+:/i.test(m) ? m : pathToFileURL(resolve(m)).href);
  if (ref === undefined) return { module: DEFAULT_RUNNER.href };
  if (typeof ref === "string" || ref instanceof URL) return { module: toHref(ref) };
  return ref.config === undefined ? { module: toHref(ref.module) } : { module: toHref(ref.module), config: ref.config };
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * The embedded default: one id per data directory, so a restarted trainer recognises the jobs it
 * was running as its own and resumes them without waiting for their leases to run out. A second
 * live process on the same directory gets an id of its own (and then takes over only expired leases).
 */
function defaultReplicaId(trainerDir: string): { id: string; release: () => void } {
  mkdirSync(trainerDir, { recursive: true });
  const idFile = join(trainerDir, "replica-id");
  let id: string;
  try {
    id = readFileSync(idFile, "utf8").trim();
  } catch {
    id = "";
  }
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(id)) {
    id = `trainer-${randomBytes(4).toString("hex")}`;
    writeFileSync(idFile, id + "\n");
  }
  const pidFile = join(trainerDir, "replica.pid");
  let holder = 0;
  try {
    holder = Number(readFileSync(pidFile, "utf8").trim());
  } catch {
    holder = 0;
  }
  if (holder > 0 && holder !== process.pid && pidAlive(holder)) {
    return { id: `${id}-${process.pid}-${randomBytes(2).toString("hex")}`, release: () => {} };
  }
  writeFileSync(pidFile, `${process.pid}\n`);
  return {
    id,
    release: () => {
      try {
        if (Number(readFileSync(pidFile, "utf8").trim()) === process.pid) unlinkSync(pidFile);
      } catch {
        // already gone
      }
    },
  };
}

function newJobId(): string {
  // Sortable by creation time at a glance, unique without coordination, a valid artifact name.
  return `job-${Date.now().toString(36)}-${randomBytes(4).toString("hex")}`;
}

/** Runs `f` exclusively (CreateJob's check-then-insert on output_adapter). */
class Mutex {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(f: () => Promise<T>): Promise<T> {
    const next = this.tail.then(f, f);
    this.tail = next.catch(() => undefined);
    return next;
  }
}

export function trainerService(opts: TrainerServiceOptions): TrainerServiceHandle {
  const { store } = opts;
  const maxLoraRank = opts.maxLoraRank ?? DEFAULT_MAX_LORA_RANK;
  const serviceDevice = opts.device ?? "cpu";
  if (serviceDevice !== "cpu" && serviceDevice !== "cuda") throw new InvalidArgument(`device must be "cpu" or "cuda", got ${JSON.stringify(serviceDevice)}`);
  if (!Number.isSafeInteger(maxLoraRank) || maxLoraRank < 1) throw new InvalidArgument(`maxLoraRank must be a positive integer, got ${maxLoraRank}`);
  const dataDir = resolve(opts.dataDir);
  const trainerDir = join(dataDir, "trainer");
  mkdirSync(trainerDir, { recursive: true });
  const log = opts.log ?? ((line: string) => process.stderr.write(`[trainer] ${line}\n`));
  const replica = opts.replicaId ? { id: opts.replicaId, release: () => {} } : defaultReplicaId(trainerDir);
  const jobs = opts.jobStore ?? new SqliteJobStore(join(trainerDir, "jobs.db"));
  const runner = runnerOf(opts.runner);
  const concurrency = opts.concurrency ?? 1;
  if (!Number.isInteger(concurrency) || concurrency < 1) throw new InvalidArgument(`concurrency must be a positive integer, got ${concurrency}`);
  const manager = new JobManager({
    store,
    jobs,
    workRoot: join(trainerDir, "jobs"),
    replicaId: replica.id,
    concurrency,
    leaseMs: opts.leaseMs ?? 30_000,
    pollMs: opts.pollMs ?? 1000,
    runnerModule: runner.module,
    ...(runner.config !== undefined ? { runnerConfig: runner.config } : {}),
    shutdownTimeoutMs: opts.shutdownTimeoutMs ?? 60_000,
    cancelWaitMs: opts.cancelWaitMs ?? 10_000,
    log,
  });
  const creating = new Mutex();
  /** Datasets being uploaded right now (a second upload of the same name is refused). */
  const uploading = new Set<string>();

  const getJob = async (id: string) => {
    if (!id) throw new InvalidArgument("id is required");
    const job = await jobs.get(id);
    if (!job) throw new NotFound(`job "${id}" not found`);
    return job;
  };
  /** getJob for a caller: PERMISSION_DENIED when its token may not see the job. */
  const getVisibleJob = async (id: string, ctx: HandlerContext) => {
    const job = await getJob(id);
    const message = convertJob(job);
    checkVisible(callerOf(ctx), `job "${id}"`, jobResources(message));
    return { job, message };
  };

  let markClosed: () => void = () => {};
  const closingSignal = new Promise<void>((r) => (markClosed = r));
  let closing: Promise<void> | undefined;
  const close = (o: { abrupt?: boolean } = {}): Promise<void> =>
    (closing ??= manager.close(o).finally(() => replica.release()));

  const registration = defineService(
    TrainerService,
    {
      async createJob(req) {
        const effective = withDefaults(req, serviceDevice);
        const rank = effective.lora?.rank ?? 0;
        if (rank > maxLoraRank) {
          throw new InvalidArgument(`lora.rank ${rank} is above this trainer's limit of ${maxLoraRank} (max adapter rank)`);
        }
        await checkAgainstStore(store, effective);
        const id = newJobId();
        effective.outputAdapter ||= id;
        const output = effective.outputAdapter;
        const { job } = await creating.run(async () => {
          if (await store.exists("adapters", output)) {
            throw new AlreadyExists(`adapter "${output}" already exists; choose another output_adapter`);
          }
          const clash = (await jobs.list({ states: ["queued", "running"] })).find((j) => j.outputAdapter === output);
          if (clash) throw new AlreadyExists(`job ${clash.id} is already training adapter "${output}"`);
          return jobs.create({ id, request: requestToJson(effective), outputAdapter: output, device: effective.training?.device === Device.CUDA ? "cuda" : "cpu", message: "queued" });
        });
        manager.wake(id);
        manager.notify();
        return { job: convertJob(job) };
      },

      async getJob(req, ctx) {
        return { job: (await getVisibleJob(req.id, ctx)).message };
      },

      async listJobs(req, ctx) {
        const state = fromProtoState(req.state);
        const list = await jobs.list(state ? { states: [state] } : {});
        return { jobs: visibleOnly(callerOf(ctx), list.map(convertJob), jobResources) };
      },

      async cancelJob(req, ctx) {
        await getVisibleJob(req.id, ctx);
        const { job, outcome } = await manager.cancel(req.id);
        if (outcome === "final" && job.state !== "cancelled") {
          throw new FailedPrecondition(`job "${req.id}" already ${job.state}; only queued or running jobs can be cancelled`);
        }
        return { job: convertJob(job) };
      },

      async *watchJob(req, ctx) {
        if (!req.id) throw new InvalidArgument("id is required");
        // Without auth the watch itself reports a missing job; with auth the job must be visible.
        if (callerOf(ctx)) await getVisibleJob(req.id, ctx);
        for await (const e of manager.watch(req.id, ctx.signal)) yield toWatchResponse(e);
      },

      async listCheckpoints(req, ctx) {
        if (!req.jobId) throw new InvalidArgument("job_id is required");
        await getVisibleJob(req.jobId, ctx);
        return { checkpoints: (await jobs.listCheckpoints(req.jobId)).map(toCheckpointMessage) };
      },

      async uploadDataset(requests, ctx) {
        let name = "";
        let claimed = false;
        let fileName = "";
        let meta: Record<string, string> = {};
        try {
          const res = await receiveUpload(requests, {
            begin: async (n, overwrite) => {
              name = validateName(n, "name");
              if (uploading.has(name)) throw new AlreadyExists(`dataset "${name}" is being uploaded by another request`);
              uploading.add(name);
              claimed = true;
              if (overwrite) await refuseIfInUse(name, "replace");
              const w = await store.beginWrite("datasets", name, { overwrite });
              // receiveUpload commits without arguments; the meta is known only after validate().
              return { dir: w.dir, commit: () => w.commit({ meta }), abort: () => w.abort() };
            },
            checkPath: (p) => {
              if (p.includes("/")) throw new InvalidArgument(`chunk.path ${JSON.stringify(p)}: a dataset is one file; send its file name, not a path`);
              if (fileName && p !== fileName) throw new InvalidArgument(`a dataset is one file: got ${JSON.stringify(p)} after ${JSON.stringify(fileName)}`);
              datasetFormatOf(p);
              if (!/^[A-Za-z0-9_][A-Za-z0-9._ +@=,-]{0,254}$/.test(p)) throw new InvalidArgument(`chunk.path ${JSON.stringify(p)} is not an allowed file name`);
              fileName = p;
            },
            validate: async (dir, files) => {
              const f = files[0]!;
              if (f.sizeBytes === 0) throw new InvalidArgument(`dataset "${name}": ${f.path} is empty`);
              const scan = await scanDataset(join(dir, f.path), datasetFormatOf(f.path), `"${name}"`);
              meta = { format: scan.format, examples: String(scan.examples), file: f.path, kinds: scan.kinds.join(",") };
            },
            signal: ctx.signal,
            maxTotalBytes: opts.maxUploadBytes ?? 16 * 1024 ** 3,
            maxFiles: 1,
          });
          return { dataset: await describeDataset(store, res.name) };
        } finally {
          if (claimed) uploading.delete(name);
        }
      },

      async listDatasets(_req, ctx) {
        const datasets: Dataset[] = [];
        for (const name of visibleOnly(callerOf(ctx), await store.list("datasets"), (n) => ({ datasets: [n] }))) {
          try {
            datasets.push(await describeDataset(store, name));
          } catch (e) {
            if (e instanceof NotFound) continue; // deleted meanwhile
            if (!isQloraError(e)) throw e;
            // Placed by hand and not a usable dataset: still listed, so it can be inspected or deleted.
            const st = await store.stat("datasets", name).catch(() => undefined);
            datasets.push(create(DatasetSchema, { name, sizeBytes: BigInt(st?.sizeBytes ?? 0) }));
          }
        }
        return { datasets };
      },

      async deleteDataset(req) {
        if (!req.name) throw new InvalidArgument("name is required");
        validateName(req.name, "name");
        if (uploading.has(req.name)) throw new FailedPrecondition(`dataset "${req.name}" is being uploaded`);
        await refuseIfInUse(req.name, "delete");
        await store.delete("datasets", req.name);
        return {};
      },
    },
    {
      onStart: async (ctx) => {
        // Start checkpointing jobs and ending watch streams as soon as the server begins to drain,
        // not only after the drain (which would wait for every watcher's grace period).
        const ac = new AbortController();
        void (async () => {
          for await (const _ of ctx.health.watch(TrainerService.typeName, ac.signal)) {
            if (ctx.health.isShutDown) {
              manager.beginShutdown();
              break;
            }
          }
        })();
        void closingSignal.then(() => ac.abort());
        // Prometheus: logged steps and job ends are pushed; jobs by state are read at scrape time.
        if (ctx.metrics) {
          const training = ctx.metrics.training;
          manager.trainingMetrics = training;
          ctx.metrics.onCollect(async () => {
            const counts: Record<string, number> = {};
            for (const j of await jobs.list({})) counts[j.state] = (counts[j.state] ?? 0) + 1;
            training.setJobCounts(counts);
          });
        }
        await manager.start();
      },
      onClose: () => close(),
    },
  );

  async function refuseIfInUse(name: string, verb: string): Promise<void> {
    const users = (await jobs.list({ states: ["queued", "running"] })).filter((j) => {
      const r = j.request as { dataset?: string; evalDataset?: string };
      return r.dataset === name || r.evalDataset === name;
    });
    if (users.length > 0) {
      throw new FailedPrecondition(`cannot ${verb} dataset "${name}": job(s) ${users.map((j) => j.id).join(", ")} still need it`);
    }
  }

  return {
    ...registration,
    replicaId: replica.id,
    jobs,
    manager,
    start: () => manager.start(),
    close: (o) => {
      markClosed();
      return close(o);
    },
    onClose: () => {
      markClosed();
      return close();
    },
  };
}
