/**
 * The demo's offline model: a tiny Llama-architecture checkpoint with seeded random weights and a
 * byte-level BPE tokenizer.json (Hugging Face format), both generated here. No weights can be
 * downloaded on a fresh machine without network, and a random model makes the point of the demo
 * plain: the base knows nothing (it babbles), so whatever the adapter writes, the adapter learned.
 *
 * Sizes are chosen so that quantize → train → serve takes about a minute on two CPU cores while
 * the adapter still has the capacity to memorise a few paragraphs (see docs/demo.md).
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";

/** bos/eos/pad ids of the generated tokenizer; the 256 bytes follow. */
export const SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"] as const;
export const BYTE_OFFSET = SPECIAL_TOKENS.length;
export const DEMO_VOCAB_SIZE = BYTE_OFFSET + 256;

export const DEMO_MODEL_NAME = "qlora-demo-tiny-llama";

/** config.json of the offline model (transformers' LlamaConfig fields). */
export function demoModelConfig(): Record<string, string | number | boolean | null | string[]> {
  return {
    _name_or_path: DEMO_MODEL_NAME,
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: 128,
    intermediate_size: 352,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    num_key_value_heads: 4,
    head_dim: 32,
    vocab_size: DEMO_VOCAB_SIZE,
    // Room for the whole built-in story in one training sequence (575 tokens).
    max_position_embeddings: 1024,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    hidden_act: "silu",
    attention_bias: false,
    mlp_bias: false,
    // Untied: a separate random lm_head, so the output layer is as uninformed as the rest.
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    pad_token_id: 0,
    torch_dtype: "float32",
  };
}

/**
 * GPT-2's byte → printable character map (bytes_to_unicode): byte-level BPE vocabularies store
 * each byte as one visible character, so that the JSON stays readable and whitespace survives.
 */
export function byteToUnicode(): string[] {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const map: string[] = new Array<string>(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    map[b] = printable.includes(b) ? String.fromCharCode(b) : String.fromCharCode(256 + extra++);
  }
  return map;
}

/**
 * tokenizer.json (the `tokenizers` library's format): ByteLevel pre-tokenizer and decoder, a BPE
 * model whose vocabulary is the 256 bytes and no merges, so one byte is one token and any text —
 * any UTF-8 — round-trips. The post-processor puts <s> in front, as Llama tokenizers do.
 */
export function byteLevelTokenizerJson(): object {
  const special = SPECIAL_TOKENS.map((content, id) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
  const vocab: Record<string, number> = {};
  SPECIAL_TOKENS.forEach((t, i) => (vocab[t] = i));
  byteToUnicode().forEach((ch, b) => (vocab[ch] = BYTE_OFFSET + b));
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: special,
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: "<s>", type_id: 1 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [],
    },
  };
}

export interface DemoModelInfo {
  dir: string;
  config: Record<string, unknown>;
  parameters: number;
  description: string;
}

/** Parameters of a Llama config (embeddings, layers, final norm, untied lm_head). */
export function llamaParameterCount(c: { hidden_size: number; intermediate_size: number; num_hidden_layers: number; num_attention_heads: number; num_key_value_heads: number; head_dim: number; vocab_size: number }): number {
  const h = c.hidden_size;
  const q = c.num_attention_heads * c.head_dim;
  const kv = c.num_key_value_heads * c.head_dim;
  const layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size + 2 * h;
  return 2 * c.vocab_size * h + c.num_hidden_layers * layer + h;
}

export interface DemoModelOptions {
  seed?: number;
  /** Standard deviations of the random weights, by role (experiments; the demo uses the defaults). */
  std?: Partial<WeightScales>;
  /** config.json fields to change (experiments; the demo uses the defaults). */
  config?: Record<string, number>;
}

export interface WeightScales {
  /** embed_tokens. */
  embed: number;
  /** Every linear layer inside the decoder blocks. */
  layers: number;
  /** The output layer. */
  lmHead: number;
}

/**
 * Why three scales (measured, see docs/demo.md): with the decoder layers a little larger than
 * transformers' initializer_range (0.12 instead of 0.02) the random layers mix the context into
 * rich features that a LoRA update can pick from — with 0.02 the base passes tokens through almost
 * unchanged and the adapter learns far slower. The output layer is larger still, because after the
 * final RMSNorm the largest logit margin an adapter can reach is about std·hidden: 0.15·128 ≈ 19
 * allows confident predictions, 0.02 (≈ 2.6) never would.
 */
export const DEFAULT_SCALES: WeightScales = { embed: 0.08, layers: 0.12, lmHead: 0.15 };

/** Writes the offline model (config, weights, tokenizer, generation config) into `dir`. */
export async function writeDemoModel(dir: string, opts: DemoModelOptions = {}): Promise<DemoModelInfo> {
  const { canonicalToHf, encodeFloats, expectedWeights, parseModelConfig, pyJsonDumps, seededNormal, ShardedSafetensorsWriter } = await import("@qlora/formats");
  const config = { ...demoModelConfig(), ...opts.config };
  const scales = { ...DEFAULT_SCALES, ...opts.std };
  const seed = opts.seed ?? 1234;
  const cfg = parseModelConfig(config);
  await mkdir(dir, { recursive: true });

  const plan = [...expectedWeights(cfg)]
    .filter(([, exp]) => exp.required)
    .map(([name, exp]) => ({ name, key: canonicalToHf(name, "llama", "model."), shape: exp.shape }));
  const w = await ShardedSafetensorsWriter.create(
    dir,
    plan.map((p) => ({ name: p.key, dtype: "F32" as const, shape: p.shape })),
    { maxShardSize: Number.MAX_SAFE_INTEGER },
  );
  try {
    for (let t = 0; t < plan.length; t++) {
      const p = plan[t]!;
      // One generator per tensor, so each tensor depends only on the seed and its position.
      const normal = seededNormal((Math.imul(seed, 0x9e3779b1) + t) >>> 0);
      const v = new Float32Array(p.shape.reduce((a, b) => a * b, 1));
      const isNorm = /norm/.test(p.name);
      const std = p.name === "embed_tokens" ? scales.embed : p.name === "lm_head" ? scales.lmHead : scales.layers;
      for (let i = 0; i < v.length; i++) v[i] = isNorm ? 1 : std * normal();
      await w.write(p.key, encodeFloats(v, "F32"));
    }
    await w.finish();
  } catch (e) {
    await w.abort();
    throw e;
  }
  const files: Record<string, string> = {
    "config.json": pyJsonDumps(config, { indent: 2, sortKeys: true }) + "\n",
    "tokenizer.json": JSON.stringify(byteLevelTokenizerJson()),
    "tokenizer_config.json": JSON.stringify(
      {
        tokenizer_class: "PreTrainedTokenizerFast",
        bos_token: "<s>",
        eos_token: "</s>",
        pad_token: "<pad>",
        add_bos_token: true,
        add_eos_token: false,
        clean_up_tokenization_spaces: false,
        model_max_length: config.max_position_embeddings,
      },
      null,
      2,
    ),
    "special_tokens_map.json": JSON.stringify({ bos_token: "<s>", eos_token: "</s>", pad_token: "<pad>" }, null, 2),
    "generation_config.json": JSON.stringify({ bos_token_id: 1, eos_token_id: 2, pad_token_id: 0, do_sample: false }, null, 2),
  };
  for (const [name, text] of Object.entries(files)) await writeFile(join(dir, name), text);

  const c = config as unknown as Parameters<typeof llamaParameterCount>[0];
  const parameters = llamaParameterCount(c);
  const description =
    `a tiny Llama-architecture model (${c.num_hidden_layers} layers, hidden ${c.hidden_size}, ${(parameters / 1e6).toFixed(2)}M parameters) ` +
    `with seeded random weights and a byte-level tokenizer, both generated by this project — it has never seen any text`;
  return { dir, config, parameters, description };
}

/** Writes `text` where the dataset upload reads it from (a .txt: one continuous document). */
export async function writeTextFile(dir: string, name: string, text: string): Promise<string> {
  const p = join(dir, name);
  await writeFile(p, text);
  return p;
}
