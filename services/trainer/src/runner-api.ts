/**
 * The contract between the job system and what actually trains: a *runner module*, loaded inside
 * the job's worker thread, exporting `runJob(spec, hooks)`.
 *
 * The default runner (runners/train.ts) calls the training loop of @qlora/model; tests plug in a
 * small deterministic one to exercise queueing, cancellation and resumption quickly. Everything here
 * is plain data, because it crosses a worker_threads boundary by structured clone.
 *
 * Division of labour: the runner trains into `spec.outDir` (checkpoints `checkpoint-<step>/`, the
 * final adapter, logs) and never deletes checkpoints itself; the service publishes each checkpoint
 * to the artifact store and applies save_total_limit, so that a checkpoint is never rotated away
 * while it is being published.
 */

/** Training hyperparameters after defaults (the names of @qlora/model's TrainOptions). */
export interface RunnerTrainOptions {
  rank: number;
  alpha: number;
  dropout: number;
  target: string[];
  useRslora: boolean;
  epochs: number;
  maxSteps: number;
  batchSize: number;
  gradAccum: number;
  blockSize: number;
  lr: number;
  scheduler: "constant" | "linear" | "cosine";
  warmupSteps: number;
  weightDecay: number;
  maxGradNorm: number;
  seed: number;
  saveSteps: number;
  loggingSteps: number;
  /** Undefined: evaluate at every save (the trainer's default). */
  evalSteps?: number;
  packing: boolean;
  quant: "nf4" | "none";
  /** Where the job trains (the effective request's training.device; the job record's device). */
  device: "cpu" | "cuda";
  gradientCheckpointing: boolean;
}

export interface JobRunSpec {
  jobId: string;
  /** 1 for the first run of the job. */
  attempt: number;
  /** Continue from the newest checkpoint in outDir (a fresh start when there is none). */
  resume: boolean;
  /** Local directories/files, resolved through the artifact store. */
  modelDir: string;
  dataPath: string;
  evalDataPath?: string;
  outDir: string;
  /** base_model_name_or_path for adapter_config.json: the store name, never a host path. */
  baseModelName: string;
  options: RunnerTrainOptions;
  /** Whatever the service was configured to hand its runner (JSON). */
  config?: unknown;
}

export type RunnerEvent =
  | {
      type: "start";
      totalSteps: number;
      resumedFromStep: number;
      [k: string]: unknown;
    }
  | { type: "step"; step: number; totalSteps: number; epoch: number }
  | {
      type: "log";
      step: number;
      totalSteps: number;
      epoch: number;
      loss: number;
      learningRate: number;
      gradNorm: number;
      tokensPerSecond: number;
    }
  | { type: "eval"; step: number; epoch: number; evalLoss: number }
  | { type: "checkpoint"; step: number; path: string; sizeBytes: number; [k: string]: unknown }
  | { type: "end"; step: number; trainLoss: number; evalLoss: number | null; [k: string]: unknown };

export interface RunHooks {
  /** Synchronously, in order. */
  onEvent: (e: RunnerEvent) => void;
  /**
   * Aborted to stop at the next step boundary. The runner then writes a checkpoint of the current
   * step (so a shutdown loses nothing) and rejects with a CANCELLED error.
   */
  signal: AbortSignal;
}

export interface RunResult {
  globalStep: number;
  totalSteps: number;
  trainLoss: number;
  evalLoss: number | null;
  resumedFromStep: number;
}

/** What a runner module exports as `runJob`. */
export type JobRunner = (spec: JobRunSpec, hooks: RunHooks) => Promise<RunResult>;

/** Files of a finished run in outDir that become the adapter artifact (when present). */
export const ADAPTER_OUTPUT_FILES = ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"] as const;
/** Directories copied along (TensorBoard event files). */
export const ADAPTER_OUTPUT_DIRS = ["runs"] as const;
/** Files every adapter must have. */
export const ADAPTER_REQUIRED_FILES = ["adapter_config.json", "adapter_model.safetensors"] as const;
