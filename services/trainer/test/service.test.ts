/** TrainerService over gRPC with the deterministic runner: datasets, a job's life, its events, its outputs. */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  CreateJobRequestSchema,
  GetJobRequestSchema,
  JobState,
  LoraBias,
  Quantization,
  Scheduler,
  TrainerService,
  WatchJobRequestSchema,
  type Job,
  type WatchJobResponse,
} from "@qlora/proto";
import {
  addConfigOnlyModel,
  collect,
  datasetUpload,
  describeEvents,
  grpcJsClient,
  grpcUnary,
  JSONL,
  sleep,
  startHarness,
  TEXT_LINES,
  type Harness,
} from "./helpers.js";

describe("TrainerService (deterministic runner)", () => {
  let h: Harness;
  before(async () => {
    h = await startHarness({ fake: { stepMs: 2 } });
    await addConfigOnlyModel(h.store, "tiny");
  });
  after(async () => {
    await h.close();
  });

  test("UploadDataset stores .txt and .jsonl files, counts examples; List and Delete", async () => {
    const txt = (await h.client.uploadDataset(datasetUpload("lines", "story.txt", TEXT_LINES, { chunkSize: 100 }))).dataset!;
    assert.equal(txt.name, "lines");
    assert.equal(txt.format, "txt");
    assert.equal(txt.examples, 24n);
    assert.equal(txt.sizeBytes, BigInt(Buffer.byteLength(TEXT_LINES)));
    assert.match(txt.sha256, /^[0-9a-f]{64}$/);
    assert.ok(txt.createdAt && Math.abs(timestampMs(txt.createdAt) - Date.now()) < 60_000);

    const jl = (await h.client.uploadDataset(datasetUpload("mixed", "data.jsonl", JSONL))).dataset!;
    assert.equal(jl.format, "jsonl");
    assert.equal(jl.examples, 3n);
    const dir = await h.store.localPath("datasets", "mixed");
    assert.equal(await readFile(path.join(dir, "data.jsonl"), "utf8"), JSONL);
    assert.equal((await h.store.readManifest("datasets", "mixed")).meta["kinds"], "alpaca,prompt-completion,text");

    await h.client.uploadDataset(datasetUpload("scratch", "x.txt", "a\nb\n"));
    assert.deepEqual((await h.client.listDatasets({})).datasets.map((d) => [d.name, d.examples]), [
      ["lines", 24n],
      ["mixed", 3n],
      ["scratch", 2n],
    ]);
    // overwrite replaces; without it the name is taken.
    await assert.rejects(h.client.uploadDataset(datasetUpload("scratch", "x.txt", "c\n")), (e: ConnectError) => e.code === Code.AlreadyExists);
    assert.equal((await h.client.uploadDataset(datasetUpload("scratch", "y.txt", "c\n", { overwrite: true }))).dataset?.examples, 1n);
    await h.client.deleteDataset({ name: "scratch" });
    assert.deepEqual((await h.client.listDatasets({})).datasets.map((d) => d.name), ["lines", "mixed"]);
    await assert.rejects(h.client.deleteDataset({ name: "scratch" }), (e: ConnectError) => e.code === Code.NotFound);
  });

  let job: Job;
  let events: WatchJobResponse[];

  test("CreateJob fills the classic defaults; WatchJob streams states, metrics and checkpoints to the end", async () => {
    const created = (
      await h.client.createJob({
        baseModel: "tiny",
        dataset: "lines",
        lora: { rank: 4, targetModules: ["q_proj", "v_proj", "o_proj"] },
        training: { maxSteps: 25, saveSteps: 10, saveTotalLimit: 2, loggingSteps: 5, learningRate: 1e-3 },
        outputAdapter: "lines-adapter",
      })
    ).job!;
    assert.match(created.id, /^job-[0-9a-z]+-[0-9a-f]{8}$/);
    assert.ok(created.state === JobState.QUEUED || created.state === JobState.RUNNING);
    assert.equal(created.outputAdapter, "lines-adapter");
    const r = created.request!;
    assert.deepEqual(
      [r.lora?.rank, r.lora?.alpha, r.lora?.dropout, r.lora?.targetModules, r.lora?.bias],
      [4, 16, Math.fround(0.05), ["q_proj", "v_proj", "o_proj"], LoraBias.NONE],
    );
    const t = r.training!;
    assert.deepEqual(
      [t.epochs, t.maxSteps, t.batchSize, t.gradAccum, t.blockSize, t.learningRate, t.scheduler, t.maxGradNorm, t.seed, t.saveSteps, t.saveTotalLimit, t.loggingSteps, t.quant],
      [3, 25, 2, 1, 64, Math.fround(1e-3), Scheduler.LINEAR, 1, 42n, 10, 2, 5, Quantization.NF4],
    );

    events = await collect(h.client.watchJob({ id: created.id }));
    assert.deepEqual(describeEvents(events), [
      "state:QUEUED",
      "state:RUNNING",
      "metrics:5",
      "metrics:10",
      "checkpoint:10",
      "metrics:15",
      "metrics:20",
      "checkpoint:20",
      "metrics:25",
      "state:SUCCEEDED",
    ]);
    const times = events.map((e) => timestampMs(e.time!));
    assert.deepEqual(times, [...times].sort((a, b) => a - b));
    const m = events.flatMap((e) => (e.event.case === "metrics" ? [e.event.value] : []));
    assert.ok(m.every((x) => x.totalSteps === 25 && x.learningRate > 0 && x.loss > 0 && x.tokensPerSecond > 0));
    assert.ok(m[4]!.loss < m[0]!.loss, "the runner's loss goes down");
    assert.ok(Math.abs(m[4]!.epoch - 25 / 12) < 1e-6);
    const last = events.at(-1)!.event;
    assert.equal(last.case, "state");
    assert.match(last.case === "state" ? last.value.message : "", /adapter "lines-adapter" written after 25 steps/);

    job = (await h.client.getJob({ id: created.id })).job!;
    assert.equal(job.state, JobState.SUCCEEDED);
    assert.equal(job.attempts, 1);
    assert.equal(job.resumedFromStep, 0);
    assert.equal(job.error, "");
    assert.equal(job.lastMetrics?.step, 25);
    assert.ok(job.startedAt && job.finishedAt && job.createdAt);
    assert.ok(timestampMs(job.createdAt!) <= timestampMs(job.startedAt!) && timestampMs(job.startedAt!) <= timestampMs(job.finishedAt!));
  });

  test("the adapter is committed to the store with the job's id; checkpoints are published and rotated", async () => {
    const st = await h.store.stat("adapters", "lines-adapter");
    assert.deepEqual(st.files.map((f) => f.path).sort(), ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"]);
    assert.equal(st.meta["job_id"], job.id);
    assert.equal(st.meta["base_model"], "tiny");
    assert.equal(st.meta["steps"], "25");
    const cfg = JSON.parse(await readFile(path.join(await h.store.localPath("adapters", "lines-adapter"), "adapter_config.json"), "utf8"));
    assert.equal(cfg.r, 4);
    assert.equal(cfg.base_model_name_or_path, "tiny", "the store name, never a host path");
    assert.ok((await h.store.verify("adapters", "lines-adapter")).ok);

    const cps = (await h.client.listCheckpoints({ jobId: job.id })).checkpoints;
    assert.deepEqual(cps.map((c) => [c.step, c.name]), [
      [10, `${job.id}.checkpoint-10`],
      [20, `${job.id}.checkpoint-20`],
    ]);
    assert.ok(cps.every((c) => c.sizeBytes > 0n && c.createdAt));
    // save_total_limit 2 of 2 checkpoints: nothing rotated yet; the artifacts are there.
    const names = (await h.store.list("checkpoints")).filter((n) => n.startsWith(job.id));
    assert.deepEqual(names, [`${job.id}.checkpoint-10`, `${job.id}.checkpoint-20`]);
    const state = JSON.parse(await readFile(path.join(await h.store.localPath("checkpoints", names[1]!), "trainer_state.json"), "utf8"));
    assert.equal(state.step, 20);
    // The work directory goes (right after the final state is recorded); the store holds what outlives the job.
    const deadline = Date.now() + 5000;
    while ((await readdir(path.join(h.dataDir, "trainer", "jobs"))).length > 0 && Date.now() < deadline) await sleep(10);
    assert.deepEqual(await readdir(path.join(h.dataDir, "trainer", "jobs")), []);
  });

  test("save_total_limit rotates published checkpoints; the eval dataset adds eval_loss", async () => {
    const { job: j } = await h.client.createJob({
      baseModel: "tiny",
      dataset: "lines",
      evalDataset: "mixed",
      training: { maxSteps: 12, saveSteps: 3, loggingSteps: 3, evalSteps: 6 },
    });
    const evs = await collect(h.client.watchJob({ id: j!.id }));
    assert.equal(describeEvents(evs).filter((e) => e.startsWith("checkpoint")).length, 4);
    const withEval = evs.flatMap((e) => (e.event.case === "metrics" && e.event.value.evalLoss !== undefined ? [e.event.value] : []));
    assert.deepEqual(withEval.map((m) => m.step), [6, 12]);
    const done = (await h.client.getJob({ id: j!.id })).job!;
    assert.equal(done.state, JobState.SUCCEEDED);
    assert.equal(done.outputAdapter, j!.id, "output_adapter defaults to the job id");
    assert.ok(done.lastMetrics?.evalLoss !== undefined);
    assert.deepEqual((await h.client.listCheckpoints({ jobId: j!.id })).checkpoints.map((c) => c.step), [12]);
    assert.deepEqual((await h.store.list("checkpoints")).filter((n) => n.startsWith(j!.id)), [`${j!.id}.checkpoint-12`]);
    assert.ok(await h.store.exists("adapters", j!.id));
  });

  test("watching a finished job replays its history; several watchers see the same stream", async () => {
    const replay = await collect(h.client.watchJob({ id: job.id }));
    assert.deepEqual(describeEvents(replay), describeEvents(events));

    const { job: j } = await h.client.createJob({ baseModel: "tiny", dataset: "lines", training: { maxSteps: 10, loggingSteps: 2 } });
    const watchers = await Promise.all([1, 2, 3].map(() => collect(h.client.watchJob({ id: j!.id }))));
    assert.equal(describeEvents(watchers[0]!).at(-1), "state:SUCCEEDED");
    assert.deepEqual(describeEvents(watchers[1]!), describeEvents(watchers[0]!));
    assert.deepEqual(describeEvents(watchers[2]!), describeEvents(watchers[0]!));
  });

  test("Prometheus /metrics: jobs by state and the logged training steps", async () => {
    const text = await (await fetch(new URL("/metrics", h.server.url))).text();
    const value = (series: string) => Number(new RegExp(`^${series.replace(/[{}]/g, "\\$&")} (\\S+)$`, "m").exec(text)?.[1]);
    const succeeded = (await h.client.listJobs({ state: JobState.SUCCEEDED })).jobs.length;
    assert.ok(succeeded >= 1);
    assert.equal(value('qlora_training_jobs{state="succeeded"}'), succeeded);
    assert.equal(value('qlora_training_jobs{state="running"}'), 0);
    assert.ok(value("qlora_training_logged_steps_total") >= 5, "every logged step is counted");
    // Per-job series go when the job ends (bounded label cardinality).
    assert.doesNotMatch(text, /^qlora_training_loss\{/m);
  });

  test("ListJobs filters by state; GetJob/WatchJob/ListCheckpoints of an unknown job are NOT_FOUND", async () => {
    const all = (await h.client.listJobs({})).jobs;
    assert.equal(all.length, 3);
    assert.deepEqual(all.map((j) => j.id), [...all.map((j) => j.id)].sort());
    assert.equal((await h.client.listJobs({ state: JobState.SUCCEEDED })).jobs.length, 3);
    assert.equal((await h.client.listJobs({ state: JobState.RUNNING })).jobs.length, 0);
    const nf = (e: ConnectError) => e.code === Code.NotFound && /job "job-nope" not found/.test(e.rawMessage);
    await assert.rejects(h.client.getJob({ id: "job-nope" }), nf);
    await assert.rejects(collect(h.client.watchJob({ id: "job-nope" })), nf);
    await assert.rejects(h.client.listCheckpoints({ jobId: "job-nope" }), nf);
    await assert.rejects(h.client.cancelJob({ id: "job-nope" }), nf);
    await assert.rejects(h.client.getJob({ id: "" }), (e: ConnectError) => e.code === Code.InvalidArgument);
  });

  test("a plain @grpc/grpc-js client creates a job and watches it (server streaming)", async () => {
    const client = grpcJsClient(TrainerService, h.server.address);
    try {
      const res = await grpcUnary<{ job: Job }>(
        client,
        "CreateJob",
        create(CreateJobRequestSchema, { baseModel: "tiny", dataset: "mixed", training: { maxSteps: 6, loggingSteps: 2, saveSteps: 3 } }),
      );
      const call = client["WatchJob"]!(create(WatchJobRequestSchema, { id: res.job.id })) as AsyncIterable<WatchJobResponse>;
      const evs = await collect(call);
      assert.deepEqual(describeEvents(evs), [
        "state:QUEUED",
        "state:RUNNING",
        "metrics:2",
        "checkpoint:3",
        "metrics:4",
        "metrics:6",
        "checkpoint:6",
        "state:SUCCEEDED",
      ]);
      const got = await grpcUnary<{ job: Job }>(client, "GetJob", create(GetJobRequestSchema, { id: res.job.id }));
      assert.equal(got.job.state, JobState.SUCCEEDED);
      const err = await grpcUnary(client, "GetJob", create(GetJobRequestSchema, { id: "job-nope" })).catch((e: { code: number }) => e);
      assert.equal((err as { code: number }).code, 5 /* NOT_FOUND */);
    } finally {
      client.close();
    }
  });
});
