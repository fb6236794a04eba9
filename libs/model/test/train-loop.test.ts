/**
 * The training loop's orchestration over the reference engine (train-reference-engine.ts): outputs,
 * events, step arithmetic, accumulation weights, schedules, checkpoints + rotation, exact resume,
 * cancellation and bad options. The same loop runs the native engine; train-stories.test.ts covers
 * that end to end.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Cancelled, FailedPrecondition, InvalidArgument } from "@qlora/core";
import { readPeftAdapter } from "@qlora/formats";
import {
  listCheckpoints,
  readCheckpoint,
  readEventFile,
  train,
  type TrainEvent,
  type TrainModel,
  type TrainOptions,
} from "../src/train/index.js";
import { ReferenceEngine, referenceModel, setup, STORY } from "./train-reference-engine.js";
import { skipNoStories, storiesDir } from "./fixtures.js";



async function storiesModel(): Promise<TrainModel & { engine: ReferenceEngine }> {
  return referenceModel(storiesDir);
}


async function run(opts: TrainOptions, model?: TrainModel, signal?: AbortSignal, onEvent?: (e: TrainEvent) => void) {
  const events: TrainEvent[] = [];
  const m = model ?? (await storiesModel());
  const result = await train(opts, {
    model: m,
    ...(signal ? { signal } : {}),
    onEvent: (e) => {
      events.push(e);
      onEvent?.(e);
    },
  });
  return { result, events, engine: m.engine as ReferenceEngine };
}

test("a run writes the adapter, checkpoints, metrics, TensorBoard events and loss.png", { skip: skipNoStories }, async () => {
  const opts = setup({ saveSteps: 10, saveTotalLimit: 1, loggingSteps: 5, lr: 3e-3 });
  const { result, events, engine } = await run(opts);
  const start = events[0]!;
  assert.equal(start.type, "start");
  if (start.type !== "start") return;
  // TextDataset rows / batch 2 = micro-batches per epoch = steps per epoch; 3 epochs.
  const rows = start.trainRows;
  assert.ok(rows >= 10, `rows ${rows}`);
  assert.equal(start.stepsPerEpoch, Math.ceil(rows / 2));
  assert.equal(result.totalSteps, 3 * Math.ceil(rows / 2));
  assert.equal(result.globalStep, result.totalSteps);
  // q_proj (64×64) and v_proj (32×64), r=8, 5 layers.
  assert.equal(start.trainableParameters, 5 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8));

  const logs = events.filter((e) => e.type === "log");
  assert.deepEqual(
    logs.map((e) => e.step),
    Array.from({ length: Math.floor(result.totalSteps / 5) }, (_, i) => 5 * (i + 1)),
  );
  for (const l of logs) {
    if (l.type !== "log") continue;
    assert.ok(l.loss > 0 && Number.isFinite(l.gradNorm) && l.tokensPerSecond > 0);
    assert.equal(l.totalSteps, result.totalSteps);
  }
  // The reference objective goes down.
  const first = logs[0]!;
  const last = logs[logs.length - 1]!;
  assert.ok(first.type === "log" && last.type === "log" && last.loss < first.loss * 0.8, "loss decreases");
  // Epoch is fractional: completed epochs + micro-batches done / per epoch.
  if (first.type === "log") assert.ok(Math.abs(first.epoch - 5 / start.stepsPerEpoch) < 1e-12);

  // Checkpoints every 10 steps, only the newest kept.
  const cks = events.filter((e) => e.type === "checkpoint");
  assert.deepEqual(
    cks.map((e) => e.step),
    Array.from({ length: Math.floor(result.totalSteps / 10) }, (_, i) => 10 * (i + 1)),
  );
  const left = await listCheckpoints(opts.out);
  assert.equal(left.length, 1);
  assert.equal(left[0]!.step, cks[cks.length - 1]!.step);
  const ck = await readCheckpoint(left[0]!.path);
  assert.equal(ck.state.global_step, left[0]!.step);
  assert.ok(Object.values(ck.lora.modules)[0]!.va.some((x) => x > 0), "moments saved");

  // Final adapter in PEFT format.
  const cfg = JSON.parse(readFileSync(join(opts.out, "adapter_config.json"), "utf8"));
  assert.equal(cfg.peft_type, "LORA");
  assert.equal(cfg.r, 8);
  assert.equal(cfg.lora_alpha, 16);
  assert.equal(cfg.lora_dropout, 0.05);
  assert.deepEqual(cfg.target_modules, ["q_proj", "v_proj"]);
  assert.equal(cfg.bias, "none");
  assert.equal(cfg.task_type, "CAUSAL_LM");
  assert.equal(cfg.base_model_name_or_path, storiesDir);
  assert.equal(cfg.use_rslora, false);
  const adapter = await readPeftAdapter(opts.out);
  assert.equal(adapter.tensors.size, 10);
  const final = engine.getLoraState(0);
  assert.deepEqual(adapter.tensors.get("layers.3.self_attn.v_proj")!.b, final.modules["layers.3.self_attn.v_proj"]!.b);
  assert.ok(final.modules["layers.0.self_attn.q_proj"]!.b.some((x) => x !== 0), "B trained away from 0");

  // metrics.jsonl = the log history.
  const lines = readFileSync(join(opts.out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
  assert.deepEqual(lines, result.logHistory);
  assert.equal(lines.length, logs.length);
  assert.deepEqual(Object.keys(lines[0]).sort(), ["epoch", "grad_norm", "learning_rate", "loss", "step", "tokens_per_second"]);

  // TensorBoard: one event file, scalars at the logged steps.
  const tbFiles = readdirSync(join(opts.out, "runs"));
  assert.equal(tbFiles.length, 1);
  const tb = readEventFile(join(opts.out, "runs", tbFiles[0]!));
  assert.equal(tb[0]!.fileVersion, "brain.Event:2");
  const lossPoints = tb.flatMap((e) => (e.scalars ?? []).filter((s) => s.tag === "train/loss").map((s) => [e.step, s.value]));
  assert.deepEqual(
    lossPoints,
    (lines as { step: number; loss: number }[]).map((l) => [l.step, Math.fround(l.loss)]),
  );
  assert.ok(existsSync(join(opts.out, "loss.png")));
  assert.deepEqual(Array.from(readFileSync(join(opts.out, "loss.png")).subarray(1, 4)), [0x50, 0x4e, 0x47]);
  const end = events[events.length - 1]!;
  assert.equal(end.type, "end");
});

test("gradient accumulation: token-weighted micro-batches, last step of an epoch takes the remainder", { skip: skipNoStories }, async () => {
  const opts = setup({ gradAccum: 3, epochs: 1, batchSize: 1, saveSteps: 0, lr: 1e-3, warmupSteps: 2, scheduler: "linear" });
  const { result, engine, events } = await run(opts);
  const start = events[0]!;
  if (start.type !== "start") throw new Error("no start event");
  const M = start.trainRows; // batch 1: one row per micro-batch
  assert.equal(result.totalSteps, Math.ceil(M / 3));
  // Group forward/backward calls by the optimizer step that follows them.
  const groups: { scales: number[]; lr: number; step: number }[] = [];
  let cur: number[] = [];
  for (const c of engine.calls) {
    if (c.op === "fb") cur.push(c.gradScale!);
    else if (c.op === "adamw") {
      groups.push({ scales: cur, lr: c.lr!, step: c.step! });
      cur = [];
    }
  }
  const sizes = groups.map((g) => g.scales.length);
  const expected = Array.from({ length: result.totalSteps }, (_, i) => (i < result.totalSteps - 1 ? 3 : M - 3 * (result.totalSteps - 1)));
  assert.deepEqual(sizes, expected);
  for (const g of groups) assert.ok(Math.abs(g.scales.reduce((a, b) => a + b, 0) - 1) < 1e-12, "weights sum to 1");
  // lr: step k runs with base × lambda(k - 1): warmup 0, 0.5, then linear decay over total - 2.
  const T = result.totalSteps;
  groups.forEach((g, i) => {
    const k = i; // scheduler steps taken before this update
    const lambda = k < 2 ? k / 2 : Math.max(0, (T - k) / Math.max(1, T - 2));
    assert.ok(Math.abs(g.lr - 1e-3 * lambda) < 1e-15, `step ${g.step}: ${g.lr}`);
    assert.equal(g.step, i + 1);
  });
  // Every micro-batch has its own dropout seed.
  const seeds = engine.calls.filter((c) => c.op === "fb").map((c) => c.dropoutSeed!);
  assert.equal(new Set(seeds).size, seeds.length);
});

async function adapterBytes(out: string): Promise<Buffer> {
  return readFileSync(join(out, "adapter_model.safetensors"));
}

function withoutSpeed(lines: Record<string, unknown>[]): Record<string, unknown>[] {
  return lines.map(({ tokens_per_second: _t, ...rest }) => rest);
}

test("a run stopped after a checkpoint and resumed ends with the same adapter bytes", { skip: skipNoStories }, async () => {
  const base = setup({ saveSteps: 4, saveTotalLimit: 2, loggingSteps: 3, epochs: 2, dropout: 0.3 });
  const full = await run(base);

  // Stop right after the checkpoint at step 8 (the abort is seen at the next step boundary).
  const stopped = { ...base, out: base.out + "-resumed" };
  const ac = new AbortController();
  await assert.rejects(
    run(stopped, undefined, ac.signal, (e) => {
      if (e.type === "checkpoint" && e.step === 8) ac.abort();
    }),
    (e: unknown) => e instanceof Cancelled && /step 8/.test((e as Error).message),
  );
  assert.deepEqual((await listCheckpoints(stopped.out)).map((c) => c.step), [4, 8]);
  assert.equal(existsSync(join(stopped.out, "adapter_model.safetensors")), false);

  // A crash between checkpoints: steps 9 and 10 are done again after resuming.
  const crashed = { ...base, out: base.out + "-crashed" };
  const ac2 = new AbortController();
  await assert.rejects(
    run(crashed, undefined, ac2.signal, (e) => {
      if (e.type === "log" && e.step === 9) ac2.abort();
    }),
    Cancelled,
  );

  for (const out of [stopped.out, crashed.out]) {
    // A fresh model: nothing of the first process survives but the files.
    const resumed = await run({ ...base, out, resume: true });
    assert.equal(resumed.result.resumedFromStep, 8);
    const start = resumed.events[0]!;
    assert.ok(start.type === "start" && start.resumedFromStep === 8);
    assert.ok((await adapterBytes(out)).equals(await adapterBytes(full.result.out)), `${out}: adapter bytes differ`);
    const a = readFileSync(join(full.result.out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
    const b = readFileSync(join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(withoutSpeed(b), withoutSpeed(a));
    assert.equal(resumed.result.trainLoss, full.result.trainLoss);
    // The restart is marked in the new event file so TensorBoard drops the crashed run's tail.
    const tbFiles = readdirSync(join(out, "runs"));
    assert.equal(tbFiles.length, 2);
    const marks = tbFiles.flatMap((f) => readEventFile(join(out, "runs", f)).filter((e) => e.sessionStart));
    assert.deepEqual(marks.map((e) => e.step), [9]);
  }
});

test("resume refuses changed options or data; a fresh run refuses a directory with checkpoints", { skip: skipNoStories }, async () => {
  const opts = setup({ saveSteps: 4, maxSteps: 4 });
  await run(opts);
  await assert.rejects(run(opts), (e: unknown) => e instanceof FailedPrecondition && /already holds checkpoints.*--resume/.test((e as Error).message));
  await assert.rejects(
    run({ ...opts, resume: true, lr: 1e-3 }),
    (e: unknown) => e instanceof FailedPrecondition && /training options changed \(lr: 0.0002 → 0.001\)/.test((e as Error).message),
  );
  writeFileSync(opts.data, STORY + "\nOne more line about the kite and the tree and the bird.");
  await assert.rejects(run({ ...opts, resume: true }), (e: unknown) => e instanceof FailedPrecondition && /training data changed/.test((e as Error).message));
  // --resume with no checkpoint yet is a fresh start.
  const fresh = setup({ maxSteps: 2, saveSteps: 0, resume: true });
  const r = await run(fresh);
  assert.equal(r.result.resumedFromStep, 0);
  assert.equal(r.result.globalStep, 2);
});

test("eval data: loss every eval_steps and after the last step", { skip: skipNoStories }, async () => {
  const opts = setup({ maxSteps: 7, saveSteps: 0, loggingSteps: 2, evalSteps: 3 });
  const evalPath = join(opts.data, "..", "eval.jsonl");
  writeFileSync(evalPath, ['{"text": "Tom flew his kite on the hill."}', '{"prompt": "The bird", "completion": " sang a song."}'].join("\n"));
  const { events, result, engine } = await run({ ...opts, evalData: evalPath });
  const evals = events.filter((e) => e.type === "eval");
  assert.deepEqual(evals.map((e) => e.step), [3, 6, 7]);
  assert.equal(result.evalLoss, (evals[2] as { evalLoss: number }).evalLoss);
  assert.ok(engine.calls.some((c) => c.op === "eval"));
  const lines = readFileSync(join(opts.out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
  assert.deepEqual(lines.filter((l) => "eval_loss" in l).map((l) => l.step), [3, 6, 7]);
});

test("bad options are InvalidArgument before anything runs", { skip: skipNoStories }, async () => {
  const bad = async (extra: Partial<TrainOptions>, pattern: RegExp) => {
    await assert.rejects(run(setup(extra)), (e: unknown) => {
      assert.ok(e instanceof InvalidArgument, String(e));
      assert.match((e as Error).message, pattern);
      return true;
    });
  };
  await bad({ rank: 0 }, /rank must be an integer ≥ 1, got 0/);
  await bad({ lr: -1e-4 }, /learning rate must be > 0/);
  await bad({ dropout: 1 }, /dropout must be in \[0, 1\)/);
  await bad({ batchSize: 0 }, /batch size/);
  await bad({ target: "q_proj,wq" }, /unknown target module "wq" for a llama model; valid target modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear/);
  await bad({ target: "" }, /target/);
  await bad({ blockSize: 1024 }, /block size 1024 exceeds the model's max_position_embeddings \(512\)/);
  await bad({ scheduler: "step" as never }, /unknown scheduler/);
  await bad({ quant: "int8" as never }, /quant must be nf4 or none/);
  await bad({ data: "/nonexistent/x.jsonl" }, /does not exist/);

  // all-linear covers every decoder linear layer; PEFT records the short names.
  const opts = setup({ target: "all-linear", maxSteps: 1, saveSteps: 0 });
  const { events } = await run(opts);
  const start = events[0]!;
  assert.ok(start.type === "start" && start.trainableParameters > 0);
  const cfg = JSON.parse(readFileSync(join(opts.out, "adapter_config.json"), "utf8"));
  assert.deepEqual(cfg.target_modules, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]);
  assert.equal((await readPeftAdapter(opts.out)).tensors.size, 5 * 7);

  // An engine without the training API is a clear error.
  const m = await storiesModel();
  await assert.rejects(
    train(setup(), { model: { ...m, engine: {} } }),
    (e: unknown) => e instanceof FailedPrecondition && /no training API/.test((e as Error).message),
  );
});
