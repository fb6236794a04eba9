/**
 * The production runner: the QLoRA training loop of @qlora/model (`train`), run inside the job's
 * worker thread. The service's options map one to one onto the loop's (the CLI's) options, with
 * three fixed by the job system:
 * - saveTotalLimit 0: the service rotates checkpoints after publishing them (runner-api.ts);
 * - checkpointOnCancel: a stop (shutdown, cancel) first saves the current step, so a re-queued
 *   job loses nothing;
 * - baseModelName: the store name of the base, so adapter_config.json carries no host path.
 */
import * as model from "@qlora/model";
import { FailedPrecondition } from "@qlora/core";
import type { JobRunner, JobRunSpec, RunHooks, RunnerEvent, RunResult } from "../runner-api.js";

/** The slice of @qlora/model's TrainOptions this runner sets. */
export interface TrainCallOptions {
  model: string;
  data: string;
  out: string;
  evalData?: string;
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
  scheduler: string;
  warmupSteps: number;
  weightDecay: number;
  maxGradNorm: number;
  seed: number;
  saveSteps: number;
  saveTotalLimit: number;
  loggingSteps: number;
  evalSteps?: number;
  packing: boolean;
  quant: "nf4" | "none";
  device: "cpu" | "cuda";
  resume: boolean;
  gradientCheckpointing: boolean;
  baseModelName: string;
  checkpointOnCancel: boolean;
}

/** The shape of @qlora/model's `train` as this runner calls it. */
export type TrainFunction = (
  options: TrainCallOptions,
  hooks: { onEvent?: (e: RunnerEvent) => void; signal?: AbortSignal; loadModel?: (dir: string, quant: "nf4" | "none") => Promise<unknown> },
) => Promise<{ globalStep: number; totalSteps: number; trainLoss: number; evalLoss: number | null; resumedFromStep: number }>;

export function trainOptionsFor(spec: JobRunSpec): TrainCallOptions {
  const o = spec.options;
  return {
    model: spec.modelDir,
    data: spec.dataPath,
    out: spec.outDir,
    ...(spec.evalDataPath ? { evalData: spec.evalDataPath } : {}),
    rank: o.rank,
    alpha: o.alpha,
    dropout: o.dropout,
    target: o.target,
    useRslora: o.useRslora,
    epochs: o.epochs,
    maxSteps: o.maxSteps,
    batchSize: o.batchSize,
    gradAccum: o.gradAccum,
    blockSize: o.blockSize,
    lr: o.lr,
    scheduler: o.scheduler,
    warmupSteps: o.warmupSteps,
    weightDecay: o.weightDecay,
    maxGradNorm: o.maxGradNorm,
    seed: o.seed,
    saveSteps: o.saveSteps,
    saveTotalLimit: 0,
    loggingSteps: o.loggingSteps,
    ...(o.evalSteps !== undefined ? { evalSteps: o.evalSteps } : {}),
    packing: o.packing,
    quant: o.quant,
    device: o.device,
    resume: spec.resume,
    gradientCheckpointing: o.gradientCheckpointing,
    baseModelName: spec.baseModelName,
    checkpointOnCancel: true,
  };
}

/** A runner over a given training function (and optionally a model loader, e.g. a reference engine). */
export function trainRunner(
  train: TrainFunction,
  loadModel?: (dir: string, quant: "nf4" | "none") => Promise<unknown>,
): JobRunner {
  return async (spec: JobRunSpec, hooks: RunHooks): Promise<RunResult> => {
    const r = await train(trainOptionsFor(spec), { onEvent: hooks.onEvent, signal: hooks.signal, ...(loadModel ? { loadModel } : {}) });
    return {
      globalStep: r.globalStep,
      totalSteps: r.totalSteps,
      trainLoss: r.trainLoss,
      evalLoss: r.evalLoss,
      resumedFromStep: r.resumedFromStep,
    };
  };
}

/** The training loop as exported by @qlora/model, or undefined in a build that does not export it. */
export function modelTrainFunction(): TrainFunction | undefined {
  const train = (model as Record<string, unknown>)["train"];
  return typeof train === "function" ? (train as TrainFunction) : undefined;
}

export const runJob: JobRunner = (spec, hooks) => {
  const train = modelTrainFunction();
  if (!train) {
    return Promise.reject(new FailedPrecondition("this build of @qlora/model does not export the training loop (train)"));
  }
  return trainRunner(train)(spec, hooks);
};
