/**
 * Synthetic checkpoints: real architectures' layouts filled with seeded random weights. No model
 * weights can be downloaded where this project is built and tested, so tests and benchmarks generate
 * checkpoints with the shapes of real models (Llama-3.2-1B, SmolLM2, Qwen2.5, OPT-125m) instead.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { InvalidArgument } from "@qlora/core";
import { parseModelConfig } from "./config.js";
import { numel, type FloatDtype } from "./dtype.js";
import { canonicalToHf, expectedWeights, type KeyPrefix } from "./names.js";
import { ShardedSafetensorsWriter, type ShardPlanEntry } from "./sharded.js";
import { pyJsonDumps, type PyJsonValue } from "./pyjson.js";

// Scratch views for bit conversions (no allocation per value).
const scratchF = new Float32Array(1);
const scratchU = new Uint32Array(scratchF.buffer);

/** float32 → IEEE half bits, round to nearest even. */
export function f32ToF16Bits(x: number): number {
  scratchF[0] = x;
  const u = scratchU[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return sign | h;
}

/** float32 → bfloat16 bits, round to nearest even (NaN stays NaN). */
export function f32ToBf16Bits(x: number): number {
  scratchF[0] = x;
  const u = scratchU[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return (u >>> 16) | 0x40;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Encodes float32 values as little-endian F32/F16/BF16 bytes. */
export function encodeFloats(values: Float32Array, dtype: FloatDtype): Uint8Array {
  if (dtype === "F32") return new Uint8Array(values.buffer.slice(values.byteOffset, values.byteOffset + values.byteLength));
  const out = new Uint16Array(values.length);
  const conv = dtype === "F16" ? f32ToF16Bits : f32ToBf16Bits;
  for (let i = 0; i < values.length; i++) out[i] = conv(values[i]!);
  return new Uint8Array(out.buffer);
}

/** A small seeded PRNG (mulberry32) and Box-Muller normals. */
export function seededNormal(seed: number): () => number {
  let s = seed >>> 0;
  const u = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  // Box-Muller yields two normals per pair of uniforms; keep the second for the next call.
  let spare: number | null = null;
  return () => {
    if (spare !== null) {
      const s2 = spare;
      spare = null;
      return s2;
    }
    const r = Math.sqrt(-2 * Math.log(u() || 1e-12));
    const th = 2 * Math.PI * u();
    spare = r * Math.sin(th);
    return r * Math.cos(th);
  };
}

export interface SyntheticOptions {
  dtype?: FloatDtype;
  seed?: number;
  /** Weight scale (std of the normal weights); norms are 1 + small noise. */
  std?: number;
  /** OPT only: "model.decoder." (opt-125m style, with lm_head.weight) or "decoder." (opt-350m style). */
  prefix?: KeyPrefix;
  /** Write lm_head.weight even when tied (as opt-125m files do). Default: only when untied. */
  writeLmHead?: boolean;
  maxShardSize?: number;
  /** Extra files (name → content), e.g. tokenizer files. */
  files?: Record<string, string>;
  /** Return the float32 values written (default true; turn off for large checkpoints). */
  keepValues?: boolean;
}

/**
 * Writes config.json + safetensors for `config` (a config.json object) into `dir`, with every weight
 * the architecture needs, one tensor in memory at a time. Returns the float32 values written, by HF
 * key (before F16/BF16 rounding), unless keepValues is false.
 */
export async function writeSyntheticCheckpoint(
  dir: string,
  config: Record<string, PyJsonValue>,
  opts: SyntheticOptions = {},
): Promise<Map<string, Float32Array>> {
  const cfg = parseModelConfig(config);
  const dtype = opts.dtype ?? "F32";
  const prefix: KeyPrefix = cfg.family === "llama" ? "model." : (opts.prefix ?? "model.decoder.");
  if (cfg.family === "llama" && opts.prefix && opts.prefix !== "model.") throw new InvalidArgument("Llama checkpoints use the model. prefix");
  const seed = opts.seed ?? 1;
  const std = opts.std ?? 0.05;
  const values = new Map<string, Float32Array>();
  const plan: (ShardPlanEntry & { shape: number[]; norm: boolean })[] = [];
  for (const [name, exp] of expectedWeights(cfg)) {
    if (name === "lm_head" && !exp.required && !(opts.writeLmHead ?? false)) continue;
    const key = canonicalToHf(name, cfg.family, prefix);
    plan.push({ name: key, dtype, shape: exp.shape, norm: /norm/.test(name) && name.endsWith("weight") });
  }
  await mkdir(dir, { recursive: true });
  const w = await ShardedSafetensorsWriter.create(dir, plan, { maxShardSize: opts.maxShardSize ?? Number.MAX_SAFE_INTEGER });
  try {
    for (let t = 0; t < plan.length; t++) {
      const p = plan[t]!;
      // One generator per tensor, so values do not depend on which others are written.
      const normal = seededNormal((Math.imul(seed, 0x9e3779b1) + t) >>> 0);
      const v = new Float32Array(numel(p.shape));
      for (let i = 0; i < v.length; i++) v[i] = p.norm ? 1 + 0.1 * normal() : std * normal();
      await w.write(p.name, encodeFloats(v, dtype));
      if (opts.keepValues ?? true) values.set(p.name, v);
    }
    await w.finish();
  } catch (e) {
    await w.abort();
    throw e;
  }
  await writeFile(join(dir, "config.json"), pyJsonDumps(config, { indent: 2, sortKeys: true }) + "\n");
  for (const [f, text] of Object.entries(opts.files ?? {})) await writeFile(join(dir, f), text);
  return values;
}

/** config.json objects of small models with real architectures' structure (for tests). */
export const TINY_CONFIGS: Record<"llama" | "llama3" | "qwen2" | "mistral" | "opt", Record<string, PyJsonValue>> = {
  llama: {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: 48,
    intermediate_size: 72,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: 40,
    max_position_embeddings: 64,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: false,
    torch_dtype: "float32",
  },
  llama3: {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: 64,
    intermediate_size: 96,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    num_key_value_heads: 1,
    head_dim: 16,
    vocab_size: 32,
    max_position_embeddings: 1024,
    rope_theta: 500000.0,
    rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: "llama3" },
    tie_word_embeddings: true,
    bos_token_id: 1,
    eos_token_id: [2, 3],
    torch_dtype: "bfloat16",
  },
  qwen2: {
    architectures: ["Qwen2ForCausalLM"],
    model_type: "qwen2",
    hidden_size: 32,
    intermediate_size: 56,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: 50,
    max_position_embeddings: 128,
    rope_theta: 1000000.0,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
    torch_dtype: "bfloat16",
  },
  mistral: {
    architectures: ["MistralForCausalLM"],
    model_type: "mistral",
    hidden_size: 32,
    intermediate_size: 64,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: 30,
    sliding_window: 4096,
    torch_dtype: "float16",
  },
  opt: {
    architectures: ["OPTForCausalLM"],
    model_type: "opt",
    activation_function: "relu",
    hidden_size: 24,
    ffn_dim: 40,
    num_hidden_layers: 2,
    num_attention_heads: 3,
    vocab_size: 50,
    max_position_embeddings: 16,
    word_embed_proj_dim: 24,
    do_layer_norm_before: true,
    enable_bias: true,
    bos_token_id: 2,
    eos_token_id: 2,
    pad_token_id: 1,
    torch_dtype: "float16",
  },
};
