/**
 * Events the training loop emits (the CLI prints them, the job service streams them). Plain
 * JSON-serialisable objects so they can cross a worker_threads boundary unchanged.
 */

export interface StartEvent {
  type: "start";
  totalSteps: number;
  /** Optimizer steps per epoch. */
  stepsPerEpoch: number;
  epochs: number;
  trainRows: number;
  evalRows: number | null;
  trainableParameters: number;
  /** Step the run continues from (0 for a fresh run). */
  resumedFromStep: number;
  /** Where training runs: the device of the engine (docs/cuda.md §7 for CUDA). */
  device: "cpu" | "cuda";
  dataset: { kinds: string[]; examples: number; truncated: number; dropped: number; targetTokens: number };
}

/** After every optimizer step (for progress bars; cheap, carries no metrics). */
export interface StepEvent {
  type: "step";
  step: number;
  totalSteps: number;
  epoch: number;
}

export interface LogEvent {
  type: "log";
  step: number;
  totalSteps: number;
  /** Fractional epoch (completed epochs + fraction of the current one). */
  epoch: number;
  /** Mean of the per-step losses since the previous log (each step's loss is its token mean). */
  loss: number;
  /** Learning rate used by this step's update. */
  learningRate: number;
  /** Global gradient norm of this step, before clipping. */
  gradNorm: number;
  /** Input tokens (padding excluded) per second of wall time since the previous log. */
  tokensPerSecond: number;
}

export interface EvalEvent {
  type: "eval";
  step: number;
  epoch: number;
  /** Mean next-token loss over every target token of the eval set. */
  evalLoss: number;
}

export interface CheckpointEvent {
  type: "checkpoint";
  step: number;
  path: string;
  sizeBytes: number;
  /** Older checkpoints deleted by save_total_limit. */
  removed: string[];
}

export interface EndEvent {
  type: "end";
  step: number;
  /** Mean per-step loss over the whole run (HF train_loss). */
  trainLoss: number;
  evalLoss: number | null;
  runtimeSeconds: number;
  out: string;
}

export type TrainEvent = StartEvent | StepEvent | LogEvent | EvalEvent | CheckpointEvent | EndEvent;
