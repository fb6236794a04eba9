#!/usr/bin/env node
// `npm run test:integration`: the three services as containers against real stores, driven over
// gRPC from this machine (docs/integration.md).
//
// 1. builds the image from deploy/docker/Dockerfile ONCE (BuildKit; or uses QLORA_IT_IMAGE), and the
//    GPU image from deploy/docker/Dockerfile.cuda when this machine has nvcc (QLORA_IT_CUDA_IMAGE),
// 2. starts PostgreSQL and an S3-compatible server (OpenStack Swift + s3api) as host processes with
//    tests/support/start-postgres.sh and start-s3.sh (or uses QLORA_IT_S3_ENDPOINT),
// 3. makes both reachable from containers: a Docker network of its own, and TCP relays on that
//    network's gateway address (the stores listen on 127.0.0.1 only),
// 4. runs tests/integration/*.test.mjs one file at a time (each starts its service containers with
//    testcontainers, reaper disabled), then
// 5. removes everything it created: containers, network, image, stores. The BuildKit cache stays (it
//    is what makes the next build fast); `docker builder prune` drops it.
//
// Environment (all optional):
//   QLORA_IT_IMAGE=TAG         use this image instead of building one (it is not removed)
//   QLORA_IT_CUDA_IMAGE=TAG|0  the GPU image (Dockerfile.cuda) to test, or 0 for none; default: built
//                              offline when this machine has nvcc (cuda-image.test.mjs skips otherwise)
//   QLORA_IT_KEEP_IMAGE=1      keep the image built here (tag printed at the end)
//   QLORA_IT_S3_ENDPOINT=URL   use a running S3-compatible server on this machine (with
//                              QLORA_IT_S3_ACCESS_KEY_ID / QLORA_IT_S3_SECRET_ACCESS_KEY, default Swift's
//                              test:tester / testing); a bucket of its own is created and emptied after
//   QLORA_IT_LOG_DIR=DIR       build and container logs (default: a temp directory, printed)
//   DOCKER_CLI=PATH            the docker client with BuildKit (default /usr/bin/docker when present)
//   QLORA_IT_TEST_PATTERN=RE   only test files whose name matches
import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, createWriteStream } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { findNvcc } from "../../libs/kernels/scripts/cuda-config.mjs";

const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const HERE = join(REPO, "tests", "integration");
const RUN = `${Date.now().toString(36)}${randomBytes(3).toString("hex")}`;
const DOCKER = process.env.DOCKER_CLI || (existsSync("/usr/bin/docker") ? "/usr/bin/docker" : "docker");
const LOG_DIR = process.env.QLORA_IT_LOG_DIR || join(tmpdir(), `qlora-it-${RUN}`);
const WORK = join(tmpdir(), `qlora-it-${RUN}-work`);
mkdirSync(LOG_DIR, { recursive: true });

const timings = [];
const t0 = Date.now();
const log = (s) => process.stdout.write(`[integration] ${s}\n`);
async function step(name, fn) {
  const start = Date.now();
  log(`${name} …`);
  try {
    return await fn();
  } finally {
    const s = (Date.now() - start) / 1000;
    timings.push([name, s]);
    log(`${name}: ${s.toFixed(1)} s`);
  }
}

function docker(args, opts = {}) {
  const r = spawnSync(DOCKER, args, { encoding: "utf8", maxBuffer: 64 << 20, ...opts });
  if (r.error) throw new Error(`${DOCKER} ${args[0]}: ${r.error.message}`);
  return r;
}

/** Runs a command, its output into a log file; rejects with the log's tail on failure. */
function runLogged(cmd, args, { env = process.env, logFile, cwd = REPO }) {
  return new Promise((resolve, reject) => {
    const out = createWriteStream(logFile);
    const child = spawn(cmd, args, { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
    child.stdout.pipe(out, { end: false });
    child.stderr.pipe(out, { end: false });
    child.on("error", reject);
    child.on("close", (code) => {
      out.end(() => {
        if (code === 0) return resolve();
        const tail = readFileSync(logFile, "utf8").split("\n").slice(-60).join("\n");
        reject(new Error(`${cmd} ${args.join(" ")} exited with ${code}; last lines of ${logFile}:\n${tail}`));
      });
    });
  });
}

const freePort = () =>
  new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

const portInUse = (port) =>
  new Promise((resolve) => {
    const c = net.connect(port, "127.0.0.1");
    c.once("connect", () => (c.destroy(), resolve(true)));
    c.once("error", () => resolve(false));
  });

/** A TCP relay: containers connect to gateway:port, the relay connects to 127.0.0.1:target. */
function relay(bindHost, target) {
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(target, "127.0.0.1");
    sockets.add(client).add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, bindHost, () =>
      resolve({
        port: server.address().port,
        close: () => {
          for (const s of sockets) s.destroy();
          server.close();
        },
      }),
    );
  });
}

const cleanups = [];
let cleaning;
function cleanup() {
  cleaning ??= (async () => {
    for (const f of cleanups.reverse()) {
      try {
        await f();
      } catch (e) {
        log(`cleanup: ${e.message}`);
      }
    }
  })();
  return cleaning;
}
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    log(`${sig}: cleaning up`);
    cleanup().finally(() => process.exit(130));
  });
}

async function main() {
  // ---- Docker
  const info = docker(["info", "--format", "{{.ServerVersion}} {{.Driver}}"]);
  if (info.status !== 0) {
    throw new Error(
      `Docker is not reachable through ${DOCKER} (${info.stderr.trim().split("\n").at(-1)}). Start it, e.g. ` +
        "`dockerd --storage-driver=vfs &` (see docs/integration.md)",
    );
  }
  log(`docker ${info.stdout.trim()} via ${DOCKER}; run ${RUN}; logs in ${LOG_DIR}`);

  // ---- Image
  let image = process.env.QLORA_IT_IMAGE;
  if (image) {
    if (docker(["image", "inspect", image]).status !== 0) throw new Error(`QLORA_IT_IMAGE=${image}: no such image`);
    log(`using the image ${image} (QLORA_IT_IMAGE)`);
  } else {
    const base = readFileSync(join(REPO, "deploy/docker/Dockerfile"), "utf8").match(/^ARG NODE_IMAGE=(\S+)/m)?.[1] ?? "node:20-bookworm-slim";
    if (docker(["image", "inspect", base]).status !== 0) {
      throw new Error(`the base image ${base} is not present and no registry is reachable: run ../shared/tools/make-base-images.sh first`);
    }
    image = `qlora-it:${RUN}`;
    const tag = image;
    // --network host: the builds' RUN steps (apt, npm ci) reach Debian's and npm's registries without the
    // engine's NAT rules, which a dockerd started with --iptables=false (.ci/run's fallback) does not have.
    await step("build the image (deploy/docker/Dockerfile, BuildKit)", () =>
      runLogged(DOCKER, ["build", "--progress=plain", "--network", "host", "-f", "deploy/docker/Dockerfile", "-t", tag, "."], {
        env: { ...process.env, DOCKER_BUILDKIT: "1" },
        logFile: join(LOG_DIR, "build.log"),
      }),
    );
    cleanups.push(() => {
      if (process.env.QLORA_IT_KEEP_IMAGE === "1") return log(`kept the image ${tag}`);
      docker(["image", "rm", "-f", tag]);
    });
  }

  // ---- The GPU image (deploy/docker/Dockerfile.cuda), offline: the build stage on an image made from
  // this machine's CUDA toolkit (deploy/docker/make-cuda-toolkit-image.sh), the runtime stage on the
  // node image (the addon's CUDA runtime is static). Tested by cuda-image.test.mjs.
  let cudaImage = process.env.QLORA_IT_CUDA_IMAGE;
  let cudaSkipped;
  if (cudaImage === "0") {
    cudaImage = undefined;
    cudaSkipped = "QLORA_IT_CUDA_IMAGE=0";
  } else if (cudaImage && cudaImage !== "build") {
    if (docker(["image", "inspect", cudaImage]).status !== 0) throw new Error(`QLORA_IT_CUDA_IMAGE=${cudaImage}: no such image`);
    log(`using the GPU image ${cudaImage} (QLORA_IT_CUDA_IMAGE)`);
  } else if (!findNvcc()) {
    cudaImage = undefined;
    cudaSkipped = "no nvcc on this machine to build the GPU image offline (CUDA_HOME, /usr/local/cuda/bin, PATH)";
    log(`GPU image: skipped (${cudaSkipped})`);
  } else {
    const toolkit = await step("make the CUDA build image (deploy/docker/make-cuda-toolkit-image.sh)", async () => {
      const logFile = join(LOG_DIR, "cuda-toolkit-image.log");
      await runLogged("bash", [join(REPO, "deploy/docker/make-cuda-toolkit-image.sh")], { env: { ...process.env, DOCKER }, logFile });
      return readFileSync(logFile, "utf8").trim().split("\n").at(-1);
    });
    const tag = `qlora-it-cuda:${RUN}`;
    await step("build the GPU image (deploy/docker/Dockerfile.cuda, BuildKit)", () =>
      runLogged(
        DOCKER,
        ["build", "--progress=plain", "--network", "host", "-f", "deploy/docker/Dockerfile.cuda", "-t", tag,
          "--build-arg", `CUDA_BUILD_IMAGE=${toolkit}`, "--build-arg", "CUDA_RUNTIME_IMAGE=node:20-bookworm-slim", "."],
        { env: { ...process.env, DOCKER_BUILDKIT: "1" }, logFile: join(LOG_DIR, "build-cuda.log") },
      ),
    );
    cleanups.push(() => {
      if (process.env.QLORA_IT_KEEP_IMAGE === "1") return log(`kept the image ${tag}`);
      docker(["image", "rm", "-f", tag]);
    });
    cudaImage = tag;
  }

  // ---- Stores (host processes)
  mkdirSync(WORK, { recursive: true });
  cleanups.push(() => rmSync(WORK, { recursive: true, force: true }));
  const pg = await step("start PostgreSQL (tests/support/start-postgres.sh)", async () => {
    const root = join(WORK, "pg");
    const port = await freePort();
    const env = { ...process.env, ROOT: root, PG_PORT: String(port), PG_DB: "qlora_it" };
    cleanups.push(() => spawnSync("bash", [join(REPO, "tests/support/stop-postgres.sh")], { env, stdio: "ignore" }));
    await runLogged("bash", [join(REPO, "tests/support/start-postgres.sh")], { env, logFile: join(LOG_DIR, "postgres-start.log") });
    return { port, db: "qlora_it" };
  });

  const s3 = await step("start the S3-compatible store (tests/support/start-s3.sh)", async () => {
    const bucket = `qlora-it-${RUN}`.toLowerCase();
    const external = process.env.QLORA_IT_S3_ENDPOINT;
    const keyId = process.env.QLORA_IT_S3_ACCESS_KEY_ID || "test:tester";
    const secret = process.env.QLORA_IT_S3_SECRET_ACCESS_KEY || "testing";
    if (external) {
      const u = new URL(external);
      if (!["127.0.0.1", "localhost"].includes(u.hostname)) throw new Error("QLORA_IT_S3_ENDPOINT must be a server on this machine (http://127.0.0.1:PORT)");
      await runLogged(process.execPath, [join(REPO, "tests/support/s3-bucket.mjs"), external, bucket, keyId, secret, "60"], { logFile: join(LOG_DIR, "s3-bucket.log") });
      cleanups.push(() => spawnSync(process.execPath, [join(HERE, "support.mjs"), "empty-bucket", external, bucket, keyId, secret], { stdio: "inherit" }));
      return { port: Number(u.port || 80), bucket, keyId, secret };
    }
    // Swift's account/container/object servers have fixed ports: a second Swift on this machine
    // would talk to the first one's servers.
    for (const p of [6200, 6201, 6202]) {
      if (await portInUse(p)) {
        throw new Error(
          `port ${p} is taken (another Swift, e.g. a tests/support/start-s3.sh of someone else?): stop it, or point the tests at it with QLORA_IT_S3_ENDPOINT=http://127.0.0.1:PORT`,
        );
      }
    }
    const root = join(WORK, "s3");
    const port = await freePort();
    const env = { ...process.env, ROOT: root, S3_PORT: String(port), S3_BUCKET: bucket };
    cleanups.push(() => spawnSync("bash", [join(REPO, "tests/support/stop-s3.sh")], { env, stdio: "ignore" }));
    await runLogged("bash", [join(REPO, "tests/support/start-s3.sh")], { env, logFile: join(LOG_DIR, "s3-start.log") });
    return { port, bucket, keyId, secret };
  });

  // ---- Network + relays
  const network = `qlora-it-${RUN}`;
  const created = docker(["network", "create", "--label", `qlora-it=${RUN}`, network]);
  if (created.status !== 0) throw new Error(`docker network create: ${created.stderr.trim()}`);
  cleanups.push(() => docker(["network", "rm", network]));
  const gateway = docker(["network", "inspect", network, "--format", "{{range .IPAM.Config}}{{.Gateway}}{{end}}"]).stdout.trim();
  if (!net.isIPv4(gateway)) throw new Error(`no IPv4 gateway on the network ${network} (${JSON.stringify(gateway)})`);
  const pgRelay = await relay(gateway, pg.port);
  const s3Relay = await relay(gateway, s3.port);
  cleanups.push(() => (pgRelay.close(), s3Relay.close()));
  // Containers left behind by a crashed test file are removed by label.
  cleanups.push(() => {
    const ids = docker(["ps", "-aq", "--filter", `label=qlora-it=${RUN}`]).stdout.split(/\s+/).filter(Boolean);
    if (ids.length) docker(["rm", "-f", "-v", ...ids]);
  });

  // What the Kubernetes ConfigMap + Secrets give every service container (deploy/k8s/base), with this
  // machine's stores; test files add QLORA_S3_PREFIX / QLORA_DATABASE_SCHEMA of their own.
  const serviceEnv = {
    QLORA_DATA_DIR: "/data",
    QLORA_STORE: "s3",
    QLORA_S3_ENDPOINT: `http://${gateway}:${s3Relay.port}`,
    QLORA_S3_BUCKET: s3.bucket,
    QLORA_S3_FORCE_PATH_STYLE: "true",
    AWS_REGION: "us-east-1",
    QLORA_JOB_STORE: "postgres",
    QLORA_DATABASE_URL: `postgres://postgres@${gateway}:${pgRelay.port}/${pg.db}`,
    AWS_ACCESS_KEY_ID: s3.keyId,
    AWS_SECRET_ACCESS_KEY: s3.secret,
    QLORA_THREADS: "1",
  };

  // The services' container args, from the manifests (deploy/k8s/base), so the containers run as the
  // Deployments say; without kubectl the tests use the args documented in docs/deploy.md.
  const serviceArgs = {};
  const rendered = spawnSync("kubectl", ["kustomize", join(REPO, "deploy/k8s/base")], { encoding: "utf8", maxBuffer: 64 << 20 });
  if (rendered.status === 0) {
    const { parseAllDocuments } = await import("yaml");
    for (const doc of parseAllDocuments(rendered.stdout)) {
      const o = doc.toJSON();
      if (o?.kind !== "Deployment") continue;
      const server = o.spec?.template?.spec?.containers?.find((c) => c.name === "server");
      if (server?.args) serviceArgs[o.metadata.name] = server.args;
    }
    log(`container args from deploy/k8s/base: ${Object.entries(serviceArgs).map(([k, v]) => `${k}: ${v.join(" ")}`).join("; ")}`);
  } else {
    log(`kubectl kustomize deploy/k8s/base failed (${rendered.error?.message ?? rendered.stderr.trim().split("\n").at(-1)}): using the documented args`);
  }

  // ---- Tests
  const pattern = process.env.QLORA_IT_TEST_PATTERN ? new RegExp(process.env.QLORA_IT_TEST_PATTERN) : null;
  const files = readdirSync(HERE)
    .filter((f) => f.endsWith(".test.mjs") && (!pattern || pattern.test(f)))
    .sort()
    .map((f) => join(HERE, f));
  if (files.length === 0) throw new Error("no test files");
  const env = {
    ...process.env,
    TESTCONTAINERS_RYUK_DISABLED: "true",
    QLORA_IT_RUN: RUN,
    QLORA_IT_IMAGE: image,
    ...(cudaImage ? { QLORA_IT_CUDA_IMAGE: cudaImage } : { QLORA_IT_CUDA_IMAGE: "", QLORA_IT_CUDA_SKIPPED: cudaSkipped }),
    QLORA_IT_NETWORK: network,
    QLORA_IT_LOG_DIR: LOG_DIR,
    QLORA_IT_WORK_DIR: WORK,
    QLORA_IT_DOCKER: DOCKER,
    QLORA_IT_SERVICE_ENV: JSON.stringify(serviceEnv),
    QLORA_IT_SERVICE_ARGS: JSON.stringify(serviceArgs),
    // The same stores as seen from this machine (assertions read them directly).
    QLORA_IT_DATABASE_URL: `postgres://postgres@127.0.0.1:${pg.port}/${pg.db}`,
    QLORA_IT_S3_HOST_ENDPOINT: `http://127.0.0.1:${s3.port}`,
    QLORA_IT_S3_BUCKET: s3.bucket,
    QLORA_IT_S3_KEY_ID: s3.keyId,
    QLORA_IT_S3_SECRET: s3.secret,
  };
  const code = await step("run the tests", () =>
    new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ["--test", "--test-concurrency=1", "--test-reporter=spec", ...files], { cwd: REPO, env, stdio: "inherit" });
      child.on("error", reject);
      child.on("close", (c) => resolve(c ?? 1));
    }),
  );
  return code;
}

let code = 1;
try {
  code = await main();
} catch (e) {
  process.stderr.write(`[integration] ${e.message}\n`);
  code = 1;
} finally {
  await step("clean up (containers, network, image, stores)", cleanup);
  log("timings:");
  for (const [name, s] of timings) log(`  ${s.toFixed(1).padStart(7)} s  ${name}`);
  log(`  ${((Date.now() - t0) / 1000).toFixed(1).padStart(7)} s  total`);
  log(`logs: ${LOG_DIR}`);
}
process.exit(code);
