// The whole flow through the three services as containers (S3 artifact store, PostgreSQL job store),
// driven over gRPC from this machine:
//   upload stories260K → quantize → upload a dataset → train → watch → load the adapter into
//   inference → generate: the adapter changes the output;
// then a second job whose trainer container is SIGKILLed mid-run: a new trainer container (a new
// replica, as a rescheduled pod) takes the job over once its lease expires, resumes from the
// checkpoint in S3 (its own /data is empty), and ends with the same adapter as the uninterrupted run.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import {
  clients,
  collect,
  database,
  datasetUpload,
  describeEvents,
  listKeys,
  modelUpload,
  s3Store,
  skipReason,
  startService,
  STORIES,
  waitForJob,
} from "./support.mjs";
import { STORY_LINES } from "@qlora/model/test-support";

const PREFIX = "flow";
const SCHEMA = "it_flow";
// Each test file has its own key prefix in the bucket and its own PostgreSQL schema.
const ENV = { QLORA_S3_PREFIX: PREFIX, QLORA_DATABASE_SCHEMA: SCHEMA };

// The fine-tuning story of the unit tests (libs/model/test/test-support.ts), its first 8 lines.
const STORY = STORY_LINES.slice(0, 8);
// One configuration for both jobs, so the interrupted one must end with the same adapter.
const TRAINING = { maxSteps: 240, saveSteps: 40, saveTotalLimit: 1, loggingSteps: 20, blockSize: 32, learningRate: 2e-3 };
const LORA = { rank: 8, alpha: 16, targetModules: ["all-linear"] };

const proto = await import("@qlora/proto").catch(() => null);
const { JobState } = proto ?? {};

describe("three services in containers: quantize, train, serve; a trainer killed mid-job", { skip: skipReason, timeout: 20 * 60_000 }, () => {
  let svc = {};
  let c = {};
  let store;
  const containers = [];

  before(async () => {
    // The three Deployments of deploy/k8s, one replica each; started together.
    const [quantizer, trainer, inference] = await Promise.all([
      startService("quantizer", { env: ENV }),
      startService("trainer", { label: "trainer-1", env: ENV }),
      startService("inference", { env: ENV }),
    ]);
    svc = { quantizer, trainer, inference };
    containers.push(quantizer, trainer, inference);
    c = await clients({ quantizer: quantizer.url, trainer: trainer.url, inference: inference.url });
    store = await s3Store(PREFIX);
  });

  after(async () => {
    await Promise.all(containers.map((x) => x.stop()));
  });

  test("each container serves its own service only (--services from the manifests)", async () => {
    const { health } = proto;
    const { grpcClient } = await import("./support.mjs");
    for (const [name, s] of Object.entries(svc)) {
      const h = await grpcClient(health.Health, s.url);
      assert.equal((await h.check({ service: "" })).status, health.HealthCheckResponse_ServingStatus.SERVING, name);
      for (const other of ["Quantizer", "Trainer", "Inference"]) {
        if (other.toLowerCase() === name) continue;
        await assert.rejects(h.check({ service: `qlora.v1.${other}Service` }), /not[_ ]found/i, `${name} must not serve ${other}`);
      }
    }
  });

  test("upload stories260K and quantize it; the artifacts are in S3", async () => {
    const up = await c.quantizer.uploadModel(modelUpload("stories", STORIES));
    assert.equal(up.model.name, "stories");
    assert.equal(up.model.architecture, "LlamaForCausalLM");
    assert.equal(up.model.quantized, false);
    assert.ok(up.model.files.some((f) => f.path === "model.safetensors"));

    let progress = 0;
    let result;
    for await (const ev of c.quantizer.quantize({ sourceModel: "stories", outputModel: "stories-nf4" })) {
      if (ev.event.case === "progress") progress++;
      else if (ev.event.case === "result") result = ev.event.value;
    }
    assert.ok(progress > 0, "progress events");
    assert.equal(result.name, "stories-nf4");
    assert.equal(result.quantized, true);
    assert.equal(result.quantization.quantType, "nf4");
    assert.equal(result.sourceModel, "stories");
    assert.deepEqual((await c.quantizer.listModels({})).models.map((m) => m.name).sort(), ["stories", "stories-nf4"]);

    // Written through S3 (the containers' /data is a tmpfs of their own), verified by sha256.
    const keys = await listKeys(`${PREFIX}/models/`);
    assert.ok(keys.includes(`${PREFIX}/models/stories-nf4/manifest.json`), keys.join("\n"));
    assert.ok((await store.verify("models", "stories-nf4")).ok);
  });

  let firstJob;
  test("upload a dataset, train, watch the events to the end", async () => {
    const ds = (await c.trainer.uploadDataset(datasetUpload("kite", "kite.txt", STORY.join("\n") + "\n"))).dataset;
    assert.equal(ds.name, "kite");
    assert.equal(ds.examples, BigInt(STORY.length));

    const { job } = await c.trainer.createJob({ baseModel: "stories-nf4", dataset: "kite", outputAdapter: "kite-a", lora: LORA, training: TRAINING });
    assert.equal(job.state, JobState.QUEUED);
    const events = await collect(c.trainer.watchJob({ id: job.id }));
    const done = (await c.trainer.getJob({ id: job.id })).job;
    assert.equal(done.state, JobState.SUCCEEDED, `${done.error}\n${svc.trainer.tail()}`);
    assert.equal(done.attempts, 1);
    firstJob = done;

    const described = await describeEvents(events);
    assert.equal(described[0], "state:QUEUED");
    assert.equal(described[1], "state:RUNNING");
    assert.equal(described.at(-1), "state:SUCCEEDED");
    const steps = events.filter((e) => e.event.case === "metrics").map((e) => e.event.value.step);
    assert.deepEqual([...new Set(steps)], [20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 220, 240], described.join(" "));
    assert.deepEqual(
      events.filter((e) => e.event.case === "checkpoint").map((e) => e.event.value.step),
      [40, 80, 120, 160, 200, 240],
    );
    const losses = events.filter((e) => e.event.case === "metrics" && e.event.value.evalLoss === undefined).map((e) => e.event.value.loss);
    assert.ok(losses.every((l) => Number.isFinite(l) && l > 0));
    assert.ok(losses.at(-1) < losses[0] * 0.5, `loss ${losses[0]} → ${losses.at(-1)}`);
    // The replica id is the container's host name (the pod name in Kubernetes).
    const running = events.find((e) => e.event.case === "state" && e.event.value.state === JobState.RUNNING).event.value.message;
    assert.match(running, new RegExp(`running on ${svc.trainer.id.slice(0, 12)}`));

    const manifest = await store.readManifest("adapters", "kite-a");
    assert.equal(manifest.meta.job_id, job.id);
    assert.ok((await store.verify("adapters", "kite-a")).ok);
  });

  test("the adapter, loaded into inference, changes greedy generation and fits the data better", async () => {
    const { adapter } = await c.inference.loadAdapter({ name: "kite-a" });
    assert.equal(adapter.name, "kite-a");
    assert.equal(adapter.baseModel, "stories-nf4");
    assert.equal(adapter.jobId, firstJob.id);
    assert.equal(adapter.resident, true);
    assert.deepEqual((await c.inference.listAdapters({})).adapters.map((a) => a.name), ["kite-a"]);

    const gen = (adapterName) =>
      c.inference.generate({ model: "stories-nf4", adapter: adapterName, prompt: "Tom had a red", maxNewTokens: 24, sampling: { temperature: 0 } });
    const base = await gen("");
    const tuned = await gen("kite-a");
    assert.ok(base.text.length > 0 && tuned.text.length > 0);
    assert.notEqual(tuned.text, base.text, `the adapter did not change the output: ${JSON.stringify(base.text)}`);
    // Greedy decoding is deterministic: the same request gives the same text again.
    assert.equal((await gen("kite-a")).text, tuned.text);

    const score = (adapterName) => c.inference.score({ model: "stories-nf4", adapter: adapterName, texts: STORY });
    const [sb, sa] = [await score(""), await score("kite-a")];
    assert.ok(sa.loss < sb.loss * 0.7, `loss on the training text: base ${sb.loss}, adapter ${sa.loss}`);
    console.log(`# base: ${JSON.stringify(base.text)}\n# adapter: ${JSON.stringify(tuned.text)}\n# score loss base ${sb.loss.toFixed(3)}, adapter ${sa.loss.toFixed(3)}`);
  });

  test("SIGKILL of the trainer mid-job: a new trainer takes the job over and resumes from the checkpoint in S3", async () => {
    const { job } = await c.trainer.createJob({ baseModel: "stories-nf4", dataset: "kite", outputAdapter: "kite-b", lora: LORA, training: TRAINING });

    // Watch until a checkpoint is in the store and training went on past it, then kill.
    let checkpointStep = 0;
    let lastStep = 0;
    const ac = new AbortController();
    try {
      for await (const e of c.trainer.watchJob({ id: job.id }, { signal: ac.signal })) {
        if (e.event.case === "checkpoint") checkpointStep = e.event.value.step;
        if (e.event.case === "metrics") lastStep = e.event.value.step;
        if (checkpointStep > 0 && lastStep > checkpointStep) break;
        assert.ok(!(e.event.case === "state" && e.event.value.state === JobState.SUCCEEDED), "the job ended before it could be killed");
      }
    } finally {
      ac.abort();
    }
    const old = svc.trainer;
    old.kill();
    old.remove();
    assert.ok(checkpointStep >= 40 && checkpointStep < TRAINING.maxSteps, `checkpoint at ${checkpointStep}`);

    // Nobody renews the lease now: the job is still "running" under the dead replica.
    const db = await database();
    try {
      const { rows } = await db.query(`SELECT state, owner, attempts FROM ${SCHEMA}.jobs WHERE id = $1`, [job.id]);
      assert.equal(rows[0].state, "running");
      assert.equal(rows[0].owner, old.id.slice(0, 12));
      assert.equal(rows[0].attempts, 1);
    } finally {
      await db.end();
    }

    // A new container: another host name, so another replica id (a rescheduled pod), an empty /data.
    const fresh = await startService("trainer", { label: "trainer-2", env: ENV });
    containers.push(fresh);
    svc.trainer = fresh;
    c.trainer = (await clients({ trainer: fresh.url })).trainer;

    // It waits for the dead replica's lease (30 s) to expire, then claims the job.
    const done = await waitForJob(c.trainer, job.id, (j) => j.state !== JobState.RUNNING && j.state !== JobState.QUEUED, 4 * 60_000, "an end");
    assert.equal(done.state, JobState.SUCCEEDED, `${done.error}\n${fresh.tail()}`);
    assert.equal(done.attempts, 2);
    assert.equal(done.resumedFromStep, checkpointStep, "resumed from the newest checkpoint published before the kill");

    // The history, replayed by the new replica: the takeover and the resume are in it.
    const events = await collect(c.trainer.watchJob({ id: job.id }));
    const states = events.filter((e) => e.event.case === "state").map((e) => `${JobState[e.event.value.state]} ${e.event.value.message}`);
    assert.match(states.join("\n"), new RegExp(`RUNNING .*${fresh.id.slice(0, 12)}`), states.join("\n"));
    assert.match(states.join("\n"), new RegExp(`RUNNING resumed from the checkpoint at step ${checkpointStep} of ${TRAINING.maxSteps}`), states.join("\n"));
    assert.match(states.at(-1), /^SUCCEEDED /);

    // Same configuration, same seed: the interrupted run's adapter equals the uninterrupted one's.
    const bytes = async (name) => readFile(join(await store.localPath("adapters", name), "adapter_model.safetensors"));
    assert.ok((await bytes("kite-b")).equals(await bytes("kite-a")), "the resumed job's adapter differs from the uninterrupted run's");
    assert.equal((await store.readManifest("adapters", "kite-b")).meta.job_id, job.id);
  });

  test("the job store holds one claim per run: 1 for the first job, 2 for the interrupted one", async () => {
    const db = await database();
    try {
      const { rows } = await db.query(
        `SELECT j.id, j.output_adapter, j.attempts, j.state,
                count(*) FILTER (WHERE e.data->>'kind' = 'state' AND e.data->>'state' = 'running' AND e.data->>'message' NOT LIKE 'resumed%') AS claims,
                count(*) FILTER (WHERE e.data->>'kind' = 'state' AND e.data->>'state' = 'succeeded') AS successes
           FROM ${SCHEMA}.jobs j JOIN ${SCHEMA}.job_events e ON e.job_id = j.id GROUP BY j.id ORDER BY j.output_adapter`,
      );
      assert.deepEqual(
        rows.map((r) => [r.output_adapter, r.state, r.attempts, Number(r.claims), Number(r.successes)]),
        [
          ["kite-a", "succeeded", 1, 1, 1],
          ["kite-b", "succeeded", 2, 2, 1],
        ],
      );
    } finally {
      await db.end();
    }
  });
});
