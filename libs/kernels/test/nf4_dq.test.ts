// NF4 weights whose block scales stay double-quantized in memory (WeightTensor.absmaxDq): every
// kernel that reads scales (M <= 8 exact and int8 decode, the packed GEMM's panel decode, the input
// backward, weightDecode / embedding rows, the engine's lm_head row views, training) must give
// results bit-identical to the same weight with the scales resolved to float32 (dequantizeAbsmax),
// at every SIMD level. Bit-identical is the contract because the kernels resolve the scales of the
// row / panel segment they decode and then run the fp32-absmax code unchanged.
import { test } from "node:test";
import assert from "node:assert/strict";
import { InvalidArgument } from "@qlora/core";
import {
  NativeModel,
  decodeWeight,
  dequantizeAbsmax,
  doubleQuantizeAbsmax,
  engineOps,
  linear,
  linearBackwardInput,
  linearInt8,
  quantizeNf4,
  trainOps,
} from "../src/index.js";
import type { EngineConfig, WeightTensor } from "../src/index.js";
import { LEVELS, normals, withLevel } from "./matmul_fixtures.js";

/**
 * The same NF4 weight twice: scales double-quantized (absmaxDq) and resolved to float32. Block
 * scales vary over four orders of magnitude so that the 8-bit codes matter.
 */
function dqPair(N: number, K: number, bs: number, seed: number, nestedBlocksize = 256): { dq: WeightTensor; f32: WeightTensor } {
  const n = N * K;
  const vals = normals(n, seed, 1);
  for (let i = 0; i < n; i++) vals[i]! *= 10 ** ((Math.floor(i / bs) * 7919) % 5 - 2);
  const q = quantizeNf4(vals, "f32", n, bs);
  const d = doubleQuantizeAbsmax(q.absmax, nestedBlocksize);
  const resolved = dequantizeAbsmax(d.qabsmax, d.nestedAbsmax, d.offset, d.quantMap, nestedBlocksize);
  // the double quantization is lossy (else the test would not tell the forms apart)
  assert.ok(resolved.some((v, b) => v !== q.absmax[b]), "resolved scales differ from the original ones");
  return {
    dq: { dtype: "nf4", shape: [N, K], data: q.packed, absmaxDq: d, blocksize: bs },
    f32: { dtype: "nf4", shape: [N, K], data: q.packed, absmax: resolved, blocksize: bs },
  };
}

function assertBitsEqual(a: Float32Array, b: Float32Array, what: string): void {
  assert.equal(a.length, b.length, `${what}: lengths`);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length), ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) {
    if (ua[i] !== ub[i]) assert.fail(`${what}: element ${i} differs: ${a[i]} vs ${b[i]}`);
  }
}

// shapes: K a multiple of the blocksize (in-register NF4 paths), odd K / K % bs != 0 (row-buffer
// decode, rows straddling blocks and bytes), and N past one GEMM column tile (256)
const SHAPES: [number, number, number][] = [
  [37, 128, 32], [29, 192, 64], [300, 256, 128], [5, 8192, 4096], [13, 4096 + 64, 4096],
  [33, 77, 32], [17, 101, 64], [9, 250, 128], [3, 4099, 4096],
];
const MS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 37];

test("linear / linearInt8 / linearBackwardInput / decodeWeight: double-quantized scales = resolved fp32, bit for bit", () => {
  let seed = 1;
  for (const [N, K, bs] of SHAPES) {
    const { dq, f32 } = dqPair(N, K, bs, seed++);
    const bias = normals(N, seed++);
    for (const level of LEVELS) {
      withLevel(level, () => {
        for (const M of MS) {
          const what = `[${N},${K}] bs ${bs} M ${M} ${level}`;
          const x = normals(M * K, seed++);
          assertBitsEqual(linear(x, M, dq, bias), linear(x, M, f32, bias), `linear ${what}`);
          const prev = normals(M * N, seed++);
          assertBitsEqual(linear(x, M, dq, undefined, prev.slice(), true), linear(x, M, f32, undefined, prev.slice(), true), `linear accumulate ${what}`);
          const a = linearInt8(x, M, dq, bias), b = linearInt8(x, M, f32, bias);
          assert.equal(a.int8, b.int8);
          assertBitsEqual(a.y, b.y, `linearInt8 ${what}`);
          const dy = normals(M * N, seed++);
          assertBitsEqual(linearBackwardInput(dy, M, dq), linearBackwardInput(dy, M, f32), `linearBackwardInput ${what}`);
        }
        const n = N * K;
        for (const [start, len] of [[0, n], [1, n - 2], [bs - 1, 2 * bs + 3], [n - bs - 5, bs + 5]] as const) {
          if (start < 0 || start + len > n || len <= 0) continue;
          assertBitsEqual(decodeWeight(dq, start, len), decodeWeight(f32, start, len), `decodeWeight [${start}, +${len}) [${N},${K}] bs ${bs} ${level}`);
        }
      });
    }
  }
});

test("dequantizeAbsmax (the resolver the kernels run per row): every SIMD level = a float32 oracle, odd lengths", () => {
  for (const [nb, nbs] of [[1, 256], [7, 256], [255, 256], [1000, 256], [1003, 5], [77, 1], [300, 64]] as const) {
    const q = quantizeNf4(normals(nb * 32, nb + nbs, 3), "f32", nb * 32, 32);
    const d = doubleQuantizeAbsmax(q.absmax, nbs);
    const want = new Float32Array(nb);
    // mul and add rounded separately (an FMA would differ in the last bit for some values)
    for (let b = 0; b < nb; b++) want[b] = Math.fround(Math.fround(d.quantMap[d.qabsmax[b]!]! * d.nestedAbsmax[Math.floor(b / nbs)]!) + d.offset);
    for (const level of LEVELS) {
      withLevel(level, () => assertBitsEqual(dequantizeAbsmax(d.qabsmax, d.nestedAbsmax, d.offset, d.quantMap, nbs), want, `nb ${nb} nested ${nbs} ${level}`));
    }
  }
});

test("a nested blocksize other than 256 decodes the same way (rows start mid nested block)", () => {
  const { dq, f32 } = dqPair(23, 96, 32, 91, 5);
  for (const level of LEVELS) {
    withLevel(level, () => {
      for (const M of [1, 3, 9, 37]) {
        const x = normals(M * 96, 92 + M);
        assertBitsEqual(linear(x, M, dq), linear(x, M, f32), `linear nested 5 M ${M} ${level}`);
        assertBitsEqual(linearBackwardInput(x.subarray(0, M * 23), M, dq), linearBackwardInput(x.subarray(0, M * 23), M, f32), `backward nested 5 M ${M} ${level}`);
      }
    });
  }
});

test("engine embedding rows and training ops: double-quantized = resolved", () => {
  const { dq, f32 } = dqPair(50, 72, 32, 7);
  const ids = Int32Array.from([0, 49, 3, 17, 17, 25]);
  for (const level of LEVELS) {
    withLevel(level, () => {
      assertBitsEqual(engineOps.embedding(dq, ids), engineOps.embedding(f32, ids), `embedding ${level}`);
      const M = 11;
      const h = normals(M * 72, 8), labels = Int32Array.from({ length: M }, (_, i) => (i * 7) % 50);
      const a = trainOps.lmHeadCrossEntropy(h, dq, labels, 4, 0.5), b = trainOps.lmHeadCrossEntropy(h, f32, labels, 4, 0.5);
      assert.equal(a.loss, b.loss, `lmHeadCrossEntropy loss ${level}`);
      assertBitsEqual(a.dh, b.dh, `lmHeadCrossEntropy dh ${level}`);
      const lora = { a: normals(3 * 72, 9, 0.1), b: normals(50 * 3, 10, 0.1), rank: 3, scaling: 2, dropout: 0.1, seed: 5n, stream: 2 };
      const dy = normals(M * 50, 11);
      const la = trainOps.loraLinear(h, M, dq, null, lora, dy, true), lb = trainOps.loraLinear(h, M, f32, null, lora, dy, true);
      for (const k of ["y", "dx", "ga", "gb"] as const) assertBitsEqual(la[k]!, lb[k]!, `loraLinear ${k} ${level}`);
    });
  }
});

// ---- a tiny Llama with every 2-D weight in NF4 --------------------------------------------------
const cfg: EngineConfig = {
  arch: "llama", hiddenSize: 64, intermediateSize: 96, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 16,
  vocabSize: 4500, maxPositions: 64, normEps: 1e-5, ropeTheta: 10000, ropeScaling: null,
  hiddenAct: "silu", tiedEmbeddings: false, qkvBias: false, oBias: false, mlpBias: false,
};

/** The model's weights twice (double-quantized / resolved). Nested blocksize 7: lm_head row views
 *  (4096-row vocab chunks in crossEntropy) start in the middle of a nested block and the kernels
 *  resolve scales into a buffer; 256 (bitsandbytes): the GEMV kernels resolve them per block. */
function tinyModels(nested: number): { dq: Record<string, WeightTensor>; f32: Record<string, WeightTensor>; targets: string[] } {
  const H = cfg.hiddenSize, I = cfg.intermediateSize, q = cfg.numHeads * cfg.headDim, kv = cfg.numKvHeads * cfg.headDim;
  const shapes: [string, number[]][] = [["embed_tokens", [cfg.vocabSize, H]], ["lm_head", [cfg.vocabSize, H]], ["norm.weight", [H]]];
  const targets: string[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const [n, o, i] of [["self_attn.q_proj", q, H], ["self_attn.k_proj", kv, H], ["self_attn.v_proj", kv, H], ["self_attn.o_proj", H, q],
      ["mlp.gate_proj", I, H], ["mlp.up_proj", I, H], ["mlp.down_proj", H, I]] as const) {
      shapes.push([`layers.${l}.${n}.weight`, [o, i]]);
      targets.push(`layers.${l}.${n}`);
    }
    shapes.push([`layers.${l}.input_layernorm.weight`, [H]], [`layers.${l}.post_attention_layernorm.weight`, [H]]);
  }
  const dq: Record<string, WeightTensor> = {}, f32: Record<string, WeightTensor> = {};
  let seed = 300;
  for (const [name, shape] of shapes) {
    if (shape.length === 1) {
      const w = Float32Array.from(normals(shape[0]!, seed++, 0.1), (v) => 1 + v);
      dq[name] = f32[name] = { dtype: "f32", shape, data: new Uint8Array(w.buffer) };
      continue;
    }
    const p = dqPair(shape[0]!, shape[1]!, name.includes("down") ? 32 : 64, seed++, nested);
    dq[name] = p.dq;
    f32[name] = p.f32;
  }
  return { dq, f32, targets };
}

for (const nested of [7, 256])
test(`NativeModel (nested blocksize ${nested}): forward, crossEntropy (lm_head row views) and a training step are bit-identical; residentBytes shrink`, () => {
  const w = tinyModels(nested);
  const a = new NativeModel(cfg, w.dq, { maxSequences: 1, maxContext: 32 });
  const b = new NativeModel(cfg, w.f32, { maxSequences: 1, maxContext: 32 });
  try {
    const toks = Int32Array.from({ length: 13 }, (_, i) => (i * 977 + 5) % cfg.vocabSize);
    for (const M of [1, 13]) {
      const sa = a.createSequence(), sb = b.createSequence();
      const la = a.forward([{ seq: sa, tokens: toks.subarray(0, M), adapter: -1 }], { allLogits: true });
      const lb = b.forward([{ seq: sb, tokens: toks.subarray(0, M), adapter: -1 }], { allLogits: true });
      assertBitsEqual(la, lb, `forward logits, ${M} tokens`);
      a.dropSequence(sa);
      b.dropSequence(sb);
    }
    assert.equal(a.crossEntropy(toks, -1).loss, b.crossEntropy(toks, -1).loss, "crossEntropy (vocab chunked)");
    assert.equal(a.crossEntropy(toks.subarray(0, 5), -1).loss, b.crossEntropy(toks.subarray(0, 5), -1).loss, "crossEntropy, 4 rows (GEMV)");

    const batch = { tokens: toks.subarray(0, 12), labels: Int32Array.from(toks.subarray(1, 13)), batchSize: 2, seqLen: 6 };
    for (const m of [a, b]) m.initLora(0, { rank: 2, alpha: 4, useRslora: false, dropout: 0.1, targets: w.targets, seed: 3n });
    const ra = a.trainForwardBackward(0, batch, { dropoutSeed: 9n, gradScale: 1, checkpointing: true });
    const rb = b.trainForwardBackward(0, batch, { dropoutSeed: 9n, gradScale: 1, checkpointing: true });
    assert.equal(ra.loss, rb.loss, "training loss");
    // lr 0, beta1 0: the first moments are the gradients
    const step = { lr: 0, beta1: 0, beta2: 0, eps: 1, weightDecay: 0, maxGradNorm: 0, step: 1 };
    assert.equal(a.adamwStep(0, step).gradNorm, b.adamwStep(0, step).gradNorm, "gradient norm");
    const ga = a.getLoraState(0).modules, gb = b.getLoraState(0).modules;
    for (const name of w.targets) {
      assertBitsEqual(ga[name]!.ma, gb[name]!.ma, `dA ${name}`);
      assertBitsEqual(ga[name]!.mb, gb[name]!.mb, `dB ${name}`);
    }

    // scales: 1 byte per block + 4 per nested block instead of 4 per block
    let saved = 0;
    for (const t of Object.values(w.dq)) {
      if (t.absmaxDq) saved += 4 * t.absmaxDq.qabsmax.length - (t.absmaxDq.qabsmax.length + 4 * t.absmaxDq.nestedAbsmax.length);
    }
    assert.equal(b.residentBytes() - a.residentBytes(), saved, "residentBytes count the double-quantized scales");
  } finally {
    a.dispose();
    b.dispose();
  }
});

test("validation: an nf4 weight needs absmax or a complete absmaxDq", () => {
  const { dq } = dqPair(8, 64, 32, 3);
  const x = normals(64, 4);
  const d = dq.absmaxDq!;
  const bad = (absmaxDq: unknown): WeightTensor => ({ ...dq, absmaxDq: absmaxDq as WeightTensor["absmaxDq"] });
  assert.throws(() => linear(x, 1, { ...dq, absmaxDq: undefined }), InvalidArgument);
  assert.throws(() => linear(x, 1, bad({ ...d, qabsmax: d.qabsmax.subarray(1) })), InvalidArgument);
  assert.throws(() => linear(x, 1, bad({ ...d, quantMap: d.quantMap.subarray(1) })), InvalidArgument);
  assert.throws(() => linear(x, 1, bad({ ...d, nestedAbsmax: new Float32Array(0) })), InvalidArgument);
  assert.throws(() => linear(x, 1, bad({ ...d, nestedBlocksize: 0 })), InvalidArgument);
  // the native bindings check the same (the engine and the training ops take WeightTensors directly)
  assert.throws(() => engineOps.embedding(bad({ ...d, qabsmax: d.qabsmax.subarray(1) }), Int32Array.from([0])), /too short/);
  assert.throws(() => engineOps.embedding(bad({ ...d, quantMap: new Float32Array(10) }), Int32Array.from([0])), /256/);
  assert.throws(() => trainOps.lmHeadCrossEntropy(x, bad({ ...d, offset: "1" }), Int32Array.from([0]), 1, 1), /offset/);
});
