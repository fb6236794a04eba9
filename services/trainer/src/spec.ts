/**
 * CreateJobRequest → the effective request (every default filled in) → the runner's options.
 *
 * Defaults are the classic example's (PEFT LoraConfig r=8, alpha=16, dropout=0.05 on q_proj/v_proj;
 * TrainingArguments epochs=3, batch 2, lr 2e-4, logging 5, save 10, save_total_limit 1), the same
 * as `qlora train`. Zero means "default" as the proto says, with one exception the issue asks for:
 * a LoraConfig that is sent with rank 0 is rejected, since rank 0 is no LoRA at all. Everything is
 * checked before a job exists, and each problem is an InvalidArgument naming the field and reason.
 *
 * The effective request is what the job stores and what GetJob returns, so a job's configuration
 * stays fixed even if the defaults change in a later version.
 */
import { join } from "node:path";
import { create, fromJson, toJson } from "@bufbuild/protobuf";
import { FailedPrecondition, InvalidArgument, isQloraError, NotFound } from "@qlora/core";
import { canonicalToModulePath, LINEAR_MODULES, parseModelConfig, readJsonFile, type ModelConfig, type ModelFamily } from "@qlora/formats";
import {
  CreateJobRequestSchema,
  Device,
  LoraBias,
  Quantization,
  Scheduler,
  type CreateJobRequest,
} from "@qlora/proto";
import { validateName, type ArtifactStore } from "@qlora/store";
import { datasetFile, scanDataset, type DatasetScan, type StoredDatasetFile } from "./datasets.js";
import { checkTokens } from "./validate.js";
import type { JsonObject } from "./job-store.js";
import type { RunnerTrainOptions } from "./runner-api.js";

export const DEFAULTS = {
  rank: 8,
  alpha: 16,
  dropout: 0.05,
  targetModules: ["q_proj", "v_proj"],
  epochs: 3,
  batchSize: 2,
  gradAccum: 1,
  blockSize: 64,
  learningRate: 2e-4,
  maxGradNorm: 1.0,
  seed: 42n,
  saveSteps: 10,
  saveTotalLimit: 1,
  loggingSteps: 5,
} as const;

/**
 * float fields arrive as float32 (2e-4 → 0.00019999999494757503). Seven significant digits are
 * what a float32 holds, so this recovers the decimal the client wrote, and a job trains with the
 * same numbers as `qlora train` given the same flags.
 */
export function fromFloat32(x: number): number {
  return x === 0 || !Number.isFinite(x) ? x : Number(x.toPrecision(7));
}

function finite(name: string, v: number): number {
  if (!Number.isFinite(v)) throw new InvalidArgument(`${name} must be a finite number, got ${v}`);
  return fromFloat32(v);
}

const SCHEDULERS: Record<number, Scheduler> = {
  [Scheduler.UNSPECIFIED]: Scheduler.LINEAR,
  [Scheduler.CONSTANT]: Scheduler.CONSTANT,
  [Scheduler.LINEAR]: Scheduler.LINEAR,
  [Scheduler.COSINE]: Scheduler.COSINE,
};
const SCHEDULER_NAMES: Record<number, RunnerTrainOptions["scheduler"]> = {
  [Scheduler.CONSTANT]: "constant",
  [Scheduler.LINEAR]: "linear",
  [Scheduler.COSINE]: "cosine",
};

/** The linear module names of a family as PEFT writes them (q_proj, …), for messages. */
export function targetModuleNames(family: ModelFamily): string[] {
  return LINEAR_MODULES[family].map((m) => m.split(".").at(-1)!);
}

/**
 * Checks LoRA targets against the base's layers with PEFT's matching rule (a target matches a
 * module path equal to it or ending in "." + target); each name must match something, so a typo is
 * an error rather than a silently smaller adapter (as in the training loop).
 */
export function checkTargets(cfg: Pick<ModelConfig, "family" | "numLayers">, targets: readonly string[]): void {
  const valid = `${targetModuleNames(cfg.family).join(", ")} or all-linear`;
  if (targets.includes("all-linear")) {
    if (targets.length > 1) throw new InvalidArgument(`lora.target_modules: "all-linear" already targets every linear layer; do not combine it with other names`);
    return;
  }
  const paths: string[] = [];
  for (let i = 0; i < Math.max(1, cfg.numLayers); i++) {
    for (const m of LINEAR_MODULES[cfg.family]) paths.push(canonicalToModulePath(`layers.${i}.${m}`, cfg.family));
  }
  for (const t of targets) {
    if (!paths.some((p) => p === t || p.endsWith("." + t))) {
      throw new InvalidArgument(`lora.target_modules: unknown target module "${t}" for a ${cfg.family} model; valid target modules: ${valid}`);
    }
  }
}

/**
 * Field checks and defaults that need nothing but the request and the device this trainer runs on
 * (`serviceDevice`, resolved when the server started): training.device AUTO / unspecified becomes
 * that device, CPU stays CPU, CUDA needs a CUDA trainer (FailedPrecondition otherwise). The effective
 * request names the device the job trains on.
 */
export function withDefaults(req: CreateJobRequest, serviceDevice: "cpu" | "cuda" = "cpu"): CreateJobRequest {
  if (!req.baseModel) throw new InvalidArgument("base_model is required");
  validateName(req.baseModel, "base_model");
  if (!req.dataset) throw new InvalidArgument("dataset is required");
  validateName(req.dataset, "dataset");
  if (req.evalDataset) validateName(req.evalDataset, "eval_dataset");
  if (req.outputAdapter) validateName(req.outputAdapter, "output_adapter");

  // ---- LoRA -------------------------------------------------------------------------------
  const l = req.lora;
  if (l && l.rank === 0) throw new InvalidArgument("lora.rank must be at least 1 (rank 0 trains nothing)");
  const rank = l ? l.rank : DEFAULTS.rank;
  if (rank > 4096) throw new InvalidArgument(`lora.rank ${rank} is unreasonably large (at most 4096)`);
  const alpha = l ? finite("lora.alpha", l.alpha) : 0;
  if (alpha < 0) throw new InvalidArgument(`lora.alpha must be positive, got ${alpha}`);
  const dropout = l ? finite("lora.dropout", l.dropout) : 0;
  if (dropout < 0 || dropout >= 1) throw new InvalidArgument(`lora.dropout must be in [0, 1), got ${dropout}`);
  const targets = (l?.targetModules ?? []).map((t) => t.trim());
  if (targets.some((t) => t === "")) throw new InvalidArgument("lora.target_modules contains an empty name");
  for (const t of targets) {
    if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*$/.test(t)) throw new InvalidArgument(`lora.target_modules: ${JSON.stringify(t)} is not a module name (e.g. "q_proj", "all-linear")`);
  }
  const bias = l?.bias ?? LoraBias.UNSPECIFIED;
  if (bias === LoraBias.LORA_ONLY || bias === LoraBias.ALL) {
    throw new InvalidArgument(`lora.bias LORA_BIAS_${LoraBias[bias]} is not supported: this trainer trains LoRA A/B only; use LORA_BIAS_NONE`);
  }
  if (bias !== LoraBias.UNSPECIFIED && bias !== LoraBias.NONE) throw new InvalidArgument(`lora.bias: unknown value ${bias}`);

  // ---- training ---------------------------------------------------------------------------
  const t = req.training;
  const epochs = finite("training.epochs", t?.epochs ?? 0);
  if (epochs < 0) throw new InvalidArgument(`training.epochs must be positive, got ${epochs}`);
  const lr = finite("training.learning_rate", t?.learningRate ?? 0);
  if (lr < 0) throw new InvalidArgument(`training.learning_rate must be positive, got ${lr}`);
  const weightDecay = finite("training.weight_decay", t?.weightDecay ?? 0);
  if (weightDecay < 0) throw new InvalidArgument(`training.weight_decay must not be negative, got ${weightDecay}`);
  const maxGradNorm = finite("training.max_grad_norm", t?.maxGradNorm ?? 0);
  if (maxGradNorm < 0) throw new InvalidArgument(`training.max_grad_norm must not be negative, got ${maxGradNorm}`);
  const blockSize = t?.blockSize || DEFAULTS.blockSize;
  if (blockSize < 2) throw new InvalidArgument(`training.block_size must be at least 2, got ${blockSize}`);
  const scheduler = SCHEDULERS[t?.scheduler ?? Scheduler.UNSPECIFIED];
  if (scheduler === undefined) throw new InvalidArgument(`training.scheduler: unknown value ${t?.scheduler}`);
  const seed = t?.seed ?? DEFAULTS.seed;
  if (seed > BigInt(Number.MAX_SAFE_INTEGER)) throw new InvalidArgument(`training.seed must be at most ${Number.MAX_SAFE_INTEGER}, got ${seed}`);
  const quant = t?.quant ?? Quantization.UNSPECIFIED;
  if (quant !== Quantization.UNSPECIFIED && quant !== Quantization.NF4 && quant !== Quantization.NONE) {
    throw new InvalidArgument(`training.quant: unknown value ${quant}`);
  }
  const requested = t?.device ?? Device.UNSPECIFIED;
  if (requested !== Device.UNSPECIFIED && requested !== Device.AUTO && requested !== Device.CPU && requested !== Device.CUDA) {
    throw new InvalidArgument(`training.device: unknown value ${requested}`);
  }
  if (requested === Device.CUDA && serviceDevice !== "cuda") {
    throw new FailedPrecondition(
      "training.device CUDA is not available: this trainer runs on the CPU (start it with --device cuda|auto on a machine with a usable GPU); use DEVICE_AUTO or DEVICE_CPU",
    );
  }
  const device = requested === Device.CPU ? Device.CPU : serviceDevice === "cuda" ? Device.CUDA : Device.CPU;

  return create(CreateJobRequestSchema, {
    baseModel: req.baseModel,
    dataset: req.dataset,
    evalDataset: req.evalDataset,
    outputAdapter: req.outputAdapter,
    lora: {
      rank,
      alpha: alpha || DEFAULTS.alpha,
      dropout: dropout || DEFAULTS.dropout,
      targetModules: targets.length ? [...new Set(targets)] : [...DEFAULTS.targetModules],
      bias: LoraBias.NONE,
      useRslora: l?.useRslora ?? false,
    },
    training: {
      epochs: epochs || DEFAULTS.epochs,
      maxSteps: t?.maxSteps ?? 0,
      batchSize: t?.batchSize || DEFAULTS.batchSize,
      gradAccum: t?.gradAccum || DEFAULTS.gradAccum,
      blockSize,
      learningRate: lr || DEFAULTS.learningRate,
      scheduler,
      warmupSteps: t?.warmupSteps ?? 0,
      weightDecay,
      maxGradNorm: maxGradNorm || DEFAULTS.maxGradNorm,
      seed,
      saveSteps: t?.saveSteps || DEFAULTS.saveSteps,
      saveTotalLimit: t?.saveTotalLimit || DEFAULTS.saveTotalLimit,
      loggingSteps: t?.loggingSteps || DEFAULTS.loggingSteps,
      evalSteps: t?.evalSteps ?? 0,
      packing: t?.packing ?? false,
      quant: quant === Quantization.UNSPECIFIED ? Quantization.NF4 : quant,
      device,
      gradientCheckpointingOff: t?.gradientCheckpointingOff ?? false,
    },
  });
}

/** The base model's config, or InvalidArgument/FailedPrecondition saying what is wrong with it. */
export async function baseModelConfig(store: ArtifactStore, name: string): Promise<ModelConfig> {
  if (!(await store.exists("models", name))) throw new InvalidArgument(`base_model "${name}" not found in the store`);
  const dir = await store.localPath("models", name);
  try {
    return parseModelConfig(await readJsonFile(join(dir, "config.json")), `model "${name}" config.json`);
  } catch (e) {
    if (e instanceof NotFound) throw new FailedPrecondition(`base_model "${name}" is not a readable checkpoint: it has no config.json`, { cause: e });
    if (isQloraError(e)) throw new InvalidArgument(`base_model "${name}": ${e.message.split(dir).join(`model "${name}"`)}`, { cause: e });
    throw e;
  }
}

/** Whether the base has a chat template (tokenizer_config.json's chat_template, or chat_template.jinja). */
async function hasChatTemplate(store: ArtifactStore, name: string): Promise<boolean> {
  const dir = await store.localPath("models", name);
  try {
    const cfg = (await readJsonFile(join(dir, "tokenizer_config.json"))) as Record<string, unknown> | null;
    if (cfg && cfg["chat_template"]) return true;
  } catch {
    // no or unreadable tokenizer_config.json: look for the separate template file
  }
  return (await store.stat("models", name)).files.some((f) => f.path === "chat_template.jinja");
}

async function checkDataset(store: ArtifactStore, field: string, name: string): Promise<{ scan: DatasetScan; file: StoredDatasetFile }> {
  if (!(await store.exists("datasets", name))) throw new InvalidArgument(`${field} "${name}" not found in the store`);
  let file: StoredDatasetFile;
  try {
    file = await datasetFile(store, name);
  } catch (e) {
    if (isQloraError(e)) throw new InvalidArgument(`${field}: ${e.message}`, { cause: e });
    throw e;
  }
  return { scan: await scanDataset(file.path, file.format, `"${name}"`), file };
}

/** Datasets up to this size are also read with the base's tokenizer at CreateJob (validate.ts). */
export const TOKEN_CHECK_MAX_BYTES = 32 * 1024 * 1024;

/**
 * Everything CreateJob checks against the store: the base model exists and is readable, block_size
 * fits its positions, the target modules exist in its architecture, the datasets exist and parse
 * (structurally, then with the base's tokenizer as the training loop reads them), chat data has a
 * template to render with.
 */
export async function checkAgainstStore(store: ArtifactStore, req: CreateJobRequest, opts: { tokenCheckMaxBytes?: number } = {}): Promise<void> {
  const cfg = await baseModelConfig(store, req.baseModel);
  const t = req.training!;
  if (t.blockSize > cfg.maxPositionEmbeddings) {
    throw new InvalidArgument(`training.block_size ${t.blockSize} exceeds the base model's max_position_embeddings (${cfg.maxPositionEmbeddings})`);
  }
  checkTargets(cfg, req.lora!.targetModules);
  const checked = [await checkDataset(store, "dataset", req.dataset)];
  if (req.evalDataset) checked.push(await checkDataset(store, "eval_dataset", req.evalDataset));
  if (checked.some((c) => c.scan.kinds.includes("chat")) && !(await hasChatTemplate(store, req.baseModel))) {
    throw new InvalidArgument(`dataset has chat records ({"messages"}) but base_model "${req.baseModel}" has no chat template to render them with`);
  }
  const names = [req.dataset, req.evalDataset];
  await checkTokens(
    { name: req.baseModel, dir: await store.localPath("models", req.baseModel) },
    checked.map((c, i) => ({ path: c.file.path, label: JSON.stringify(names[i]), sizeBytes: c.file.sizeBytes })),
    { blockSize: t.blockSize, packing: t.packing, maxBytes: opts.tokenCheckMaxBytes ?? TOKEN_CHECK_MAX_BYTES },
  );
}

/** The runner's options for an effective request (see withDefaults). */
export function runnerOptions(req: CreateJobRequest): RunnerTrainOptions {
  const l = req.lora!;
  const t = req.training!;
  return {
    rank: l.rank,
    alpha: fromFloat32(l.alpha),
    dropout: fromFloat32(l.dropout),
    target: [...l.targetModules],
    useRslora: l.useRslora,
    epochs: fromFloat32(t.epochs),
    maxSteps: t.maxSteps,
    batchSize: t.batchSize,
    gradAccum: t.gradAccum,
    blockSize: t.blockSize,
    lr: fromFloat32(t.learningRate),
    scheduler: SCHEDULER_NAMES[t.scheduler] ?? "linear",
    warmupSteps: t.warmupSteps,
    weightDecay: fromFloat32(t.weightDecay),
    maxGradNorm: fromFloat32(t.maxGradNorm),
    seed: Number(t.seed ?? DEFAULTS.seed),
    saveSteps: t.saveSteps,
    loggingSteps: t.loggingSteps,
    ...(t.evalSteps > 0 ? { evalSteps: t.evalSteps } : {}),
    packing: t.packing,
    quant: t.quant === Quantization.NONE ? "none" : "nf4",
    device: t.device === Device.CUDA ? "cuda" : "cpu",
    gradientCheckpointing: !t.gradientCheckpointingOff,
  };
}

export function requestToJson(req: CreateJobRequest): JsonObject {
  return toJson(CreateJobRequestSchema, req) as JsonObject;
}

export function requestFromJson(json: JsonObject): CreateJobRequest {
  return fromJson(CreateJobRequestSchema, json as Parameters<typeof fromJson>[1]);
}
