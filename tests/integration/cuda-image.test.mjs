// The GPU image (deploy/docker/Dockerfile.cuda), built offline by run.mjs (QLORA_IT_CUDA_IMAGE): its
// addon carries the CUDA kernels and the static CUDA runtime, loads on a machine without a driver,
// and the trainer as the gpu overlay runs it (`--device auto`) serves and trains on the CPU there;
// `--device cuda` without a GPU stops at start with the reason. What needs a GPU is bench/gpu-check.sh.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { argsFor, clients, datasetUpload, s3Store, skipReason, startService, STORIES, waitForJob } from "./support.mjs";

const E = process.env;
const IMAGE = E.QLORA_IT_CUDA_IMAGE;
const DOCKER = E.QLORA_IT_DOCKER || "docker";
const skip = skipReason || (!IMAGE && (E.QLORA_IT_CUDA_SKIPPED || "no CUDA image was built for this run"));
const PREFIX = "cuda-image";
const SCHEMA = "it_cuda_image";
const ENV = { QLORA_S3_PREFIX: PREFIX, QLORA_DATABASE_SCHEMA: SCHEMA };

const proto = await import("@qlora/proto").catch(() => null);
const { JobState } = proto ?? {};

/** `docker run --rm` of the CUDA image with an entrypoint and args: { code, stdout, stderr }. */
function runImage(entrypoint, args, { user = "10001:10001" } = {}) {
  const r = spawnSync(DOCKER, ["run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", user, "--entrypoint", entrypoint, IMAGE, ...args], {
    encoding: "utf8",
    timeout: 120_000,
  });
  if (r.error) throw r.error;
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** The gpu overlay's trainer args (deploy/k8s/overlays/gpu), or the base args + `--device auto`. */
async function gpuTrainerArgs(env) {
  const rendered = spawnSync("kubectl", ["kustomize", "deploy/k8s/overlays/gpu"], { encoding: "utf8", maxBuffer: 64 << 20 });
  if (rendered.status === 0) {
    const { parseAllDocuments } = await import("yaml");
    for (const doc of parseAllDocuments(rendered.stdout)) {
      const o = doc.toJSON();
      if (o?.kind !== "Deployment" || o.metadata.name !== "trainer") continue;
      const args = o.spec.template.spec.containers.find((c) => c.name === "server").args;
      return args.map((a) => a.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, k) => env[k] ?? m));
    }
  }
  return [...argsFor("trainer", env), "--device", "auto"];
}

describe("the GPU image (Dockerfile.cuda) on a machine without a GPU", { skip, timeout: 12 * 60_000 }, () => {
  let trainer;
  let c;

  before(async () => {
    const store = await s3Store(PREFIX);
    const w = await store.beginWrite("models", "stories");
    for (const f of await readdir(STORIES)) if (!["README.md", "reference.json"].includes(f)) await w.writeFile(f, await readFile(join(STORIES, f)));
    await w.commit();
  });

  after(async () => {
    await trainer?.stop();
  });

  test("its addon has the CUDA kernels compiled in, links no CUDA library dynamically, and loads without a driver", () => {
    const info = runImage("node", [
      "--input-type=module",
      "-e",
      "const k = await import('/app/libs/kernels/dist/src/index.js'); console.log(JSON.stringify(k.cudaInfo()))",
    ]);
    assert.equal(info.code, 0, info.stderr);
    const cuda = JSON.parse(info.stdout.trim().split("\n").at(-1));
    assert.equal(cuda.compiled, true, info.stdout);
    assert.equal(cuda.available, false, "no GPU is given to this container");
    assert.match(cuda.reason, /\S/);

    const addons = runImage("sh", ["-c", "find /app/libs/kernels -name '*.node' -exec ldd {} \\;"]);
    assert.equal(addons.code, 0, addons.stderr);
    assert.match(addons.stdout, /libc\.so/);
    assert.doesNotMatch(addons.stdout, /cuda|cublas|not found/i, addons.stdout);
  });

  test("as the gpu overlay's trainer (--device auto): serves, and trains a job on the CPU", async () => {
    const args = await gpuTrainerArgs({ ...JSON.parse(E.QLORA_IT_SERVICE_ENV || "{}"), ...ENV });
    assert.ok(args.includes("--device"), args.join(" "));
    trainer = await startService("trainer", { label: "cuda-trainer", env: ENV, image: IMAGE, args });
    c = (await clients({ trainer: trainer.url })).trainer;
    await c.uploadDataset(datasetUpload("lines", "lines.txt", "Tom had a red ball.\nHe threw it to his dog.\nThe dog ran and ran.\n"));
    const { job } = await c.createJob({
      baseModel: "stories",
      dataset: "lines",
      outputAdapter: "lines-cuda-image",
      lora: { rank: 4 },
      training: { maxSteps: 12, saveSteps: 6, loggingSteps: 4, blockSize: 32, learningRate: 2e-3, seed: 7n },
    });
    const done = await waitForJob(c, job.id, (j) => [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED].includes(j.state), 6 * 60_000, "an end");
    assert.equal(done.state, JobState.SUCCEEDED, `${done.error}\n${trainer.tail()}`);
    // `--device auto` resolved to the CPU here, and the job says where it ran.
    assert.equal(done.device, proto.Device.CPU);
    const store = await s3Store(PREFIX);
    assert.ok((await store.verify("adapters", "lines-cuda-image")).ok);
  });

  test("--device cuda without a GPU stops at start, saying why", () => {
    const r = runImage("node", ["cli/dist/src/main.js", "serve", "--services", "inference", "--port", "8080", "--data-dir", "/tmp", "--device", "cuda"]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /--device cuda: no GPU is visible to this process/, r.stderr);
  });
});
