/**
 * Hugging Face tensor keys ↔ the engine's canonical names (docs/architecture.md "Canonical weight names").
 *
 * Llama family: `model.embed_tokens.weight` → `embed_tokens`, `model.norm.weight` → `norm.weight`,
 * `lm_head.weight` → `lm_head`, `model.layers.{i}.<suffix>` → `layers.{i}.<suffix>`.
 * OPT (prefix `model.decoder.` or `decoder.`): `embed_tokens`, `embed_positions`,
 * `final_layer_norm.{weight,bias}` → `norm.{weight,bias}`, `layers.{i}.<suffix>`.
 * Suffixes inside a layer are kept verbatim (so LoRA targets match PEFT's module names, and bnb's
 * `.weight.absmax` & co. map along with their weight).
 */
import { InvalidArgument } from "@qlora/core";
import type { ModelConfig, ModelFamily } from "./config.js";
import { numel } from "./dtype.js";

/** The key prefix of the decoder in a checkpoint. */
export type KeyPrefix = "model." | "model.decoder." | "decoder.";

/** The linear modules inside one decoder layer (the ones the quantizer turns into NF4). */
export const LINEAR_MODULES: Record<ModelFamily, readonly string[]> = {
  llama: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
  opt: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
};

const LAYER_RE = /^layers\.(\d+)\.(.+)$/;

/** Detects the decoder prefix from a checkpoint's keys (OPT comes with either of two). */
export function detectKeyPrefix(family: ModelFamily, keys: Iterable<string>): KeyPrefix {
  if (family === "llama") return "model.";
  let model = false;
  let bare = false;
  for (const k of keys) {
    if (k.startsWith("model.decoder.")) model = true;
    else if (k.startsWith("decoder.")) bare = true;
  }
  if (model && bare) throw new InvalidArgument("checkpoint mixes the OPT key prefixes model.decoder.* and decoder.*");
  if (!model && !bare) throw new InvalidArgument("OPT checkpoint has neither model.decoder.* nor decoder.* keys");
  return model ? "model.decoder." : "decoder.";
}

/** HF key → canonical name, or null for keys outside the known layout (kept verbatim by tools). */
export function hfToCanonical(key: string, family: ModelFamily, prefix: KeyPrefix): string | null {
  if (key === "lm_head.weight") return "lm_head";
  if (key.startsWith("lm_head.weight.")) return "lm_head" + key.slice("lm_head.weight".length);
  if (!key.startsWith(prefix)) return null;
  const rest = key.slice(prefix.length);
  const globals: Record<string, string> =
    family === "llama"
      ? { "embed_tokens.weight": "embed_tokens", "norm.weight": "norm.weight" }
      : {
          "embed_tokens.weight": "embed_tokens",
          "embed_positions.weight": "embed_positions",
          "final_layer_norm.weight": "norm.weight",
          "final_layer_norm.bias": "norm.bias",
        };
  if (globals[rest] !== undefined) return globals[rest]!;
  if (LAYER_RE.test(rest)) return rest;
  return null;
}

/** Canonical name → HF key (inverse of hfToCanonical). */
export function canonicalToHf(name: string, family: ModelFamily, prefix: KeyPrefix): string {
  if (name === "lm_head") return "lm_head.weight";
  if (name.startsWith("lm_head.")) return "lm_head.weight" + name.slice("lm_head".length);
  const globals: Record<string, string> =
    family === "llama"
      ? { embed_tokens: "embed_tokens.weight", "norm.weight": "norm.weight" }
      : {
          embed_tokens: "embed_tokens.weight",
          embed_positions: "embed_positions.weight",
          "norm.weight": "final_layer_norm.weight",
          "norm.bias": "final_layer_norm.bias",
        };
  if (globals[name] !== undefined) return prefix + globals[name];
  if (LAYER_RE.test(name)) return prefix + name;
  throw new InvalidArgument(`not a canonical weight name: ${JSON.stringify(name)}`);
}

/**
 * The module path PEFT uses for a canonical module (`layers.0.self_attn.q_proj`): the module tree of
 * the *model class* (OPTForCausalLM always nests `model.decoder`, whatever prefix its file used).
 */
export function canonicalToModulePath(module: string, family: ModelFamily): string {
  if (!LAYER_RE.test(module)) throw new InvalidArgument(`not a layer module: ${JSON.stringify(module)}`);
  return (family === "llama" ? "model." : "model.decoder.") + module;
}

/** Module path (`model.layers.0.self_attn.q_proj`, `model.decoder.layers.0.fc1`, `decoder.…`) → canonical. */
export function modulePathToCanonical(path: string): string | null {
  for (const p of ["model.decoder.", "model.", "decoder."]) {
    if (path.startsWith(p) && LAYER_RE.test(path.slice(p.length))) return path.slice(p.length);
  }
  return null;
}

export interface ExpectedTensor {
  shape: number[];
  /** False for tensors a valid checkpoint may omit (a tied lm_head). */
  required: boolean;
}

/** Every weight the engine needs for `cfg`, by canonical name, with its shape. */
export function expectedWeights(cfg: ModelConfig): Map<string, ExpectedTensor> {
  const m = new Map<string, ExpectedTensor>();
  const H = cfg.hiddenSize;
  const add = (name: string, shape: number[], required = true) => m.set(name, { shape, required });
  add("embed_tokens", [cfg.vocabSize, H]);
  add("lm_head", [cfg.vocabSize, H], !cfg.tieWordEmbeddings);
  if (cfg.family === "llama") {
    add("norm.weight", [H]);
    const q = cfg.numHeads * cfg.headDim;
    const kv = cfg.numKvHeads * cfg.headDim;
    const I = cfg.intermediateSize;
    for (let i = 0; i < cfg.numLayers; i++) {
      const l = `layers.${i}.`;
      const lin: [string, number, number, boolean][] = [
        ["self_attn.q_proj", q, H, cfg.bias.q],
        ["self_attn.k_proj", kv, H, cfg.bias.k],
        ["self_attn.v_proj", kv, H, cfg.bias.v],
        ["self_attn.o_proj", H, q, cfg.bias.o],
        ["mlp.gate_proj", I, H, cfg.bias.mlp],
        ["mlp.up_proj", I, H, cfg.bias.mlp],
        ["mlp.down_proj", H, I, cfg.bias.mlp],
      ];
      for (const [mod, out, inp, bias] of lin) {
        add(`${l}${mod}.weight`, [out, inp]);
        if (bias) add(`${l}${mod}.bias`, [out]);
      }
      add(`${l}input_layernorm.weight`, [H]);
      add(`${l}post_attention_layernorm.weight`, [H]);
    }
    return m;
  }
  const F = cfg.intermediateSize;
  add("embed_positions", [cfg.maxPositionEmbeddings + 2, H]);
  if (cfg.finalLayerNorm && cfg.layerNormElementwiseAffine) {
    add("norm.weight", [H]);
    add("norm.bias", [H]);
  }
  for (let i = 0; i < cfg.numLayers; i++) {
    const l = `layers.${i}.`;
    const lin: [string, number, number][] = [
      ["self_attn.q_proj", H, H],
      ["self_attn.k_proj", H, H],
      ["self_attn.v_proj", H, H],
      ["self_attn.out_proj", H, H],
      ["fc1", F, H],
      ["fc2", H, F],
    ];
    for (const [mod, out, inp] of lin) {
      add(`${l}${mod}.weight`, [out, inp]);
      if (cfg.bias.q) add(`${l}${mod}.bias`, [out]);
    }
    if (cfg.layerNormElementwiseAffine) {
      for (const ln of ["self_attn_layer_norm", "final_layer_norm"]) {
        add(`${l}${ln}.weight`, [H]);
        add(`${l}${ln}.bias`, [H]);
      }
    }
  }
  return m;
}

/** Canonical names of the linear weights of the decoder layers (what NF4 quantization applies to). */
export function linearWeightNames(cfg: ModelConfig): string[] {
  const out: string[] = [];
  for (let i = 0; i < cfg.numLayers; i++) for (const mod of LINEAR_MODULES[cfg.family]) out.push(`layers.${i}.${mod}.weight`);
  return out;
}

/** Parameter count of the expected weights (a tied lm_head is counted once, in embed_tokens). */
export function parameterCount(cfg: ModelConfig): number {
  let n = 0;
  for (const [name, t] of expectedWeights(cfg)) if (t.required || name !== "lm_head") n += numel(t.shape);
  return n;
}

/** Compares names with embedded integers numerically ("layers.2" < "layers.10"), for stable output order. */
export function naturalCompare(a: string, b: string): number {
  const ra = a.split(/(\d+)/);
  const rb = b.split(/(\d+)/);
  for (let i = 0; i < Math.min(ra.length, rb.length); i++) {
    const x = ra[i]!;
    const y = rb[i]!;
    if (x === y) continue;
    if (i % 2 === 1) {
      const d = Number(x) - Number(y);
      if (d !== 0) return d;
    }
    return x < y ? -1 : 1;
  }
  return ra.length - rb.length;
}
