/**
 * The quantizer against an independent scalar NF4 / double-quant reference written here from
 * ../shared/docs/formats.md §1-3 (not from the kernels), on the real stories260K checkpoint and on
 * synthetic OPT (F16, both key prefixes) and Qwen2 (BF16, biases) checkpoints.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  HfCheckpoint,
  SafetensorsSet,
  TINY_CONFIGS,
  toFloat32,
  writeSyntheticCheckpoint,
  type FloatDtype,
} from "@qlora/formats";
import { describeModel, quantizeCheckpoint, type QuantizeProgress } from "../src/quantize.js";

const SHARED = join(import.meta.dirname, "../../../../../shared");
const STORIES = join(SHARED, "models/stories260K");

// ---- independent reference ------------------------------------------------------------------
const f = Math.fround;
/** formats.md §1.1, as written in bitsandbytes. */
const NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
].map(f);
/** Float32 midpoints; x > mid[i] strictly counts, so ties go to the lower code (§1.2). */
const MID = NF4.slice(0, 15).map((v, i) => f(f(v + NF4[i + 1]!) / 2));
const NF4_MAX_HALF_GAP = Math.max(...MID.map((m, i) => NF4[i + 1]! - m));

function nearest(s: number, mids: readonly number[]): number {
  let c = 0;
  for (const m of mids) if (s > m) c++;
  return c;
}

/** Blockwise absmax over the flat index, float32 reciprocal, nearest code, high nibble first (§1.2-1.5). */
function refQuantize(x: Float32Array, bs: number): { packed: Uint8Array; absmax: Float32Array; codes: Uint8Array } {
  const n = x.length;
  const nb = Math.ceil(n / bs);
  const absmax = new Float32Array(nb);
  const codes = new Uint8Array(n + (n % 2));
  if (n % 2) codes[n] = 7;
  for (let b = 0; b < nb; b++) {
    let m = 0;
    for (let i = b * bs; i < Math.min(n, (b + 1) * bs); i++) m = Math.max(m, Math.abs(x[i]!));
    absmax[b] = m;
    const inv = f(1 / Math.max(m, f(1e-38)));
    for (let i = b * bs; i < Math.min(n, (b + 1) * bs); i++) codes[i] = nearest(f(x[i]! * inv), MID);
  }
  const packed = new Uint8Array(Math.ceil(n / 2));
  for (let j = 0; j < packed.length; j++) packed[j] = (codes[2 * j]! << 4) | codes[2 * j + 1]!;
  return { packed, absmax, codes };
}

/** §2.1 + §2.3 (default path): offset = mean, 8-bit blockwise (256) on absmax - offset, bucketize. */
function refDoubleQuant(absmax: Float32Array, map: Float32Array): { q: Uint8Array; nested: Float32Array; offset: number } {
  let sum = 0;
  for (const a of absmax) sum += a;
  const offset = f(sum / absmax.length);
  const mids = Array.from({ length: 255 }, (_, i) => f(f(map[i]! + map[i + 1]!) / 2));
  const nb = Math.ceil(absmax.length / 256);
  const nested = new Float32Array(nb);
  const q = new Uint8Array(absmax.length);
  for (let b = 0; b < nb; b++) {
    const lo = b * 256;
    const hi = Math.min(absmax.length, lo + 256);
    let m = 0;
    for (let i = lo; i < hi; i++) m = Math.max(m, Math.abs(f(absmax[i]! - offset)));
    nested[b] = m;
    const inv = f(1 / Math.max(m, f(1e-38)));
    for (let i = lo; i < hi; i++) q[i] = nearest(Math.min(1, Math.max(-1, f(f(absmax[i]! - offset) * inv))), mids);
  }
  return { q, nested, offset };
}

function f32(b: Uint8Array): Float32Array {
  return toFloat32(b, "F32");
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/** Candidate dynamic maps from ../shared/docs/dynamic_map_signed_8bit.tsv (columns differ by <= 1 ULP). */
async function dynamicMapCandidates(): Promise<number[][]> {
  const rows = (await readFile(join(SHARED, "docs/dynamic_map_signed_8bit.tsv"), "utf8")).split("\n").filter((l) => /^\d/.test(l));
  assert.equal(rows.length, 256);
  return rows.map((r) => r.split("\t").slice(1).map((v) => f(Number(v))));
}

/** A Python float repr: fixed "d.d" or "d[.ddd]e±XX". */
const PY_FLOAT = /^-?(\d+\.\d+|\d(\.\d+)?e[+-]\d{2,3})$/;

interface CheckOpts {
  blocksize: number;
  doubleQuant: boolean;
  torchDtype: "float32" | "float16" | "bfloat16";
  skipped?: (key: string) => boolean;
}

/**
 * Checks an output directory against its input tensor by tensor: formats.md §3.1 keys/dtypes/shapes,
 * the exact quant_state JSON, codes and absmax against the reference, dequantization error bounds, and
 * byte-identical copies of everything not quantized.
 */
async function checkOutput(inDir: string, outDir: string, o: CheckOpts): Promise<{ quantized: number }> {
  const inp = await SafetensorsSet.open(inDir);
  const out = await SafetensorsSet.open(outDir);
  const inCk = await HfCheckpoint.open(inDir);
  const outCk = await HfCheckpoint.open(outDir);
  const mapCands = await dynamicMapCandidates();
  let quantized = 0;
  try {
    const expectedKeys = new Set<string>();
    const linear = new Set(inCk.linearWeights().map((c) => inCk.hfName(c)));
    for (const [k, t] of inp.tensors) {
      const isQ = linear.has(k) && !(o.skipped?.(k) ?? false);
      if (!isQ) {
        expectedKeys.add(k);
        const ot = out.info(k);
        assert.equal(ot.dtype, t.dtype, k);
        assert.deepEqual(ot.shape, t.shape, k);
        assert.ok((await out.read(k)).equals(await inp.read(k)), `${k} is a byte-identical copy`);
        continue;
      }
      quantized++;
      const suffixes = o.doubleQuant
        ? ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"]
        : ["", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"];
      for (const s of suffixes) expectedKeys.add(k + s);
      const [rows, cols] = t.shape as [number, number];
      const n = rows * cols;
      const B = Math.ceil(n / o.blocksize);
      const x = toFloat32(await inp.read(k), t.dtype as FloatDtype);
      const ref = refQuantize(x, o.blocksize);
      const w = out.info(k);
      assert.deepEqual([w.dtype, w.shape], ["U8", [(n + 1) >> 1, 1]], k);
      assert.deepEqual(new Uint8Array(await out.read(k)), ref.packed, `${k}: NF4 codes equal the reference`);
      const qm = out.info(`${k}.quant_map`);
      assert.deepEqual([qm.dtype, qm.shape], ["F32", [16]]);
      assert.deepEqual([...f32(await out.read(`${k}.quant_map`))], NF4);
      const am = out.info(`${k}.absmax`);
      const qsBytes = await out.read(`${k}.quant_state.bitsandbytes__nf4`);
      const qsInfo = out.info(`${k}.quant_state.bitsandbytes__nf4`);
      assert.deepEqual([qsInfo.dtype, qsInfo.shape], ["U8", [qsBytes.byteLength]]);
      const qs = qsBytes.toString("utf8");
      const head = `{"quant_type": "nf4", "blocksize": ${o.blocksize}, "dtype": "${o.torchDtype}", "shape": [${rows}, ${cols}]`;
      let resolved: Float32Array;
      if (o.doubleQuant) {
        assert.deepEqual([am.dtype, am.shape], ["U8", [B]], `${k}.absmax`);
        const na = out.info(`${k}.nested_absmax`);
        assert.deepEqual([na.dtype, na.shape], ["F32", [Math.ceil(B / 256)]]);
        const nm = out.info(`${k}.nested_quant_map`);
        assert.deepEqual([nm.dtype, nm.shape], ["F32", [256]]);
        const map = f32(await out.read(`${k}.nested_quant_map`));
        for (let i = 0; i < 256; i++) assert.ok(mapCands[i]!.includes(map[i]!), `nested_quant_map[${i}] = ${map[i]} is one of bnb's`);
        const dq = refDoubleQuant(ref.absmax, map);
        assert.deepEqual(new Uint8Array(await out.read(`${k}.absmax`)), dq.q, `${k}: 8-bit absmax codes`);
        const nested = f32(await out.read(`${k}.nested_absmax`));
        assert.deepEqual(nested, dq.nested);
        assert.ok(qs.startsWith(`${head}, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": `), qs);
        assert.ok(qs.endsWith("}"));
        const off = qs.slice(qs.lastIndexOf(": ") + 2, -1);
        assert.match(off, PY_FLOAT);
        assert.equal(Number(off), dq.offset, `${k}: nested_offset is the float32 mean`);
        // Shortest round-trip digits, like Python's repr.
        assert.ok(off.replace(/e.*$/, "").replace(/[-.]/g, "").replace(/^0+/, "").length <= String(dq.offset).replace(/e.*$/, "").replace(/[-.]/g, "").replace(/^0+/, "").length);
        resolved = new Float32Array(B);
        for (let b = 0; b < B; b++) resolved[b] = f(f(map[dq.q[b]!]! * nested[b >> 8]!) + dq.offset);
        // The resolved absmax is within half a code step of the true one.
        let gap = 1 + map[0]!;
        for (let i = 0; i < 255; i++) gap = Math.max(gap, (map[i + 1]! - map[i]!) / 2);
        for (let b = 0; b < B; b++) {
          assert.ok(Math.abs(resolved[b]! - ref.absmax[b]!) <= gap * nested[b >> 8]! * (1 + 1e-6) + 1e-7, `${k} absmax[${b}]`);
        }
      } else {
        assert.deepEqual([am.dtype, am.shape], ["F32", [B]]);
        assert.deepEqual(f32(await out.read(`${k}.absmax`)), ref.absmax, `${k}: absmax`);
        assert.equal(qs, `${head}}`);
        assert.equal(out.tensors.has(`${k}.nested_absmax`), false);
        resolved = ref.absmax;
      }
      // What a loader gets (double quant resolved by the library) equals the reference resolution.
      const canonical = inCk.canonicalName(k)!;
      const wt = await outCk.readWeight(canonical);
      assert.deepEqual([wt.dtype, wt.shape, wt.blocksize], ["nf4", [rows, cols], o.blocksize]);
      assert.deepEqual(wt.absmax, resolved, `${k}: resolved absmax`);
      // Dequantization error: at most half an NF4 step times the block scale, plus the absmax error.
      for (let i = 0; i < n; i++) {
        const b = Math.floor(i / o.blocksize);
        const deq = f(NF4[ref.codes[i]!]! * resolved[b]!);
        const bound = NF4_MAX_HALF_GAP * ref.absmax[b]! + Math.abs(resolved[b]! - ref.absmax[b]!) + 1e-6 * ref.absmax[b]! + 1e-30;
        if (!(Math.abs(deq - x[i]!) <= bound)) assert.fail(`${k}[${i}]: |${deq} - ${x[i]}| > ${bound}`);
      }
    }
    assert.deepEqual([...out.tensors.keys()].sort(), [...expectedKeys].sort());
    assert.deepEqual(out.metadata(), { format: "pt" });
  } finally {
    await inp.close();
    await out.close();
    await inCk.close();
    await outCk.close();
  }
  return { quantized };
}

async function checkManifest(dir: string): Promise<void> {
  const m = JSON.parse(await readFile(join(dir, "manifest.json"), "utf8"));
  const files = (await readdir(dir)).filter((x) => x !== "manifest.json").sort();
  assert.deepEqual(m.files.map((x: { path: string }) => x.path), files);
  for (const e of m.files) {
    const b = await readFile(join(dir, e.path));
    assert.equal(e.sha256, sha256(b), e.path);
    assert.equal(e.size, b.byteLength, e.path);
  }
}

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "qlora-quant-"));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test("stories260K, default options: bnb layout, codes, double quant, copies, config, manifest", async () => {
  await withTmp(async (dir) => {
    const out = join(dir, "stories-nf4");
    const events: QuantizeProgress[] = [];
    const r = await quantizeCheckpoint({ modelDir: STORIES, outDir: out, onProgress: (p) => events.push(p), sourceModel: "stories260K" });
    assert.deepEqual(await readdir(dir), ["stories-nf4"], "no temp directory left");
    assert.deepEqual((await readdir(out)).sort(), [
      "config.json",
      "generation_config.json",
      "manifest.json",
      "model.safetensors",
      "special_tokens_map.json",
      "tokenizer.json",
      "tokenizer_config.json",
    ]);
    for (const t of ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]) {
      assert.ok((await readFile(join(out, t))).equals(await readFile(join(STORIES, t))), t);
    }
    await checkManifest(out);
    const { quantized } = await checkOutput(STORIES, out, { blocksize: 64, doubleQuant: true, torchDtype: "float32" });
    assert.equal(quantized, 35);
    assert.equal(r.tensorsQuantized, 35);
    assert.equal(r.tensorsCopied, 12);
    assert.equal(r.parameters, 260032);
    assert.deepEqual(r.shards, ["model.safetensors"]);
    assert.equal(r.indexFile, null);

    // Progress: one event per input tensor, cumulative bytes, 35 quantized.
    assert.equal(events.length, 47);
    assert.equal(events.filter((e) => e.quantized).length, 35);
    for (let i = 0; i < events.length; i++) {
      assert.equal(events[i]!.tensorsDone, i + 1);
      assert.equal(events[i]!.tensorsTotal, 47);
      if (i) assert.ok(events[i]!.bytesDone > events[i - 1]!.bytesDone);
    }
    assert.equal(events.at(-1)!.bytesDone, events.at(-1)!.bytesTotal);
    assert.equal(events.at(-1)!.bytesTotal, r.bytesIn);

    // config.json: the input's fields unchanged plus quantization_config, written like transformers.
    const inCfg = JSON.parse(await readFile(join(STORIES, "config.json"), "utf8"));
    const text = await readFile(join(out, "config.json"), "utf8");
    const outCfg = JSON.parse(text);
    const { quantization_config: qc, ...rest } = outCfg;
    assert.deepEqual(rest, inCfg);
    assert.deepEqual(qc, {
      _load_in_4bit: true,
      _load_in_8bit: false,
      bnb_4bit_compute_dtype: "bfloat16",
      bnb_4bit_quant_storage: "uint8",
      bnb_4bit_quant_type: "nf4",
      bnb_4bit_use_double_quant: true,
      llm_int8_enable_fp32_cpu_offload: false,
      llm_int8_has_fp16_weight: false,
      llm_int8_skip_modules: null,
      llm_int8_threshold: 6.0,
      load_in_4bit: true,
      load_in_8bit: false,
      quant_method: "bitsandbytes",
    });
    for (const s of ['"llm_int8_threshold": 6.0', '"rope_theta": 10000.0', '"rms_norm_eps": 1e-05', '"attention_dropout": 0.0']) assert.ok(text.includes(s), s);
    assert.ok(text.endsWith("}\n"));

    const d = await describeModel(out, "stories-nf4");
    assert.equal(d.quantized, true);
    assert.deepEqual(d.quantization, { quantType: "nf4", blocksize: 64, doubleQuant: true, computeDtype: "bfloat16", skipModules: [] });
    assert.equal(d.parameters, 260032);
    assert.equal(d.architecture, "LlamaForCausalLM");
    assert.equal(d.modelType, "llama");
    assert.equal(d.sourceModel, "stories260K");
    assert.equal(d.sizeBytes, r.bytesOut);
    const orig = await describeModel(STORIES);
    assert.equal(orig.quantized, false);
    assert.equal(orig.parameters, 260032);
    assert.equal(orig.files.length, 8);
  });
});

test("stories260K, no double quant, blocksize 128, float16 compute", async () => {
  await withTmp(async (dir) => {
    const out = join(dir, "o");
    const r = await quantizeCheckpoint({ modelDir: STORIES, outDir: out, doubleQuant: false, blocksize: 128, computeDtype: "float16" });
    await checkOutput(STORIES, out, { blocksize: 128, doubleQuant: false, torchDtype: "float32" });
    await checkManifest(out);
    const qc = JSON.parse(await readFile(join(out, "config.json"), "utf8")).quantization_config;
    assert.equal(qc.bnb_4bit_use_double_quant, false);
    assert.equal(qc.bnb_4bit_compute_dtype, "float16");
    assert.deepEqual(r.quantization, { quantType: "nf4", blocksize: 128, doubleQuant: false, computeDtype: "float16", skipModules: [] });
    assert.equal((await describeModel(out)).quantization?.blocksize, 128);
  });
});

test("sharded output with skip modules; shards hold whole weight groups", async () => {
  await withTmp(async (dir) => {
    const one = join(dir, "one");
    const many = join(dir, "many");
    const skipModules = ["q_proj", "model.layers.4"];
    await quantizeCheckpoint({ modelDir: STORIES, outDir: one, skipModules });
    const r = await quantizeCheckpoint({ modelDir: STORIES, outDir: many, skipModules, maxShardSize: 60_000 });
    assert.ok(r.shards.length >= 4, `${r.shards.length} shards`);
    assert.equal(r.indexFile, "model.safetensors.index.json");
    assert.equal(r.tensorsQuantized, 4 * 6);
    const skipped = (k: string) => k.includes("q_proj") || k.startsWith("model.layers.4.");
    await checkOutput(STORIES, many, { blocksize: 64, doubleQuant: true, torchDtype: "float32", skipped });
    await checkManifest(many);
    const index = JSON.parse(await readFile(join(many, "model.safetensors.index.json"), "utf8"));
    const a = await SafetensorsSet.open(one);
    const b = await SafetensorsSet.open(many);
    try {
      assert.deepEqual(Object.keys(index.weight_map).sort(), [...b.tensors.keys()].sort());
      let total = 0;
      for (const [k, t] of a.tensors) {
        assert.ok((await a.read(k)).equals(await b.read(k)), `${k} identical in single-file and sharded output`);
        total += t.byteLength;
        const base = k.replace(/\.weight\..*$/, ".weight");
        assert.equal(index.weight_map[k], index.weight_map[base], `${k} shares the shard of ${base}`);
      }
      assert.equal(index.metadata.total_size, total);
    } finally {
      await a.close();
      await b.close();
    }
    const qc = JSON.parse(await readFile(join(many, "config.json"), "utf8")).quantization_config;
    assert.deepEqual(qc.llm_int8_skip_modules, ["lm_head", "q_proj", "model.layers.4"]);
    assert.deepEqual((await describeModel(many)).quantization?.skipModules, ["lm_head", "q_proj", "model.layers.4"]);
  });
});

test("OPT (F16, both key prefixes) and Qwen2 (BF16, q/k/v biases)", async () => {
  await withTmp(async (dir) => {
    for (const prefix of ["model.decoder.", "decoder."] as const) {
      const src = join(dir, `opt-${prefix.length}`);
      await writeSyntheticCheckpoint(src, TINY_CONFIGS.opt, { dtype: "F16", prefix, writeLmHead: prefix === "model.decoder.", seed: 11 });
      const out = join(dir, `opt-${prefix.length}-nf4`);
      const r = await quantizeCheckpoint({ modelDir: src, outDir: out, blocksize: 32 });
      assert.equal(r.tensorsQuantized, 2 * 6);
      await checkOutput(src, out, { blocksize: 32, doubleQuant: true, torchDtype: "float16" });
      const set = await SafetensorsSet.open(out);
      assert.equal(set.info(`${prefix}layers.0.fc1.bias`).dtype, "F16");
      assert.equal(set.info(`${prefix}embed_positions.weight`).dtype, "F16");
      assert.equal(set.tensors.has("lm_head.weight"), prefix === "model.decoder.");
      await set.close();
    }
    const src = join(dir, "qwen2");
    await writeSyntheticCheckpoint(src, TINY_CONFIGS.qwen2, { dtype: "BF16", seed: 12 });
    const out = join(dir, "qwen2-nf4");
    await quantizeCheckpoint({ modelDir: src, outDir: out, doubleQuant: false });
    await checkOutput(src, out, { blocksize: 64, doubleQuant: false, torchDtype: "bfloat16" });
    const set = await SafetensorsSet.open(out);
    for (const p of ["q", "k", "v"]) assert.equal(set.info(`model.layers.1.self_attn.${p}_proj.bias`).dtype, "BF16");
    assert.equal(set.tensors.has("model.layers.1.self_attn.o_proj.bias"), false);
    await set.close();
  });
});
