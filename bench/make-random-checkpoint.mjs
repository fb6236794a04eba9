// Random-weight Hugging Face checkpoints with real architectures' shapes, for benchmarks (no
// real weights can be downloaded here). The tensor names and shapes come from libs/formats
// (expectedWeights over the parsed config), i.e. exactly what the loader checks; values are
// uniform with std 0.02 (like the init of these models), LayerNorm/RMSNorm weights 1, biases 0.
// Weights are BF16 and written tensor by tensor (SafetensorsWriter), never all in memory.
// The tokenizer is a synthetic byte-level BPE (GPT-2 style, no merges: text encodes byte by
// byte) whose vocabulary covers every id the model can emit, so any generated id decodes.
//
//   node bench/make-random-checkpoint.mjs [preset] [outDir]     presets: opt-125m (default),
//   smollm2-135m, llama-3.2-1b. Prints the directory. Reuses it when already complete.
import { existsSync } from "node:fs";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { canonicalToHf, expectedWeights, parseModelConfig, SafetensorsWriter } from "@qlora/formats";

export const PRESETS = {
  "opt-125m": {
    architectures: ["OPTForCausalLM"],
    model_type: "opt",
    activation_function: "relu",
    do_layer_norm_before: true,
    enable_bias: true,
    ffn_dim: 3072,
    hidden_size: 768,
    max_position_embeddings: 2048,
    num_attention_heads: 12,
    num_hidden_layers: 12,
    vocab_size: 50272,
    word_embed_proj_dim: 768,
    bos_token_id: 2,
    eos_token_id: 2,
    pad_token_id: 1,
    tie_word_embeddings: true,
    torch_dtype: "bfloat16",
  },
  "smollm2-135m": {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: 576,
    intermediate_size: 1536,
    num_hidden_layers: 30,
    num_attention_heads: 9,
    num_key_value_heads: 3,
    head_dim: 64,
    vocab_size: 49152,
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-5,
    rope_theta: 100000,
    hidden_act: "silu",
    tie_word_embeddings: true,
    bos_token_id: 2,
    eos_token_id: 2,
    torch_dtype: "bfloat16",
  },
  "llama-3.2-1b": {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: 2048,
    intermediate_size: 8192,
    num_hidden_layers: 16,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 64,
    vocab_size: 128256,
    max_position_embeddings: 131072,
    rms_norm_eps: 1e-5,
    rope_theta: 500000,
    rope_scaling: { rope_type: "llama3", factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
    hidden_act: "silu",
    tie_word_embeddings: true,
    bos_token_id: 2,
    eos_token_id: 2,
    torch_dtype: "bfloat16",
  },
};

/** GPT-2's bytes_to_unicode: every byte as a printable character. */
function bytesToUnicode() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const map = new Map();
  bs.forEach((b, i) => map.set(b, String.fromCodePoint(cs[i])));
  return map;
}

/** Ids 0-3 special (OPT's <s> <pad> </s> <unk>), then 256 byte tokens, then "Ġ" + letters. */
export function syntheticTokenizer(vocabSize) {
  const specials = ["<s>", "<pad>", "</s>", "<unk>"];
  const vocab = {};
  specials.forEach((t, i) => (vocab[t] = i));
  let id = specials.length;
  for (const ch of bytesToUnicode().values()) vocab[ch] = id++;
  for (let k = 0; id < vocabSize; k++) {
    let s = "";
    let x = k;
    do {
      s = String.fromCharCode(97 + (x % 26)) + s;
      x = Math.floor(x / 26);
    } while (x > 0);
    vocab[`Ġ${s}`] = id++;
  }
  const special = (t, i) => ({ id: i, content: t, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  const tokenizer = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: specials.map(special),
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "</s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ SpecialToken: { id: "</s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { Sequence: { id: "B", type_id: 1 } }],
      special_tokens: { "</s>": { id: "</s>", ids: [2], tokens: ["</s>"] } },
    },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: "",
      end_of_word_suffix: "",
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [],
    },
  };
  const config = { bos_token: "</s>", eos_token: "</s>", pad_token: "<pad>", unk_token: "<unk>", add_bos_token: true, model_max_length: 1e30 };
  return { tokenizer, config };
}

/** xorshift128+ uniform floats in [-a, a): fast enough for 10^9 values. */
function filler(seed) {
  let s0 = BigInt.asUintN(64, 0x9e3779b97f4a7c15n ^ BigInt(seed));
  let s1 = 0xbf58476d1ce4e5b9n;
  // 32-bit state in JS numbers for speed (BigInt per value is too slow).
  let a = Number(s0 & 0xffffffffn) | 1;
  let b = Number(s1 & 0xffffffffn) | 1;
  return (out, scale) => {
    for (let i = 0; i < out.length; i++) {
      a ^= a << 13;
      a ^= a >>> 17;
      a ^= a << 5;
      b = (b + 0x6d2b79f5) | 0;
      out[i] = (((a ^ b) >>> 0) / 4294967296 - 0.5) * 2 * scale;
    }
  };
}

export async function makeRandomCheckpoint(preset = "opt-125m", outDir) {
  const raw = PRESETS[preset];
  if (!raw) throw new Error(`unknown preset ${preset} (have: ${Object.keys(PRESETS).join(", ")})`);
  const dir = outDir ?? join(process.env.QLORA_BENCH_DIR ?? join(tmpdir(), "qlora-bench"), `${preset}-random`);
  const weightsFile = join(dir, "model.safetensors");
  if (existsSync(weightsFile) && existsSync(join(dir, "tokenizer.json"))) return dir;
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const cfg = parseModelConfig(raw);
  const prefix = cfg.family === "opt" ? "model.decoder." : "model.";
  const plan = [];
  for (const [name, t] of expectedWeights(cfg)) {
    if (name === "lm_head" && !t.required) continue; // tied
    plan.push({ canonical: name, name: canonicalToHf(name, cfg.family, prefix), dtype: "BF16", shape: t.shape });
  }
  const w = await SafetensorsWriter.create(weightsFile, plan, { format: "pt" });
  const fill = filler(1234);
  const CHUNK = 1 << 22;
  const f32 = new Float32Array(CHUNK);
  const u16 = new Uint16Array(f32.buffer);
  const bf16 = new Uint16Array(CHUNK);
  try {
    for (const t of plan) {
      const n = t.shape.reduce((x, y) => x * y, 1);
      const isNormWeight = /norm\.weight$|layer_norm\.weight$/.test(t.canonical);
      const isBias = /\.bias$/.test(t.canonical);
      for (let off = 0; off < n; off += CHUNK) {
        const m = Math.min(CHUNK, n - off);
        const v = f32.subarray(0, m);
        if (isNormWeight) v.fill(1);
        else if (isBias) v.fill(0);
        else fill(v, 0.02 * Math.sqrt(3)); // uniform with std 0.02
        // bf16 = the high half of the float32 (little-endian: odd uint16s).
        for (let i = 0; i < m; i++) bf16[i] = u16[2 * i + 1];
        await w.writeChunk(t.name, new Uint8Array(bf16.buffer, 0, m * 2));
      }
    }
    await w.finish();
  } catch (e) {
    await w.abort();
    throw e;
  }
  const { tokenizer, config } = syntheticTokenizer(cfg.vocabSize);
  await writeFile(join(dir, "tokenizer.json"), JSON.stringify(tokenizer));
  await writeFile(join(dir, "tokenizer_config.json"), JSON.stringify(config, null, 2));
  await writeFile(join(dir, "config.json"), JSON.stringify({ ...raw, _name_or_path: `${preset}-random` }, null, 2));
  return dir;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const t0 = Date.now();
  const dir = await makeRandomCheckpoint(process.argv[2] ?? "opt-125m", process.argv[3]);
  console.error(`checkpoint ready in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  console.log(dir);
}
