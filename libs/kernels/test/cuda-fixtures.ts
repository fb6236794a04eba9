// Fixtures of the CUDA engine and trainer tests (cuda-engine.test.ts, cuda-train.test.ts): small
// random Llama / OPT models in every weight dtype (odd sizes included), the same model on both
// engines, closeness checks, and gpuTest (skips with "no CUDA device: <reason>" without a GPU).
import { test } from "node:test";
import assert from "node:assert/strict";
import { NativeModel, cudaInfo, quantizeNf4 } from "../src/index.js";
import type { EngineConfig, EngineOptions, WeightTensor } from "../src/index.js";
import { rng } from "./random.js";

// ---- random models ----------------------------------------------------------------------------
export const rand = (n: number, r: () => number, amp: number) => Float32Array.from({ length: n }, () => amp * (2 * r() - 1));
const asBytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
export type DType = "f32" | "nf4" | "bf16" | "f16";

function toHalf(x: number): number {  // round to nearest for the small normal values used here
  const f = new Float32Array([x]), b = new Uint32Array(f.buffer)[0]!;
  const sign = (b >>> 16) & 0x8000, e = ((b >>> 23) & 0xff) - 127 + 15, m = b & 0x7fffff;
  if (e <= 0) return sign;
  return sign | (e << 10) | ((m + 0x1000) >>> 13);
}
export function tensor(a: Float32Array, shape: number[], dtype: DType): WeightTensor {
  if (dtype === "f32") return { dtype, shape, data: asBytes(a) };
  if (dtype === "nf4") {
    const q = quantizeNf4(a, "f32", a.length, 64);
    return { dtype, shape, data: q.packed, absmax: q.absmax, blocksize: 64 };
  }
  const u = new Uint16Array(a.length);
  const bits = new Uint32Array(a.buffer, a.byteOffset, a.length);
  for (let i = 0; i < a.length; i++) u[i] = dtype === "bf16" ? bits[i]! >>> 16 : toHalf(a[i]!);
  return { dtype, shape, data: asBytes(u) };
}

export interface Shape {
  arch: "llama" | "opt";
  H: number; I: number; L: number; nh: number; nkv: number; hd: number; V: number;
  tied?: boolean; preLN?: boolean; bias?: boolean; maxPositions?: number;
}
export const LLAMA: Shape = { arch: "llama", H: 64, I: 96, L: 2, nh: 4, nkv: 2, hd: 16, V: 97 };
// K not a multiple of 32 anywhere (generic GEMV), hd 12, MHA, biases on q/k/v
export const LLAMA_ODD: Shape = { arch: "llama", H: 36, I: 50, L: 2, nh: 3, nkv: 3, hd: 12, V: 61, bias: true, tied: true };
export const OPT_PRE: Shape = { arch: "opt", H: 64, I: 128, L: 2, nh: 4, nkv: 4, hd: 16, V: 83, tied: true, preLN: true };
export const OPT_POST: Shape = { ...OPT_PRE, preLN: false };
// head_dim 32 and 160 positions: prefill rows take the flash attention kernel (tiles of 64 queries)
export const LLAMA_HD32: Shape = { arch: "llama", H: 96, I: 128, L: 2, nh: 3, nkv: 1, hd: 32, V: 89, maxPositions: 160 };

export function makeModel(s: Shape, dtype: DType, seed: number): { cfg: EngineConfig; weights: Record<string, WeightTensor> } {
  const r = rng(seed);
  const opt = s.arch === "opt";
  const cfg: EngineConfig = {
    arch: s.arch, hiddenSize: s.H, intermediateSize: s.I, numLayers: s.L, numHeads: s.nh, numKvHeads: s.nkv,
    headDim: s.hd, vocabSize: s.V, maxPositions: s.maxPositions ?? 64, normEps: 1e-5, ropeTheta: 10000, ropeScaling: null,
    hiddenAct: opt ? "relu" : "silu", tiedEmbeddings: s.tied ?? false, qkvBias: opt || (s.bias ?? false),
    oBias: opt, mlpBias: opt, doLayerNormBefore: s.preLN ?? true,
  };
  const w: Record<string, WeightTensor> = {};
  const lin = (name: string, out: number, inp: number, bias: boolean) => {
    w[`${name}.weight`] = tensor(rand(out * inp, r, 1 / Math.sqrt(inp)), [out, inp], dtype);
    if (bias) w[`${name}.bias`] = tensor(rand(out, r, 0.1), [out], "f32");
  };
  const norm = (name: string, bias: boolean) => {
    w[`${name}.weight`] = tensor(Float32Array.from(rand(s.H, r, 0.2), (x) => 1 + x), [s.H], "f32");
    if (bias) w[`${name}.bias`] = tensor(rand(s.H, r, 0.1), [s.H], "f32");
  };
  w.embed_tokens = tensor(rand(s.V * s.H, r, 1), [s.V, s.H], dtype === "nf4" ? "f32" : dtype);
  if (!cfg.tiedEmbeddings) w.lm_head = tensor(rand(s.V * s.H, r, 1 / Math.sqrt(s.H)), [s.V, s.H], dtype);
  if (opt) w.embed_positions = tensor(rand((cfg.maxPositions + 2) * s.H, r, 0.5), [cfg.maxPositions + 2, s.H], "f32");
  if (!opt || cfg.doLayerNormBefore) norm("norm", opt);
  const q = s.nh * s.hd, kv = s.nkv * s.hd;
  for (let l = 0; l < s.L; l++) {
    const p = `layers.${l}.`;
    lin(`${p}self_attn.q_proj`, q, s.H, cfg.qkvBias);
    lin(`${p}self_attn.k_proj`, kv, s.H, cfg.qkvBias);
    lin(`${p}self_attn.v_proj`, kv, s.H, cfg.qkvBias);
    if (opt) {
      lin(`${p}self_attn.out_proj`, s.H, q, true);
      lin(`${p}fc1`, s.I, s.H, true);
      lin(`${p}fc2`, s.H, s.I, true);
      norm(`${p}self_attn_layer_norm`, true);
      norm(`${p}final_layer_norm`, true);
    } else {
      lin(`${p}self_attn.o_proj`, s.H, q, false);
      lin(`${p}mlp.gate_proj`, s.I, s.H, false);
      lin(`${p}mlp.up_proj`, s.I, s.H, false);
      lin(`${p}mlp.down_proj`, s.H, s.I, false);
      norm(`${p}input_layernorm`, false);
      norm(`${p}post_attention_layernorm`, false);
    }
  }
  return { cfg, weights: w };
}

// ---- comparison helpers ---------------------------------------------------------------------------
export const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
};
export function assertClose(got: Float32Array, want: Float32Array, rel: number, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  const tol = rel * Math.max(1, maxAbs(want));
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i]! - want[i]!);
    if (!(d <= tol)) assert.fail(`${what}[${i}]: got ${got[i]}, want ${want[i]} (|diff| ${d} > ${tol})`);
  }
}
export const ids = (n: number, V: number, seed: number) => {
  const r = rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(r() * V));
};

/** The same model on both engines (the weights object is shared: the CPU engine references it). */
export function pair(s: Shape, dtype: DType, seed: number, options: EngineOptions = {}): { cpu: NativeModel; gpu: NativeModel } {
  const { cfg, weights } = makeModel(s, dtype, seed);
  return {
    cpu: new NativeModel(cfg, weights, { maxSequences: 4, maxContext: 48, ...options, device: "cpu" }),
    gpu: new NativeModel(cfg, weights, { maxSequences: 4, maxContext: 48, ...options, device: "cuda" }),
  };
}
/** A CUDA model made with QLORA_CUDA_FLASH=0 (read at creation): its prefill and training attention stay on SIMT. */
export function simtAttentionModel(cfg: EngineConfig, weights: Record<string, WeightTensor>, options: EngineOptions): NativeModel {
  const saved = process.env.QLORA_CUDA_FLASH;
  process.env.QLORA_CUDA_FLASH = "0";
  try {
    return new NativeModel(cfg, weights, { ...options, device: "cuda" });
  } finally {
    if (saved === undefined) delete process.env.QLORA_CUDA_FLASH;
    else process.env.QLORA_CUDA_FLASH = saved;
  }
}
export function disposeAll(...ms: NativeModel[]): void {
  for (const m of ms) m.dispose();
}

export const info = cudaInfo();
/** A test that needs a GPU: skipped with the reason when there is none (or with `skip`, when given). */
export function gpuTest(name: string, fn: () => void, skip: string | false = false): void {
  test(name, (t) => {
    if (!info.available) {
      t.skip(`no CUDA device: ${info.reason}`);
      return;
    }
    if (skip) {
      t.skip(skip);
      return;
    }
    fn();
  });
}

