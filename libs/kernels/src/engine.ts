/**
 * The native model (csrc/model, csrc/napi/engine_napi.cpp): Llama-family and OPT decoders over
 * frozen NF4 / f16 / bf16 / f32 weights referenced in place, unmerged LoRA adapters mixed per
 * batch row, a per-sequence KV cache; plus the sampling kernel. Design: docs/engine.md.
 */
import { InvalidArgument } from "@qlora/core";
import { native } from "./native.js";
import { rethrowNative } from "./native-errors.js";
import type { WeightTensor } from "./tensor.js";

export interface RopeScalingLlama3 {
  type: "llama3";
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositions: number;
}

export interface EngineConfig {
  arch: "llama" | "opt";
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  maxPositions: number;
  normEps: number;
  ropeTheta: number;
  ropeScaling?: RopeScalingLlama3 | null;
  hiddenAct: "silu" | "relu" | "gelu";
  /** lm_head = embed_tokens */
  tiedEmbeddings: boolean;
  /** Llama attention_bias → all four attention projections; Qwen2: qkv only; OPT: all true. */
  qkvBias: boolean;
  oBias: boolean;
  mlpBias: boolean;
  /** OPT: pre-LayerNorm when true (default), post-LN otherwise. */
  doLayerNormBefore?: boolean;
}

export interface EngineOptions {
  /** KV-cache slots (default 8). Each slot's cache is allocated on its first createSequence. */
  maxSequences?: number;
  /** Tokens per sequence (default min(maxPositions, 2048)). */
  maxContext?: number;
  /**
   * How NF4 linears of at most 8 rows (decode steps) multiply: "exact" (default; weights decoded to
   * their exact fp32 values) or "int8" (activations quantized to int8 per weight block, integer block
   * dot products: faster, ~1% relative error per output; `linearInt8`, docs/engine.md). Prefill and
   * longer steps always run the exact kernel.
   */
  decodeMatmul?: DecodeMatmul;
  /**
   * Where the model runs (default "cpu"). "cuda": engine::CudaModel (docs/cuda.md §6) — weights,
   * KV caches and adapters are copied to the GPU; FailedPrecondition when the addon has no CUDA or
   * no device is available (the reason from cudaInfo()). Resolve "auto" with resolveDevice() first.
   */
  device?: "cpu" | "cuda";
  /** CUDA only: replay decode steps from captured CUDA graphs (default true). */
  cudaGraphs?: boolean;
}

export type DecodeMatmul = "exact" | "int8";

export interface LoraModuleWeights {
  /** lora_A [rank, in], row-major */
  a: Float32Array;
  /** lora_B [out, rank], row-major */
  b: Float32Array;
  rank: number;
}

export interface EngineAdapter {
  /** lora_alpha / r (or / sqrt(r) with rsLoRA) */
  scaling: number;
  /** keyed by module path, e.g. "layers.0.self_attn.q_proj" (OPT: "layers.0.fc1", ...) */
  modules: Record<string, LoraModuleWeights>;
}

export interface ForwardRow {
  seq: number;
  tokens: Int32Array;
  /** adapter slot, or -1 for the base model */
  adapter: number;
}

export interface ForwardOptions {
  /** logits for every token ([total tokens, vocab], rows in the given order) instead of each row's last */
  allLogits?: boolean;
  /** write the logits here (must be large enough) instead of a fresh array; it is returned */
  out?: Float32Array;
}

export interface SamplingParams {
  /** 0 = greedy (argmax, ties → lowest id) */
  temperature: number;
  /** <= 0: off */
  topK: number;
  /** >= 1: off; nucleus after top-k, renormalised */
  topP: number;
  /** 1: off; HF semantics over `recent` ids: logit > 0 ? logit / p : logit · p */
  repetitionPenalty: number;
}

/** One batch row's sampling for NativeModel.forwardSample: sampleToken's arguments besides the logits. */
export interface RowSampling {
  params: SamplingParams;
  /** Repetition-penalty context (prompt + generated ids); null when the penalty is off. */
  recent: Int32Array | null;
  /** The sequence's RNG (seedRng), advanced in place. */
  rng: BigUint64Array;
}

let modelClass: (new (config: EngineConfig, weights: Record<string, WeightTensor>, options: EngineOptions) => any) | undefined;

export class NativeModel {
  readonly config: EngineConfig;
  readonly maxSequences: number;
  readonly maxContext: number;
  /** The device the model lives on. */
  readonly device: "cpu" | "cuda";
  readonly decodeMatmul: DecodeMatmul;
  #m: any;

  constructor(config: EngineConfig, weights: Record<string, WeightTensor>, options: EngineOptions = {}) {
    if (options.device !== undefined && options.device !== "cpu" && options.device !== "cuda") {
      throw new InvalidArgument(`device must be "cpu" or "cuda" (resolve "auto" with resolveDevice), got ${JSON.stringify(options.device)}`);
    }
    modelClass ??= native.engineModelClass();
    try {
      this.#m = new modelClass!(config, weights, options);
    } catch (e) {
      rethrowNative(e);
    }
    this.config = { ...config };
    const info = this.#m.info();
    this.maxSequences = info.maxSequences;
    this.maxContext = info.maxContext;
    this.decodeMatmul = info.decodeMatmul;
    this.device = info.device;
  }

  /** CUDA graph statistics of a "cuda" model (decode steps captured / replayed); null on the CPU. */
  cudaGraphStats(): { captured: number; launches: number } | null {
    try {
      const info = this.#m.info();
      return info.device === "cuda" ? { captured: info.graphsCaptured, launches: info.graphLaunches } : null;
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** @internal The native object (src/train.ts binds the LoRA training API to it). */
  get handle(): unknown {
    return this.#m;
  }

  /** A KV-cache slot; throws ResourceExhausted when all maxSequences are in use. */
  createSequence(): number {
    try {
      return this.#m.createSequence();
    } catch (e) {
      rethrowNative(e);
    }
  }

  dropSequence(seq: number): void {
    try {
      this.#m.dropSequence(seq);
    } catch (e) {
      rethrowNative(e);
    }
  }

  sequenceLength(seq: number): number {
    try {
      return this.#m.sequenceLength(seq);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Forgets the cached tokens from `length` on (0 <= length <= sequenceLength). */
  truncateSequence(seq: number, length: number): void {
    try {
      this.#m.truncateSequence(seq, length);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Installs (or replaces) the adapter in `slot`; its arrays are referenced, not copied. */
  setAdapter(slot: number, adapter: EngineAdapter): void {
    try {
      this.#m.setAdapter(slot, adapter);
    } catch (e) {
      rethrowNative(e);
    }
  }

  removeAdapter(slot: number): void {
    try {
      this.#m.removeAdapter(slot);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * One step for a batch: each row appends its tokens to its sequence's cache at [len, len+n).
   * Returns logits [rows, vocab] of each row's last token, or [total tokens, vocab] with allLogits.
   */
  forward(rows: ForwardRow[], options?: ForwardOptions): Float32Array {
    try {
      return this.#m.forward(rows, options?.allLogits === true, options?.out);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * One step as `forward`, then one token per row picked from its last-token logits by
   * `sampleToken` with `sampling[i]` (its rng advances in place); -1 for rows whose entry is null
   * (e.g. a prompt chunk that is not its prompt's last). The logits stay inside the engine — on a
   * "cuda" model they never leave the device: one batched sampling launch, the ids come back.
   */
  forwardSample(rows: ForwardRow[], sampling: readonly (RowSampling | null)[]): Int32Array {
    try {
      return this.#m.forwardSample(rows, sampling);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Mean next-token cross-entropy of `tokens` (BOS included), vocab-chunked, on a temporary sequence. */
  crossEntropy(tokens: Int32Array, adapter: number): { loss: number; tokens: number } {
    try {
      return this.#m.crossEntropy(tokens, adapter);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * Weights (as referenced), KV caches allocated so far, adapters, tables and scratch — for a "cuda"
   * model the device memory it holds.
   */
  residentBytes(): number {
    try {
      return this.#m.residentBytes();
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Frees the native state and releases the weight / adapter arrays; later calls throw. */
  dispose(): void {
    this.#m.dispose();
  }
}

/**
 * Samples the next token from logits[offset, offset+vocab). `rng` (from seedRng) is advanced in
 * place: the same seed and logits give the same tokens.
 */
export function sampleToken(
  logits: Float32Array,
  offset: number,
  vocab: number,
  params: SamplingParams,
  recent: Int32Array | null,
  rng: BigUint64Array,
): number {
  try {
    return native.engineSampleToken(logits, offset, vocab, params, recent, rng);
  } catch (e) {
    rethrowNative(e);
  }
}

/** xoshiro256** state (4 × u64) expanded from `seed` by splitmix64. */
export function seedRng(seed: bigint): BigUint64Array {
  try {
    return native.engineSeedRng(BigInt.asUintN(64, seed));
  } catch (e) {
    rethrowNative(e);
  }
}

/** The engine's building-block kernels, exposed for tests and benchmarks (fresh output arrays). */
export const engineOps = {
  rmsNorm(x: Float32Array, w: Float32Array, rows: number, dim: number, eps: number): Float32Array {
    return native.engineOpRmsNorm(x, w, rows, dim, eps);
  },
  layerNorm(x: Float32Array, w: Float32Array | null, b: Float32Array | null, rows: number, dim: number, eps: number): Float32Array {
    return native.engineOpLayerNorm(x, w, b, rows, dim, eps);
  },
  ropeInvFreq(headDim: number, theta: number, scaling: RopeScalingLlama3 | null): Float32Array {
    return native.engineOpRopeInvFreq(headDim, theta, scaling);
  },
  /** x [T, nHeads·headDim] rotated at positions pos[t] (rotate_half convention). */
  rope(x: Float32Array, T: number, nHeads: number, headDim: number, pos: Int32Array, theta: number, scaling: RopeScalingLlama3 | null): Float32Array {
    return native.engineOpRope(x, T, nHeads, headDim, pos, theta, scaling);
  },
  activation(kind: "silu" | "relu" | "gelu", x: Float32Array): Float32Array {
    return native.engineOpActivation(kind, x);
  },
  /** act(gate) · up */
  gatedActivation(kind: "silu" | "relu" | "gelu", gate: Float32Array, up: Float32Array): Float32Array {
    return native.engineOpGatedActivation(kind, gate, up);
  },
  softmax(x: Float32Array, rows: number, n: number): Float32Array {
    return native.engineOpSoftmax(x, rows, n);
  },
  /** q [T, nHeads·hd] over one cache k/v [ctx, nKvHeads·hd]; token t sees rows 0..pos[t]. */
  attention(q: Float32Array, k: Float32Array, v: Float32Array, pos: Int32Array, nHeads: number, nKvHeads: number, headDim: number, scale: number): Float32Array {
    return native.engineOpAttention(q, k, v, pos, nHeads, nKvHeads, headDim, scale);
  },
  /** rows ids of a [rows, cols] table in any weight dtype, as fp32 [T, cols] */
  embedding(table: WeightTensor, ids: Int32Array): Float32Array {
    return native.engineOpEmbedding(table, ids);
  },
};
