/**
 * Hugging Face config.json → a validated, typed ModelConfig for the two families the engine runs:
 * the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM — LlamaForCausalLM & co.) and OPT.
 * Defaults are the transformers config classes' defaults (../../shared/docs/formats.md §6).
 */
import { InvalidArgument } from "@qlora/core";
import { parseBnbQuantizationConfig, type BnbQuantizationInfo } from "./bnb4bit.js";

export type ModelFamily = "llama" | "opt";

/** model_type values we accept, with the family they run as. */
export const SUPPORTED_MODEL_TYPES: Record<string, ModelFamily> = {
  llama: "llama",
  mistral: "llama",
  qwen2: "llama",
  opt: "opt",
};

export const SUPPORTED_ARCHITECTURES: Record<string, string> = {
  LlamaForCausalLM: "llama",
  MistralForCausalLM: "mistral",
  Qwen2ForCausalLM: "qwen2",
  OPTForCausalLM: "opt",
};

export type RopeScaling =
  | {
      ropeType: "llama3";
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    }
  | { ropeType: "linear"; factor: number };

/** Which linear layers carry a bias. */
export interface LinearBiases {
  q: boolean;
  k: boolean;
  v: boolean;
  /** o_proj (Llama) / out_proj (OPT). */
  o: boolean;
  /** gate/up/down (Llama) / fc1, fc2 (OPT). */
  mlp: boolean;
}

export interface ModelConfig {
  family: ModelFamily;
  /** config.model_type, e.g. "llama", "qwen2", "opt". */
  modelType: string;
  /** config.architectures[0], e.g. "LlamaForCausalLM". */
  architecture: string;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  /** intermediate_size (Llama) / ffn_dim (OPT). */
  intermediateSize: number;
  vocabSize: number;
  maxPositionEmbeddings: number;
  /** rms_norm_eps (Llama) / LayerNorm eps 1e-5 (OPT). */
  normEps: number;
  /** Llama family only (OPT has learned positions); 0 for OPT. */
  ropeTheta: number;
  ropeScaling: RopeScaling | null;
  tieWordEmbeddings: boolean;
  bias: LinearBiases;
  /** hidden_act (Llama) / activation_function (OPT). */
  hiddenAct: string;
  /** OPT: pre-LN (true) or post-LN (false). Always true for the Llama family. */
  doLayerNormBefore: boolean;
  /** OPT: whether LayerNorms have weight and bias. */
  layerNormElementwiseAffine: boolean;
  /** OPT: whether the decoder has a final LayerNorm (do_layer_norm_before && !_remove_final_layer_norm). */
  finalLayerNorm: boolean;
  bosTokenId: number | null;
  eosTokenId: number | number[] | null;
  padTokenId: number | null;
  /** config.torch_dtype (or transformers 5's "dtype"), e.g. "float32"; null when absent. */
  torchDtype: string | null;
  /** Set when the checkpoint is pre-quantized (config.quantization_config, bitsandbytes 4-bit). */
  quantization: BnbQuantizationInfo | null;
  /** The parsed config.json as read. */
  raw: Record<string, unknown>;
}

function fail(what: string, msg: string): never {
  throw new InvalidArgument(`${what}: ${msg}`);
}

/** Parses and validates a config.json object. `what` names the file in errors. */
export function parseModelConfig(raw: unknown, what = "config.json"): ModelConfig {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) fail(what, "not a JSON object");
  const c = raw as Record<string, unknown>;
  const modelType = c.model_type;
  if (typeof modelType !== "string") fail(what, 'missing "model_type"');
  const family = SUPPORTED_MODEL_TYPES[modelType];
  if (!family) {
    fail(what, `unsupported model_type ${JSON.stringify(modelType)} (supported: ${Object.keys(SUPPORTED_MODEL_TYPES).join(", ")})`);
  }
  const archs = c.architectures;
  let architecture: string;
  if (archs === undefined || archs === null) {
    architecture = Object.keys(SUPPORTED_ARCHITECTURES).find((k) => SUPPORTED_ARCHITECTURES[k] === modelType)!;
  } else {
    if (!Array.isArray(archs) || archs.length === 0 || typeof archs[0] !== "string") fail(what, '"architectures" must be a non-empty list of strings');
    architecture = archs[0] as string;
    if (SUPPORTED_ARCHITECTURES[architecture] !== modelType) {
      fail(what, `unsupported architecture ${JSON.stringify(architecture)} for model_type ${JSON.stringify(modelType)} (supported: ${Object.keys(SUPPORTED_ARCHITECTURES).join(", ")})`);
    }
  }

  const int = (key: string, dflt?: number, min = 1): number => {
    const v = c[key];
    if (v === undefined || v === null) {
      if (dflt === undefined) fail(what, `missing required field "${key}"`);
      return dflt;
    }
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) fail(what, `"${key}" must be an integer >= ${min}, got ${JSON.stringify(v)}`);
    return v;
  };
  const num = (key: string, dflt: number, positive = true): number => {
    const v = c[key];
    if (v === undefined || v === null) return dflt;
    if (typeof v !== "number" || !Number.isFinite(v) || (positive && v <= 0)) fail(what, `"${key}" must be a ${positive ? "positive " : ""}number, got ${JSON.stringify(v)}`);
    return v;
  };
  const bool = (key: string, dflt: boolean): boolean => {
    const v = c[key];
    if (v === undefined || v === null) return dflt;
    if (typeof v !== "boolean") fail(what, `"${key}" must be true or false, got ${JSON.stringify(v)}`);
    return v;
  };
  const str = (key: string, dflt: string): string => {
    const v = c[key];
    if (v === undefined || v === null) return dflt;
    if (typeof v !== "string") fail(what, `"${key}" must be a string`);
    return v;
  };
  const tokenId = (key: string): number | null => {
    const v = c[key];
    if (v === undefined || v === null) return null;
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) fail(what, `"${key}" must be a non-negative integer or null`);
    return v;
  };
  let eosTokenId: number | number[] | null = null;
  if (Array.isArray(c.eos_token_id)) {
    if (!c.eos_token_id.every((x) => Number.isSafeInteger(x) && (x as number) >= 0)) fail(what, '"eos_token_id" must be integers');
    eosTokenId = (c.eos_token_id as number[]).slice();
  } else eosTokenId = tokenId("eos_token_id");

  const hiddenSize = int("hidden_size");
  const numLayers = int("num_hidden_layers");
  const numHeads = int("num_attention_heads");
  const vocabSize = int("vocab_size");
  const torchDtypeRaw = c.torch_dtype ?? c.dtype;
  const torchDtype = typeof torchDtypeRaw === "string" ? torchDtypeRaw : null;
  let quantization: BnbQuantizationInfo | null = null;
  if (c.quantization_config !== undefined && c.quantization_config !== null) {
    quantization = parseBnbQuantizationConfig(c.quantization_config, `${what}: quantization_config`);
  }
  const common = {
    modelType,
    architecture,
    hiddenSize,
    numLayers,
    numHeads,
    vocabSize,
    bosTokenId: tokenId("bos_token_id"),
    eosTokenId,
    padTokenId: tokenId("pad_token_id"),
    torchDtype,
    quantization,
    raw: c,
  };

  if (family === "opt") {
    const wep = c.word_embed_proj_dim;
    if (wep !== undefined && wep !== null && wep !== hiddenSize) {
      fail(what, `word_embed_proj_dim ${JSON.stringify(wep)} != hidden_size ${hiddenSize}: OPT models with project_in/project_out (e.g. opt-350m) are not supported`);
    }
    if (hiddenSize % numHeads !== 0) fail(what, `hidden_size ${hiddenSize} is not divisible by num_attention_heads ${numHeads}`);
    const enableBias = bool("enable_bias", true);
    const doLayerNormBefore = bool("do_layer_norm_before", true);
    return {
      ...common,
      family,
      numKvHeads: numHeads,
      headDim: hiddenSize / numHeads,
      intermediateSize: int("ffn_dim"),
      maxPositionEmbeddings: int("max_position_embeddings", 2048),
      normEps: 1e-5,
      ropeTheta: 0,
      ropeScaling: null,
      // OPTConfig inherits PretrainedConfig's default tie_word_embeddings=True.
      tieWordEmbeddings: bool("tie_word_embeddings", true),
      bias: { q: enableBias, k: enableBias, v: enableBias, o: enableBias, mlp: enableBias },
      hiddenAct: str("activation_function", "relu"),
      doLayerNormBefore,
      layerNormElementwiseAffine: bool("layer_norm_elementwise_affine", true),
      finalLayerNorm: doLayerNormBefore && !bool("_remove_final_layer_norm", false),
    };
  }

  // Llama family.
  const numKvHeads = int("num_key_value_heads", modelType === "mistral" ? 8 : numHeads);
  if (numHeads % numKvHeads !== 0) fail(what, `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`);
  let headDim: number;
  if (c.head_dim === undefined || c.head_dim === null) {
    if (hiddenSize % numHeads !== 0) fail(what, `hidden_size ${hiddenSize} is not divisible by num_attention_heads ${numHeads} and head_dim is not given`);
    headDim = hiddenSize / numHeads;
  } else headDim = int("head_dim");
  if (headDim % 2 !== 0) fail(what, `head_dim ${headDim} must be even for rotary embeddings`);
  // transformers 5 may carry rope settings in "rope_parameters" instead of rope_theta/rope_scaling.
  const rp = c.rope_parameters;
  let ropeTheta: number;
  let ropeScalingRaw: unknown;
  if (rp !== undefined && rp !== null && typeof rp === "object" && !Array.isArray(rp)) {
    const r = rp as Record<string, unknown>;
    ropeTheta = typeof r.rope_theta === "number" ? r.rope_theta : num("rope_theta", 10000);
    ropeScalingRaw = r.rope_type === undefined || r.rope_type === "default" ? null : r;
  } else {
    ropeTheta = num("rope_theta", 10000);
    ropeScalingRaw = c.rope_scaling;
  }
  const ropeScaling = parseRopeScaling(ropeScalingRaw, what);
  const attentionBias = bool("attention_bias", false);
  const mlpBias = bool("mlp_bias", false);
  const bias: LinearBiases =
    modelType === "qwen2"
      ? { q: true, k: true, v: true, o: false, mlp: false }
      : { q: attentionBias, k: attentionBias, v: attentionBias, o: attentionBias, mlp: mlpBias };
  const defaultMaxPos = modelType === "mistral" ? 4096 * 32 : modelType === "qwen2" ? 32768 : 2048;
  return {
    ...common,
    family,
    numKvHeads,
    headDim,
    intermediateSize: int("intermediate_size"),
    maxPositionEmbeddings: int("max_position_embeddings", defaultMaxPos),
    normEps: num("rms_norm_eps", 1e-6),
    ropeTheta,
    ropeScaling,
    tieWordEmbeddings: bool("tie_word_embeddings", false),
    bias,
    hiddenAct: str("hidden_act", "silu"),
    doLayerNormBefore: true,
    layerNormElementwiseAffine: true,
    finalLayerNorm: true,
  };
}

function parseRopeScaling(v: unknown, what: string): RopeScaling | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== "object" || Array.isArray(v)) fail(what, "rope_scaling must be an object or null");
  const r = v as Record<string, unknown>;
  const type = r.rope_type ?? r.type;
  const need = (k: string): number => {
    const x = r[k];
    if (typeof x !== "number" || !Number.isFinite(x) || x <= 0) fail(what, `rope_scaling.${k} must be a positive number, got ${JSON.stringify(x)}`);
    return x;
  };
  if (type === "default") return null;
  if (type === "llama3") {
    const s: RopeScaling = {
      ropeType: "llama3",
      factor: need("factor"),
      lowFreqFactor: need("low_freq_factor"),
      highFreqFactor: need("high_freq_factor"),
      originalMaxPositionEmbeddings: need("original_max_position_embeddings"),
    };
    if (!(s.highFreqFactor > s.lowFreqFactor)) fail(what, "rope_scaling.high_freq_factor must be greater than low_freq_factor");
    return s;
  }
  if (type === "linear") return { ropeType: "linear", factor: need("factor") };
  return fail(what, `unsupported rope_scaling type ${JSON.stringify(type)} (supported: llama3, linear)`);
}
