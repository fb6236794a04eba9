/**
 * What the training loop needs from the native engine: the LoRA training API of NativeModel
 * (libs/kernels/src/engine.ts). LoRA weights, gradients and AdamW moments live in native memory in an
 * adapter slot; TypeScript only orchestrates whole steps. Declared structurally so the loop can run
 * on any object with these methods (NativeModel, or a reference engine in tests).
 */
import { FailedPrecondition } from "@qlora/core";
// The data shapes of the API are the kernels' own (type-only import: no native code is loaded).
import type { AdamWStepOptions, LoraModuleState, LoraState, LoraTrainSpec, TrainBatchInput } from "@qlora/kernels";

export type { LoraModuleState, LoraState, LoraTrainSpec, TrainBatchInput };
export type AdamWParams = AdamWStepOptions;

export interface TrainingEngine {
  initLora(slot: number, spec: LoraTrainSpec): void;
  /** Loss = mean over the non-ignored labels; gradients are accumulated (× gradScale) into the slot. */
  trainForwardBackward(
    slot: number,
    batch: TrainBatchInput,
    opts: { dropoutSeed: bigint; gradScale: number; checkpointing: boolean },
  ): { loss: number; tokens: number };
  /** No gradients, no dropout; slot -1 = the base model alone. */
  evalLoss(slot: number, batch: TrainBatchInput): { loss: number; tokens: number };
  /** Clip, decoupled weight decay, Adam update, zero the gradients; returns the pre-clip global norm. */
  adamwStep(slot: number, o: AdamWParams): { gradNorm: number };
  zeroGrad(slot: number): void;
  getLoraState(slot: number): LoraState;
  setLoraState(slot: number, state: LoraState): void;
}

/** Narrows an engine object to the training API, with a clear error when it is missing. */
export function asTrainingEngine(engine: unknown): TrainingEngine {
  const methods = ["initLora", "trainForwardBackward", "evalLoss", "adamwStep", "zeroGrad", "getLoraState", "setLoraState"];
  const missing = methods.filter((m) => typeof (engine as Record<string, unknown> | null)?.[m] !== "function");
  if (missing.length > 0) {
    throw new FailedPrecondition(`the native engine has no training API (missing ${missing.join(", ")}); rebuild libs/kernels`);
  }
  return engine as TrainingEngine;
}
