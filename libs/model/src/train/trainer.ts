/**
 * The training loop: Hugging Face Trainer semantics over the native engine's LoRA training API.
 *
 * Per optimizer step s (1-based): the next ≤ grad_accum micro-batches of the epoch (an epoch's last
 * step may take fewer, as current HF does) each run forward + backward with gradScale = its target
 * tokens / the step's target tokens, so the accumulated gradient is that of the token-mean loss over
 * the whole step (HF's num_items_in_batch); then AdamW with lr = base × schedule(s − 1), clipping at
 * max_grad_norm. max_steps defaults to ceil(epochs × ceil(micro-batches per epoch / grad_accum)).
 * Logging every logging_steps (loss = mean of per-step losses in the window), eval every eval_steps
 * and after the last step, checkpoints every save_steps.
 *
 * Reproducibility: data order of epoch e and the dropout masks of micro-step k are pure functions
 * of (seed, e) and (seed, k) (data/rng.ts); a checkpoint stores the weights, AdamW moments and these
 * counters, so a resumed run replays exactly the computations of an uninterrupted one.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { Cancelled, FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import { parseModelConfig, readJsonFile, type LoraConfigInput, type ModelConfig } from "@qlora/formats";
import { resolveDevice } from "@qlora/kernels";
import {
  dataTokenizer,
  deriveSeed,
  epochOrder,
  evalBatches,
  loadDataset,
  microBatch,
  microBatchesPerEpoch,
  Stream,
  type Batch,
  type TrainDataset,
} from "../data/index.js";
import type { ModelTokenizer } from "../tokenizer.js";
import {
  listCheckpoints,
  readCheckpoint,
  removeStaleStaging,
  rotateCheckpoints,
  writeCheckpoint,
  type LogEntry,
  type TrainerState,
} from "./checkpoint.js";
import { asTrainingEngine, type LoraState, type TrainingEngine } from "./engine.js";
import type { TrainEvent } from "./events.js";
import { resolveOptions, trajectoryArgs, type ResolvedOptions, type TrainOptions } from "./options.js";
import { appendMetrics, removeStaleTemps, rewriteMetrics, RUNS_DIR, writeFinalAdapter, writeLossPng } from "./outputs.js";
import { loadTrainModel } from "./model.js";
import { learningRateAt, type ScheduleSpec } from "./schedule.js";
import { resolveTargets } from "./targets.js";
import { EventFileWriter } from "./tfevents.js";

/** What training needs from a loaded base model. */
export interface TrainModel {
  /** The native model; must have the LoRA training API (TrainingEngine). */
  engine: unknown;
  tokenizer: ModelTokenizer;
  config: ModelConfig;
}

/** Loads the base for training on `device` (resolved: "auto" has become cpu or cuda). */
export type ModelLoader = (dir: string, quant: "nf4" | "none", device: "cpu" | "cuda") => Promise<TrainModel>;

/** Where a training engine runs: NativeModel.device ("cuda" for the CUDA engine); anything else trains on the CPU. */
function engineDevice(engine: unknown): "cpu" | "cuda" {
  return (engine as { device?: unknown } | null)?.device === "cuda" ? "cuda" : "cpu";
}

export interface TrainHooks {
  /** Called for every event, synchronously, in order. */
  onEvent?: (e: TrainEvent) => void;
  /** Aborting stops the run at the next step boundary (optionally after a checkpoint) with Cancelled. */
  signal?: AbortSignal;
  /**
   * An already loaded model (the job service may cache them; it is left as it is, with the trained
   * LoRA in its slot). Otherwise `loadModel`, or by default the runtime's loader, loads opts.model.
   */
  model?: TrainModel;
  loadModel?: ModelLoader;
}

export interface TrainResult {
  out: string;
  globalStep: number;
  totalSteps: number;
  trainLoss: number;
  evalLoss: number | null;
  resumedFromStep: number;
  adapterFiles: string[];
  logHistory: LogEntry[];
}

/** How long the run is, from the dataset size and the options (HF's max_steps arithmetic). */
export function planSteps(rows: number, o: Pick<ResolvedOptions, "batchSize" | "gradAccum" | "epochs" | "maxSteps">): {
  microBatchesPerEpoch: number;
  stepsPerEpoch: number;
  totalSteps: number;
} {
  const mb = microBatchesPerEpoch(rows, o.batchSize);
  const stepsPerEpoch = Math.max(1, Math.ceil(mb / o.gradAccum));
  const totalSteps = o.maxSteps > 0 ? o.maxSteps : Math.max(1, Math.ceil(o.epochs * stepsPerEpoch));
  return { microBatchesPerEpoch: mb, stepsPerEpoch, totalSteps };
}

function describeDiff(saved: Record<string, unknown>, now: Record<string, unknown>): string {
  const keys = new Set([...Object.keys(saved), ...Object.keys(now)]);
  const diffs: string[] = [];
  for (const k of keys) {
    if (JSON.stringify(saved[k]) !== JSON.stringify(now[k])) diffs.push(`${k}: ${JSON.stringify(saved[k])} → ${JSON.stringify(now[k])}`);
  }
  return diffs.join(", ");
}

const yieldToEventLoop = (): Promise<void> => new Promise((r) => setImmediate(r));

/**
 * Trains a LoRA adapter (see the file comment). Options are validated before anything is loaded.
 * Resolves with the result when done; rejects with Cancelled when `hooks.signal` aborts, and with
 * InvalidArgument / FailedPrecondition for bad requests.
 */
export async function train(options: TrainOptions, hooks: TrainHooks = {}): Promise<TrainResult> {
  const o = resolveOptions(options);
  if (hooks.signal?.aborted) throw new Cancelled("training cancelled before it started");
  // A model passed in stays the caller's; one loaded here is disposed when the run ends.
  let model = hooks.model;
  let owned: { dispose(): void } | undefined;
  if (!model) {
    // "cuda" without a usable device fails here (FailedPrecondition naming the reason), and "auto"
    // picks CUDA when available; then what depends only on config.json, before the weights.
    const device = resolveDevice(o.device);
    await precheckModel(o);
    if (hooks.loadModel) model = await hooks.loadModel(o.model, o.quant, device);
    else {
      const m = await loadTrainModel(o.model, o.quant, device);
      model = m;
      owned = m.loaded;
    }
  }
  try {
    return await runTraining(o, model, hooks);
  } finally {
    owned?.dispose();
  }
}

async function precheckModel(o: ResolvedOptions): Promise<void> {
  let cfg: ModelConfig;
  try {
    cfg = parseModelConfig(await readJsonFile(join(o.model, "config.json")), join(o.model, "config.json"));
  } catch (e) {
    if (e instanceof NotFound) throw new InvalidArgument(`model ${o.model} not found (no config.json)`, { cause: e });
    throw e;
  }
  checkModelFit(o, cfg);
}

/** Options that must agree with the model: block size within its positions, target modules that exist. */
function checkModelFit(o: ResolvedOptions, cfg: ModelConfig): ReturnType<typeof resolveTargets> {
  if (o.blockSize > cfg.maxPositionEmbeddings) {
    throw new InvalidArgument(`block size ${o.blockSize} exceeds the model's max_position_embeddings (${cfg.maxPositionEmbeddings})`);
  }
  return resolveTargets(cfg.family, cfg.numLayers, o.targets);
}

async function runTraining(o: ResolvedOptions, model: TrainModel, hooks: TrainHooks): Promise<TrainResult> {
  const emit = (e: TrainEvent): void => hooks.onEvent?.(e);
  const signal = hooks.signal;

  // ---- model, targets, data ---------------------------------------------------------------
  const cfg = model.config;
  const targets = checkModelFit(o, cfg);
  const tok = dataTokenizer(model.tokenizer, cfg.padTokenId);
  const ds = await loadDataset(o.data, tok, { blockSize: o.blockSize, packing: o.packing });
  const evalDs = o.evalData ? await loadDataset(o.evalData, tok, { blockSize: o.blockSize, packing: o.packing }) : undefined;
  const engine: TrainingEngine = asTrainingEngine(model.engine);
  const plan = planSteps(ds.rows.length, o);
  const totalSteps = plan.totalSteps;
  const M = plan.microBatchesPerEpoch;
  const sched: ScheduleSpec = { scheduler: o.scheduler, warmupSteps: o.warmupSteps, totalSteps };
  const args = trajectoryArgs(o);

  const loraConfig: LoraConfigInput = {
    r: o.rank,
    loraAlpha: o.alpha,
    loraDropout: o.dropout,
    targetModules: targets.peftTargetModules,
    useRslora: o.useRslora,
    bias: "none",
    baseModelNameOrPath: o.baseModelName,
    taskType: "CAUSAL_LM",
  };

  // ---- fresh start or resume ----------------------------------------------------------------
  await mkdir(o.out, { recursive: true });
  await removeStaleStaging(o.out);
  await removeStaleTemps(o.out);
  const existing = await listCheckpoints(o.out);
  if (existing.length > 0 && !o.resume) {
    throw new FailedPrecondition(
      `${o.out} already holds checkpoints of a run (${existing.map((c) => `checkpoint-${c.step}`).join(", ")}); ` +
        `resume it with --resume or train into an empty directory`,
    );
  }
  engine.initLora(o.slot, {
    rank: o.rank,
    alpha: o.alpha,
    useRslora: o.useRslora,
    dropout: o.dropout,
    targets: targets.modules,
    seed: deriveSeed(o.seed, Stream.loraInit, 0),
  });

  let state: TrainerState = {
    format: "qlora-trainer-state",
    version: 1,
    global_step: 0,
    max_steps: totalSteps,
    epoch: 0,
    epoch_index: 0,
    micro_step_in_epoch: 0,
    micro_batches_per_epoch: M,
    global_micro_step: 0,
    seed: o.seed,
    rng: {
      algorithm: "splitmix64 seeds, xoshiro128** Fisher-Yates (data order); engine dropout seeded per micro-step",
      data_order_epoch: 0,
      dropout_next_micro_step: 0,
      lora_init_seed: deriveSeed(o.seed, Stream.loraInit, 0).toString(),
    },
    totals: { loss_sum: 0, window_loss_sum: 0, window_steps: 0, tokens_seen: 0, target_tokens_seen: 0 },
    log_history: [],
    args,
    data: { train_sha256: ds.sha256, train_rows: ds.rows.length, eval_sha256: evalDs?.sha256 ?? null },
  };
  let resumedFromStep = 0;
  if (o.resume && existing.length > 0) {
    const newest = existing[existing.length - 1]!;
    const ck = await readCheckpoint(newest.path);
    const saved = ck.state;
    const diff = describeDiff(saved.args, args);
    if (diff) throw new FailedPrecondition(`cannot resume ${newest.path}: training options changed (${diff})`);
    if (saved.data.train_sha256 !== ds.sha256) {
      throw new FailedPrecondition(`cannot resume ${newest.path}: the training data changed since the checkpoint`);
    }
    if ((saved.data.eval_sha256 ?? null) !== (evalDs?.sha256 ?? null)) {
      throw new FailedPrecondition(`cannot resume ${newest.path}: the eval data changed since the checkpoint`);
    }
    if (saved.max_steps !== totalSteps || saved.micro_batches_per_epoch !== M) {
      throw new FailedPrecondition(`cannot resume ${newest.path}: the run's length changed (${saved.max_steps} → ${totalSteps} steps)`);
    }
    const names = Object.keys(ck.lora.modules).sort();
    const want = [...targets.modules].sort();
    if (JSON.stringify(names) !== JSON.stringify(want)) {
      throw new FailedPrecondition(`cannot resume ${newest.path}: its adapter covers different modules`);
    }
    engine.setLoraState(o.slot, ck.lora);
    state = saved;
    resumedFromStep = saved.global_step;
  }
  await rewriteMetrics(o.out, state.log_history);

  const runsDir = join(o.out, RUNS_DIR);
  await mkdir(runsDir, { recursive: true });
  const tb = new EventFileWriter(runsDir);
  // A restart discards, in TensorBoard's view, whatever the interrupted run logged after its checkpoint.
  if (resumedFromStep > 0) tb.sessionStart(resumedFromStep + 1);

  let trainable = 0;
  {
    const s = engine.getLoraState(o.slot);
    for (const m of Object.values(s.modules)) trainable += m.a.length + m.b.length;
  }
  emit({
    type: "start",
    totalSteps,
    stepsPerEpoch: plan.stepsPerEpoch,
    epochs: Math.ceil(totalSteps / plan.stepsPerEpoch),
    trainRows: ds.rows.length,
    evalRows: evalDs ? evalDs.rows.length : null,
    trainableParameters: trainable,
    resumedFromStep,
    device: engineDevice(model.engine),
    dataset: {
      kinds: ds.kinds,
      examples: ds.stats.examples,
      truncated: ds.stats.truncated,
      dropped: ds.stats.dropped,
      targetTokens: ds.stats.targetTokens,
    },
  });

  const t0 = performance.now();
  let windowStart = performance.now();
  let windowInputTokens = 0;
  let lastEvalLoss: number | null = null;
  let lastEvalStep = -1;
  let lastSavedStep = resumedFromStep;

  const record = async (entry: LogEntry): Promise<void> => {
    state.log_history.push(entry);
    await appendMetrics(o.out, entry);
  };

  const evaluate = async (): Promise<void> => {
    if (!evalDs) return;
    const loss = evalLossOf(engine, o.slot, evalDs, o.batchSize);
    lastEvalLoss = loss;
    lastEvalStep = state.global_step;
    tb.scalars(state.global_step, [{ tag: "eval/loss", value: loss }]);
    await record({ step: state.global_step, epoch: state.epoch, eval_loss: loss });
    emit({ type: "eval", step: state.global_step, epoch: state.epoch, evalLoss: loss });
  };

  const checkpoint = async (): Promise<void> => {
    const lora = engine.getLoraState(o.slot);
    const { path, sizeBytes } = await writeCheckpoint(o.out, { loraConfig, family: cfg.family, lora, state });
    const removed = await rotateCheckpoints(o.out, o.saveTotalLimit);
    lastSavedStep = state.global_step;
    await writeLossPng(o.out, state.log_history);
    emit({ type: "checkpoint", step: state.global_step, path, sizeBytes, removed });
  };

  let order: Uint32Array | null = null;
  let orderEpoch = -1;
  try {
    while (state.global_step < totalSteps) {
      if (signal?.aborted) {
        if (o.checkpointOnCancel && lastSavedStep !== state.global_step) await checkpoint();
        throw new Cancelled(`training cancelled at step ${state.global_step} of ${totalSteps}`);
      }
      if (orderEpoch !== state.epoch_index) {
        order = epochOrder(ds, o.seed, state.epoch_index);
        orderEpoch = state.epoch_index;
      }
      // ---- one optimizer step ----------------------------------------------------------------
      const first = state.micro_step_in_epoch;
      const last = Math.min(first + o.gradAccum, M);
      const batches: Batch[] = [];
      let stepTargets = 0;
      for (let j = first; j < last; j++) {
        const b = microBatch(ds, order!, j, o.batchSize);
        batches.push(b);
        stepTargets += b.targetTokens;
      }
      let stepLoss = 0;
      for (const b of batches) {
        const weight = stepTargets > 0 ? b.targetTokens / stepTargets : 0;
        const res = engine.trainForwardBackward(o.slot, b, {
          dropoutSeed: deriveSeed(o.seed, Stream.dropout, state.global_micro_step),
          gradScale: weight,
          checkpointing: o.gradientCheckpointing,
        });
        stepLoss += res.loss * weight;
        state.global_micro_step++;
        state.totals.tokens_seen += b.inputTokens;
        state.totals.target_tokens_seen += b.targetTokens;
        windowInputTokens += b.inputTokens;
      }
      const stepNo = state.global_step + 1;
      const lr = learningRateAt(o.lr, sched, stepNo);
      const { gradNorm } = engine.adamwStep(o.slot, {
        lr,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weightDecay: o.weightDecay,
        maxGradNorm: o.maxGradNorm,
        step: stepNo,
      });
      state.global_step = stepNo;
      state.micro_step_in_epoch = last;
      if (last >= M) {
        state.epoch_index++;
        state.micro_step_in_epoch = 0;
      }
      state.epoch = state.epoch_index + state.micro_step_in_epoch / M;
      state.rng.data_order_epoch = state.epoch_index;
      state.rng.dropout_next_micro_step = state.global_micro_step;
      state.totals.loss_sum += stepLoss;
      state.totals.window_loss_sum += stepLoss;
      state.totals.window_steps++;

      emit({ type: "step", step: state.global_step, totalSteps, epoch: state.epoch });

      // ---- log / eval / save ------------------------------------------------------------------
      if (state.global_step % o.loggingSteps === 0) {
        const now = performance.now();
        const secs = Math.max((now - windowStart) / 1000, 1e-9);
        const entry = {
          step: state.global_step,
          epoch: state.epoch,
          loss: state.totals.window_loss_sum / state.totals.window_steps,
          learning_rate: lr,
          grad_norm: gradNorm,
          tokens_per_second: windowInputTokens / secs,
        };
        state.totals.window_loss_sum = 0;
        state.totals.window_steps = 0;
        windowStart = now;
        windowInputTokens = 0;
        tb.scalars(state.global_step, [
          { tag: "train/loss", value: entry.loss },
          { tag: "train/learning_rate", value: entry.learning_rate },
          { tag: "train/grad_norm", value: entry.grad_norm },
          { tag: "train/epoch", value: entry.epoch },
        ]);
        await record(entry);
        emit({
          type: "log",
          step: entry.step,
          totalSteps,
          epoch: entry.epoch,
          loss: entry.loss,
          learningRate: entry.learning_rate,
          gradNorm: entry.grad_norm,
          tokensPerSecond: entry.tokens_per_second,
        });
      }
      if (evalDs && state.global_step % o.evalSteps === 0) await evaluate();
      if (o.saveSteps > 0 && state.global_step % o.saveSteps === 0) await checkpoint();
      await yieldToEventLoop();
    }

    if (evalDs && lastEvalStep !== state.global_step) await evaluate();
    const lora = engine.getLoraState(o.slot);
    const adapterFiles = await writeFinalAdapter(o.out, { config: loraConfig, family: cfg.family, tensors: moduleTensors(lora) });
    await writeLossPng(o.out, state.log_history);
    const trainLoss = state.global_step > 0 ? state.totals.loss_sum / state.global_step : NaN;
    const runtimeSeconds = (performance.now() - t0) / 1000;
    emit({ type: "end", step: state.global_step, trainLoss, evalLoss: lastEvalLoss, runtimeSeconds, out: o.out });
    return {
      out: o.out,
      globalStep: state.global_step,
      totalSteps,
      trainLoss,
      evalLoss: lastEvalLoss,
      resumedFromStep,
      adapterFiles,
      logHistory: state.log_history,
    };
  } finally {
    tb.close();
  }
}

function moduleTensors(lora: LoraState): Map<string, { a: Float32Array; b: Float32Array }> {
  const m = new Map<string, { a: Float32Array; b: Float32Array }>();
  for (const [name, s] of Object.entries(lora.modules)) m.set(name, { a: s.a, b: s.b });
  return m;
}

/** Mean next-token loss over every target token of `ds` (rows in file order, no dropout). */
export function evalLossOf(engine: Pick<TrainingEngine, "evalLoss">, slot: number, ds: TrainDataset, batchSize: number): number {
  let sum = 0;
  let n = 0;
  for (const b of evalBatches(ds, batchSize)) {
    if (b.targetTokens === 0) continue;
    const r = engine.evalLoss(slot, b);
    sum += r.loss * b.targetTokens;
    n += b.targetTokens;
  }
  return n > 0 ? sum / n : NaN;
}
