/**
 * Training options, their defaults (the classic example: PEFT LoraConfig(r=8, lora_alpha=16,
 * lora_dropout=0.05, target q_proj/v_proj) + TrainingArguments(num_train_epochs=3,
 * per_device_train_batch_size=2, learning_rate=2e-4, logging_steps=5, save_steps=10,
 * save_total_limit=1) and HF's own defaults elsewhere), and validation. Everything is checked before
 * any model or data is loaded, so a bad request fails fast with InvalidArgument.
 */
import { InvalidArgument } from "@qlora/core";
import { parseTargetList } from "./targets.js";
import { parseScheduler, type SchedulerName } from "./schedule.js";

/** Plain data (structured-cloneable), so the options can be posted to a worker thread. */
export interface TrainOptions {
  /** Base model directory (Hugging Face layout, original or NF4). */
  model: string;
  /** Training data (.txt or .jsonl). */
  data: string;
  /** Output directory: final adapter, checkpoints, metrics.jsonl, runs/, loss.png. */
  out: string;
  rank?: number;
  alpha?: number;
  dropout?: number;
  /** "q_proj,v_proj", ["q_proj", "v_proj"] or "all-linear". */
  target?: string | string[];
  /** Scaling alpha/√r instead of alpha/r. */
  useRslora?: boolean;
  epochs?: number;
  /** > 0: train exactly this many optimizer steps (overrides epochs). */
  maxSteps?: number;
  batchSize?: number;
  gradAccum?: number;
  blockSize?: number;
  lr?: number;
  scheduler?: SchedulerName;
  warmupSteps?: number;
  weightDecay?: number;
  /** 0 disables clipping. */
  maxGradNorm?: number;
  seed?: number;
  /** Checkpoint every N optimizer steps; 0 = no checkpoints. */
  saveSteps?: number;
  /** Checkpoints kept (newest); 0 = keep all. */
  saveTotalLimit?: number;
  loggingSteps?: number;
  evalData?: string;
  /** Evaluate every N steps (and after the last); default = saveSteps, or loggingSteps when saveSteps is 0. */
  evalSteps?: number;
  packing?: boolean;
  quant?: "nf4" | "none";
  /**
   * Where the engine trains (a model the caller passes in trains where it lives): "cpu" (default),
   * "cuda" (FailedPrecondition naming the reason when CUDA is not available) or "auto" (CUDA when
   * available, else the CPU). The start event reports the device used.
   */
  device?: "auto" | "cpu" | "cuda";
  /** Continue from the newest checkpoint in `out` (a fresh start when there is none). */
  resume?: boolean;
  /** Recompute activations in backward (prepare_model_for_kbit_training's default). */
  gradientCheckpointing?: boolean;
  /** base_model_name_or_path written into adapter_config.json; default: `model` as given. */
  baseModelName?: string;
  /** On cancellation, write a checkpoint of the current step before stopping. */
  checkpointOnCancel?: boolean;
  /** Adapter slot of the engine used for training (default 0). */
  slot?: number;
}

export interface ResolvedOptions {
  model: string;
  data: string;
  out: string;
  rank: number;
  alpha: number;
  dropout: number;
  targets: string[];
  useRslora: boolean;
  epochs: number;
  maxSteps: number;
  batchSize: number;
  gradAccum: number;
  blockSize: number;
  lr: number;
  scheduler: SchedulerName;
  warmupSteps: number;
  weightDecay: number;
  maxGradNorm: number;
  seed: number;
  saveSteps: number;
  saveTotalLimit: number;
  loggingSteps: number;
  evalData: string | undefined;
  evalSteps: number;
  packing: boolean;
  quant: "nf4" | "none";
  device: "auto" | "cpu" | "cuda";
  resume: boolean;
  gradientCheckpointing: boolean;
  baseModelName: string;
  checkpointOnCancel: boolean;
  slot: number;
  /** AdamW, as the Trainer's default adamw_torch. */
  beta1: number;
  beta2: number;
  eps: number;
}

export const DEFAULTS = {
  rank: 8,
  alpha: 16,
  dropout: 0.05,
  target: "q_proj,v_proj",
  epochs: 3,
  maxSteps: 0,
  batchSize: 2,
  gradAccum: 1,
  blockSize: 64,
  lr: 2e-4,
  scheduler: "linear" as SchedulerName,
  warmupSteps: 0,
  weightDecay: 0,
  maxGradNorm: 1.0,
  seed: 42,
  saveSteps: 10,
  saveTotalLimit: 1,
  loggingSteps: 5,
  quant: "nf4" as const,
  device: "cpu" as const,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
};

function req(name: string, v: string | undefined): string {
  if (typeof v !== "string" || v.trim() === "") throw new InvalidArgument(`${name} is required`);
  return v;
}

function int(name: string, v: number | undefined, dflt: number, min: number): number {
  if (v === undefined) return dflt;
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
    throw new InvalidArgument(`${name} must be an integer ≥ ${min}, got ${String(v)}`);
  }
  return v;
}

function num(name: string, v: number | undefined, dflt: number, ok: (x: number) => boolean, rule: string): number {
  if (v === undefined) return dflt;
  if (typeof v !== "number" || !Number.isFinite(v) || !ok(v)) throw new InvalidArgument(`${name} must be ${rule}, got ${String(v)}`);
  return v;
}

/** Applies defaults and validates; throws InvalidArgument naming the first bad option. */
export function resolveOptions(o: TrainOptions): ResolvedOptions {
  const model = req("model", o.model);
  const data = req("data", o.data);
  const out = req("out", o.out);
  const rank = int("rank", o.rank, DEFAULTS.rank, 1);
  const alpha = num("alpha", o.alpha, DEFAULTS.alpha, (x) => x > 0, "> 0");
  const dropout = num("dropout", o.dropout, DEFAULTS.dropout, (x) => x >= 0 && x < 1, "in [0, 1)");
  const targets = parseTargetList(o.target ?? DEFAULTS.target);
  if (targets.length === 0) throw new InvalidArgument("target must name at least one module (or all-linear)");
  const maxSteps = int("max steps", o.maxSteps, DEFAULTS.maxSteps, 0);
  const epochs = num("epochs", o.epochs, DEFAULTS.epochs, (x) => x > 0, "> 0");
  const batchSize = int("batch size", o.batchSize, DEFAULTS.batchSize, 1);
  const gradAccum = int("gradient accumulation steps", o.gradAccum, DEFAULTS.gradAccum, 1);
  const blockSize = int("block size", o.blockSize, DEFAULTS.blockSize, 2);
  const lr = num("learning rate", o.lr, DEFAULTS.lr, (x) => x > 0, "> 0");
  const scheduler = o.scheduler === undefined ? DEFAULTS.scheduler : parseScheduler(o.scheduler);
  const warmupSteps = int("warmup steps", o.warmupSteps, DEFAULTS.warmupSteps, 0);
  const weightDecay = num("weight decay", o.weightDecay, DEFAULTS.weightDecay, (x) => x >= 0, "≥ 0");
  const maxGradNorm = num("max grad norm", o.maxGradNorm, DEFAULTS.maxGradNorm, (x) => x >= 0, "≥ 0 (0 disables clipping)");
  const seed = int("seed", o.seed, DEFAULTS.seed, 0);
  const saveSteps = int("save steps", o.saveSteps, DEFAULTS.saveSteps, 0);
  const saveTotalLimit = int("save total limit", o.saveTotalLimit, DEFAULTS.saveTotalLimit, 0);
  const loggingSteps = int("logging steps", o.loggingSteps, DEFAULTS.loggingSteps, 1);
  const evalSteps = int("eval steps", o.evalSteps, saveSteps > 0 ? saveSteps : loggingSteps, 1);
  const quant = o.quant ?? DEFAULTS.quant;
  if (quant !== "nf4" && quant !== "none") throw new InvalidArgument(`quant must be nf4 or none, got ${String(quant)}`);
  const device = o.device ?? DEFAULTS.device;
  if (device !== "auto" && device !== "cpu" && device !== "cuda") {
    throw new InvalidArgument(`device must be auto, cpu or cuda, got ${String(device)}`);
  }
  const slot = int("slot", o.slot, 0, 0);
  const evalData = o.evalData === undefined || o.evalData === "" ? undefined : o.evalData;
  return {
    model,
    data,
    out,
    rank,
    alpha,
    dropout,
    targets,
    useRslora: o.useRslora ?? false,
    epochs,
    maxSteps,
    batchSize,
    gradAccum,
    blockSize,
    lr,
    scheduler,
    warmupSteps,
    weightDecay,
    maxGradNorm,
    seed,
    saveSteps,
    saveTotalLimit,
    loggingSteps,
    evalData,
    evalSteps,
    packing: o.packing ?? false,
    quant,
    device,
    resume: o.resume ?? false,
    gradientCheckpointing: o.gradientCheckpointing ?? true,
    baseModelName: o.baseModelName ?? model,
    checkpointOnCancel: o.checkpointOnCancel ?? false,
    slot,
    beta1: DEFAULTS.beta1,
    beta2: DEFAULTS.beta2,
    eps: DEFAULTS.eps,
  };
}

/**
 * The options that decide the training trajectory. A resumed run must match them exactly, or its
 * result could not equal an uninterrupted run's.
 */
export function trajectoryArgs(o: ResolvedOptions): Record<string, unknown> {
  return {
    rank: o.rank,
    alpha: o.alpha,
    dropout: o.dropout,
    targets: o.targets,
    use_rslora: o.useRslora,
    epochs: o.epochs,
    max_steps: o.maxSteps,
    batch_size: o.batchSize,
    grad_accum: o.gradAccum,
    block_size: o.blockSize,
    lr: o.lr,
    scheduler: o.scheduler,
    warmup_steps: o.warmupSteps,
    weight_decay: o.weightDecay,
    max_grad_norm: o.maxGradNorm,
    seed: o.seed,
    packing: o.packing,
    quant: o.quant,
    beta1: o.beta1,
    beta2: o.beta2,
    eps: o.eps,
  };
}
