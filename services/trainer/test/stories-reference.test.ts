/**
 * stories260K end to end through the service with the real training loop of libs/model on its
 * TypeScript reference engine (the production runner wrapper, `trainRunner`): UploadDataset,
 * CreateJob, WatchJob, checkpoints, a PEFT adapter in the store; and a graceful shutdown mid-run whose
 * resumed job ends with the same adapter bytes as an uninterrupted one.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { JobState } from "@qlora/proto";
import { collect, describeEvents, startHarness, terminal, waitForJob } from "./helpers.js";
import { REFERENCE_RUNNER, setupStories, skipReference } from "./stories-shared.js";

const training = { maxSteps: 12, saveSteps: 4, saveTotalLimit: 2, loggingSteps: 2, blockSize: 32, learningRate: 2e-3 };

test("the real training loop through the service: events, checkpoints, a PEFT adapter in the store", { skip: skipReference }, async () => {
  const h = await startHarness({ runner: REFERENCE_RUNNER });
  try {
    await setupStories(h);
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
  const long = { ...training, maxSteps: 48, saveSteps: 10, loggingSteps: 1 };
  const h1 = await startHarness({ runner: REFERENCE_RUNNER });
  await setupStories(h1);
  const { job } = await h1.client.createJob({ baseModel: "stories", dataset: "kite", outputAdapter: "resumed", training: long });
  await waitForJob(h1.client, job!.id, (j) => (j.lastMetrics?.step ?? 0) >= 3, 20_000);
  await h1.close();
  const h2 = await startHarness({ runner: REFERENCE_RUNNER }, h1.dataDir);
  try {
    const resumed = await waitForJob(h2.client, job!.id, terminal, 30_000);
    assert.equal(resumed.state, JobState.SUCCEEDED, resumed.error);
    assert.equal(resumed.attempts, 2);
    assert.ok(resumed.resumedFromStep >= 3 && resumed.resumedFromStep < 48, `resumed from ${resumed.resumedFromStep}`);
    const { job: ref } = await h2.client.createJob({ baseModel: "stories", dataset: "kite", outputAdapter: "uninterrupted", training: long });
    assert.equal((await waitForJob(h2.client, ref!.id, terminal, 30_000)).state, JobState.SUCCEEDED);
    const bytes = async (n: string) => readFile(path.join(await h2.store.localPath("adapters", n), "adapter_model.safetensors"));
    assert.ok((await bytes("resumed")).equals(await bytes("uninterrupted")), "the resumed job's adapter differs from the uninterrupted one");
  } finally {
    await h2.close();
  }
});
