/**
 * The loading path for the other families, on tiny random-weight checkpoints: OPT (both key
 * prefixes, a stored copy of the tied lm_head) and the config → EngineConfig mapping of the
 * Llama variants (Qwen2 biases, llama3 rope scaling, unsupported settings).
 */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FailedPrecondition } from "@qlora/core";
import { f32Bytes, parseModelConfig, serializeSafetensors, type NamedTensor } from "@qlora/formats";
import { engineConfigFor, evaluate, generate, loadModel } from "../src/index.js";
import { writeTinyByteLevelTokenizer } from "./fixtures.js";

const tmp = mkdtempSync(join(tmpdir(), "qlora-opt-"));
after(() => rmSync(tmp, { recursive: true, force: true }));

function randomArray(n: number, seed: number, scale: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = (s / 2 ** 32 - 0.5) * 2 * scale;
  }
  return a;
}

const H = 16;
const F = 32;
const LAYERS = 2;
const VOCAB = 261; // the tiny byte-level tokenizer: </s> + 256 bytes + 4 merges
const MAXPOS = 64;

/** A random OPT-125m-shaped (but tiny) checkpoint; `prefix` "model.decoder." or "decoder.". */
function writeTinyOpt(dir: string, prefix: string, withLmHead: boolean): void {
  mkdirSync(dir, { recursive: true });
  writeTinyByteLevelTokenizer(dir);
  const config = {
    architectures: ["OPTForCausalLM"],
    model_type: "opt",
    hidden_size: H,
    ffn_dim: F,
    num_hidden_layers: LAYERS,
    num_attention_heads: 2,
    vocab_size: VOCAB,
    max_position_embeddings: MAXPOS,
    word_embed_proj_dim: H,
    do_layer_norm_before: true,
    activation_function: "relu",
    bos_token_id: 0,
    eos_token_id: 0,
    pad_token_id: 1,
    torch_dtype: "float32",
  };
  writeFileSync(join(dir, "config.json"), JSON.stringify(config));
  const tensors: NamedTensor[] = [];
  let seed = 1;
  const add = (name: string, shape: number[], scale: number, offset = 0): Float32Array => {
    const a = randomArray(shape.reduce((x, y) => x * y, 1), seed++, scale).map((v) => v + offset);
    tensors.push({ name, dtype: "F32", shape, data: f32Bytes(a) });
    return a;
  };
  const embed = add(`${prefix}embed_tokens.weight`, [VOCAB, H], 0.5);
  add(`${prefix}embed_positions.weight`, [MAXPOS + 2, H], 0.1);
  add(`${prefix}final_layer_norm.weight`, [H], 0.1, 1);
  add(`${prefix}final_layer_norm.bias`, [H], 0.1);
  for (let i = 0; i < LAYERS; i++) {
    const l = `${prefix}layers.${i}.`;
    for (const m of ["q_proj", "k_proj", "v_proj", "out_proj"]) {
      add(`${l}self_attn.${m}.weight`, [H, H], 0.3);
      add(`${l}self_attn.${m}.bias`, [H], 0.05);
    }
    add(`${l}fc1.weight`, [F, H], 0.3);
    add(`${l}fc1.bias`, [F], 0.05);
    add(`${l}fc2.weight`, [H, F], 0.3);
    add(`${l}fc2.bias`, [H], 0.05);
    for (const ln of ["self_attn_layer_norm", "final_layer_norm"]) {
      add(`${l}${ln}.weight`, [H], 0.1, 1);
      add(`${l}${ln}.bias`, [H], 0.1);
    }
  }
  if (withLmHead) tensors.push({ name: "lm_head.weight", dtype: "F32", shape: [VOCAB, H], data: f32Bytes(embed) });
  writeFileSync(join(dir, "model.safetensors"), serializeSafetensors(tensors, { format: "pt" }));
}

test("OPT: both key prefixes load to the same model; the tied lm_head copy is not read", async () => {
  const a = join(tmp, "opt-model-decoder");
  const b = join(tmp, "opt-decoder");
  writeTinyOpt(a, "model.decoder.", true);
  writeTinyOpt(b, "decoder.", false);
  const ma = await loadModel(a, { quant: "none", maxSequences: 1 });
  const mb = await loadModel(b, { quant: "none", maxSequences: 1 });
  try {
    assert.equal(ma.engineConfig.arch, "opt");
    assert.equal(ma.engineConfig.tiedEmbeddings, true);
    assert.equal(ma.engineConfig.qkvBias && ma.engineConfig.oBias && ma.engineConfig.mlpBias, true);
    assert.equal(ma.stats.weightBytes, mb.stats.weightBytes, "lm_head copy skipped");
    const ra = await generate(ma, { prompt: "the cat", maxNewTokens: 8, temperature: 0 });
    const rb = await generate(mb, { prompt: "the cat", maxNewTokens: 8, temperature: 0 });
    assert.equal(ra.promptIds[0], 0, "OPT prompts start with </s>");
    assert.deepEqual(ra.tokenIds, rb.tokenIds);
    const ea = await evaluate(ma, ["the cat sat on the mat"]);
    const eb = await evaluate(mb, ["the cat sat on the mat"]);
    assert.ok(Number.isFinite(ea.loss) && ea.loss > 0);
    assert.equal(ea.loss, eb.loss);
  } finally {
    ma.dispose();
    mb.dispose();
  }
  const q = await loadModel(a, { maxSequences: 1 });
  try {
    assert.equal(q.stats.nf4Tensors, LAYERS * 6);
    const e = await evaluate(q, ["the cat sat on the mat"]);
    assert.ok(Number.isFinite(e.loss));
  } finally {
    q.dispose();
  }
});

const llamaBase = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 100,
  max_position_embeddings: 256,
  rms_norm_eps: 1e-5,
};

test("config → EngineConfig: llama3 rope scaling, Qwen2 biases, head_dim", () => {
  const l3 = engineConfigFor(
    parseModelConfig({
      ...llamaBase,
      head_dim: 32,
      rope_theta: 500000,
      tie_word_embeddings: true,
      rope_scaling: { rope_type: "llama3", factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
    }),
  );
  assert.deepEqual(l3.ropeScaling, { type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 });
  assert.equal(l3.headDim, 32);
  assert.equal(l3.ropeTheta, 500000);
  assert.equal(l3.numKvHeads, 2);
  assert.equal(l3.tiedEmbeddings, true);
  assert.equal(l3.hiddenAct, "silu");
  const qwen = engineConfigFor(parseModelConfig({ ...llamaBase, architectures: ["Qwen2ForCausalLM"], model_type: "qwen2" }));
  assert.deepEqual([qwen.qkvBias, qwen.oBias, qwen.mlpBias], [true, false, false]);
  assert.equal(qwen.headDim, 16);
});

test("config → EngineConfig: unsupported variants are FailedPrecondition", () => {
  assert.throws(() => engineConfigFor(parseModelConfig({ ...llamaBase, hidden_act: "gelu_pytorch_tanh" })), FailedPrecondition);
  assert.throws(
    () => engineConfigFor(parseModelConfig({ ...llamaBase, rope_scaling: { type: "linear", factor: 2 } })),
    (e: unknown) => e instanceof FailedPrecondition && /rope_scaling/.test(e.message),
  );
});
