import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import {
  bnb4bitPlan,
  bnb4bitTensors,
  bnbQuantizationConfig,
  encodeFloats,
  isSkippedModule,
  parseBnbQuantizationConfig,
  pyJsonDumps,
  quantStateJson,
  readBnb4bitWeight,
  readPeftAdapter,
  readSafetensorsBuffer,
  SafetensorsSet,
  serializeSafetensors,
  ShardedSafetensorsWriter,
  writePeftAdapter,
  type TensorInfo,
} from "../src/index.js";

async function tmp(): Promise<string> {
  return mkdtemp(join(tmpdir(), "qlora-bnb-"));
}

test("quant_state JSON bytes are Python's json.dumps of QuantState.as_dict", () => {
  assert.equal(
    quantStateJson({ quantType: "nf4", blocksize: 64, dtype: "bfloat16", shape: [2048, 2048], nestedOffset: Math.fround(0.0123) }),
    '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2048, 2048], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.012299999594688416}',
  );
  assert.equal(
    quantStateJson({ quantType: "nf4", blocksize: 128, dtype: "float16", shape: [768, 3072] }),
    '{"quant_type": "nf4", "blocksize": 128, "dtype": "float16", "shape": [768, 3072]}',
  );
  // A float32 offset that is a whole number still prints as a Python float.
  assert.match(quantStateJson({ quantType: "nf4", blocksize: 64, dtype: "float32", shape: [1, 1], nestedOffset: 2 }), /"nested_offset": 2\.0}$/);
  assert.match(quantStateJson({ quantType: "nf4", blocksize: 64, dtype: "float32", shape: [1, 1], nestedOffset: Math.fround(3e-5) }), /"nested_offset": 2\.9999999242136255e-05}$/);
});

test("quantization_config: the 13 keys of BitsAndBytesConfig.to_dict", () => {
  const q = bnbQuantizationConfig({ doubleQuant: true, computeDtype: "bfloat16", skipModules: null });
  assert.equal(
    pyJsonDumps(q, { sortKeys: true }),
    '{"_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8", ' +
      '"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true, "llm_int8_enable_fp32_cpu_offload": false, ' +
      '"llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0, "load_in_4bit": true, ' +
      '"load_in_8bit": false, "quant_method": "bitsandbytes"}',
  );
  const parsed = parseBnbQuantizationConfig(JSON.parse(pyJsonDumps(bnbQuantizationConfig({ doubleQuant: false, computeDtype: "float16", skipModules: ["lm_head", "fc1"] }))), "q");
  assert.deepEqual(parsed, { quantType: "nf4", doubleQuant: false, computeDtype: "float16", skipModules: ["lm_head", "fc1"] });
  assert.throws(() => parseBnbQuantizationConfig({ quant_method: "bitsandbytes", load_in_8bit: true }, "q"), FailedPrecondition);
  assert.throws(() => parseBnbQuantizationConfig({ quant_method: "bitsandbytes", load_in_4bit: true, bnb_4bit_quant_type: "fp4" }, "q"), /fp4/);
  assert.throws(() => parseBnbQuantizationConfig({ quant_method: "bitsandbytes", load_in_4bit: true, bnb_4bit_quant_type: "nf4", bnb_4bit_quant_storage: "bfloat16" }, "q"), FailedPrecondition);
  assert.throws(() => parseBnbQuantizationConfig("x", "q"), InvalidArgument);
});

test("skip-module matching follows transformers' rule", () => {
  const m = "model.layers.1.self_attn.q_proj";
  assert.equal(isSkippedModule(m, null), false);
  assert.equal(isSkippedModule(m, ["q_proj"]), true);
  assert.equal(isSkippedModule(m, ["k_proj", "lm_head"]), false);
  assert.equal(isSkippedModule(m, ["model.layers.1"]), true);
  assert.equal(isSkippedModule(m, ["layers.1"]), true);
  assert.equal(isSkippedModule("model.layers.11.mlp.up_proj", ["layers.1"]), false);
  assert.equal(isSkippedModule(m, [m]), true);
  assert.equal(isSkippedModule(m, ["proj"]), false);
});

/** An in-memory tensor source built from NamedTensors. */
function memSource(ts: { name: string; dtype: string; shape: number[]; data: Uint8Array }[]) {
  const buf = serializeSafetensors(ts as never);
  const st = readSafetensorsBuffer(buf);
  return {
    info: (n: string): TensorInfo | undefined => st.tensors.get(n),
    read: async (n: string) => new Uint8Array(st.tensors.get(n)!.data),
    buf,
  };
}

test("bnb tensors: plan, keys, shapes, read back (both absmax layouts), malformed inputs", async () => {
  const shape = [3, 37]; // n = 111: odd, and a partial last block
  const n = 111;
  const packed = new Uint8Array(56).map((_, i) => (i * 37) & 0xff);
  const absmax = new Float32Array([0.5, 0.25]);
  const plain = bnb4bitTensors("m.w.weight", { shape, dtype: "float16", blocksize: 64, packed, absmax });
  assert.deepEqual(
    plain.map((t) => [t.name, t.dtype, t.shape]),
    [
      ["m.w.weight", "U8", [56, 1]],
      ["m.w.weight.absmax", "F32", [2]],
      ["m.w.weight.quant_map", "F32", [16]],
      ["m.w.weight.quant_state.bitsandbytes__nf4", "U8", [plain[3]!.data.byteLength]],
    ],
  );
  const plan = bnb4bitPlan("m.w.weight", shape, "float16", 64, false);
  assert.deepEqual(plan.map((p) => [p.name, p.dtype, p.shape]), plain.map((t) => [t.name, t.dtype, t.shape]));
  const src = memSource(plain);
  const wt = await readBnb4bitWeight("m.w.weight", src);
  assert.equal(wt.dtype, "nf4");
  assert.deepEqual(wt.shape, shape);
  assert.equal(wt.blocksize, 64);
  assert.deepEqual(new Uint8Array(wt.data), packed);
  assert.deepEqual(wt.absmax, absmax);

  // Double quant: absmax resolved as DYN[q] * nested_absmax + offset (computed here by hand).
  const dyn = new Float32Array(256).map((_, i) => (i - 127) / 128);
  const dq = { qabsmax: new Uint8Array([200, 10]), nestedAbsmax: new Float32Array([0.75]), offset: Math.fround(0.375), quantMap: dyn };
  const dqt = bnb4bitTensors("m.w.weight", { shape, dtype: "bfloat16", blocksize: 64, packed, doubleQuant: dq });
  assert.deepEqual(
    dqt.map((t) => [t.name, t.dtype, t.shape]),
    bnb4bitPlan("m.w.weight", shape, "bfloat16", 64, true).map((p) => [p.name, p.dtype, p.shape ?? [dqt.at(-1)!.data.byteLength]]),
  );
  const back = await readBnb4bitWeight("m.w.weight", memSource(dqt));
  const expected = [0, 1].map((b) => Math.fround(Math.fround(dyn[dq.qabsmax[b]!]! * 0.75) + Math.fround(0.375)));
  assert.deepEqual([...back.absmax!], expected);
  assert.equal(n, 111);

  // Malformed: missing aux tensor, wrong dtype, wrong length, foreign quant map, fp4.
  const drop = (name: string) => dqt.filter((t) => t.name !== name);
  await assert.rejects(readBnb4bitWeight("m.w.weight", memSource(drop("m.w.weight.nested_absmax"))), /missing m.w.weight.nested_absmax/);
  await assert.rejects(readBnb4bitWeight("m.w.weight", memSource(drop("m.w.weight.quant_state.bitsandbytes__nf4"))), /missing/);
  const wrongLen = dqt.map((t) => (t.name === "m.w.weight" ? { ...t, shape: [55, 1], data: t.data.subarray(0, 55) } : t));
  await assert.rejects(readBnb4bitWeight("m.w.weight", memSource(wrongLen)), /packed weight has 55 bytes/);
  const badMap = dqt.map((t) => (t.name === "m.w.weight.quant_map" ? { ...t, data: new Uint8Array(64) } : t));
  await assert.rejects(readBnb4bitWeight("m.w.weight", memSource(badMap)), FailedPrecondition);
  const fp4 = plain.map((t) => (t.name.endsWith("__nf4") ? { ...t, name: "m.w.weight.quant_state.bitsandbytes__fp4" } : t));
  await assert.rejects(readBnb4bitWeight("m.w.weight", memSource(fp4)), /FP4/);
  const badJson = plain.map((t) => (t.name.endsWith("__nf4") ? { ...t, shape: [3], data: new Uint8Array([0x7b, 0x7b, 0x7b]) } : t));
  await assert.rejects(readBnb4bitWeight("m.w.weight", memSource(badJson)), /not valid UTF-8 JSON/);
});

test("sharded writer keeps groups together and handles tensors of unknown size (spooled)", async () => {
  const dir = await tmp();
  try {
    const plan = [
      { name: "a", dtype: "F32" as const, shape: [100] },
      ...bnb4bitPlan("l0.weight", [40, 40], "float32", 64, true),
      { name: "b", dtype: "F16" as const, shape: [300] },
      ...bnb4bitPlan("l1.weight", [40, 40], "float32", 64, true),
    ];
    const w = await ShardedSafetensorsWriter.create(dir, plan, { maxShardSize: 1000 });
    const files = w.files;
    assert.ok(files.length >= 3);
    for (const p of plan.filter((e) => e.name.startsWith("l0."))) assert.equal(w.shardOf(p.name), w.shardOf("l0.weight"));
    // Write in an order different from the plan.
    const data = new Map<string, Uint8Array>();
    const mk = (n: number, seed: number) => new Uint8Array(n).map((_, i) => (i * seed + 11) & 0xff);
    data.set("a", mk(400, 3));
    data.set("b", mk(600, 5));
    const dq = { qabsmax: mk(25, 7), nestedAbsmax: new Float32Array([0.5]), offset: 0.1, quantMap: new Float32Array(256) };
    for (const l of ["l0.weight", "l1.weight"]) {
      for (const t of bnb4bitTensors(l, { shape: [40, 40], dtype: "float32", blocksize: 64, packed: mk(800, 9), doubleQuant: dq })) data.set(t.name, t.data);
    }
    const order = [...data.keys()].reverse();
    for (const k of order) await w.write(k, data.get(k)!);
    await assert.rejects(w.write("a", data.get("a")!), InvalidArgument);
    const r = await w.finish();
    assert.equal(r.indexFile, "model.safetensors.index.json");
    assert.equal(r.totalSize, [...data.values()].reduce((s, d) => s + d.byteLength, 0));
    assert.deepEqual((await readdir(dir)).sort(), [...files, "model.safetensors.index.json"].sort());
    const index = await readFile(join(dir, "model.safetensors.index.json"), "utf8");
    assert.ok(index.startsWith('{\n  "metadata": {\n    "total_size": '));
    const set = await SafetensorsSet.open(dir);
    for (const [k, v] of data) assert.deepEqual(new Uint8Array(await set.read(k)), new Uint8Array(v), k);
    assert.deepEqual(set.metadata(), { format: "pt" });
    await set.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const dir2 = await tmp();
  try {
    const w = await ShardedSafetensorsWriter.create(dir2, [{ name: "x", dtype: "U8", shape: [4] }, { name: "y", dtype: "U8" }], { maxShardSize: 2 });
    await w.write("x", new Uint8Array(4));
    await assert.rejects(w.write("x2", new Uint8Array(1)), InvalidArgument);
    await assert.rejects(w.finish(), /not written/);
    await w.abort();
    assert.deepEqual(await readdir(dir2), []);
  } finally {
    await rm(dir2, { recursive: true, force: true });
  }
});

test("PEFT adapters: write like save_pretrained, read back, F16/BF16, errors", async () => {
  const dir = await tmp();
  try {
    const r = 4;
    const mods = new Map([
      ["layers.0.self_attn.q_proj", { a: new Float32Array(r * 6).map((_, i) => i / 10), b: new Float32Array(5 * r).map((_, i) => -i / 7) }],
      ["layers.1.self_attn.v_proj", { a: new Float32Array(r * 6).fill(0.5), b: new Float32Array(3 * r).fill(0.25) }],
    ]);
    const out = join(dir, "adapter");
    await writePeftAdapter(out, { config: { r, loraAlpha: 16, loraDropout: 0.05, targetModules: ["v_proj", "q_proj"], baseModelNameOrPath: "stories260K" }, family: "llama", tensors: mods });
    assert.deepEqual((await readdir(out)).sort(), ["adapter_config.json", "adapter_model.safetensors"]);
    assert.deepEqual((await readdir(dir)).sort(), ["adapter"]);
    const cfgText = await readFile(join(out, "adapter_config.json"), "utf8");
    const cfg = JSON.parse(cfgText);
    assert.deepEqual(Object.keys(cfg), Object.keys(cfg).sort());
    assert.ok(cfgText.includes('\n  "lora_alpha": 16,\n  "lora_bias": false,\n  "lora_dropout": 0.05,\n'));
    assert.ok(cfgText.includes('"target_modules": [\n    "q_proj",\n    "v_proj"\n  ],'));
    for (const k of ["alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora"]) {
      assert.ok(k in cfg, k);
    }
    assert.equal(cfg.inference_mode, true);
    assert.equal(cfg.peft_type, "LORA");
    assert.equal(cfg.task_type, "CAUSAL_LM");
    const st = readSafetensorsBuffer(await readFile(join(out, "adapter_model.safetensors")));
    assert.deepEqual(st.metadata, { format: "pt" });
    assert.deepEqual([...st.tensors.keys()].sort(), [
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
      "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
      "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    ]);
    assert.deepEqual(st.tensors.get("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")!.shape, [5, 4]);
    const back = await readPeftAdapter(out);
    assert.equal(back.scaling, 4);
    assert.equal(back.config.r, 4);
    assert.deepEqual(back.config.targetModules, ["q_proj", "v_proj"]);
    assert.equal(back.config.baseModelNameOrPath, "stories260K");
    const q = back.tensors.get("layers.0.self_attn.q_proj")!;
    assert.deepEqual([q.r, q.inFeatures, q.outFeatures], [4, 6, 5]);
    assert.deepEqual(q.a, mods.get("layers.0.self_attn.q_proj")!.a);
    assert.deepEqual(q.b, mods.get("layers.0.self_attn.q_proj")!.b);
    await assert.rejects(writePeftAdapter(out, { config: { r, loraAlpha: 16, targetModules: ["q_proj"] }, family: "llama", tensors: mods }), AlreadyExists);
    await writePeftAdapter(out, { config: { r, loraAlpha: 8, useRslora: true, targetModules: ["q_proj"] }, family: "llama", tensors: mods }, { overwrite: true });
    assert.equal((await readPeftAdapter(out)).scaling, 4);

    // An OPT adapter saved by PEFT in bf16/f16 with a rank pattern.
    const opt = join(dir, "opt");
    await mkdir(opt);
    const A = new Float32Array(2 * 3).map((_, i) => i - 2.5);
    const B = new Float32Array(4 * 2).map((_, i) => i * 0.125);
    await writeFile(
      join(opt, "adapter_model.safetensors"),
      serializeSafetensors([
        { name: "base_model.model.model.decoder.layers.0.fc1.lora_A.weight", dtype: "BF16", shape: [2, 3], data: encodeFloats(A, "BF16") },
        { name: "base_model.model.model.decoder.layers.0.fc1.lora_B.weight", dtype: "F16", shape: [4, 2], data: encodeFloats(B, "F16") },
      ], { format: "pt" }),
    );
    await writeFile(join(opt, "adapter_config.json"), JSON.stringify({ peft_type: "LORA", r: 8, lora_alpha: 16, rank_pattern: { fc1: 2 }, alpha_pattern: { "layers\\.0\\.fc1": 4 }, target_modules: ["fc1"] }));
    const o = await readPeftAdapter(opt);
    const fc1 = o.tensors.get("layers.0.fc1")!;
    assert.deepEqual([fc1.r, fc1.inFeatures, fc1.outFeatures, fc1.scaling], [2, 3, 4, 2]);
    assert.deepEqual(fc1.a, A);
    assert.deepEqual(fc1.b, B);

    const bad = async (config: unknown, re: RegExp | (new (...a: never[]) => Error), tensors?: Buffer) => {
      const d = join(dir, `bad${Math.random().toString(36).slice(2)}`);
      await mkdir(d);
      await writeFile(join(d, "adapter_config.json"), JSON.stringify(config));
      if (tensors) await writeFile(join(d, "adapter_model.safetensors"), tensors);
      await assert.rejects(readPeftAdapter(d), re);
    };
    const okTensors = await readFile(join(opt, "adapter_model.safetensors"));
    await bad({ peft_type: "IA3" }, FailedPrecondition, okTensors);
    await bad({ peft_type: "LORA", r: 0 }, /r must be a positive integer/, okTensors);
    await bad({ peft_type: "LORA", r: 2, use_dora: true }, /DoRA/, okTensors);
    await bad({ peft_type: "LORA", r: 2, bias: "some" }, /bias must be/, okTensors);
    await bad({ peft_type: "LORA", r: 4 }, /do not match rank 4/, okTensors);
    await bad({ peft_type: "LORA", r: 2 }, NotFound);
    const onlyA = serializeSafetensors([{ name: "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", dtype: "F32", shape: [2, 3], data: new Uint8Array(24) }]);
    await bad({ peft_type: "LORA", r: 2 }, /has lora_A but no lora_B/, onlyA);
    const extra = serializeSafetensors([{ name: "base_model.model.lm_head.weight", dtype: "F32", shape: [1], data: new Uint8Array(4) }]);
    await bad({ peft_type: "LORA", r: 2 }, /unsupported tensor/, extra);
    await assert.rejects(writePeftAdapter(join(dir, "w"), { config: { r: 3, loraAlpha: 1, targetModules: ["q_proj"] }, family: "llama", tensors: mods }), /multiples of r=3/);
    await assert.rejects(
      writePeftAdapter(join(dir, "w"), { config: { r: 4, loraAlpha: 1, targetModules: ["q_proj"] }, family: "llama", tensors: new Map([["embed_tokens", mods.get("layers.0.self_attn.q_proj")!]]) }),
      /not a layer module/,
    );
    assert.ok(!(await readdir(dir)).some((f) => f.startsWith(".")), "no temp dirs left");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
