/**
 * LoRA training on the native engine (csrc/model/train.{h,cpp}, csrc/napi/train_napi.cpp): the
 * methods below are attached to NativeModel.prototype, so `model.trainForwardBackward(...)` works on
 * every NativeModel. LoRA A/B, their gradients and the AdamW moments live in native memory in an
 * adapter slot; the slot also serves `forward()` (inference) with the trained weights, unmerged.
 * Design and math: docs/engine-training.md.
 */
import { NativeModel } from "./engine.js";
import { rethrowNative } from "./native-errors.js";
import { native } from "./native.js";
import type { WeightTensor } from "./tensor.js";

export interface LoraTrainSpec {
  rank: number;
  alpha: number;
  useRslora: boolean;
  /** Dropout probability on the LoRA branch input, in [0, 1). */
  dropout: number;
  /** Canonical module names, e.g. "layers.0.self_attn.q_proj" (OPT: "layers.0.fc1", …). */
  targets: string[];
  /** A ~ kaiming_uniform(a=√5) = U(-1/√in, 1/√in) from this seed; B = 0. */
  seed: bigint;
}

export interface TrainBatchInput {
  /** [batchSize·seqLen] token ids */
  tokens: Int32Array;
  /** labels[b·T + t]: the target token at position t, or -100 (ignored). */
  labels: Int32Array;
  batchSize: number;
  seqLen: number;
  /** Packing: example id per position; runs of equal ids are separate examples (attention stays inside, positions restart). */
  segments?: Int32Array;
}

export interface TrainStepOptions {
  /** Keys the LoRA dropout masks (with the module and the element): a recompute regenerates them. */
  dropoutSeed: bigint;
  /** Gradients of (loss · gradScale) are accumulated. */
  gradScale: number;
  /** Gradient checkpointing: keep each layer's input only, recompute in backward. */
  checkpointing: boolean;
}

export interface AdamWStepOptions {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** > 0: clip by the global gradient norm first (torch clip_grad_norm_). */
  maxGradNorm: number;
  /** 1-based optimizer step (bias correction). */
  step: number;
}

export interface LoraModuleState {
  /** A [rank, in] */
  a: Float32Array;
  /** B [out, rank] */
  b: Float32Array;
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

declare module "./engine.js" {
  interface NativeModel {
    /** Creates (or re-creates) the LoRA training state in `slot` and installs the adapter there. */
    initLora(slot: number, spec: LoraTrainSpec): void;
    /** Loss = mean over the non-ignored labels; gradients of loss·gradScale are accumulated into the slot. */
    trainForwardBackward(slot: number, batch: TrainBatchInput, opts: TrainStepOptions): { loss: number; tokens: number };
    /** No gradients, no dropout; slot -1 = the base model alone (any installed adapter slot works). */
    evalLoss(slot: number, batch: TrainBatchInput): { loss: number; tokens: number };
    /** Clip, decoupled weight decay, Adam update, zero the gradients; returns the pre-clip global norm. */
    adamwStep(slot: number, o: AdamWStepOptions): { gradNorm: number };
    zeroGrad(slot: number): void;
    /** Copies of A, B and the AdamW moments of every module. */
    getLoraState(slot: number): LoraState;
    /** Restores A, B and the moments (same modules and shapes); zeroes the gradients. */
    setLoraState(slot: number, state: LoraState): void;
  }
}


// One native trainer per model, created on first use; it lives as long as the model object.
const trainers = new WeakMap<NativeModel, unknown>();
function trainerOf(m: NativeModel): unknown {
  let t = trainers.get(m);
  if (t === undefined) {
    t = native.trainCreate(m.handle);
    trainers.set(m, t);
  }
  return t;
}

function call<T>(m: NativeModel, fn: (trainer: unknown, handle: unknown) => T): T {
  try {
    return fn(trainerOf(m), m.handle);
  } catch (e) {
    rethrowNative(e);
  }
}

const methods: Pick<
  NativeModel,
  "initLora" | "trainForwardBackward" | "evalLoss" | "adamwStep" | "zeroGrad" | "getLoraState" | "setLoraState"
> = {
  initLora(this: NativeModel, slot, spec) {
    call(this, (t, h) => native.trainInitLora(t, h, slot, { ...spec, seed: BigInt.asUintN(64, spec.seed) }));
  },
  trainForwardBackward(this: NativeModel, slot, batch, opts) {
    return call(this, (t, h) =>
      native.trainForwardBackward(t, h, slot, batch, { ...opts, dropoutSeed: BigInt.asUintN(64, opts.dropoutSeed) }),
    );
  },
  evalLoss(this: NativeModel, slot, batch) {
    return call(this, (t, h) => native.trainEvalLoss(t, h, slot, batch));
  },
  adamwStep(this: NativeModel, slot, o) {
    return call(this, (t, h) => native.trainAdamwStep(t, h, slot, o));
  },
  zeroGrad(this: NativeModel, slot) {
    call(this, (t, h) => native.trainZeroGrad(t, h, slot));
  },
  getLoraState(this: NativeModel, slot) {
    return call(this, (t, h) => native.trainGetLoraState(t, h, slot));
  },
  setLoraState(this: NativeModel, slot, state) {
    call(this, (t, h) => native.trainSetLoraState(t, h, slot, state));
  },
};
for (const [name, fn] of Object.entries(methods)) {
  Object.defineProperty(NativeModel.prototype, name, { value: fn, writable: true, configurable: true, enumerable: false });
}

// dispose() also frees the model's trainer at once: its activation workspaces and (on CUDA) device
// buffers are native memory the garbage collector does not see, so waiting for it to collect the
// trainer could hold gigabytes after the model is gone. The model goes first, so nothing still points
// at a CUDA slot's A / B when the trainer frees them.
const disposeModel = NativeModel.prototype.dispose;
Object.defineProperty(NativeModel.prototype, "dispose", {
  value: function dispose(this: NativeModel): void {
    disposeModel.call(this);
    const t = trainers.get(this);
    if (t === undefined) return;
    trainers.delete(this);
    native.trainRelease(t);
  },
  writable: true,
  configurable: true,
  enumerable: false,
});

/** The training kernels, exposed for tests and benchmarks (fresh output arrays unless noted). */
export const trainOps = {
  /** dx of y = RMSNorm(x)·w (w frozen) */
  rmsNormBackward(dy: Float32Array, x: Float32Array, w: Float32Array, rows: number, dim: number, eps: number): Float32Array {
    return native.trainOpRmsNormBackward(dy, x, w, rows, dim, eps);
  },
  /** dx of y = LayerNorm(x)·w + b (w, b frozen; w null = 1) */
  layerNormBackward(dy: Float32Array, x: Float32Array, w: Float32Array | null, rows: number, dim: number, eps: number): Float32Array {
    return native.trainOpLayerNormBackward(dy, x, w, rows, dim, eps);
  },
  /** dx of the rotate_half RoPE at positions pos (theta, no scaling) */
  ropeBackward(dy: Float32Array, T: number, nHeads: number, headDim: number, pos: Int32Array, theta: number): Float32Array {
    return native.trainOpRopeBackward(dy, T, nHeads, headDim, pos, theta);
  },
  activationBackward(kind: "silu" | "relu" | "gelu", x: Float32Array, dy: Float32Array): Float32Array {
    return native.trainOpActivationBackward(kind, x, dy);
  },
  /** y = act(gate)·up */
  gatedActivationBackward(kind: "silu" | "relu" | "gelu", gate: Float32Array, up: Float32Array, dy: Float32Array): { dgate: Float32Array; dup: Float32Array } {
    return native.trainOpGatedActivationBackward(kind, gate, up, dy);
  },
  /** Causal attention over B rows × T positions, token i = b·T+t sees row positions start[i]..t; with dout also the backward. */
  attention(
    q: Float32Array, k: Float32Array, v: Float32Array, B: number, T: number, start: Int32Array,
    nHeads: number, nKvHeads: number, headDim: number, scale: number, dout: Float32Array | null,
  ): { out: Float32Array; lse: Float32Array; dq?: Float32Array; dk?: Float32Array; dv?: Float32Array } {
    return native.trainOpAttention(q, k, v, B, T, start, nHeads, nKvHeads, headDim, scale, dout);
  },
  /** Σ_r CE(h_r·Wᵀ, labels_r) and dh (× gradScale), `chunkRows` rows of logits at a time. */
  lmHeadCrossEntropy(h: Float32Array, w: WeightTensor, labels: Int32Array, chunkRows: number, gradScale: number): { loss: number; dh: Float32Array; logitsFloats: number } {
    return native.trainOpLmHeadCrossEntropy(h, w, labels, chunkRows, gradScale);
  },
  /** The LoRA dropout mask applied to x [rows, cols] (seed, stream = module index). */
  dropout(x: Float32Array, rows: number, cols: number, p: number, seed: bigint, stream: number): Float32Array {
    return native.trainOpDropout(x, rows, cols, p, BigInt.asUintN(64, seed), stream);
  },
  /** Forward + backward of y = x·Wᵀ + b + s·drop(x)·Aᵀ·Bᵀ for the upstream gradient dy. */
  loraLinear(
    x: Float32Array, N: number, w: WeightTensor, bias: Float32Array | null,
    lora: { a: Float32Array; b: Float32Array; rank: number; scaling: number; dropout: number; seed: bigint; stream: number } | null,
    dy: Float32Array, needDx: boolean,
  ): { y: Float32Array; dx: Float32Array; ga?: Float32Array; gb?: Float32Array } {
    const l = lora ? { ...lora, seed: BigInt.asUintN(64, lora.seed) } : null;
    return native.trainOpLoraLinear(x, N, w, bias, l, dy, needDx);
  },
  /** One AdamW update in place (p, m, v updated; g zeroed); clip multiplies g first. */
  adamw(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, o: Omit<AdamWStepOptions, "maxGradNorm">, clip: number): void {
    native.trainOpAdamw(p, g, m, v, o, clip);
  },
};
