/**
 * End to end on stories260K: UploadDataset, CreateJob, WatchJob, the adapter in the store.
 *
 * 1. The real training loop (libs/model) with its reference engine, through the production runner
 *    wrapper: events, checkpoints, a PEFT adapter; and a graceful shutdown mid-run whose resumed
 *    job ends with the same adapter bytes as an uninterrupted one.
 * 2. The production runner as shipped (native engine): the loss goes down and the adapter changes
 *    greedy generation. Skipped, with the reason, until @qlora/model exports `train` and the native
 *    engine has its LoRA training API.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { NativeModel } from "@qlora/kernels";
import { generate, installAdapter, loadAdapter, loadModel } from "@qlora/model";
import { JobState } from "@qlora/proto";
import { modelTrainFunction } from "../src/runners/train.js";
import { LIBS_MODEL_REFERENCE_ENGINE, LIBS_MODEL_TRAIN } from "./fixtures/reference-runner.js";
import { addFullModel, collect, datasetUpload, describeEvents, startHarness, STORIES, terminal, waitForJob, type Harness } from "./helpers.js";

const STORY = [
  "Tom had a red kite. He took it to the hill on a windy day.",
  "The kite went up and up. Tom laughed and ran with the string.",
  "A bird flew next to the kite. The bird sang a happy song.",
  "Then the wind stopped. The kite came down into a tall tree.",
  "Tom was sad. His friend Sue came with a long stick.",
  "Sue helped Tom get the kite out of the tree. Tom said thank you.",
  "They flew the kite together until the sun went down.",
  "At home, Tom told his mom about the bird and the tree.",
  "The next morning it rained. Tom and Sue stayed inside and drew pictures.",
  "Sue drew a big green frog. Tom drew his red kite in the blue sky.",
  "Mom put the pictures on the wall. She said they were very good.",
  "After lunch the rain stopped and a rainbow came out over the hill.",
  "Tom and Sue ran outside. The grass was wet and the air smelled sweet.",
  "They found a small puppy under a bush. The puppy was cold and scared.",
  "Sue held the puppy close. Tom gave it some of his bread.",
  "The puppy wagged its tail and licked Tom on the nose.",
].join("\n");

const haveStories = existsSync(path.join(STORIES, "model.safetensors"));
// The modules the reference runner loads: this file imports it, so they are present whenever it runs.
const haveReference = existsSync(fileURLToPath(LIBS_MODEL_TRAIN)) && existsSync(fileURLToPath(LIBS_MODEL_REFERENCE_ENGINE));
const skipReference = !haveStories ? `stories260K not found at ${STORIES}` : !haveReference ? "libs/model's build output (training loop, reference engine) is missing" : false;
const REFERENCE_RUNNER = new URL("./fixtures/reference-runner.js", import.meta.url);

const hasTrainingApi = typeof (NativeModel.prototype as unknown as Record<string, unknown>)["trainForwardBackward"] === "function";
const skipNative = !haveStories
  ? `stories260K not found at ${STORIES}`
  : !modelTrainFunction()
    ? "@qlora/model does not export the training loop (train) yet: libs/model/src/index.ts must export ./train/index.js"
    : !hasTrainingApi
      ? "the native engine has no LoRA training API yet (NativeModel.prototype.trainForwardBackward)"
      : false;

async function setup(h: Harness): Promise<void> {
  await addFullModel(h.store, "stories");
  const ds = (await h.client.uploadDataset(datasetUpload("kite", "kite.txt", STORY))).dataset!;
  assert.equal(ds.examples, 16n);
}

const training = { maxSteps: 12, saveSteps: 4, saveTotalLimit: 2, loggingSteps: 2, blockSize: 32, learningRate: 2e-3 };

test("the real training loop through the service: events, checkpoints, a PEFT adapter in the store", { skip: skipReference }, async () => {
  const h = await startHarness({ runner: REFERENCE_RUNNER });
  try {
    await setup(h);
    const { job } = await h.client.createJob({ baseModel: "stories", dataset: "kite", outputAdapter: "kite-lora", lora: { rank: 4, targetModules: ["all-linear"] }, training });
    const evs = await collect(h.client.watchJob({ id: job!.id }));
    assert.deepEqual(describeEvents(evs), [
      "state:QUEUED",
      "state:RUNNING",
      "metrics:2",
      "metrics:4",
      "checkpoint:4",
      "metrics:6",
      "metrics:8",
      "checkpoint:8",
      "metrics:10",
      "metrics:12",
      "checkpoint:12",
      "state:SUCCEEDED",
    ]);
    const metrics = evs.flatMap((e) => (e.event.case === "metrics" ? [e.event.value] : []));
    assert.ok(metrics.every((m) => Number.isFinite(m.loss) && m.loss > 0 && m.totalSteps === 12 && m.gradNorm > 0 && m.tokensPerSecond > 0));
    assert.ok(metrics.at(-1)!.loss < metrics[0]!.loss, `loss ${metrics[0]!.loss} → ${metrics.at(-1)!.loss}`);
    const done = (await h.client.getJob({ id: job!.id })).job!;
    assert.equal(done.state, JobState.SUCCEEDED, done.error);

    const dir = await h.store.localPath("adapters", "kite-lora");
    const cfg = JSON.parse(await readFile(path.join(dir, "adapter_config.json"), "utf8"));
    assert.equal(cfg.peft_type, "LORA");
    assert.equal(cfg.r, 4);
    assert.equal(cfg.task_type, "CAUSAL_LM");
    assert.equal(cfg.base_model_name_or_path, "stories");
    const files = await readdir(dir);
    for (const f of ["adapter_model.safetensors", "metrics.jsonl", "loss.png", "runs"]) assert.ok(files.includes(f), `${f} in ${files.join(", ")}`);
    assert.ok((await h.store.verify("adapters", "kite-lora")).ok);
    assert.deepEqual((await h.client.listCheckpoints({ jobId: job!.id })).checkpoints.map((c) => c.step), [8, 12]);
  } finally {
    await h.close();
  }
});

test("the real training loop: a shutdown mid-run, a restart, and the same adapter as an uninterrupted run", { skip: skipReference }, async () => {
  const long = { ...training, maxSteps: 40, saveSteps: 10, loggingSteps: 1 };
  const h1 = await startHarness({ runner: REFERENCE_RUNNER });
  await setup(h1);
  const { job } = await h1.client.createJob({ baseModel: "stories", dataset: "kite", outputAdapter: "resumed", training: long });
  await waitForJob(h1.client, job!.id, (j) => (j.lastMetrics?.step ?? 0) >= 3, 20_000);
  await h1.close();
  const h2 = await startHarness({ runner: REFERENCE_RUNNER }, h1.dataDir);
  try {
    const resumed = await waitForJob(h2.client, job!.id, terminal, 30_000);
    assert.equal(resumed.state, JobState.SUCCEEDED, resumed.error);
    assert.equal(resumed.attempts, 2);
    assert.ok(resumed.resumedFromStep >= 3 && resumed.resumedFromStep < 40, `resumed from ${resumed.resumedFromStep}`);
    const { job: ref } = await h2.client.createJob({ baseModel: "stories", dataset: "kite", outputAdapter: "uninterrupted", training: long });
    assert.equal((await waitForJob(h2.client, ref!.id, terminal, 30_000)).state, JobState.SUCCEEDED);
    const bytes = async (n: string) => readFile(path.join(await h2.store.localPath("adapters", n), "adapter_model.safetensors"));
    assert.ok((await bytes("resumed")).equals(await bytes("uninterrupted")), "the resumed job's adapter differs from the uninterrupted one");
  } finally {
    await h2.close();
  }
});

test("upload a dataset, train stories260K with the production runner, and the adapter changes generation", { skip: skipNative }, async () => {
  const h = await startHarness({ runner: undefined });
  try {
    await setup(h);
    const { job } = await h.client.createJob({
      baseModel: "stories",
      dataset: "kite",
      outputAdapter: "kite-native",
      lora: { rank: 8, targetModules: ["all-linear"] },
      training: { maxSteps: 60, loggingSteps: 10, saveSteps: 20, blockSize: 32, learningRate: 2e-3 },
    });
    const evs = await collect(h.client.watchJob({ id: job!.id }));
    const done = (await h.client.getJob({ id: job!.id })).job!;
    assert.equal(done.state, JobState.SUCCEEDED, done.error);
    const losses = evs.flatMap((e) => (e.event.case === "metrics" ? [e.event.value.loss] : []));
    assert.equal(losses.length, 6);
    assert.ok(losses.at(-1)! < losses[0]! * 0.8, `loss ${losses[0]} → ${losses.at(-1)}`);

    const m = await loadModel(STORIES, { quant: "nf4", maxSequences: 2 });
    try {
      const greedy = async (slot: number) => (await generate(m, { prompt: "Tom had a red", adapterSlot: slot, maxNewTokens: 32, temperature: 0 })).text;
      const before = await greedy(-1);
      installAdapter(m, 1, await loadAdapter(await h.store.localPath("adapters", "kite-native"), m));
      assert.notEqual(await greedy(1), before);
    } finally {
      m.dispose();
    }
  } finally {
    await h.close();
  }
});
