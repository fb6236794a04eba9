/**
 * The CUDA kernel layer (csrc/cuda, docs/cuda.md): what the addon was built with, which device a
 * job runs on (`resolveDevice`), and the kernels on host arrays for tests and benchmarks
 * (`cudaOps`: upload, one kernel, download — compared with the CPU kernels in the tests).
 */
import { FailedPrecondition } from "@qlora/core";
import { native } from "./native.js";
import type { SamplingParams } from "./engine.js";
import type { WeightTensor } from "./tensor.js";
import type { AdamWStepOptions } from "./train.js";

export type Device = "cpu" | "cuda";
export type DeviceRequest = "auto" | Device;

export interface CudaDevice {
  name: string;
  totalMemory: number;
  /** e.g. "9.0" */
  computeCapability: string;
  multiprocessors: number;
}

export interface CudaInfo {
  /** The addon was built with nvcc (QLORA_WITH_CUDA). */
  compiled: boolean;
  /** A device of compute capability >= 8.0 can be used now. */
  available: boolean;
  /** Why not (the CUDA error text), "" when available. */
  reason: string;
  runtimeVersion: number;
  /** 0 when no driver is installed. */
  driverVersion: number;
  devices: CudaDevice[];
}

export function cudaInfo(): CudaInfo {
  return native.cudaInfo();
}

/**
 * "auto" → cuda when a device is available, else cpu; "cuda" → cuda, or FailedPrecondition naming the
 * reason; "cpu" → cpu. `info` defaults to this process's cudaInfo().
 */
export function resolveDevice(request: DeviceRequest, info: CudaInfo = cudaInfo()): Device {
  switch (request) {
    case "cpu":
      return "cpu";
    case "auto":
      return info.available ? "cuda" : "cpu";
    case "cuda":
      if (!info.available) throw new FailedPrecondition(`device "cuda" was requested but CUDA is not available: ${info.reason}`);
      return "cuda";
    default:
      throw new FailedPrecondition(`device must be auto, cpu or cuda, got ${String(request)}`);
  }
}

function requireCuda(): void {
  const i = cudaInfo();
  if (!i.available) throw new FailedPrecondition(`no CUDA device: ${i.reason}`);
}

/** Runs `fn` on the addon after checking that a device is available. */
function call<T>(fn: () => T): T {
  requireCuda();
  return fn();
}

export type ActivationKind = "silu" | "relu" | "gelu";

/**
 * Each CUDA kernel on host arrays (fresh outputs). Argument conventions follow the CPU wrappers
 * they are compared with (linear, gemm, engineOps, trainOps, sampleToken).
 */
export const cudaOps = {
  nf4Dequantize(packed: Uint8Array, absmax: Float32Array, n: number, blocksize: number): Float32Array {
    return call(() => native.cudaTestNf4Dequantize(packed, absmax, n, blocksize, false));
  },
  nf4DequantizeBf16(packed: Uint8Array, absmax: Float32Array, n: number, blocksize: number): Uint16Array {
    return call(() => native.cudaTestNf4Dequantize(packed, absmax, n, blocksize, true));
  },
  /** y = x·Wᵀ (+ bias); with yInit: yInit + x·Wᵀ (+ bias). M <= 8: GEMV (fp32); M > 8: bf16 tensor cores. */
  linear(x: Float32Array, M: number, w: WeightTensor, bias: Float32Array | null = null, yInit: Float32Array | null = null): Float32Array {
    return call(() => native.cudaTestLinear(x, M, w, bias, yInit));
  },
  /** linear for 1..3 weights sharing x; fused: computed by one launch (q/k/v, gate/up at M <= 8, NF4). */
  linearMany(x: Float32Array, M: number, ws: WeightTensor[], biases: (Float32Array | null)[]): { ys: Float32Array[]; fused: boolean } {
    return call(() => native.cudaTestLinearMany(x, M, ws, biases));
  },
  /** act(x·Gᵀ + b_g)·(x·Uᵀ + b_u); fused: one launch (NF4 at M <= 8). */
  gatedLinear(x: Float32Array, M: number, gate: WeightTensor, up: WeightTensor, gateBias: Float32Array | null,
    upBias: Float32Array | null, act: ActivationKind): { y: Float32Array; fused: boolean } {
    return call(() => native.cudaTestGatedLinear(x, M, gate, up, gateBias, upBias, act));
  },
  /** dx = dy·W (bf16 tensor cores); with dxInit: dxInit + dy·W. */
  linearBackwardInput(dy: Float32Array, M: number, w: WeightTensor, dxInit: Float32Array | null = null): Float32Array {
    return call(() => native.cudaTestLinearBackwardInput(dy, M, w, dxInit));
  },
  /** fp32 GEMM, qk::gemmF32 semantics; returns the updated copy of C ([M, ldc]). */
  gemm(transA: boolean, transB: boolean, M: number, N: number, K: number, alpha: number, A: Float32Array, lda: number,
    B: Float32Array, ldb: number, beta: number, C: Float32Array, ldc: number): Float32Array {
    return call(() => native.cudaTestGemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc));
  },
  /** Same arguments and results as trainOps.loraLinear. */
  loraLinear(
    x: Float32Array, N: number, w: WeightTensor, bias: Float32Array | null,
    lora: { a: Float32Array; b: Float32Array; rank: number; scaling: number; dropout: number; seed: bigint; stream: number } | null,
    dy: Float32Array, needDx: boolean,
  ): { y: Float32Array; dx: Float32Array; ga?: Float32Array; gb?: Float32Array } {
    const l = lora ? { ...lora, seed: BigInt.asUintN(64, lora.seed) } : null;
    return call(() => native.cudaTestLoraLinear(x, N, w, bias, l, dy, needDx));
  },
  /** Forward y and backward dx (for the upstream dy) of RMSNorm (w required) or LayerNorm. */
  norm(kind: "rms" | "layer", x: Float32Array, w: Float32Array | null, b: Float32Array | null, rows: number, dim: number,
    eps: number, dy: Float32Array): { y: Float32Array; dx: Float32Array } {
    return call(() => native.cudaTestNorm(kind, x, w, b, rows, dim, eps, dy));
  },
  /** RoPE (backward: the inverse rotation) with the CPU path's cos/sin tables. */
  rope(x: Float32Array, T: number, nHeads: number, headDim: number, pos: Int32Array, theta: number,
    scaling: { factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositions: number } | null,
    backward: boolean): Float32Array {
    return call(() => native.cudaTestRope(x, T, nHeads, headDim, pos, theta, scaling, backward));
  },
  activation(kind: ActivationKind, x: Float32Array, dy: Float32Array): { y: Float32Array; dx: Float32Array } {
    return call(() => native.cudaTestActivation(kind, x, dy));
  },
  gatedActivation(kind: ActivationKind, gate: Float32Array, up: Float32Array, dy: Float32Array): { y: Float32Array; dgate: Float32Array; dup: Float32Array } {
    return call(() => native.cudaTestGatedActivation(kind, gate, up, dy));
  },
  /**
   * Inference attention over KV caches: token t reads rows offsetRows[t].. (default 0) up to pos[t]. kernel "flash":
   * the engine's prefill plan (runs of > 8 tokens of one cache at consecutive positions on the flash kernel, TF32).
   */
  attention(q: Float32Array, k: Float32Array, v: Float32Array, pos: Int32Array, nHeads: number, nKvHeads: number,
    headDim: number, scale: number, offsetRows: Int32Array | null = null, kernel: "simt" | "flash" = "simt"): Float32Array {
    return call(() => native.cudaTestAttention(q, k, v, pos, nHeads, nKvHeads, headDim, scale, offsetRows, kernel));
  },
  /**
   * Same arguments and results as trainOps.attention. kernel: "flash" (tensor cores, TF32 operands; headDim 32/64/128),
   * "simt" (fp32) or "auto" (flash where it applies, what training uses).
   */
  attentionTrain(q: Float32Array, k: Float32Array, v: Float32Array, B: number, T: number, start: Int32Array, nHeads: number,
    nKvHeads: number, headDim: number, scale: number, dout: Float32Array | null, kernel: "auto" | "simt" | "flash" = "auto",
  ): { out: Float32Array; lse: Float32Array; dq?: Float32Array; dk?: Float32Array; dv?: Float32Array } {
    return call(() => native.cudaTestAttentionTrain(q, k, v, B, T, start, nHeads, nKvHeads, headDim, scale, dout, kernel));
  },
  softmaxCrossEntropy(logits: Float32Array, rows: number, V: number, labels: Int32Array, gradScale: number): { loss: Float64Array; dlogits: Float32Array } {
    return call(() => native.cudaTestSoftmaxCrossEntropy(logits, rows, V, labels, gradScale));
  },
  /** Same arguments as trainOps.lmHeadCrossEntropy. */
  lmHeadCrossEntropy(h: Float32Array, w: WeightTensor, labels: Int32Array, chunkRows: number, gradScale: number): { loss: number; dh: Float32Array } {
    return call(() => native.cudaTestLmHeadCrossEntropy(h, w, labels, chunkRows, gradScale));
  },
  /** In place, as trainOps.adamw. */
  adamw(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, o: Omit<AdamWStepOptions, "maxGradNorm">, clip: number): void {
    call(() => native.cudaTestAdamw(p, g, m, v, o, clip));
  },
  sumSquares(g: Float32Array): number {
    return call(() => native.cudaTestSumSquares(g));
  },
  /** As sampleToken(logits, 0, logits.length, ...): rng (from seedRng) is advanced in place. */
  sampleToken(logits: Float32Array, params: SamplingParams, recent: Int32Array | null, rng: BigUint64Array): number {
    return call(() => native.cudaTestSample(logits, params, recent, rng));
  },
  /** Device timings for bench/cuda.bench.mjs (kinds: copy, gemv, gemm, lora, attentionDecode, attentionTrain). */
  bench(kind: string, opts: Record<string, number> = {}): Record<string, number> {
    return call(() => native.cudaBench(kind, opts));
  },
};
