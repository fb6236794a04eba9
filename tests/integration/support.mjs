// Shared by tests/integration/*.test.mjs: service containers (testcontainers), gRPC clients, and
// direct access to the stores for assertions. The environment comes from tests/integration/run.mjs.
//
// Also a tiny CLI used by run.mjs: `node support.mjs empty-bucket ENDPOINT BUCKET KEY SECRET`.
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { createWriteStream, existsSync } from "node:fs";
import { mkdtemp, readdir, readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const REPO = fileURLToPath(new URL("../../", import.meta.url));
export const STORIES = join(REPO, "..", "shared", "models", "stories260K");
const E = process.env;

/** Why a test file cannot run (it is meant to be started by run.mjs), or false. */
export const skipReason = !E.QLORA_IT_IMAGE
  ? "run through `npm run test:integration` (tests/integration/run.mjs builds the image and starts the stores)"
  : !existsSync(join(STORIES, "model.safetensors"))
    ? `stories260K not found at ${STORIES}`
    : false;

export const RUN = E.QLORA_IT_RUN ?? "manual";
const DOCKER = E.QLORA_IT_DOCKER || "docker";
const SERVICE_ENV = E.QLORA_IT_SERVICE_ENV ? JSON.parse(E.QLORA_IT_SERVICE_ENV) : {};
const LOG_DIR = E.QLORA_IT_LOG_DIR || tmpdir();

// Dependencies of the workspaces, resolved from the package that declares them (hoisted or not).
const requireFrom = (pkgDir) => createRequire(join(REPO, pkgDir, "package.json"));
const importFrom = async (pkgDir, name) => import(pathToFileURL(requireFrom(pkgDir).resolve(name)).href);

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Runs a command without blocking the event loop. */
function run(cmd, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

// ---------------------------------------------------------------------------------------------
// Service containers

const QUALIFIED = { quantizer: "qlora.v1.QuantizerService", trainer: "qlora.v1.TrainerService", inference: "qlora.v1.InferenceService" };

/**
 * The container args of a service's Deployment in deploy/k8s/base (rendered by run.mjs), with
 * $(VAR) expanded as the kubelet does; the documented args when the manifests could not be read.
 */
export function argsFor(service, env) {
  const fromManifests = E.QLORA_IT_SERVICE_ARGS ? JSON.parse(E.QLORA_IT_SERVICE_ARGS)[service] : undefined;
  const args = fromManifests ?? ["--services", service, "--host", "0.0.0.0", "--allow-insecure", "--port", "8080", "--data-dir", "$(QLORA_DATA_DIR)"];
  return args.map((a) => a.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, k) => env[k] ?? m));
}

/**
 * Starts `qlora serve` for one service the way deploy/k8s runs it: the manifests' args, the
 * ConfigMap/Secret environment (S3 + PostgreSQL of this run), uid 10001, read-only root filesystem,
 * a fresh /tmp and /data (a pod's emptyDirs: nothing survives the container), all capabilities
 * dropped, no-new-privileges. Resolves once the container logged its listening line and its gRPC
 * health check says SERVING. `image` / `args` override the run's image and the manifests' args.
 */
export async function startService(service, { label = service, env = {}, image = E.QLORA_IT_IMAGE, args } = {}) {
  const { GenericContainer, Wait } = await import("testcontainers");
  class PodLikeContainer extends GenericContainer {
    constructor(image) {
      super(image);
      this.hostConfig.ReadonlyRootfs = true;
    }
  }
  const name = `qlora-it-${RUN}-${label}`;
  const logFile = join(LOG_DIR, `${label}.log`);
  const tail = [];
  const container = await new PodLikeContainer(image)
    .withName(name)
    .withLabels({ "qlora-it": RUN })
    .withNetworkMode(E.QLORA_IT_NETWORK)
    .withCommand(args ?? argsFor(service, { ...SERVICE_ENV, ...env }))
    .withEnvironment({ ...SERVICE_ENV, ...env })
    .withExposedPorts(8080)
    // /tmp: a tmpfs (the pod's emptyDir). /data: the image's VOLUME, a fresh anonymous volume per
    // container owned by uid 10001 (removed with the container), like the pod's emptyDir.
    .withTmpFs({ "/tmp": "rw,size=512m,mode=1777" })
    .withDroppedCapabilities("ALL")
    .withSecurityOpt("no-new-privileges")
    .withLogConsumer((stream) => {
      const out = createWriteStream(logFile, { flags: "a" });
      stream.on("data", (d) => {
        out.write(d);
        for (const line of String(d).split("\n")) if (line) tail.push(line) > 80 && tail.shift();
      });
      stream.on("end", () => out.end());
    })
    .withWaitStrategy(Wait.forLogMessage(/qlora serve: listening on/))
    .withStartupTimeout(180_000)
    .start()
    .catch(async (e) => {
      await sleep(500); // the last log lines
      throw new Error(`${label}: the container did not start: ${e.message}\n--- last lines of ${logFile}:\n${tail.join("\n")}`);
    });
  const url = `http://${container.getHost()}:${container.getMappedPort(8080)}`;
  const handle = {
    service,
    label,
    url,
    id: container.getId(),
    container,
    logFile,
    /** The container's last log lines (for failure messages). */
    tail: () => tail.join("\n"),
    /** docker kill -s KILL: no SIGTERM, no shutdown hook, the process just dies. */
    kill: () => {
      const r = spawnSync(DOCKER, ["kill", "--signal", "KILL", container.getId()], { encoding: "utf8" });
      if (r.status !== 0) throw new Error(`docker kill: ${r.stderr}`);
    },
    /** Graceful stop (SIGTERM, as Kubernetes does), then removal. */
    stop: async () => {
      try {
        await container.stop({ timeout: 30_000, remove: true, removeVolumes: true });
      } catch {
        spawnSync(DOCKER, ["rm", "-f", "-v", container.getId()], { stdio: "ignore" });
      }
    },
    /**
     * `docker stop` (SIGTERM, then SIGKILL after `graceSeconds`, as the kubelet does with the pod's
     * grace period); returns the process's exit code and removes the container.
     */
    terminate: async (graceSeconds = 60) => {
      // Asynchronously: this process's gRPC clients must keep answering (GOAWAY, session close)
      // while the server drains, as live clients do.
      const stop = await run(DOCKER, ["stop", "--time", String(graceSeconds), container.getId()]);
      if (stop.code !== 0) throw new Error(`docker stop: ${stop.stderr}`);
      const code = Number(spawnSync(DOCKER, ["inspect", "--format", "{{.State.ExitCode}}", container.getId()], { encoding: "utf8" }).stdout.trim());
      spawnSync(DOCKER, ["rm", "-f", "-v", container.getId()], { stdio: "ignore" });
      return code;
    },
    /** Removal without a graceful stop (after kill). */
    remove: () => spawnSync(DOCKER, ["rm", "-f", "-v", container.getId()], { stdio: "ignore" }),
  };
  await waitServing(url, QUALIFIED[service], 60_000).catch((e) => {
    throw new Error(`${label}: ${e.message}\n${handle.tail()}`);
  });
  return handle;
}

/** Polls grpc.health.v1.Health/Check over h2c (what the kubelet's gRPC probe does) until SERVING. */
export async function waitServing(url, service, timeoutMs) {
  const { health } = await import("@qlora/proto");
  const client = await grpcClient(health.Health, url);
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const r = await client.check({ service }, { timeoutMs: 3000 });
      if (r.status === health.HealthCheckResponse_ServingStatus.SERVING) return;
      last = `status ${health.HealthCheckResponse_ServingStatus[r.status]}`;
    } catch (e) {
      last = e.message;
    }
    if (Date.now() > deadline) throw new Error(`health of ${service} at ${url} not SERVING after ${timeoutMs} ms (${last})`);
    await sleep(250);
  }
}

/** A connect-node gRPC client (HTTP/2, h2c) for a service descriptor of @qlora/proto. */
export async function grpcClient(desc, url) {
  const { createClient } = await importFrom("cli", "@connectrpc/connect");
  const { createGrpcTransport } = await importFrom("cli", "@connectrpc/connect-node");
  return createClient(desc, createGrpcTransport({ baseUrl: url, readMaxBytes: 64 << 20 }));
}

export async function clients(urls) {
  const proto = await import("@qlora/proto");
  const out = {};
  if (urls.quantizer) out.quantizer = await grpcClient(proto.QuantizerService, urls.quantizer);
  if (urls.trainer) out.trainer = await grpcClient(proto.TrainerService, urls.trainer);
  if (urls.inference) out.inference = await grpcClient(proto.InferenceService, urls.inference);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Uploads

const CHUNK = 256 * 1024;

/** UploadModel messages for a Hugging Face checkpoint directory (weights, config, tokenizer). */
export async function* modelUpload(name, dir, skip = ["README.md", "reference.json"]) {
  let first = true;
  for (const f of (await readdir(dir)).sort()) {
    if (skip.includes(f)) continue;
    const data = await readFile(join(dir, f));
    const sha256 = createHash("sha256").update(data).digest("hex");
    for (let off = 0; off === 0 || off < data.length; off += CHUNK) {
      const last = off + CHUNK >= data.length;
      yield { name: first ? name : "", chunk: { path: f, data: data.subarray(off, off + CHUNK), last, sha256: last ? sha256 : "" } };
      first = false;
    }
  }
}

/** UploadDataset messages for one file. */
export async function* datasetUpload(name, fileName, text) {
  const data = Buffer.from(text);
  for (let off = 0; off === 0 || off < data.length; off += CHUNK) {
    yield { name: off === 0 ? name : "", chunk: { path: fileName, data: data.subarray(off, off + CHUNK), last: off + CHUNK >= data.length } };
  }
}

// ---------------------------------------------------------------------------------------------
// Jobs

export async function collect(it) {
  const out = [];
  for await (const x of it) out.push(x);
  return out;
}

export async function waitForJob(trainer, id, pred, timeoutMs, what = "the expected state") {
  const { JobState } = await import("@qlora/proto");
  const deadline = Date.now() + timeoutMs;
  let job;
  for (;;) {
    try {
      job = (await trainer.getJob({ id }, { timeoutMs: 10_000 })).job;
      if (job && pred(job)) return job;
    } catch (e) {
      if (Date.now() > deadline) throw e;
    }
    if (Date.now() > deadline) throw new Error(`job ${id} did not reach ${what} in ${timeoutMs} ms (now ${JobState[job?.state ?? 0]}, step ${job?.lastMetrics?.step})`);
    await sleep(250);
  }
}

export async function isTerminal(job) {
  const { JobState } = await import("@qlora/proto");
  return [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED].includes(job.state);
}

/** "state:QUEUED", "metrics:25", "checkpoint:50": a watch stream, short. */
export async function describeEvents(events) {
  const { JobState } = await import("@qlora/proto");
  return events.map((e) =>
    e.event.case === "state"
      ? `state:${JobState[e.event.value.state]}`
      : e.event.case === "metrics"
        ? `metrics:${e.event.value.step}${e.event.value.evalLoss !== undefined ? "+eval" : ""}`
        : `${e.event.case}:${e.event.value.step}`,
  );
}

// ---------------------------------------------------------------------------------------------
// The stores, from this machine

/** A pg client on the run's database (host side). Call `.end()`. */
export async function database() {
  const pg = (await importFrom("services/trainer", "pg")).default;
  const c = new pg.Client({ connectionString: E.QLORA_IT_DATABASE_URL });
  await c.connect();
  return c;
}

/** The run's bucket through @qlora/store's S3Store (host side), under `prefix`. */
export async function s3Store(prefix) {
  const { S3Store } = await import("@qlora/store");
  return new S3Store({
    bucket: E.QLORA_IT_S3_BUCKET,
    prefix,
    endpoint: E.QLORA_IT_S3_HOST_ENDPOINT,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: { accessKeyId: E.QLORA_IT_S3_KEY_ID, secretAccessKey: E.QLORA_IT_S3_SECRET },
    // Under run.mjs's work directory, which it removes at the end.
    cacheDir: await mkdtemp(join(E.QLORA_IT_WORK_DIR || tmpdir(), "s3-cache-")),
  });
}

/** Raw object keys under a prefix (to check what the services wrote, without the store's view). */
export async function listKeys(prefix) {
  const s3 = await importFrom("libs/store", "@aws-sdk/client-s3");
  const client = new s3.S3Client({
    endpoint: E.QLORA_IT_S3_HOST_ENDPOINT,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: { accessKeyId: E.QLORA_IT_S3_KEY_ID, secretAccessKey: E.QLORA_IT_S3_SECRET },
  });
  const keys = [];
  let token;
  do {
    const r = await client.send(new s3.ListObjectsV2Command({ Bucket: E.QLORA_IT_S3_BUCKET, Prefix: prefix, ContinuationToken: token }));
    for (const o of r.Contents ?? []) keys.push(o.Key);
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  client.destroy();
  return keys;
}

// ---------------------------------------------------------------------------------------------
// CLI: empty and delete a bucket (run.mjs's cleanup when it used an external S3 server).

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href && process.argv[2] === "empty-bucket") {
  const [endpoint, bucket, accessKeyId, secretAccessKey] = process.argv.slice(3);
  const s3 = await importFrom("libs/store", "@aws-sdk/client-s3");
  const client = new s3.S3Client({ endpoint, region: "us-east-1", forcePathStyle: true, credentials: { accessKeyId, secretAccessKey } });
  let token;
  do {
    const r = await client.send(new s3.ListObjectsV2Command({ Bucket: bucket, ContinuationToken: token }));
    for (const o of r.Contents ?? []) await client.send(new s3.DeleteObjectCommand({ Bucket: bucket, Key: o.Key }));
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  await client.send(new s3.DeleteBucketCommand({ Bucket: bucket }));
  console.log(`emptied and deleted ${endpoint}/${bucket}`);
}
