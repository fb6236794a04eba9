import { test } from "node:test";
import assert from "node:assert/strict";
import { cp, mkdir, mkdtemp, readdir, readFile, rm, unlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import {
  canonicalToHf,
  encodeFloats,
  HfCheckpoint,
  hfToCanonical,
  INDEX_FILE,
  parseModelConfig,
  parameterCount,
  SafetensorsSet,
  ShardedSafetensorsWriter,
  TINY_CONFIGS,
  toFloat32,
  writeSyntheticCheckpoint,
  type PyJsonValue,
} from "../src/index.js";

const STORIES = join(import.meta.dirname, "../../../../../shared/models/stories260K");

async function tmp(): Promise<string> {
  return mkdtemp(join(tmpdir(), "qlora-ck-"));
}

test("stories260K: config, tensors, canonical names", async () => {
  const ck = await HfCheckpoint.open(STORIES);
  try {
    const c = ck.config;
    assert.equal(c.family, "llama");
    assert.equal(c.architecture, "LlamaForCausalLM");
    assert.deepEqual(
      [c.hiddenSize, c.numLayers, c.numHeads, c.numKvHeads, c.headDim, c.intermediateSize, c.vocabSize, c.maxPositionEmbeddings],
      [64, 5, 8, 4, 8, 172, 512, 512],
    );
    assert.equal(c.normEps, 1e-5);
    assert.equal(c.ropeTheta, 10000);
    assert.equal(c.ropeScaling, null);
    assert.equal(c.tieWordEmbeddings, true);
    assert.deepEqual(c.bias, { q: false, k: false, v: false, o: false, mlp: false });
    assert.equal(c.bosTokenId, 1);
    assert.equal(c.eosTokenId, 2);
    assert.equal(c.padTokenId, null);
    assert.equal(c.torchDtype, "float32");
    assert.equal(c.quantization, null);
    assert.equal(ck.prequantized, false);
    assert.equal(ck.tensors.size, 2 + 5 * 9);
    assert.equal(ck.has("lm_head"), false);
    assert.equal(ck.canonicalName("model.layers.3.mlp.down_proj.weight"), "layers.3.mlp.down_proj.weight");
    assert.equal(ck.canonicalName("model.embed_tokens.weight"), "embed_tokens");
    assert.equal(ck.canonicalName("model.norm.weight"), "norm.weight");
    assert.equal(ck.hfName("layers.0.input_layernorm.weight"), "model.layers.0.input_layernorm.weight");
    const w = await ck.readWeight("layers.1.mlp.down_proj.weight");
    assert.deepEqual([w.dtype, w.shape, w.data.byteLength], ["f32", [64, 172], 64 * 172 * 4]);
    await assert.rejects(ck.readWeight("lm_head"), NotFound);
    assert.equal(parameterCount(c), 260032 + 0);
    assert.deepEqual(await ck.tokenizerFiles(), ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]);
    assert.equal(ck.storageDtype(), "F32");
  } finally {
    await ck.close();
  }
});

test("canonical names map both ways for both OPT prefixes", () => {
  for (const prefix of ["model.decoder.", "decoder."] as const) {
    const pairs: [string, string][] = [
      [`${prefix}embed_tokens.weight`, "embed_tokens"],
      [`${prefix}embed_positions.weight`, "embed_positions"],
      [`${prefix}final_layer_norm.weight`, "norm.weight"],
      [`${prefix}final_layer_norm.bias`, "norm.bias"],
      [`${prefix}layers.11.self_attn.out_proj.bias`, "layers.11.self_attn.out_proj.bias"],
      [`${prefix}layers.0.final_layer_norm.weight`, "layers.0.final_layer_norm.weight"],
      [`${prefix}layers.0.fc1.weight.absmax`, "layers.0.fc1.weight.absmax"],
      ["lm_head.weight", "lm_head"],
    ];
    for (const [hf, c] of pairs) {
      assert.equal(hfToCanonical(hf, "opt", prefix), c, hf);
      assert.equal(canonicalToHf(c, "opt", prefix), hf, c);
    }
  }
  assert.equal(hfToCanonical("model.rotary_emb.inv_freq", "llama", "model."), null);
  assert.equal(hfToCanonical("decoder.layers.0.fc1.weight", "opt", "model.decoder."), null);
  assert.throws(() => canonicalToHf("../etc", "llama", "model."), InvalidArgument);
});

test("OPT checkpoints with both key prefixes", async () => {
  const dir = await tmp();
  try {
    for (const prefix of ["model.decoder.", "decoder."] as const) {
      const d = join(dir, prefix.replace(/\./g, "_"));
      const vals = await writeSyntheticCheckpoint(d, TINY_CONFIGS.opt, { dtype: "F16", prefix, writeLmHead: prefix === "model.decoder.", seed: 7 });
      const ck = await HfCheckpoint.open(d);
      try {
        const c = ck.config;
        assert.equal(c.family, "opt");
        assert.equal(ck.prefix, prefix);
        assert.deepEqual([c.hiddenSize, c.numHeads, c.numKvHeads, c.headDim, c.intermediateSize, c.maxPositionEmbeddings], [24, 3, 3, 8, 40, 16]);
        assert.deepEqual(c.bias, { q: true, k: true, v: true, o: true, mlp: true });
        assert.equal(c.tieWordEmbeddings, true);
        assert.equal(c.doLayerNormBefore, true);
        assert.equal(c.finalLayerNorm, true);
        assert.equal(c.hiddenAct, "relu");
        assert.equal(c.padTokenId, 1);
        assert.equal(ck.has("lm_head"), prefix === "model.decoder.");
        const pos = await ck.readWeight("embed_positions");
        assert.deepEqual(pos.shape, [18, 24]);
        const fc2 = await ck.readWeight("layers.1.fc2.weight");
        assert.equal(fc2.dtype, "f16");
        assert.deepEqual(fc2.shape, [24, 40]);
        assert.deepEqual(toFloat32(fc2.data, "F16"), toFloat32(encodeFloats(vals.get(`${prefix}layers.1.fc2.weight`)!, "F16"), "F16"));
        const b = await ck.readWeight("norm.bias");
        assert.deepEqual(b.shape, [24]);
      } finally {
        await ck.close();
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("config parsing: Qwen2 biases, llama3 rope_scaling, Mistral defaults, errors", () => {
  const q = parseModelConfig(TINY_CONFIGS.qwen2);
  assert.deepEqual(q.bias, { q: true, k: true, v: true, o: false, mlp: false });
  assert.equal(q.headDim, 8);
  assert.equal(q.ropeTheta, 1e6);
  assert.equal(q.normEps, 1e-6);
  const l3 = parseModelConfig(TINY_CONFIGS.llama3);
  assert.deepEqual(l3.ropeScaling, { ropeType: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
  assert.equal(l3.headDim, 16);
  assert.deepEqual(l3.eosTokenId, [2, 3]);
  assert.equal(l3.tieWordEmbeddings, true);
  const legacy = parseModelConfig({ ...TINY_CONFIGS.llama3, rope_scaling: { type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 } });
  assert.equal(legacy.ropeScaling?.ropeType, "llama3");
  const rp = parseModelConfig({ ...TINY_CONFIGS.llama, rope_parameters: { rope_type: "default", rope_theta: 100000 } });
  assert.equal(rp.ropeTheta, 100000);
  assert.equal(rp.ropeScaling, null);
  const m = parseModelConfig(TINY_CONFIGS.mistral);
  assert.equal(m.architecture, "MistralForCausalLM");
  assert.equal(m.normEps, 1e-6);
  assert.equal(m.torchDtype, "float16");
  const llamaBias = parseModelConfig({ ...TINY_CONFIGS.llama, attention_bias: true, mlp_bias: true });
  assert.deepEqual(llamaBias.bias, { q: true, k: true, v: true, o: true, mlp: true });

  const bad: [Record<string, PyJsonValue>, RegExp][] = [
    [{ ...TINY_CONFIGS.llama, hidden_size: undefined as never }, /missing required field "hidden_size"/],
    [{ ...TINY_CONFIGS.llama, num_hidden_layers: "2" }, /num_hidden_layers/],
    [{ ...TINY_CONFIGS.llama, model_type: "gpt2", architectures: ["GPT2LMHeadModel"] }, /unsupported model_type "gpt2"/],
    [{ ...TINY_CONFIGS.llama, architectures: ["LlamaForSequenceClassification"] }, /unsupported architecture/],
    [{ ...TINY_CONFIGS.llama, model_type: undefined as never }, /missing "model_type"/],
    [{ ...TINY_CONFIGS.llama, num_key_value_heads: 3 }, /not a multiple/],
    [{ ...TINY_CONFIGS.llama, rope_scaling: { rope_type: "yarn", factor: 4 } }, /unsupported rope_scaling type "yarn"/],
    [{ ...TINY_CONFIGS.llama3, rope_scaling: { rope_type: "llama3", factor: 8 } }, /low_freq_factor/],
    [{ ...TINY_CONFIGS.opt, word_embed_proj_dim: 16 }, /word_embed_proj_dim 16 != hidden_size 24/],
    [{ ...TINY_CONFIGS.opt, ffn_dim: undefined as never }, /ffn_dim/],
    [{ ...TINY_CONFIGS.llama, quantization_config: { quant_method: "gptq" } }, /quant_method "gptq" is not supported/],
  ];
  for (const [cfg, re] of bad) {
    assert.throws(() => parseModelConfig(JSON.parse(JSON.stringify(cfg))), (e: unknown) => {
      assert.ok(e instanceof InvalidArgument || e instanceof FailedPrecondition, String(e));
      assert.match((e as Error).message, re);
      return true;
    });
  }
  assert.throws(() => parseModelConfig([1]), InvalidArgument);
});

test("sharded checkpoints: read, validate the index, errors", async () => {
  const dir = await tmp();
  try {
    const single = join(dir, "single");
    await writeSyntheticCheckpoint(single, TINY_CONFIGS.qwen2, { dtype: "BF16", seed: 3 });
    const sharded = join(dir, "sharded");
    await writeSyntheticCheckpoint(sharded, TINY_CONFIGS.qwen2, { dtype: "BF16", seed: 3, maxShardSize: 6000 });
    const files = (await readdir(sharded)).sort();
    assert.ok(files.includes(INDEX_FILE));
    const shardFiles = files.filter((f) => f.endsWith(".safetensors"));
    assert.ok(shardFiles.length >= 3, `got ${shardFiles}`);
    assert.match(shardFiles[0]!, /^model-00001-of-000\d\d\.safetensors$/);
    const index = JSON.parse(await readFile(join(sharded, INDEX_FILE), "utf8"));
    const a = await HfCheckpoint.open(single);
    const b = await HfCheckpoint.open(sharded);
    try {
      assert.equal(b.weights.files.length, shardFiles.length);
      assert.deepEqual([...a.tensors.keys()].sort(), [...b.tensors.keys()].sort());
      assert.deepEqual(Object.keys(index.weight_map).sort(), [...b.tensors.keys()].sort());
      let total = 0;
      for (const k of a.tensors.keys()) {
        assert.deepEqual(await a.read(k), await b.read(k), k);
        assert.equal(index.weight_map[k], b.tensors.get(k)!.file);
        total += a.tensors.get(k)!.byteLength;
      }
      assert.equal(index.metadata.total_size, total);
      const qb = await b.readWeight("layers.1.self_attn.k_proj.bias");
      assert.deepEqual([qb.dtype, qb.shape], ["bf16", [16]]);
    } finally {
      await a.close();
      await b.close();
    }

    // A missing shard: NotFound naming it.
    const broken = join(dir, "broken");
    await cp(sharded, broken, { recursive: true });
    await unlink(join(broken, shardFiles[1]!));
    await assert.rejects(HfCheckpoint.open(broken), (e: unknown) => e instanceof NotFound && e.message.includes(shardFiles[1]!));
    // An index entry escaping the directory.
    await cp(join(sharded, shardFiles[1]!), join(broken, shardFiles[1]!));
    const evil = { ...index, weight_map: { ...index.weight_map, "model.norm.weight": "../single/model.safetensors" } };
    await writeFile(join(broken, INDEX_FILE), JSON.stringify(evil));
    await assert.rejects(HfCheckpoint.open(broken), /is not a shard file name/);
    // A weight_map that disagrees with the shards.
    const key = Object.keys(index.weight_map)[0]!;
    const other = shardFiles.find((f) => f !== index.weight_map[key])!;
    await writeFile(join(broken, INDEX_FILE), JSON.stringify({ ...index, weight_map: { ...index.weight_map, [key]: other } }));
    await assert.rejects(HfCheckpoint.open(broken), InvalidArgument);
    await writeFile(join(broken, INDEX_FILE), "{not json");
    await assert.rejects(HfCheckpoint.open(broken), /not valid JSON/);
    await writeFile(join(broken, INDEX_FILE), JSON.stringify({ metadata: {} }));
    await assert.rejects(HfCheckpoint.open(broken), /missing "weight_map"/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("checkpoint validation: missing weights, wrong shapes, missing files", async () => {
  const dir = await tmp();
  try {
    await assert.rejects(HfCheckpoint.open(join(dir, "nope")), NotFound);
    const d = join(dir, "m");
    await writeSyntheticCheckpoint(d, TINY_CONFIGS.llama, { seed: 5 });
    // lm_head is required when embeddings are not tied; drop it by re-writing the file without it.
    const set = await SafetensorsSet.open(d);
    const keep = [...set.tensors.entries()].filter(([k]) => k !== "lm_head.weight");
    await mkdir(join(dir, "tmpw"));
    const w = await ShardedSafetensorsWriter.create(join(dir, "tmpw"), keep.map(([k, t]) => ({ name: k, dtype: t.dtype, shape: t.shape })));
    for (const [k] of keep) await w.write(k, await set.read(k));
    await w.finish();
    await set.close();
    await writeFile(join(dir, "tmpw", "config.json"), JSON.stringify(TINY_CONFIGS.llama));
    await assert.rejects(HfCheckpoint.open(join(dir, "tmpw")), /missing tensor lm_head.weight/);
    // Wrong shape: claim a larger intermediate size.
    await writeFile(join(d, "config.json"), JSON.stringify({ ...TINY_CONFIGS.llama, intermediate_size: 80 }));
    await assert.rejects(HfCheckpoint.open(d), /has shape \[72, 48\] but the config implies \[80, 48\]/);
    await unlink(join(d, "config.json"));
    await assert.rejects(HfCheckpoint.open(d), NotFound);
    await writeFile(join(d, "config.json"), "{oops");
    await assert.rejects(HfCheckpoint.open(d), /not valid JSON/);
    await writeFile(join(d, "config.json"), JSON.stringify(TINY_CONFIGS.llama));
    await unlink(join(d, "model.safetensors"));
    await assert.rejects(HfCheckpoint.open(d), NotFound);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
