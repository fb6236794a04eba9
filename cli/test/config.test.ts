/**
 * `qlora serve`'s configuration (cli/src/config.ts): flags + environment → ServerConfig, with
 * flags winning, and every mistake named. The last tests render the Kubernetes overlays and check
 * that each Deployment's args + env (ConfigMap, Secrets) give the configuration the manifests mean.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { InvalidArgument, FailedPrecondition } from "@qlora/core";
import { createStoreFromEnv, LocalStore, S3Store } from "@qlora/store";
import { parse as parseYaml, parseAllDocuments } from "yaml";
import { parseCommandLine, UsageError, type Io } from "../src/command.js";
import { runCli } from "../src/cli.js";
import { serve } from "../src/commands/serve.js";
import {
  checkJobStoreInUse,
  describeStores,
  probeCuda,
  redactDatabaseUrl,
  replicaIdFromHostname,
  resolveDevice,
  serverConfigFromEnv,
  STORE_ENV_KEYS,
  type CudaSupport,
  type Env,
  type ServeFlags,
} from "../src/config.js";

const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const host = () => "trainer-7d9f8b6c4-x2x5z";
const cfg = (flags: ServeFlags, env: Env) => serverConfigFromEnv(flags, env, { cwd: "/work", hostname: host });

/** The base ConfigMap + Secrets of deploy/k8s, with a development database and S3 keys. */
const K8S_ENV: Env = {
  QLORA_DATA_DIR: "/data",
  QLORA_STORE: "s3",
  QLORA_S3_ENDPOINT: "",
  QLORA_S3_BUCKET: "qlora-artifacts",
  QLORA_S3_FORCE_PATH_STYLE: "false",
  AWS_REGION: "us-east-1",
  QLORA_JOB_STORE: "postgres",
  QLORA_DATABASE_URL: "postgres://qlora:s3cret-pw@postgres:5432/qlora",
  AWS_ACCESS_KEY_ID: "AKIAEXAMPLE",
  AWS_SECRET_ACCESS_KEY: "secret-key-value",
  QLORA_THREADS: "8",
  PATH: "/usr/local/bin:/usr/bin",
};

function throwsWith(f: () => unknown, kind: new (...a: never[]) => Error, re: RegExp): void {
  assert.throws(f, (e: unknown) => {
    assert.ok(e instanceof kind, `expected ${kind.name}, got ${(e as Error)?.constructor?.name}: ${(e as Error)?.message}`);
    assert.match((e as Error).message, re);
    return true;
  });
}

describe("serverConfigFromEnv", () => {
  test("defaults: loopback, 50051, local store and SQLite in the data dir, device auto, the data dir's replica id", () => {
    const c = cfg({}, { QLORA_DATA_DIR: "data" });
    assert.equal(c.host, "127.0.0.1");
    assert.equal(c.port, 50051);
    assert.equal(c.dataDir, "/work/data");
    assert.deepEqual(c.services, []);
    assert.equal(c.store.kind, "local");
    assert.equal(c.store.kind === "local" && c.store.root, "/work/data");
    assert.deepEqual(c.jobStore, { kind: "sqlite", path: "/work/data/trainer/jobs.db" });
    assert.equal(c.device, "auto");
    assert.equal(c.replicaId, undefined);
    assert.equal(c.replicaIdSource, "data-dir");
    assert.deepEqual(describeStores(c), { store: "local /work/data", jobStore: "sqlite /work/data/trainer/jobs.db" });
  });

  test("the Kubernetes base: S3 on AWS, PostgreSQL, the pod name as replica id", () => {
    const c = cfg({ services: ["trainer"], host: "0.0.0.0", port: "8080", dataDir: "/data" }, K8S_ENV);
    assert.equal(c.host, "0.0.0.0");
    assert.equal(c.port, 8080);
    assert.deepEqual(c.services, ["trainer"]);
    assert.equal(c.store.kind, "s3");
    if (c.store.kind !== "s3") return;
    assert.equal(c.store.bucket, "qlora-artifacts");
    assert.equal(c.store.endpoint, undefined, "an empty QLORA_S3_ENDPOINT means AWS S3");
    assert.equal(c.store.forcePathStyle, false);
    assert.equal(c.store.region, "us-east-1");
    assert.equal(c.store.credentials, "env");
    assert.equal(c.store.cacheDir, "/data/s3-cache");
    assert.deepEqual(c.jobStore, { kind: "postgres", url: K8S_ENV.QLORA_DATABASE_URL, display: "postgres://qlora@postgres:5432/qlora", schema: undefined });
    assert.equal(c.replicaId, "trainer-7d9f8b6c4-x2x5z");
    assert.equal(c.replicaIdSource, "hostname");
    // Only the store's variables travel to createStoreFromEnv, and the data dir is the resolved one.
    assert.deepEqual(Object.keys(c.store.env).sort(), Object.keys(c.store.env).filter((k) => (STORE_ENV_KEYS as readonly string[]).includes(k)).sort());
    assert.equal(c.store.env.QLORA_THREADS, undefined);
    assert.equal(c.store.env.QLORA_DATA_DIR, "/data");
    const d = describeStores(c);
    assert.equal(d.store, "s3://qlora-artifacts/");
    assert.doesNotMatch(JSON.stringify(d), /s3cret-pw|secret-key-value/, "no secret in the startup log");
  });

  test("an S3-compatible endpoint: path style by default, prefix, region, the SDK's credential chain", () => {
    const c = cfg(
      { dataDir: "/d" },
      { QLORA_STORE: "S3", QLORA_S3_ENDPOINT: "http://s3:8333", QLORA_S3_BUCKET: "qlora", QLORA_S3_PREFIX: "team-a/", QLORA_S3_REGION: "eu-west-1" },
    );
    assert.equal(c.store.kind, "s3");
    if (c.store.kind !== "s3") return;
    assert.equal(c.store.endpoint, "http://s3:8333");
    assert.equal(c.store.forcePathStyle, true);
    assert.equal(c.store.prefix, "team-a/");
    assert.equal(c.store.region, "eu-west-1");
    assert.equal(c.store.credentials, "default-chain");
    assert.equal(describeStores(c).store, "s3://qlora/team-a/ at http://s3:8333 (path-style)");
  });

  test("createStoreFromEnv builds the store the settings describe", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), "qlora-config-"));
    assert.ok(createStoreFromEnv(cfg({ dataDir: dir }, {}).store.env, { dataDir: dir }) instanceof LocalStore);
    const s3 = cfg({ dataDir: dir }, { QLORA_STORE: "s3", QLORA_S3_ENDPOINT: "http://127.0.0.1:9", QLORA_S3_BUCKET: "b" });
    assert.ok(createStoreFromEnv(s3.store.env, { dataDir: dir }) instanceof S3Store);
  });

  test("flags win over the environment", () => {
    const env: Env = { ...K8S_ENV, QLORA_DEVICE: "cuda", QLORA_REPLICA_ID: "from-env", QLORA_DATA_DIR: "/env-data" };
    const c = cfg({ dataDir: "/flag-data", store: "local", jobStore: "sqlite", device: "cpu", replicaId: "from-flag" }, env);
    assert.equal(c.dataDir, "/flag-data");
    assert.equal(c.store.kind, "local");
    assert.deepEqual(c.jobStore, { kind: "sqlite", path: "/flag-data/trainer/jobs.db" });
    assert.equal(c.device, "cpu");
    assert.equal(c.replicaId, "from-flag");
    assert.equal(c.replicaIdSource, "flag");
    const e = cfg({ dataDir: "/x" }, env);
    assert.equal(e.device, "cuda");
    assert.equal(e.replicaId, "from-env");
    assert.equal(e.replicaIdSource, "env");
    assert.equal(e.store.kind, "s3");
    // --store s3 over QLORA_STORE=local; --job-store postgres over QLORA_JOB_STORE=sqlite.
    const f = cfg({ dataDir: "/x", store: "s3", jobStore: "postgres" }, { ...K8S_ENV, QLORA_STORE: "local", QLORA_JOB_STORE: "sqlite" });
    assert.equal(f.store.kind, "s3");
    assert.equal(f.jobStore?.kind, "postgres");
  });

  test("services: comma-separated or repeated, deduplicated, lower-cased; the job store only matters to the trainer", () => {
    assert.deepEqual(cfg({ dataDir: "/d", services: ["quantizer,Trainer", "quantizer", " inference "] }, {}).services, ["quantizer", "trainer", "inference"]);
    // quantizer/inference pods share the ConfigMap (QLORA_JOB_STORE=postgres) but need no URL.
    const q = cfg({ dataDir: "/d", services: ["quantizer"] }, { ...K8S_ENV, QLORA_DATABASE_URL: undefined });
    assert.equal(q.jobStore, null);
    assert.equal(q.replicaId, undefined);
    throwsWith(() => cfg({ dataDir: "/d", services: ["trainer"] }, { ...K8S_ENV, QLORA_DATABASE_URL: "" }), InvalidArgument, /QLORA_JOB_STORE=postgres needs QLORA_DATABASE_URL/);
    throwsWith(() => cfg({ dataDir: "/d" }, { QLORA_JOB_STORE: "postgres" }), InvalidArgument, /needs QLORA_DATABASE_URL/);
    throwsWith(() => cfg({ dataDir: "/d", jobStore: "postgres" }, {}), InvalidArgument, /--job-store=postgres needs QLORA_DATABASE_URL/);
  });

  test("replica ids: explicit ones are checked, host names are made usable", () => {
    assert.equal(replicaIdFromHostname("ip-10-0-0-1.ec2.internal"), "ip-10-0-0-1.ec2.internal");
    assert.equal(replicaIdFromHostname("my host:1"), "my-host-1");
    assert.equal(replicaIdFromHostname("x".repeat(300))?.length, 128);
    assert.equal(replicaIdFromHostname("---"), undefined);
    throwsWith(() => cfg({ dataDir: "/d", replicaId: "a/b" }, {}), UsageError, /--replica-id must be 1-128 characters/);
    throwsWith(() => cfg({ dataDir: "/d" }, { QLORA_REPLICA_ID: ".hidden" }), InvalidArgument, /QLORA_REPLICA_ID must be/);
    throwsWith(
      () => serverConfigFromEnv({ dataDir: "/d" }, K8S_ENV, { hostname: () => "!!!" }),
      InvalidArgument,
      /host name "!!!" is not usable as a replica id: set QLORA_REPLICA_ID/,
    );
  });

  test("every bad value is refused with the setting named", () => {
    const bad: [ServeFlags, Env, new (...a: never[]) => Error, RegExp][] = [
      [{}, {}, UsageError, /--data-dir is required \(or set QLORA_DATA_DIR\)/],
      [{}, { QLORA_DATA_DIR: "  " }, UsageError, /--data-dir is required/],
      [{ dataDir: "" }, { QLORA_DATA_DIR: "/env" }, UsageError, /--data-dir is required/],
      [{ dataDir: "/d", port: "http" }, {}, UsageError, /--port must be an integer, got "http"/],
      [{ dataDir: "/d", port: "65536" }, {}, UsageError, /--port must be at most 65535, got 65536/],
      [{ dataDir: "/d", host: "0.0.0.0:8080" }, {}, UsageError, /--host must be an IP address or a host name/],
      [{ dataDir: "/d", host: "" }, {}, UsageError, /--host must be/],
      [{ dataDir: "/d" }, { QLORA_STORE: "gcs" }, InvalidArgument, /QLORA_STORE must be one of local, s3; got "gcs"/],
      [{ dataDir: "/d", store: "minio" }, {}, UsageError, /--store must be one of local, s3; got "minio"/],
      [{ dataDir: "/d" }, { QLORA_STORE: "s3" }, InvalidArgument, /QLORA_STORE=s3 needs QLORA_S3_BUCKET/],
      [{ dataDir: "/d" }, { QLORA_STORE: "s3", QLORA_S3_BUCKET: "b", QLORA_S3_ENDPOINT: "s3:8333" }, InvalidArgument, /QLORA_S3_ENDPOINT must be an http\(s\) URL/],
      [{ dataDir: "/d" }, { QLORA_STORE: "s3", QLORA_S3_BUCKET: "b", QLORA_S3_FORCE_PATH_STYLE: "sometimes" }, InvalidArgument, /QLORA_S3_FORCE_PATH_STYLE="sometimes": expected true or false/],
      [{ dataDir: "/d" }, { QLORA_STORE: "s3", QLORA_S3_BUCKET: "b", AWS_ACCESS_KEY_ID: "k" }, InvalidArgument, /set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/],
      [{ dataDir: "/d" }, { QLORA_JOB_STORE: "mysql" }, InvalidArgument, /QLORA_JOB_STORE must be one of sqlite, postgres; got "mysql"/],
      [{ dataDir: "/d" }, { QLORA_JOB_STORE: "postgres", QLORA_DATABASE_URL: "mysql://u:pw@h/db" }, InvalidArgument, /must be a postgres:\/\/ or postgresql:\/\/ URL, not mysql:\/\/…/],
      [{ dataDir: "/d" }, { QLORA_JOB_STORE: "postgres", QLORA_DATABASE_URL: "not a url pw=hunter2" }, InvalidArgument, /^QLORA_DATABASE_URL is not a URL/],
      [{ dataDir: "/d" }, { QLORA_JOB_STORE: "postgres", QLORA_DATABASE_URL: "postgres://h/db", QLORA_DATABASE_SCHEMA: "Qlora-1" }, InvalidArgument, /QLORA_DATABASE_SCHEMA="Qlora-1"/],
      [{ dataDir: "/d", device: "gpu" }, {}, UsageError, /--device must be one of auto, cpu, cuda; got "gpu"/],
      [{ dataDir: "/d" }, { QLORA_DEVICE: "tpu" }, InvalidArgument, /QLORA_DEVICE must be one of auto, cpu, cuda; got "tpu"/],
    ];
    for (const [flags, env, kind, re] of bad) throwsWith(() => cfg(flags, env), kind, re);
    // A malformed URL's text (which may hold a password) is never echoed.
    assert.throws(
      () => cfg({ dataDir: "/d" }, { QLORA_JOB_STORE: "postgres", QLORA_DATABASE_URL: "not a url pw=hunter2" }),
      (e: Error) => !e.message.includes("hunter2"),
    );
  });

  test("accepted spellings", () => {
    assert.equal(cfg({ dataDir: "/d", host: "::" }, {}).host, "::");
    assert.equal(cfg({ dataDir: "/d", host: "[::1]" }, {}).host, "::1");
    assert.equal(cfg({ dataDir: "/d", host: "localhost" }, {}).host, "localhost");
    assert.equal(cfg({ dataDir: "/d", port: "0" }, {}).port, 0);
    assert.equal(cfg({ dataDir: "/d", device: "CUDA" }, {}).device, "cuda");
    const pg = cfg({ dataDir: "/d" }, { QLORA_JOB_STORE: "postgres", QLORA_DATABASE_URL: "postgresql://u:p@db.example:6432/q?sslmode=require", QLORA_DATABASE_SCHEMA: "qlora_ci" });
    assert.deepEqual(pg.jobStore, { kind: "postgres", url: "postgresql://u:p@db.example:6432/q?sslmode=require", display: "postgresql://u@db.example:6432/q", schema: "qlora_ci" });
    assert.equal(redactDatabaseUrl(new URL("postgres://h/db")), "postgres://h/db");
  });

  test("--decode-matmul / QLORA_DECODE_MATMUL: exact by default, the flag wins, other values are refused", () => {
    assert.equal(cfg({ dataDir: "/d" }, {}).decodeMatmul, "exact");
    assert.equal(cfg({ dataDir: "/d" }, { QLORA_DECODE_MATMUL: "int8" }).decodeMatmul, "int8");
    assert.equal(cfg({ dataDir: "/d", decodeMatmul: "exact" }, { QLORA_DECODE_MATMUL: "int8" }).decodeMatmul, "exact");
    throwsWith(() => cfg({ dataDir: "/d", decodeMatmul: "fp8" }, {}), UsageError, /--decode-matmul must be one of exact, int8; got "fp8"/);
    throwsWith(() => cfg({ dataDir: "/d" }, { QLORA_DECODE_MATMUL: "int4" }), InvalidArgument, /QLORA_DECODE_MATMUL must be one of exact, int8; got "int4"/);
  });
});

describe("the job store in use", () => {
  test("a trainer on another job store than the configured one is refused; other services do not matter", () => {
    const pg = cfg({ dataDir: "/d" }, { QLORA_JOB_STORE: "postgres", QLORA_DATABASE_URL: "postgres://h/db" });
    const sqliteTrainer = { service: {}, jobs: { kind: "sqlite" } };
    throwsWith(() => checkJobStoreInUse(pg, [{ service: {} }, sqliteTrainer]), FailedPrecondition, /the trainer uses a sqlite job store, not the configured postgres one/);
    checkJobStoreInUse(pg, [{ service: {} }, { service: {}, jobs: { kind: "postgres" } }]);
    checkJobStoreInUse(cfg({ dataDir: "/d" }, {}), [sqliteTrainer]);
    checkJobStoreInUse(cfg({ dataDir: "/d", services: ["quantizer"] }, { QLORA_JOB_STORE: "postgres" }), [{ service: {} }]);
  });
});

describe("devices", () => {
  const probe = (c: CudaSupport) => async () => c;
  const never = async (): Promise<CudaSupport> => assert.fail("cpu must not probe the GPU");

  test("cpu never probes; auto takes CUDA only when it is built and a GPU is visible", async () => {
    assert.equal(await resolveDevice("cpu", never), "cpu");
    assert.equal(await resolveDevice("auto", probe({ built: false, devices: 0 })), "cpu");
    assert.equal(await resolveDevice("auto", probe({ built: true, devices: 0 })), "cpu");
    assert.equal(await resolveDevice("auto", probe({ built: true, devices: 2 })), "cuda");
    assert.equal(await resolveDevice("cuda", probe({ built: true, devices: 1 })), "cuda");
  });

  test("cuda without a CUDA build, or without a GPU, is a clear error", async () => {
    await assert.rejects(resolveDevice("cuda", probe({ built: false, devices: 0 })), (e: Error) => {
      assert.ok(e instanceof FailedPrecondition);
      assert.match(e.message, /--device cuda: this build of qlora has no CUDA support .*Dockerfile\.cuda/);
      return true;
    });
    await assert.rejects(resolveDevice("cuda", probe({ built: true, devices: 0, reason: "no CUDA driver" })), /no GPU is visible to this process \(no CUDA driver\)/);
  });

  test("this build's kernels answer the probe", async () => {
    const c = await probeCuda();
    assert.equal(typeof c.built, "boolean");
    if (!c.built) await assert.rejects(resolveDevice("cuda"), /no CUDA support/);
  });
});

describe("qlora serve with the configuration", () => {
  async function run(argv: string[], env: Env): Promise<{ code: number; stdout: string; stderr: string }> {
    let stdout = "";
    let stderr = "";
    const io: Io = { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) }, isTTY: false, columns: 80, env, cwd: process.cwd() };
    const code = await runCli(argv, io);
    return { code, stdout, stderr };
  }

  test("configuration errors exit before anything starts, with the setting named", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), "qlora-config-serve-"));
    const cases: [string[], Env, number, RegExp][] = [
      [["serve", "--data-dir", dir, "--port", "0", "--services", "trainer"], { QLORA_JOB_STORE: "postgres" }, 2, /needs QLORA_DATABASE_URL/],
      [["serve", "--data-dir", dir, "--port", "0"], { QLORA_STORE: "s3" }, 2, /QLORA_STORE=s3 needs QLORA_S3_BUCKET/],
      [["serve", "--data-dir", dir, "--port", "0", "--device", "gpu"], {}, 2, /--device must be one of auto, cpu, cuda/],
      [["serve", "--data-dir", dir, "--port", "0", "--store", "gcs"], {}, 2, /--store must be one of local, s3/],
    ];
    // PostgreSQL that is not there: the trainer never starts (no silent fallback to SQLite).
    cases.push([["serve", "--data-dir", dir, "--port", "0", "--services", "trainer"], { QLORA_JOB_STORE: "postgres", QLORA_DATABASE_URL: "postgres://qlora@127.0.0.1:1/qlora" }, 1, /job store|ECONNREFUSED|connect/i]);
    // --device cuda on this CPU-only build (the gpu overlay's trainer on a CPU image).
    if (!(await probeCuda()).built) cases.push([["serve", "--data-dir", dir, "--port", "0", "--services", "quantizer", "--device", "cuda"], {}, 1, /no CUDA support/]);
    for (const [argv, env, code, re] of cases) {
      const r = await run(argv, env);
      assert.equal(r.code, code, `${argv.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr.replace(/\s+/g, " "), re);
      assert.equal(r.stdout, "", "nothing was started");
    }
  });

  test("the listening line names the stores and the device, never a secret", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), "qlora-config-serve-"));
    const ac = new AbortController();
    let stdout = "";
    const io: Io = {
      stdout: {
        write: (s: string) => {
          stdout += s;
          if (s.includes('"listening"')) ac.abort();
          return true;
        },
      },
      stderr: { write: () => true },
      isTTY: false,
      columns: 80,
      // An S3 store is only contacted on first use, so the server starts without one.
      env: { QLORA_STORE: "s3", QLORA_S3_ENDPOINT: "http://127.0.0.1:9", QLORA_S3_BUCKET: "bkt", AWS_ACCESS_KEY_ID: "id", AWS_SECRET_ACCESS_KEY: "very-secret" },
      cwd: process.cwd(),
    };
    const code = await runCli(["serve", "--data-dir", dir, "--port", "0", "--services", "quantizer", "--device", "cpu", "--json"], io, ac.signal);
    assert.equal(code, 0);
    const listening = JSON.parse(stdout.split("\n")[0]!);
    assert.equal(listening.event, "listening");
    assert.equal(listening.store, "s3://bkt/ at http://127.0.0.1:9 (path-style)");
    assert.equal(listening.jobStore, null);
    assert.equal(listening.device, "cpu");
    assert.doesNotMatch(stdout, /very-secret/);
  });
});

// ---- The manifests: each Deployment's args + env, as the kubelet would build them, configure serve.

interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { secretKeyRef?: { name: string; key: string; optional?: boolean }; configMapKeyRef?: { name: string; key: string }; resourceFieldRef?: unknown };
}
interface Container {
  name: string;
  args?: string[];
  env?: EnvVar[];
  envFrom?: { configMapRef?: { name: string }; secretRef?: { name: string } }[];
}
type K8sObject = { kind: string; metadata: { name: string }; data?: Record<string, string>; stringData?: Record<string, string>; spec?: { template?: { spec?: { containers?: Container[] } } } };

const kubectl = spawnSync("kubectl", ["version", "--client"], { encoding: "utf8" });
const noKubectl = kubectl.error || kubectl.status !== 0 ? "kubectl is not installed (needed to render the overlays)" : false;

function render(dir: string): K8sObject[] {
  const r = spawnSync("kubectl", ["kustomize", path.join(REPO, dir)], { encoding: "utf8", maxBuffer: 64 << 20 });
  assert.equal(r.status, 0, r.stderr);
  return parseAllDocuments(r.stdout).map((d) => d.toJSON() as K8sObject).filter(Boolean);
}

/** The container's environment as the kubelet makes it; Secrets the overlay does not define get stand-ins. */
function containerEnv(objects: K8sObject[], c: Container): Env {
  const byName = (kind: string, name: string) => objects.find((o) => o.kind === kind && o.metadata.name === name);
  const secretValue = (name: string, key: string): string | undefined => {
    const s = byName("Secret", name);
    if (!s) return `stand-in-${name}-${key}`.replace("stand-in-qlora-postgres-database-url", "postgres://qlora:pw@postgres.example:5432/qlora");
    const b64 = s.data?.[key];
    return b64 !== undefined ? Buffer.from(b64, "base64").toString("utf8") : s.stringData?.[key];
  };
  const env: Env = {};
  for (const f of c.envFrom ?? []) {
    if (f.configMapRef) Object.assign(env, byName("ConfigMap", f.configMapRef.name)?.data ?? assert.fail(`ConfigMap ${f.configMapRef.name}`));
  }
  for (const e of c.env ?? []) {
    if (e.value !== undefined) env[e.name] = e.value;
    else if (e.valueFrom?.secretKeyRef) env[e.name] = secretValue(e.valueFrom.secretKeyRef.name, e.valueFrom.secretKeyRef.key);
    else if (e.valueFrom?.configMapKeyRef) env[e.name] = byName("ConfigMap", e.valueFrom.configMapKeyRef.name)?.data?.[e.valueFrom.configMapKeyRef.key];
    else if (e.valueFrom?.resourceFieldRef) env[e.name] = "4";
  }
  return env;
}

/** $(VAR) in args, as the kubelet expands them. */
const expand = (args: string[], env: Env) => args.map((a) => a.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, k: string) => env[k] ?? m));

function flagsOf(args: string[]): ServeFlags {
  const { args: a } = parseCommandLine(serve, args);
  return {
    host: a.string("host"),
    port: a.string("port"),
    dataDir: a.string("data-dir"),
    services: a.list("services"),
    store: a.string("store"),
    jobStore: a.string("job-store"),
    device: a.string("device"),
    replicaId: a.string("replica-id"),
  };
}

describe("the Kubernetes manifests configure qlora serve", { skip: noKubectl }, () => {
  for (const overlay of ["deploy/k8s/overlays/local", "deploy/k8s/overlays/gpu"]) {
    test(overlay, async () => {
      const objects = render(overlay);
      const deployments = objects.filter((o) => o.kind === "Deployment" && ["quantizer", "trainer", "inference"].includes(o.metadata.name));
      assert.equal(deployments.length, 3);
      for (const d of deployments) {
        const c = d.spec!.template!.spec!.containers!.find((x) => x.name === "server")!;
        const env = containerEnv(objects, c);
        const args = expand(c.args ?? [], env);
        assert.doesNotMatch(args.join(" "), /\$\(/, `${d.metadata.name}: unexpanded args ${args.join(" ")}`);
        const conf = serverConfigFromEnv(flagsOf(args), env, { cwd: "/app", hostname: () => `${d.metadata.name}-5f7c9d-abcde` });
        const what = `${overlay} ${d.metadata.name}`;
        assert.deepEqual(conf.services, [d.metadata.name], what);
        assert.equal(conf.host, "0.0.0.0", what);
        assert.equal(conf.port, 8080, what);
        assert.equal(conf.dataDir, "/data", what);
        assert.equal(conf.store.kind, "s3", what);
        if (d.metadata.name === "trainer") {
          assert.equal(conf.jobStore?.kind, "postgres", what);
          assert.equal(conf.replicaId, `trainer-5f7c9d-abcde`, what);
        } else {
          assert.equal(conf.jobStore, null, what);
        }
        if (overlay.endsWith("local") && conf.store.kind === "s3") {
          assert.equal(conf.store.endpoint, "http://s3:8333", what);
          assert.equal(conf.store.forcePathStyle, true, what);
          assert.equal(conf.store.credentials, "env", what);
        }
        // Every server runs --device auto: the GPU trainer too (it trains on CUDA where a GPU is
        // usable, else on the CPU; docs/deploy.md).
        assert.equal(conf.device, "auto", what);
        if (overlay.endsWith("gpu") && d.metadata.name === "trainer") {
          assert.equal(await resolveDevice(conf.device, async () => ({ built: false, devices: 0 })), "cpu");
          assert.equal(await resolveDevice(conf.device, async () => ({ built: true, devices: 1 })), "cuda");
        }
      }
    });
  }

  test("the base ConfigMap holds only variables that serve reads", () => {
    const kustomization = parseYaml(readFileSync(path.join(REPO, "deploy/k8s/base/kustomization.yaml"), "utf8")) as { configMapGenerator: { name: string; literals: string[] }[] };
    const literals = kustomization.configMapGenerator.find((g) => g.name === "qlora-config")!.literals.map((l) => l.split("=")[0]!);
    const read = new Set<string>([...STORE_ENV_KEYS, "QLORA_JOB_STORE", "QLORA_DATABASE_URL", "QLORA_DEVICE", "QLORA_REPLICA_ID"]);
    for (const k of literals) assert.ok(read.has(k), `${k} in the ConfigMap is not read by qlora serve`);
  });
});
