/**
 * Server configuration for `qlora serve`: command-line flags + environment, validated in one
 * place, with flags winning over the environment. The container images get their settings from
 * the Kubernetes manifests (deploy/k8s/base: ConfigMap `qlora-config`, Secrets, the container's
 * args), so every variable those pass is read here:
 *
 * | setting      | flag                | environment                                  | default            |
 * |--------------|---------------------|----------------------------------------------|--------------------|
 * | host         | --host              | (none)                                       | 127.0.0.1          |
 * | port         | --port              | (none)                                       | 50051              |
 * | data dir     | --data-dir          | QLORA_DATA_DIR                               | required           |
 * | services     | --services          | (none)                                       | all available      |
 * | artifacts    | --store local|s3    | QLORA_STORE, QLORA_S3_* , AWS_*              | local (data dir)   |
 * | job store    | --job-store         | QLORA_JOB_STORE, QLORA_DATABASE_URL (+ _SCHEMA) | sqlite (data dir) |
 * | device       | --device            | QLORA_DEVICE                                 | auto               |
 * | replica id   | --replica-id        | QLORA_REPLICA_ID                             | see below          |
 * | decode matmul| --decode-matmul     | QLORA_DECODE_MATMUL (exact, int8)            | exact              |
 * | embeddings   | --embeddings        | QLORA_EMBEDDINGS (stored, nf4)               | stored             |
 * | adapter rank | --max-adapter-rank  | QLORA_MAX_ADAPTER_RANK                       | 256                |
 * | adapter size | --max-adapter-bytes | QLORA_MAX_ADAPTER_BYTES (1073741824, 512MiB, 1GiB) | 1 GiB        |
 *
 * Host and port deliberately have no environment variables: Kubernetes' service links inject
 * `<SERVICE>_PORT=tcp://…` variables, and a Service named "qlora" would silently set QLORA_PORT.
 *
 * The artifact store settings are handed to `createStoreFromEnv` of @qlora/store (`store.env`), so
 * the rules (QLORA_S3_BUCKET required, endpoint URL, path style, credentials in pairs, …) are the
 * store's own; they are checked here already, before anything starts.
 *
 * The parsing is pure (flags and env in, a plain object out); `resolveDevice` and `openJobStore`
 * are the two steps that look at the machine or the network.
 */
import { hostname as osHostname } from "node:os";
import net from "node:net";
import path from "node:path";
import { FailedPrecondition, InvalidArgument } from "@qlora/core";
import { s3OptionsFromEnv } from "@qlora/store";
import type { JobStore } from "@qlora/trainer";
import { UsageError } from "./command.js";

export type Env = Record<string, string | undefined>;

export const DEVICES = ["auto", "cpu", "cuda"] as const;
export type DeviceChoice = (typeof DEVICES)[number];
export const STORE_KINDS = ["local", "s3"] as const;
export type StoreKind = (typeof STORE_KINDS)[number];
export const JOB_STORE_KINDS = ["sqlite", "postgres"] as const;
export type JobStoreKind = (typeof JOB_STORE_KINDS)[number];
export const DECODE_MATMULS = ["exact", "int8"] as const;
export const EMBEDDINGS_MODES = ["stored", "nf4"] as const;
export type DecodeMatmulChoice = (typeof DECODE_MATMULS)[number];

/** The flags of `qlora serve` as given (undefined or empty list: not given). */
export interface ServeFlags {
  host?: string | undefined;
  port?: string | undefined;
  dataDir?: string | undefined;
  services?: string[] | undefined;
  store?: string | undefined;
  jobStore?: string | undefined;
  device?: string | undefined;
  replicaId?: string | undefined;
  decodeMatmul?: string | undefined;
  embeddings?: string | undefined;
  maxAdapterRank?: string | undefined;
  maxAdapterBytes?: string | undefined;
}

/** The variables `createStoreFromEnv` (@qlora/store) reads; `store.env` holds only these. */
export const STORE_ENV_KEYS = [
  "QLORA_STORE",
  "QLORA_DATA_DIR",
  "QLORA_S3_ENDPOINT",
  "QLORA_S3_BUCKET",
  "QLORA_S3_REGION",
  "QLORA_S3_PREFIX",
  "QLORA_S3_FORCE_PATH_STYLE",
  "QLORA_S3_CACHE_DIR",
  "QLORA_S3_PART_SIZE_MIB",
  "QLORA_S3_CONCURRENCY",
  "AWS_REGION",
  "AWS_DEFAULT_REGION",
  "AWS_ACCESS_KEY_ID",
  "AWS_SECRET_ACCESS_KEY",
  "AWS_SESSION_TOKEN",
] as const;

export type StoreSettings =
  | {
      kind: "local";
      /** The store's root: the data directory. */
      root: string;
      /** Input for `createStoreFromEnv(env, { dataDir })`. */
      env: Env;
    }
  | {
      kind: "s3";
      bucket: string;
      prefix: string;
      /** Undefined: AWS S3 itself. */
      endpoint: string | undefined;
      region: string;
      forcePathStyle: boolean;
      /** Local cache of downloaded artifacts (under the data dir unless QLORA_S3_CACHE_DIR). */
      cacheDir: string;
      /** "env": AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; "default-chain": the SDK's (IRSA, profiles, …). */
      credentials: "env" | "default-chain";
      /** Input for `createStoreFromEnv(env, { dataDir })`; holds secrets: never log it. */
      env: Env;
    };

export type JobStoreSettings =
  | { kind: "sqlite"; /** `<dataDir>/trainer/jobs.db` (the trainer's embedded default). */ path: string }
  | {
      kind: "postgres";
      /** The connection URL as given (may hold a password: log `display` instead). */
      url: string;
      /** The URL without credentials, for logs. */
      display: string;
      /** PostgreSQL schema of the tables (QLORA_DATABASE_SCHEMA); undefined: the job store's default. */
      schema: string | undefined;
    };

export interface ServerConfig {
  host: string;
  port: number;
  /** Absolute. */
  dataDir: string;
  /** Services asked for, deduplicated, in order; empty: every service available in this build. */
  services: string[];
  store: StoreSettings;
  /** Null when no trainer is served (nothing reads it). */
  jobStore: JobStoreSettings | null;
  /** As asked; `resolveDevice` turns it into the device used. */
  device: DeviceChoice;
  /**
   * This replica's id in the job table. Undefined means the trainer's embedded default (an id kept
   * in the data directory), which is what a SQLite job store wants; with PostgreSQL the default is the
   * host name (the pod name in Kubernetes, so a restarted container resumes its jobs at once).
   */
  replicaId: string | undefined;
  replicaIdSource: "flag" | "env" | "hostname" | "data-dir";
  /** The inference service's decode-step NF4 matmul (docs/engine.md): exact fp32 weights or int8 activations. */
  decodeMatmul: DecodeMatmulChoice;
  /** The inference service's token embeddings / lm_head: as stored, or NF4 (docs/model.md). */
  embeddings: (typeof EMBEDDINGS_MODES)[number];
  /**
   * Limits on LoRA adapters (docs/security.md): the inference service refuses to load larger ones,
   * the trainer refuses jobs of a larger rank. Undefined: the services' defaults (rank 256, 1 GiB).
   */
  adapterLimits: { maxRank: number | undefined; maxBytes: number | undefined };
}

export interface ConfigOptions {
  /** Resolves a relative --data-dir (default: process.cwd()). */
  cwd?: string;
  /** Default: os.hostname(). */
  hostname?: () => string;
}

const nonEmpty = (v: string | undefined): string | undefined => {
  const t = v?.trim();
  return t ? t : undefined;
};

/** A flag's value wins; an empty flag counts as given (and is then rejected by the validator). */
function pick(flag: string | undefined, env: Env, key: string): { value: string; from: string } | undefined {
  if (flag !== undefined) return { value: flag.trim(), from: `--${flagName(key)}` };
  const v = nonEmpty(env[key]);
  return v === undefined ? undefined : { value: v, from: key };
}

function flagName(envKey: string): string {
  return (
    {
      QLORA_DATA_DIR: "data-dir",
      QLORA_STORE: "store",
      QLORA_JOB_STORE: "job-store",
      QLORA_DEVICE: "device",
      QLORA_REPLICA_ID: "replica-id",
      QLORA_DECODE_MATMUL: "decode-matmul",
      QLORA_EMBEDDINGS: "embeddings",
      QLORA_MAX_ADAPTER_RANK: "max-adapter-rank",
      QLORA_MAX_ADAPTER_BYTES: "max-adapter-bytes",
    } as Record<string, string>
  )[envKey]!;
}

/** Mistakes on the command line are usage errors (exit 2); in the environment, invalid arguments (exit 2 too). */
function invalid(from: string, message: string): Error {
  return from.startsWith("--") ? new UsageError(`${from} ${message}`) : new InvalidArgument(`${from} ${message}`);
}

function choice<T extends string>(v: { value: string; from: string } | undefined, choices: readonly T[], dflt: T): T {
  if (v === undefined) return dflt;
  const lower = v.value.toLowerCase();
  if (!(choices as readonly string[]).includes(lower)) {
    throw invalid(v.from, `must be one of ${choices.join(", ")}; got ${JSON.stringify(v.value)}`);
  }
  return lower as T;
}

const REPLICA_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

function positiveInt(v: { value: string; from: string } | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = /^[0-9]+$/.test(v.value) ? Number(v.value) : NaN;
  if (!Number.isSafeInteger(n) || n < 1) throw invalid(v.from, `must be a positive integer; got ${JSON.stringify(v.value)}`);
  return n;
}

const BYTE_UNITS: Record<string, number> = { "": 1, b: 1, k: 1024, kib: 1024, m: 1024 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gib: 1024 ** 3 };

/** Bytes as a count, or with a binary unit: 1073741824, 512MiB, 1GiB (K/M/G mean KiB/MiB/GiB). */
function byteSize(v: { value: string; from: string } | undefined): number | undefined {
  if (v === undefined) return undefined;
  const m = /^([0-9]+)\s*([A-Za-z]*)$/.exec(v.value);
  const unit = m ? BYTE_UNITS[m[2]!.toLowerCase()] : undefined;
  const n = m && unit !== undefined ? Number(m[1]) * unit : NaN;
  if (!Number.isSafeInteger(n) || n < 1) throw invalid(v.from, `must be a positive size in bytes (e.g. 1073741824, 512MiB, 1GiB); got ${JSON.stringify(v.value)}`);
  return n;
}

/** A host name as a replica id: characters outside [A-Za-z0-9._-] become "-", at most 128. */
export function replicaIdFromHostname(h: string): string | undefined {
  const id = h
    .trim()
    .replace(/[^A-Za-z0-9._-]/g, "-")
    .replace(/^[^A-Za-z0-9]+/, "")
    .slice(0, 128);
  return REPLICA_ID.test(id) ? id : undefined;
}

/** postgres://user:secret@host:5432/db?x=y → postgres://user@host:5432/db (no password, no query). */
export function redactDatabaseUrl(u: URL): string {
  const user = u.username ? `${u.username}@` : "";
  return `${u.protocol}//${user}${u.host}${u.pathname}`;
}

function parseHost(flag: string | undefined): string {
  if (flag === undefined) return "127.0.0.1";
  const h = flag.trim();
  // IPv4, IPv6 (bare, as node's listen() wants it) or a host name that resolves to a local address.
  if (net.isIP(h) !== 0) return h;
  if (/^\[.*\]$/.test(h) && net.isIP(h.slice(1, -1)) === 6) return h.slice(1, -1);
  if (/^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/.test(h)) return h;
  throw new UsageError(`--host must be an IP address or a host name, got ${JSON.stringify(flag)}`);
}

function parsePort(flag: string | undefined): number {
  if (flag === undefined) return 50051;
  const p = flag.trim();
  if (!/^\d+$/.test(p)) throw new UsageError(`--port must be an integer, got "${flag}"`);
  const n = Number(p);
  if (n > 65535) throw new UsageError(`--port must be at most 65535, got ${n}`);
  return n;
}

function parseServices(flag: string[] | undefined): string[] {
  const names = (flag ?? []).flatMap((s) => s.split(",")).map((s) => s.trim().toLowerCase()).filter(Boolean);
  return [...new Set(names)];
}

function parseStore(kind: StoreKind, env: Env, dataDir: string): StoreSettings {
  const storeEnv: Env = {};
  for (const k of STORE_ENV_KEYS) if (env[k] !== undefined) storeEnv[k] = env[k];
  storeEnv.QLORA_STORE = kind;
  storeEnv.QLORA_DATA_DIR = dataDir;
  if (kind === "local") return { kind, root: dataDir, env: storeEnv };
  // The store's own validation (bucket required, endpoint an http(s) URL, booleans, key pairs).
  const o = s3OptionsFromEnv(storeEnv, { dataDir });
  return {
    kind,
    bucket: o.bucket,
    prefix: o.prefix ?? "",
    endpoint: o.endpoint,
    region: o.region ?? "us-east-1",
    forcePathStyle: o.forcePathStyle ?? false,
    cacheDir: o.cacheDir,
    credentials: o.credentials ? "env" : "default-chain",
    env: storeEnv,
  };
}

function parseJobStore(kind: JobStoreKind, env: Env, dataDir: string, kindFrom: string): JobStoreSettings {
  if (kind === "sqlite") return { kind, path: path.join(dataDir, "trainer", "jobs.db") };
  const raw = nonEmpty(env.QLORA_DATABASE_URL);
  if (!raw) {
    throw new InvalidArgument(
      `${kindFrom}=postgres needs QLORA_DATABASE_URL (postgres://USER:PASSWORD@HOST:5432/DB; in Kubernetes from the Secret qlora-postgres, key database-url)`,
    );
  }
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    // Never echo the value: it may hold a password.
    throw new InvalidArgument("QLORA_DATABASE_URL is not a URL (expected postgres://USER:PASSWORD@HOST:5432/DB)");
  }
  if (u.protocol !== "postgres:" && u.protocol !== "postgresql:") {
    throw new InvalidArgument(`QLORA_DATABASE_URL must be a postgres:// or postgresql:// URL, not ${u.protocol}//…`);
  }
  if (!u.hostname && !u.searchParams.get("host")) throw new InvalidArgument("QLORA_DATABASE_URL has no host");
  const schema = nonEmpty(env.QLORA_DATABASE_SCHEMA);
  if (schema !== undefined && !/^[a-z_][a-z0-9_]{0,62}$/.test(schema)) {
    throw new InvalidArgument(`QLORA_DATABASE_SCHEMA=${JSON.stringify(schema)}: use lowercase letters, digits and "_" (at most 63)`);
  }
  return { kind, url: raw, display: redactDatabaseUrl(u), schema };
}

/**
 * The server configuration from `qlora serve`'s flags and the environment. Throws UsageError (bad
 * flag) or InvalidArgument (bad variable), both exit code 2, with the setting named.
 */
export function serverConfigFromEnv(flags: ServeFlags, env: Env, opts: ConfigOptions = {}): ServerConfig {
  const host = parseHost(flags.host);
  const port = parsePort(flags.port);

  const dd = pick(flags.dataDir, env, "QLORA_DATA_DIR");
  if (!dd || !dd.value) throw new UsageError("--data-dir is required (or set QLORA_DATA_DIR)");
  if (dd.value.includes("\0")) throw invalid(dd.from, "must not contain NUL");
  const dataDir = path.resolve(opts.cwd ?? process.cwd(), dd.value);

  const services = parseServices(flags.services);
  const servesTrainer = services.length === 0 || services.includes("trainer");

  const storeKind = choice(pick(flags.store, env, "QLORA_STORE"), STORE_KINDS, "local");
  const store = parseStore(storeKind, env, dataDir);

  const jsFrom = pick(flags.jobStore, env, "QLORA_JOB_STORE");
  const jobStoreKind = choice(jsFrom, JOB_STORE_KINDS, "sqlite");
  // Only the trainer has jobs; other services ignore the (shared) job store settings, so a
  // ConfigMap that sets QLORA_JOB_STORE=postgres for every pod does not need the URL everywhere.
  const jobStore = servesTrainer ? parseJobStore(jobStoreKind, env, dataDir, jsFrom?.from ?? "QLORA_JOB_STORE") : null;

  const device = choice(pick(flags.device, env, "QLORA_DEVICE"), DEVICES, "auto");
  const decodeMatmul = choice(pick(flags.decodeMatmul, env, "QLORA_DECODE_MATMUL"), DECODE_MATMULS, "exact");
  const embeddings = choice(pick(flags.embeddings, env, "QLORA_EMBEDDINGS"), EMBEDDINGS_MODES, "stored");

  let replicaId: string | undefined;
  let replicaIdSource: ServerConfig["replicaIdSource"];
  const rid = pick(flags.replicaId, env, "QLORA_REPLICA_ID");
  if (rid) {
    if (!REPLICA_ID.test(rid.value)) {
      throw invalid(rid.from, `must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit; got ${JSON.stringify(rid.value)}`);
    }
    replicaId = rid.value;
    replicaIdSource = rid.from.startsWith("--") ? "flag" : "env";
  } else if (jobStore?.kind === "postgres") {
    const h = (opts.hostname ?? osHostname)();
    replicaId = replicaIdFromHostname(h);
    if (!replicaId) throw new InvalidArgument(`the host name ${JSON.stringify(h)} is not usable as a replica id: set QLORA_REPLICA_ID`);
    replicaIdSource = "hostname";
  } else {
    // SQLite: one queue per data directory; the trainer keeps the id there (and gives a second
    // live process on the same directory its own), which a shared host name could not.
    replicaId = undefined;
    replicaIdSource = "data-dir";
  }

  const adapterLimits = {
    maxRank: positiveInt(pick(flags.maxAdapterRank, env, "QLORA_MAX_ADAPTER_RANK")),
    maxBytes: byteSize(pick(flags.maxAdapterBytes, env, "QLORA_MAX_ADAPTER_BYTES")),
  };

  return { host, port, dataDir, services, store, jobStore, device, replicaId, replicaIdSource, decodeMatmul, embeddings, adapterLimits };
}

/** What this build can do with CUDA: the kernels' `cudaInfo()` when they have one. */
export interface CudaSupport {
  /** The kernels were compiled with CUDA. */
  built: boolean;
  /** GPUs visible to this process (0 without a driver or device). */
  devices: number;
  /** Why none is usable, when the runtime said (e.g. "no CUDA driver"). */
  reason?: string;
}

/**
 * Asks the native kernels about CUDA (`cudaInfo()` of @qlora/kernels, docs/cuda.md §3): built =
 * compiled with nvcc; devices = usable GPUs (compute capability >= 8.0), 0 with the driver's reason
 * otherwise. Loads the addon only when called.
 */
export async function probeCuda(): Promise<CudaSupport> {
  const { cudaInfo } = await import("@qlora/kernels");
  const info = cudaInfo();
  const devices = info.available ? info.devices.filter((d) => Number(d.computeCapability) >= 8).length : 0;
  return { built: info.compiled, devices, ...(info.reason ? { reason: info.reason } : {}) };
}

/**
 * The device to run on. `cuda` without a CUDA build or without a visible GPU is an error
 * (FailedPrecondition, exit 1) rather than a silent fallback to the CPU; `auto` picks CUDA when
 * it can, else the CPU. `probe` is only called when the answer depends on it.
 */
export async function resolveDevice(choice: DeviceChoice, probe: () => Promise<CudaSupport> = probeCuda): Promise<"cpu" | "cuda"> {
  if (choice === "cpu") return "cpu";
  const cuda = await probe();
  if (choice === "auto") return cuda.built && cuda.devices > 0 ? "cuda" : "cpu";
  if (!cuda.built) {
    throw new FailedPrecondition(
      "--device cuda: this build of qlora has no CUDA support (CPU-only kernels; use the CUDA image, deploy/docker/Dockerfile.cuda, or --device cpu|auto)",
    );
  }
  if (cuda.devices < 1) {
    throw new FailedPrecondition(
      `--device cuda: no GPU is visible to this process${cuda.reason ? ` (${cuda.reason})` : ""}; check the NVIDIA driver and the container's GPU access (nvidia.com/gpu limit, --gpus)`,
    );
  }
  return "cuda";
}

/** One line describing the stores for the startup log: never a password or key. */
export function describeStores(c: ServerConfig): { store: string; jobStore: string | null } {
  const s = c.store;
  const store =
    s.kind === "local"
      ? `local ${s.root}`
      : `s3://${s.bucket}/${s.prefix}${s.endpoint ? ` at ${s.endpoint}` : ""}${s.forcePathStyle ? " (path-style)" : ""}`;
  const j = c.jobStore;
  const jobStore = j === null ? null : j.kind === "sqlite" ? `sqlite ${j.path}` : `${j.display}${j.schema ? ` schema ${j.schema}` : ""}`;
  return { store, jobStore };
}

/** The PostgreSQL job store's constructor as @qlora/trainer exports it. */
interface PostgresJobStoreCtor {
  open(o: { connectionString: string; schema?: string }): Promise<JobStore>;
}

/**
 * Opens the job store the settings name: undefined for SQLite (the trainer opens its embedded
 * default itself), a connected and migrated PostgresJobStore for PostgreSQL. The trainer closes it.
 */
export async function openJobStore(s: JobStoreSettings | null): Promise<JobStore | undefined> {
  if (!s || s.kind === "sqlite") return undefined;
  const trainer = (await import("@qlora/trainer")) as unknown as { PostgresJobStore?: PostgresJobStoreCtor };
  if (typeof trainer.PostgresJobStore?.open !== "function") {
    throw new FailedPrecondition("QLORA_JOB_STORE=postgres: this build's trainer has no PostgreSQL job store (@qlora/trainer does not export PostgresJobStore)");
  }
  return trainer.PostgresJobStore.open({ connectionString: s.url, ...(s.schema ? { schema: s.schema } : {}) });
}

/**
 * After the services are built: a trainer must use the job store the configuration names (one that
 * ignored QLORA_JOB_STORE=postgres would silently keep a private SQLite queue per replica).
 * Registrations without a job store (quantizer, inference) are ignored.
 */
export function checkJobStoreInUse(config: Pick<ServerConfig, "jobStore">, registrations: readonly object[]): void {
  if (!config.jobStore) return;
  for (const r of registrations) {
    const kind = (r as { jobs?: { kind?: unknown } }).jobs?.kind;
    if (typeof kind === "string" && kind !== config.jobStore.kind) {
      throw new FailedPrecondition(
        `the trainer uses a ${kind} job store, not the configured ${config.jobStore.kind} one (this build does not pass the configured job store to the trainer)`,
      );
    }
  }
}
