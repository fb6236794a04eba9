// The native model against a naive TypeScript forward (no cache, float64), the KV-cache path
// against full recomputation, mixed-adapter batches against one-row runs, crossEntropy against
// allLogits, NF4 weights, sequence bookkeeping, and the real stories260K checkpoint.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { InvalidArgument, NotFound, ResourceExhausted } from "@qlora/core";
import { NativeModel, dequantizeNf4, quantizeNf4, sampleToken, seedRng } from "../src/index.js";
import type { EngineAdapter, EngineConfig } from "../src/index.js";
import type { WeightTensor } from "../src/tensor.js";
import { checkForwardSample, f32Tensor, readSafetensors, storiesDir } from "./helpers.js";
import { rng, uniformSigned } from "./random.js";

// ---- helpers ----------------------------------------------------------------------------------
function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, "lengths differ");
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
function assertClose(a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string): void {
  const d = maxDiff(a, b);
  assert.ok(d <= tol, `${what}: max |diff| ${d} > ${tol}`);
}
const argmax = (a: ArrayLike<number>, off = 0, n = a.length) => {
  let b = 0;
  for (let i = 1; i < n; i++) if (a[off + i]! > a[off + b]!) b = i;
  return b;
};

// ---- tiny random models -----------------------------------------------------------------------
type Weights = Map<string, Float32Array>;

/** Names and shapes of a config's tensors (canonical names, docs/architecture.md). */
function tensorShapes(c: EngineConfig): [string, number[]][] {
  const H = c.hiddenSize, I = c.intermediateSize, q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  const out: [string, number[]][] = [["embed_tokens", [c.vocabSize, H]], ["norm.weight", [H]]];
  if (!c.tiedEmbeddings) out.push(["lm_head", [c.vocabSize, H]]);
  const opt = c.arch === "opt";
  if (opt) out.push(["embed_positions", [c.maxPositions + 2, H]], ["norm.bias", [H]]);
  for (let l = 0; l < c.numLayers; l++) {
    const p = `layers.${l}.`;
    const lin = (name: string, o: number, i: number, bias: boolean) => {
      out.push([`${p}${name}.weight`, [o, i]]);
      if (bias) out.push([`${p}${name}.bias`, [o]]);
    };
    lin("self_attn.q_proj", q, H, c.qkvBias);
    lin("self_attn.k_proj", kv, H, c.qkvBias);
    lin("self_attn.v_proj", kv, H, c.qkvBias);
    lin(opt ? "self_attn.out_proj" : "self_attn.o_proj", H, q, c.oBias);
    if (opt) {
      lin("fc1", I, H, c.mlpBias);
      lin("fc2", H, I, c.mlpBias);
    } else {
      lin("mlp.gate_proj", I, H, c.mlpBias);
      lin("mlp.up_proj", I, H, c.mlpBias);
      lin("mlp.down_proj", H, I, c.mlpBias);
    }
    for (const n of opt ? ["self_attn_layer_norm", "final_layer_norm"] : ["input_layernorm", "post_attention_layernorm"]) {
      out.push([`${p}${n}.weight`, [H]]);
      if (opt) out.push([`${p}${n}.bias`, [H]]);
    }
  }
  return out;
}

function randomWeights(c: EngineConfig, seed: number): Weights {
  const r = rng(seed), w: Weights = new Map();
  for (const [name, shape] of tensorShapes(c)) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (name.endsWith("norm.weight") || name.endsWith("layernorm.weight") || name.endsWith("layer_norm.weight")) {
      w.set(name, Float32Array.from({ length: n }, () => 0.8 + 0.4 * r()));
    } else if (shape.length === 1) {
      w.set(name, uniformSigned(n, r, 0.1));
    } else {
      w.set(name, uniformSigned(n, r, name.startsWith("embed") ? 1 : 1.6 / Math.sqrt(shape[1]!)));
    }
  }
  return w;
}

function toTensors(c: EngineConfig, w: Weights): Record<string, WeightTensor> {
  const shapes = new Map(tensorShapes(c));
  const out: Record<string, WeightTensor> = {};
  for (const [name, a] of w) out[name] = f32Tensor(a, shapes.get(name)!);
  return out;
}

// ---- naive TypeScript forward (float64, no cache) ------------------------------------------------
function linear(x: Float64Array, T: number, inF: number, W: Float32Array, b: Float32Array | undefined, outF: number,
  lora?: { a: Float32Array; b: Float32Array; rank: number; scaling: number }): Float64Array {
  const y = new Float64Array(T * outF);
  for (let t = 0; t < T; t++) {
    const mid = lora ? new Float64Array(lora.rank) : null;
    if (lora && mid) for (let j = 0; j < lora.rank; j++) {
      let s = 0;
      for (let i = 0; i < inF; i++) s += x[t * inF + i]! * lora.a[j * inF + i]!;
      mid[j] = s;
    }
    for (let o = 0; o < outF; o++) {
      let s = b ? b[o]! : 0;
      for (let i = 0; i < inF; i++) s += x[t * inF + i]! * W[o * inF + i]!;
      if (lora && mid) {
        let d = 0;
        for (let j = 0; j < lora.rank; j++) d += mid[j]! * lora.b[o * lora.rank + j]!;
        s += lora.scaling * d;
      }
      y[t * outF + o] = s;
    }
  }
  return y;
}
function rms(x: Float64Array, T: number, H: number, w: Float32Array, eps: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let i = 0; i < H; i++) ss += x[t * H + i]! ** 2;
    const inv = 1 / Math.sqrt(ss / H + eps);
    for (let i = 0; i < H; i++) y[t * H + i] = x[t * H + i]! * inv * w[i]!;
  }
  return y;
}
function layerNorm(x: Float64Array, T: number, H: number, w: Float32Array, b: Float32Array, eps: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let t = 0; t < T; t++) {
    let m = 0, v = 0;
    for (let i = 0; i < H; i++) m += x[t * H + i]!;
    m /= H;
    for (let i = 0; i < H; i++) v += (x[t * H + i]! - m) ** 2;
    const inv = 1 / Math.sqrt(v / H + eps);
    for (let i = 0; i < H; i++) y[t * H + i] = (x[t * H + i]! - m) * inv * w[i]! + b[i]!;
  }
  return y;
}
function invFreq(c: EngineConfig): Float32Array {
  const hd = c.headDim, inv = new Float32Array(hd / 2);
  for (let j = 0; j < hd / 2; j++) inv[j] = 1 / Math.pow(c.ropeTheta, (2 * j) / hd);
  const s = c.ropeScaling;
  if (s) {
    for (let j = 0; j < hd / 2; j++) {
      const f = inv[j]!, wl = (2 * Math.PI) / f;
      if (wl < s.originalMaxPositions / s.highFreqFactor) continue;
      if (wl > s.originalMaxPositions / s.lowFreqFactor) inv[j] = f / s.factor;
      else {
        const sm = (s.originalMaxPositions / wl - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        inv[j] = (1 - sm) * (f / s.factor) + sm * f;
      }
    }
  }
  return inv;
}
function rope(x: Float64Array, T: number, nh: number, hd: number, inv: Float32Array): void {
  const half = hd / 2;
  for (let t = 0; t < T; t++)
    for (let h = 0; h < nh; h++) {
      const o = (t * nh + h) * hd;
      for (let j = 0; j < half; j++) {
        const f = Math.fround(t * inv[j]!), cs = Math.cos(f), sn = Math.sin(f);
        const x1 = x[o + j]!, x2 = x[o + j + half]!;
        x[o + j] = x1 * cs - x2 * sn;
        x[o + j + half] = x2 * cs + x1 * sn;
      }
    }
}
function causalAttention(q: Float64Array, k: Float64Array, v: Float64Array, T: number, c: EngineConfig, scale: number): Float64Array {
  const nh = c.numHeads, nkv = c.numKvHeads, hd = c.headDim, rep = nh / nkv;
  const out = new Float64Array(T * nh * hd);
  for (let t = 0; t < T; t++)
    for (let h = 0; h < nh; h++) {
      const kh = Math.floor(h / rep), s = new Float64Array(t + 1);
      for (let j = 0; j <= t; j++) {
        let d = 0;
        for (let i = 0; i < hd; i++) d += q[(t * nh + h) * hd + i]! * k[(j * nkv + kh) * hd + i]!;
        s[j] = d * scale;
      }
      const m = Math.max(...s);
      let z = 0;
      for (let j = 0; j <= t; j++) z += (s[j] = Math.exp(s[j]! - m));
      for (let j = 0; j <= t; j++)
        for (let i = 0; i < hd; i++) out[(t * nh + h) * hd + i] += (s[j]! / z) * v[(j * nkv + kh) * hd + i]!;
    }
  return out;
}

/** logits [T, V] of the whole token sequence, Hugging Face semantics (formats.md §6). */
function naiveForward(c: EngineConfig, w: Weights, tokens: ArrayLike<number>, adapter?: EngineAdapter): Float64Array {
  const T = tokens.length, H = c.hiddenSize, I = c.intermediateSize, hd = c.headDim;
  const qd = c.numHeads * hd, kvd = c.numKvHeads * hd, opt = c.arch === "opt";
  const g = (n: string) => w.get(n)!;
  const lin = (l: number, mod: string, x: Float64Array, inF: number, outF: number) => {
    const m = adapter?.modules[`layers.${l}.${mod}`];
    return linear(x, T, inF, g(`layers.${l}.${mod}.weight`), w.get(`layers.${l}.${mod}.bias`), outF,
      m ? { ...m, scaling: adapter!.scaling } : undefined);
  };
  let x: Float64Array = new Float64Array(T * H);
  const E = g("embed_tokens"), P = opt ? g("embed_positions") : null;
  for (let t = 0; t < T; t++)
    for (let i = 0; i < H; i++) x[t * H + i] = E[tokens[t]! * H + i]! + (P ? P[(t + 2) * H + i]! : 0);
  const norm = (l: number, n: string, v: Float64Array) =>
    opt ? layerNorm(v, T, H, g(`layers.${l}.${n}.weight`), g(`layers.${l}.${n}.bias`), c.normEps)
      : rms(v, T, H, g(`layers.${l}.${n}.weight`), c.normEps);
  const pre = !opt || c.doLayerNormBefore !== false;
  const inv = invFreq(c);
  for (let l = 0; l < c.numLayers; l++) {
    const a = pre ? norm(l, opt ? "self_attn_layer_norm" : "input_layernorm", x) : x;
    const q = lin(l, "self_attn.q_proj", a, H, qd), k = lin(l, "self_attn.k_proj", a, H, kvd), v = lin(l, "self_attn.v_proj", a, H, kvd);
    let scale = 1 / Math.sqrt(hd);
    if (opt) {
      for (let i = 0; i < q.length; i++) q[i]! *= 1 / Math.sqrt(hd);
      scale = 1;
    } else {
      rope(q, T, c.numHeads, hd, inv);
      rope(k, T, c.numKvHeads, hd, inv);
    }
    const att = causalAttention(q, k, v, T, c, scale);
    const o = lin(l, opt ? "self_attn.out_proj" : "self_attn.o_proj", att, qd, H);
    for (let i = 0; i < x.length; i++) x[i]! += o[i]!;
    if (!pre) x = norm(l, "self_attn_layer_norm", x);
    const m = pre ? norm(l, opt ? "final_layer_norm" : "post_attention_layernorm", x) : x;
    let d: Float64Array;
    if (opt) {
      const f = lin(l, "fc1", m, H, I);
      for (let i = 0; i < f.length; i++) f[i] = Math.max(0, f[i]!);
      d = lin(l, "fc2", f, I, H);
    } else {
      const gt = lin(l, "mlp.gate_proj", m, H, I), up = lin(l, "mlp.up_proj", m, H, I);
      for (let i = 0; i < gt.length; i++) gt[i] = (gt[i]! / (1 + Math.exp(-gt[i]!))) * up[i]!;
      d = lin(l, "mlp.down_proj", gt, I, H);
    }
    for (let i = 0; i < x.length; i++) x[i]! += d[i]!;
    if (!pre) x = norm(l, "final_layer_norm", x);
  }
  if (w.has("norm.weight")) x = opt ? layerNorm(x, T, H, g("norm.weight"), g("norm.bias"), c.normEps) : rms(x, T, H, g("norm.weight"), c.normEps);
  return linear(x, T, H, c.tiedEmbeddings ? E : g("lm_head"), undefined, c.vocabSize);
}

// ---- configs ----------------------------------------------------------------------------------
const llamaGqa: EngineConfig = {
  arch: "llama", hiddenSize: 30, intermediateSize: 47, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 10,
  vocabSize: 61, maxPositions: 64, normEps: 1e-5, ropeTheta: 10000,
  ropeScaling: { type: "llama3", factor: 4, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 16 },
  hiddenAct: "silu", tiedEmbeddings: false, qkvBias: true, oBias: false, mlpBias: false,
};
const llamaTiedBiases: EngineConfig = {
  ...llamaGqa, hiddenSize: 21, numHeads: 3, numKvHeads: 1, headDim: 8, intermediateSize: 33, vocabSize: 53,
  ropeScaling: null, ropeTheta: 500, tiedEmbeddings: true, oBias: true, mlpBias: true, numLayers: 3,
};
const optPre: EngineConfig = {
  arch: "opt", hiddenSize: 24, intermediateSize: 40, numLayers: 2, numHeads: 3, numKvHeads: 3, headDim: 8,
  vocabSize: 57, maxPositions: 40, normEps: 1e-5, ropeTheta: 0, ropeScaling: null, hiddenAct: "relu",
  tiedEmbeddings: true, qkvBias: true, oBias: true, mlpBias: true, doLayerNormBefore: true,
};
const optPost: EngineConfig = { ...optPre, doLayerNormBefore: false };

function tokensOf(n: number, V: number, seed: number): Int32Array {
  const r = rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(r() * V));
}

function randomAdapter(c: EngineConfig, seed: number, modules: string[], rank: number, scaling: number): EngineAdapter {
  const r = rng(seed), H = c.hiddenSize, I = c.intermediateSize, q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  const dims: Record<string, [number, number]> = {
    "self_attn.q_proj": [H, q], "self_attn.k_proj": [H, kv], "self_attn.v_proj": [H, kv], "self_attn.o_proj": [q, H],
    "self_attn.out_proj": [q, H], "mlp.gate_proj": [H, I], "mlp.up_proj": [H, I], "mlp.down_proj": [I, H], fc1: [H, I], fc2: [I, H],
  };
  const out: EngineAdapter = { scaling, modules: {} };
  for (let l = 0; l < c.numLayers; l++)
    for (const m of modules) {
      const [inF, outF] = dims[m]!;
      out.modules[`layers.${l}.${m}`] = { a: uniformSigned(rank * inF, r, 1 / Math.sqrt(inF)), b: uniformSigned(outF * rank, r, 0.5), rank };
    }
  return out;
}

// ---- tests ------------------------------------------------------------------------------------
for (const [name, cfg] of [["llama GQA+qkv bias+llama3 rope", llamaGqa], ["llama tied, all biases", llamaTiedBiases],
  ["opt pre-LN", optPre], ["opt post-LN", optPost]] as const) {
  test(`forward equals the naive TypeScript forward: ${name}`, () => {
    const w = randomWeights(cfg, 11);
    if (cfg.arch === "opt" && cfg.doLayerNormBefore === false) {
      w.delete("norm.weight");
      w.delete("norm.bias");
    }
    const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 2, maxContext: 32 });
    const toks = tokensOf(13, cfg.vocabSize, 5);
    const want = naiveForward(cfg, w, toks);
    const seq = m.createSequence();
    const all = m.forward([{ seq, tokens: toks, adapter: -1 }], { allLogits: true });
    assertClose(all, want, 1e-4, "allLogits");
    assert.equal(m.sequenceLength(seq), 13);

    // KV-cache path: prefill 5, then 3, then one token at a time
    const s2 = m.createSequence();
    const steps = [5, 3, 1, 1, 1, 1, 1];
    let at = 0;
    for (const n of steps) {
      const last = m.forward([{ seq: s2, tokens: toks.subarray(at, at + n), adapter: -1 }]);
      at += n;
      assertClose(last, want.subarray((at - 1) * cfg.vocabSize, at * cfg.vocabSize), 1e-4, `cached step at ${at}`);
    }
    m.dispose();
  });
}

test("LoRA: one adapter equals the naive forward with y += scaling·(x·Aᵀ)·Bᵀ (llama and opt)", () => {
  for (const [cfg, mods] of [[llamaGqa, ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]],
    [optPre, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.out_proj", "fc1", "fc2"]]] as const) {
    const w = randomWeights(cfg, 12);
    const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 1, maxContext: 16 });
    const ad = randomAdapter(cfg, 3, [...mods], 3, 2.0);
    m.setAdapter(2, ad);
    const toks = tokensOf(9, cfg.vocabSize, 8);
    const seq = m.createSequence();
    const got = m.forward([{ seq, tokens: toks, adapter: 2 }], { allLogits: true });
    const want = naiveForward(cfg, w, toks, ad);
    assertClose(got, want, 1e-4, `${cfg.arch} lora`);
    assert.ok(maxDiff(want, naiveForward(cfg, w, toks)) > 1e-2, "the adapter changes the logits");
    m.dispose();
  }
});

test("a mixed batch (prefill + decode rows, different adapters) equals each row run alone", () => {
  const cfg = llamaGqa, w = randomWeights(cfg, 13);
  const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 8, maxContext: 32 });
  const adapters = new Map<number, EngineAdapter>([
    [0, randomAdapter(cfg, 21, ["self_attn.q_proj", "self_attn.v_proj"], 4, 1.5)],
    [3, randomAdapter(cfg, 22, ["mlp.up_proj", "self_attn.o_proj", "self_attn.k_proj"], 2, 0.75)],
  ]);
  for (const [slot, ad] of adapters) m.setAdapter(slot, ad);
  // history (prefix already in the cache) and the step's tokens per row
  const spec = [
    { hist: tokensOf(0, 61, 1), step: tokensOf(6, 61, 2), adapter: 0 },
    { hist: tokensOf(4, 61, 3), step: tokensOf(1, 61, 4), adapter: -1 },
    { hist: tokensOf(2, 61, 5), step: tokensOf(3, 61, 6), adapter: 3 },
    { hist: tokensOf(7, 61, 7), step: tokensOf(1, 61, 8), adapter: 0 },
    { hist: tokensOf(0, 61, 9), step: tokensOf(2, 61, 10), adapter: 3 },
  ];
  const prep = () =>
    spec.map((s) => {
      const seq = m.createSequence();
      if (s.hist.length) m.forward([{ seq, tokens: s.hist, adapter: s.adapter }]);
      return seq;
    });
  const seqs = prep();
  const rows = spec.map((s, i) => ({ seq: seqs[i]!, tokens: s.step, adapter: s.adapter }));
  const batched = m.forward(rows);
  const batchedAll = (() => {
    for (const [i, s] of seqs.entries()) m.truncateSequence(s, spec[i]!.hist.length);
    return m.forward(rows, { allLogits: true });
  })();
  for (const s of seqs) m.dropSequence(s);
  const V = cfg.vocabSize;
  let off = 0;
  for (const [i, s] of spec.entries()) {
    const seq = m.createSequence();
    if (s.hist.length) m.forward([{ seq, tokens: s.hist, adapter: s.adapter }]);
    const alone = m.forward([{ seq, tokens: s.step, adapter: s.adapter }], { allLogits: true });
    m.dropSequence(seq);
    const lastAlone = alone.subarray((s.step.length - 1) * V);
    assertClose(batched.subarray(i * V, (i + 1) * V), lastAlone, 1e-5, `row ${i} last logits`);
    assertClose(batchedAll.subarray(off * V, (off + s.step.length) * V), alone, 1e-5, `row ${i} all logits`);
    off += s.step.length;
    // and against the naive forward over the full history
    const full = naiveForward(cfg, w, [...s.hist, ...s.step], adapters.get(s.adapter));
    assertClose(lastAlone, full.subarray((s.hist.length + s.step.length - 1) * V), 1e-4, `row ${i} vs naive`);
  }
  m.dispose();
});

test("crossEntropy equals the mean next-token CE of allLogits (vocab chunked, nf4 tied head)", () => {
  // vocab > one 4096-row chunk; nf4 embed/lm_head with H = 24 so chunk starts must be block aligned
  const cfg: EngineConfig = { ...llamaTiedBiases, hiddenSize: 24, vocabSize: 4500, numLayers: 1, oBias: false, mlpBias: false };
  const w = randomWeights(cfg, 14);
  const tensors = toTensors(cfg, w);
  const E = w.get("embed_tokens")!;
  const q = quantizeNf4(E, "f32", E.length, 64);
  tensors["embed_tokens"] = { dtype: "nf4", shape: [cfg.vocabSize, 24], data: q.packed, absmax: q.absmax, blocksize: 64 };
  const m = new NativeModel(cfg, tensors, { maxSequences: 1, maxContext: 40 });
  m.setAdapter(1, randomAdapter(cfg, 5, ["self_attn.v_proj", "mlp.down_proj"], 2, 1));
  const toks = tokensOf(23, cfg.vocabSize, 15);
  const seq = m.createSequence();
  m.forward([{ seq, tokens: toks.subarray(0, 4), adapter: -1 }]);
  for (const adapter of [-1, 1]) {
    const ce = m.crossEntropy(toks, adapter);
    m.truncateSequence(seq, 0);
    const all = m.forward([{ seq, tokens: toks, adapter }], { allLogits: true });
    let sum = 0;
    const V = cfg.vocabSize;
    for (let t = 0; t + 1 < toks.length; t++) {
      const row = all.subarray(t * V, (t + 1) * V);
      let mx = -Infinity;
      for (const v of row) mx = Math.max(mx, v);
      let z = 0;
      for (const v of row) z += Math.exp(v - mx);
      sum += mx + Math.log(z) - row[toks[t + 1]!]!;
    }
    assert.equal(ce.tokens, toks.length - 1);
    assert.ok(Math.abs(ce.loss - sum / (toks.length - 1)) < 1e-5, `adapter ${adapter}: ${ce.loss} vs ${sum / (toks.length - 1)}`);
  }
  assert.equal(m.sequenceLength(seq), toks.length, "crossEntropy leaves user sequences alone");
  assert.throws(() => m.crossEntropy(toks.subarray(0, 1), -1), InvalidArgument);
  m.dispose();
});

test("nf4 weights: forward equals the naive forward over the dequantized weights", () => {
  const cfg = llamaGqa, w = randomWeights(cfg, 16);
  const tensors = toTensors(cfg, w), deq: Weights = new Map(w);
  for (const [name, t] of Object.entries(tensors)) {
    if (t.shape.length !== 2 || name.startsWith("embed")) continue;
    const a = w.get(name)!, n = a.length, bs = name.includes("down") ? 32 : 64;
    const q = quantizeNf4(a, "f32", n, bs);
    tensors[name] = { dtype: "nf4", shape: t.shape, data: q.packed, absmax: q.absmax, blocksize: bs };
    deq.set(name, dequantizeNf4(q.packed, q.absmax, n, bs));
  }
  const m = new NativeModel(cfg, tensors, { maxSequences: 1, maxContext: 16 });
  const toks = tokensOf(11, cfg.vocabSize, 17);
  const seq = m.createSequence();
  const got = m.forward([{ seq, tokens: toks, adapter: -1 }], { allLogits: true });
  assertClose(got, naiveForward(cfg, deq, toks), 1e-4, "nf4 forward");
  assert.ok(m.residentBytes() > 0);
  m.dispose();
});

test("sequences: slots, truncate, limits and errors", () => {
  const cfg = optPre, w = randomWeights(cfg, 18);
  const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 2, maxContext: 10 });
  assert.equal(m.maxSequences, 2);
  assert.equal(m.maxContext, 10);
  const a = m.createSequence(), b = m.createSequence();
  assert.notEqual(a, b);
  assert.throws(() => m.createSequence(), ResourceExhausted);
  const toks = tokensOf(8, cfg.vocabSize, 19);
  const first = m.forward([{ seq: a, tokens: toks, adapter: -1 }], { allLogits: true });
  m.truncateSequence(a, 3);
  assert.equal(m.sequenceLength(a), 3);
  const again = m.forward([{ seq: a, tokens: toks.subarray(3), adapter: -1 }], { allLogits: true });
  assertClose(again, first.subarray(3 * cfg.vocabSize), 1e-6, "re-decoding after truncate");
  assert.throws(() => m.forward([{ seq: a, tokens: toks.subarray(0, 3), adapter: -1 }]), ResourceExhausted); // 8 + 3 > 10
  assert.throws(() => m.forward([{ seq: b, tokens: new Int32Array([cfg.vocabSize]), adapter: -1 }]), InvalidArgument);
  assert.throws(() => m.forward([{ seq: b, tokens: toks.subarray(0, 1), adapter: 4 }]), NotFound);
  assert.throws(() => m.forward([{ seq: b, tokens: toks.subarray(0, 1), adapter: -1 }, { seq: b, tokens: toks.subarray(0, 1), adapter: -1 }]), InvalidArgument);
  assert.throws(() => m.truncateSequence(a, 9), InvalidArgument);
  m.dropSequence(a);
  assert.throws(() => m.sequenceLength(a), NotFound);
  assert.equal(m.createSequence(), a);
  assert.equal(m.sequenceLength(a), 0);
  // out buffer reuse
  const out = new Float32Array(cfg.vocabSize);
  assert.equal(m.forward([{ seq: a, tokens: toks.subarray(0, 2), adapter: -1 }], { out }), out);
  assertClose(out, first.subarray(cfg.vocabSize, 2 * cfg.vocabSize), 1e-6, "out buffer");
  // adapters: names and sizes are checked
  assert.throws(() => m.setAdapter(0, { scaling: 1, modules: { "layers.0.mlp.up_proj": { a: new Float32Array(24), b: new Float32Array(40), rank: 1 } } }), InvalidArgument);
  assert.throws(() => m.setAdapter(0, { scaling: 1, modules: { "layers.0.fc1": { a: new Float32Array(23), b: new Float32Array(40), rank: 1 } } }), InvalidArgument);
  assert.throws(() => m.setAdapter(0, { scaling: 1, modules: { "layers.2.fc1": { a: new Float32Array(24), b: new Float32Array(40), rank: 1 } } }), InvalidArgument);
  m.setAdapter(0, { scaling: 1, modules: { "layers.0.fc1": { a: new Float32Array(24), b: new Float32Array(40), rank: 1 } } });
  m.removeAdapter(0);
  assert.throws(() => m.removeAdapter(0), NotFound);
  m.dispose();
  assert.throws(() => m.createSequence(), /disposed/);
});

test("weights are validated: missing, misshapen and unexpected tensors", () => {
  const cfg = llamaTiedBiases, w = randomWeights(cfg, 20);
  const good = toTensors(cfg, w);
  const { ["layers.1.mlp.up_proj.weight"]: _dropped, ...missing } = good;
  assert.throws(() => new NativeModel(cfg, missing), NotFound);
  assert.throws(() => new NativeModel(cfg, { ...good, "layers.0.self_attn.q_proj.weight": { ...good["layers.0.self_attn.q_proj.weight"]!, shape: [21, 24] } }), InvalidArgument);
  assert.throws(() => new NativeModel(cfg, { ...good, "layers.9.mlp.up_proj.weight": good["layers.0.mlp.up_proj.weight"]! }), /unexpected weights/);
  assert.throws(() => new NativeModel({ ...cfg, numKvHeads: 2 }, good), InvalidArgument);
});

test("forwardSample: each row's token = sampleToken over forward's logits (greedy, top-k/top-p + penalty, full distribution, unsampled rows), mixed adapters", () => {
  const cfg = llamaGqa, w = randomWeights(cfg, 41);
  const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 8, maxContext: 32 });
  m.setAdapter(2, randomAdapter(cfg, 42, ["self_attn.q_proj", "mlp.up_proj"], 4, 2));
  checkForwardSample(m, cfg.vocabSize, [2, -1, 2, -1]);
  m.dispose();
});

test("forwardSample: bad sampling entries → InvalidArgument, and the rows are not run", () => {
  const cfg = llamaGqa, w = randomWeights(cfg, 43);
  const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 2, maxContext: 16 });
  const seq = m.createSequence();
  const row = [{ seq, tokens: Int32Array.of(1, 2), adapter: -1 }];
  const params = { temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1 };
  const bad: [string, unknown[]][] = [
    ["one entry (or null) per row", []],
    ["needs temperature >= 0", [{ params: { ...params, temperature: -1 }, recent: null, rng: seedRng(1n) }]],
    ["BigUint64Array", [{ params, recent: null, rng: new Float64Array(4) }]],
    ["BigUint64Array(4)", [{ params, recent: null, rng: new BigUint64Array(2) }]],
    ["Int32Array", [{ params, recent: [1, 2], rng: seedRng(1n) }]],
  ];
  for (const [msg, sampling] of bad) {
    assert.throws(() => m.forwardSample(row, sampling as never), (e: unknown) => e instanceof InvalidArgument && e.message.includes(msg), msg);
  }
  assert.equal(m.sequenceLength(seq), 0, "a rejected call appends nothing");
  assert.deepEqual(Array.from(m.forwardSample(row, [null])), [-1]);
  assert.equal(m.sequenceLength(seq), 2);
  m.dispose();
});

// ---- the real checkpoint ----------------------------------------------------------------------
test("stories260K: greedy tokens, cross-entropy and final logits match reference.json", { skip: !existsSync(`${storiesDir}/model.safetensors`) }, () => {
  const hf = JSON.parse(readFileSync(`${storiesDir}/config.json`, "utf8"));
  const ref = JSON.parse(readFileSync(`${storiesDir}/reference.json`, "utf8"));
  const cfg: EngineConfig = {
    arch: "llama", hiddenSize: hf.hidden_size, intermediateSize: hf.intermediate_size, numLayers: hf.num_hidden_layers,
    numHeads: hf.num_attention_heads, numKvHeads: hf.num_key_value_heads, headDim: hf.head_dim, vocabSize: hf.vocab_size,
    maxPositions: hf.max_position_embeddings, normEps: hf.rms_norm_eps, ropeTheta: hf.rope_theta, ropeScaling: null,
    hiddenAct: hf.hidden_act, tiedEmbeddings: hf.tie_word_embeddings, qkvBias: hf.attention_bias, oBias: hf.attention_bias,
    mlpBias: hf.mlp_bias,
  };
  const weights: Record<string, WeightTensor> = {};
  for (const [name, t] of readSafetensors(`${storiesDir}/model.safetensors`)) {
    assert.equal(t.dtype, "F32");
    const canon = name === "model.embed_tokens.weight" ? "embed_tokens" : name.replace(/^model\./, "");
    weights[canon] = { dtype: "f32", shape: t.shape, data: t.data };
  }
  const m = new NativeModel(cfg, weights, { maxSequences: 2, maxContext: 128 });

  // greedy continuation: prefill the prompt, then one token per step
  const seq = m.createSequence(), st = seedRng(0n);
  const greedy = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 };
  let logits = m.forward([{ seq, tokens: Int32Array.from(ref.greedy.prompt_ids), adapter: -1 }]);
  const got: number[] = [];
  for (let i = 0; i < ref.greedy.new_tokens; i++) {
    const next = sampleToken(logits, 0, cfg.vocabSize, greedy, null, st);
    assert.equal(next, argmax(logits));
    got.push(next);
    logits = m.forward([{ seq, tokens: Int32Array.of(next), adapter: -1 }]);
  }
  assert.deepEqual(got, ref.greedy.new_ids);
  // the same continuation through forwardSample (the path generate() and the services take)
  const fs = m.createSequence(), sampling = [{ params: greedy, recent: null, rng: st }];
  let step = [{ seq: fs, tokens: Int32Array.from(ref.greedy.prompt_ids), adapter: -1 }];
  const viaSample: number[] = [];
  for (let i = 0; i < ref.greedy.new_tokens; i++) {
    viaSample.push(m.forwardSample(step, sampling)[0]!);
    step = [{ seq: fs, tokens: Int32Array.of(viaSample[i]!), adapter: -1 }];
  }
  assert.deepEqual(viaSample, ref.greedy.new_ids);
  m.dropSequence(fs);

  // cross-entropy and final-position logits
  const ids = Int32Array.from(ref.cross_entropy.ids);
  const ce = m.crossEntropy(ids, -1);
  assert.equal(ce.tokens, ids.length - 1);
  assert.ok(Math.abs(ce.loss - ref.cross_entropy.mean_next_token_ce) < 1e-4, `ce ${ce.loss} vs ${ref.cross_entropy.mean_next_token_ce}`);
  const s2 = m.createSequence();
  const last = m.forward([{ seq: s2, tokens: ids, adapter: -1 }]);
  assertClose(last, ref.cross_entropy.final_position_logits, 1e-4, "final position logits");
  m.dispose();
});

test("long steps run in decoder windows: a mixed 1041-token batch and a 1100-token crossEntropy equal small steps", () => {
  // The engine runs at most 1024 packed tokens per decoder pass (fewer for wide models); these
  // steps cross a window boundary inside an adapter segment and inside a row.
  const cfg = llamaGqa, w = randomWeights(cfg, 31), V = cfg.vocabSize;
  const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 4, maxContext: 1200 });
  m.setAdapter(0, randomAdapter(cfg, 32, ["self_attn.q_proj", "mlp.down_proj"], 3, 1.5));
  m.setAdapter(3, randomAdapter(cfg, 33, ["self_attn.v_proj", "mlp.up_proj"], 2, 0.75));
  const a = tokensOf(1000, V, 34), c = tokensOf(40, V, 35), bHist = tokensOf(7, V, 36);
  const [sa, sb, sc] = [m.createSequence(), m.createSequence(), m.createSequence()];
  m.forward([{ seq: sb, tokens: bHist, adapter: -1 }]);
  // packed by adapter: b (1 token) | a (1000, adapter 0) | c (40, adapter 3): the 1024 boundary is in c
  const rows = [{ seq: sa, tokens: a, adapter: 0 }, { seq: sb, tokens: Int32Array.of(5), adapter: -1 }, { seq: sc, tokens: c, adapter: 3 }];
  const all = m.forward(rows, { allLogits: true });
  assert.equal(all.length, 1041 * V);
  for (const s of [sa, sb, sc]) m.dropSequence(s);

  // the same tokens in steps of ≤ 100 (each one pass; the KV cache grows and is copied on the way)
  const stepwise = (tokens: Int32Array, adapter: number, hist?: Int32Array): Float32Array => {
    const seq = m.createSequence();
    if (hist) m.forward([{ seq, tokens: hist, adapter }]);
    const out = new Float32Array(tokens.length * V);
    for (let at = 0; at < tokens.length; at += 100) {
      const part = tokens.subarray(at, Math.min(tokens.length, at + 100));
      out.set(m.forward([{ seq, tokens: part, adapter }], { allLogits: true }), at * V);
    }
    m.dropSequence(seq);
    return out;
  };
  assertClose(all.subarray(0, 1000 * V), stepwise(a, 0), 1e-4, "row a (crosses no boundary, 1000 tokens in one window)");
  assertClose(all.subarray(1000 * V, 1001 * V), stepwise(Int32Array.of(5), -1, bHist), 1e-4, "row b (decode)");
  assertClose(all.subarray(1001 * V), stepwise(c, 3), 1e-4, "row c (split over two windows)");

  // a single row longer than a window, and crossEntropy over it
  const long = tokensOf(1100, V, 37);
  const seq = m.createSequence();
  const one = m.forward([{ seq, tokens: long, adapter: 3 }], { allLogits: true });
  assertClose(one, stepwise(long, 3), 1e-4, "1100-token prefill vs steps of 100");
  let sum = 0;
  for (let t = 0; t + 1 < long.length; t++) {
    const row = one.subarray(t * V, (t + 1) * V);
    let mx = -Infinity;
    for (const v of row) mx = Math.max(mx, v);
    let z = 0;
    for (const v of row) z += Math.exp(v - mx);
    sum += mx + Math.log(z) - row[long[t + 1]!]!;
  }
  const ce = m.crossEntropy(long, 3);
  assert.equal(ce.tokens, 1099);
  assert.ok(Math.abs(ce.loss - sum / 1099) < 1e-5, `crossEntropy ${ce.loss} vs ${sum / 1099}`);
  m.dispose();
});

test("KV cache memory grows with the sequence, is released on dropSequence, and residentBytes reports it", () => {
  const cfg = llamaGqa, w = randomWeights(cfg, 41), V = cfg.vocabSize;
  const rowBytes = 2 * cfg.numLayers * cfg.numKvHeads * cfg.headDim * 4; // K and V of one token, all layers
  const m = new NativeModel(cfg, toTensors(cfg, w), { maxSequences: 3, maxContext: 150 });
  const warm = m.createSequence();
  m.forward([{ seq: warm, tokens: tokensOf(100, V, 42), adapter: -1 }]); // scratch for 100-token steps
  const base = m.residentBytes();
  const s = m.createSequence();
  assert.equal(m.residentBytes(), base, "createSequence allocates nothing");
  m.forward([{ seq: s, tokens: tokensOf(10, V, 43), adapter: -1 }]);
  assert.equal(m.residentBytes() - base, 64 * rowBytes, "10 tokens: one 64-token chunk");
  const toks = tokensOf(150, V, 44);
  for (let n = 10; n < 64; n++) m.forward([{ seq: s, tokens: toks.subarray(n, n + 1), adapter: -1 }]);
  assert.equal(m.residentBytes() - base, 64 * rowBytes, "64 tokens still fit the first chunk");
  m.forward([{ seq: s, tokens: toks.subarray(64, 65), adapter: -1 }]);
  assert.equal(m.residentBytes() - base, 128 * rowBytes, "the 65th token grows it by one 64-token chunk");
  m.forward([{ seq: s, tokens: toks.subarray(65, 140), adapter: -1 }]);
  assert.equal(m.residentBytes() - base, 150 * rowBytes, "capped at maxContext");
  m.truncateSequence(s, 3);
  assert.equal(m.residentBytes() - base, 150 * rowBytes, "truncate keeps the capacity");
  m.dropSequence(s);
  assert.equal(m.residentBytes(), base, "dropSequence releases it");
  // crossEntropy's internal slot holds nothing once it returns (its vocab-chunk buffer stays)
  m.crossEntropy(toks.subarray(0, 12), -1);
  const afterCe = m.residentBytes();
  m.crossEntropy(toks.subarray(0, 12), -1);
  assert.equal(m.residentBytes(), afterCe);
  assert.ok(afterCe - base < 64 * rowBytes, `crossEntropy keeps ${afterCe - base} bytes`);
  m.dispose();
});
