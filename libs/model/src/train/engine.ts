/**
 * What the training loop needs from the native engine: the LoRA training API of NativeModel
 * (libs/kernels/src/engine.ts). LoRA weights, gradients and AdamW moments live in native memory in an
 * adapter slot; TypeScript only orchestrates whole steps. Declared structurally so the loop can run
 * on any object with these methods (NativeModel, or a reference engine in tests).
 */
import { FailedPrecondition } from "@qlora/core";

export interface LoraTrainSpec {
  rank: number;
  alpha: number;
  useRslora: boolean;
  /** Dropout probability on the LoRA branch input. */
  dropout: number;
  /** Canonical module names, e.g. "layers.0.self_attn.q_proj". */
  targets: string[];
  /** A ~ kaiming_uniform(a=√5) = U(-1/√in, 1/√in) drawn from this seed; B = 0. */
  seed: bigint;
}

export interface TrainBatchInput {
  tokens: Int32Array;
  /** labels[b*T+t]: the target token at position t, or -100. */
  labels: Int32Array;
  batchSize: number;
  seqLen: number;
  /** Packing: example id per position (attention within a segment, positions restart). */
  segments?: Int32Array;
}

export interface LoraModuleState {
  a: Float32Array;
  b: Float32Array;
  /** AdamW first/second moments of A and B. */
  ma: Float32Array;
  va: Float32Array;
  mb: Float32Array;
  vb: Float32Array;
}

export interface LoraState {
  rank: number;
  scaling: number;
  modules: Record<string, LoraModuleState>;
}

export interface AdamWParams {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** > 0: clip by the global gradient norm first. */
  maxGradNorm: number;
  /** 1-based optimizer step (bias correction). */
  step: number;
}

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
