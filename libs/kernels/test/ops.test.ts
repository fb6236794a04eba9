// The engine's kernels (csrc/cpu/ops, attention, sampling) against straightforward TypeScript
// references on odd sizes, at every SIMD level the CPU has.
import { test } from "node:test";
import assert from "node:assert/strict";
import { cpuInfo, engineOps, sampleToken, seedRng, setSimd, type SimdLevel } from "../src/index.js";
import type { RopeScalingLlama3, SamplingParams } from "../src/index.js";
import { rng, uniformSigned } from "./random.js";

// ---- helpers ----------------------------------------------------------------------------------
function assertClose(got: ArrayLike<number>, want: ArrayLike<number>, atol: number, rtol: number, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i]! - want[i]!);
    if (!(d <= atol + rtol * Math.abs(want[i]!))) {
      assert.fail(`${what}: element ${i}: got ${got[i]}, want ${want[i]} (|diff| ${d})`);
    }
  }
}
const levels: SimdLevel[] = (() => {
  const info = cpuInfo();
  const l: SimdLevel[] = ["scalar"];
  if (info.avx2) l.push("avx2");
  if (info.avx512) l.push("avx512");
  return l;
})();
/** Runs f at every SIMD level, restoring the best level after. */
function atLevels(f: (level: SimdLevel) => void): void {
  try {
    for (const l of levels) {
      assert.equal(setSimd(l), l);
      f(l);
    }
  } finally {
    setSimd("avx512");
  }
}

// ---- references -------------------------------------------------------------------------------
function refRmsNorm(x: Float32Array, w: Float32Array, rows: number, dim: number, eps: number): Float64Array {
  const y = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[r * dim + i]! ** 2;
    const inv = 1 / Math.sqrt(ss / dim + eps);
    for (let i = 0; i < dim; i++) y[r * dim + i] = x[r * dim + i]! * inv * w[i]!;
  }
  return y;
}
function refLayerNorm(x: Float32Array, w: Float32Array | null, b: Float32Array | null, rows: number, dim: number, eps: number): Float64Array {
  const y = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let m = 0;
    for (let i = 0; i < dim; i++) m += x[r * dim + i]!;
    m /= dim;
    let v = 0;
    for (let i = 0; i < dim; i++) v += (x[r * dim + i]! - m) ** 2;
    const inv = 1 / Math.sqrt(v / dim + eps);
    for (let i = 0; i < dim; i++) y[r * dim + i] = (x[r * dim + i]! - m) * inv * (w ? w[i]! : 1) + (b ? b[i]! : 0);
  }
  return y;
}
/** HF inv_freq (+ llama3 _compute_llama3_parameters), fp32 like torch. */
function refInvFreq(hd: number, theta: number, s: RopeScalingLlama3 | null): Float32Array {
  const inv = new Float32Array(hd / 2);
  for (let j = 0; j < hd / 2; j++) inv[j] = 1 / Math.pow(theta, (2 * j) / hd);
  if (!s) return inv;
  const lowWl = s.originalMaxPositions / s.lowFreqFactor, highWl = s.originalMaxPositions / s.highFreqFactor;
  for (let j = 0; j < hd / 2; j++) {
    const f = inv[j]!, wl = (2 * Math.PI) / f;
    if (wl < highWl) continue;
    if (wl > lowWl) inv[j] = f / s.factor;
    else {
      const smooth = (s.originalMaxPositions / wl - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
      inv[j] = (1 - smooth) * (f / s.factor) + smooth * f;
    }
  }
  return inv;
}
/** q·cos + rotate_half(q)·sin with emb = cat(freqs, freqs), freqs = fp32(pos·inv_freq). */
function refRope(x: Float32Array, T: number, nh: number, hd: number, pos: Int32Array, inv: Float32Array): Float64Array {
  const y = new Float64Array(x.length), half = hd / 2;
  for (let t = 0; t < T; t++)
    for (let h = 0; h < nh; h++) {
      const o = (t * nh + h) * hd;
      for (let i = 0; i < hd; i++) {
        const j = i % half;
        const f = Math.fround(pos[t]! * inv[j]!);
        const rot = i < half ? -x[o + i + half]! : x[o + i - half]!;
        y[o + i] = x[o + i]! * Math.cos(f) + rot * Math.sin(f);
      }
    }
  return y;
}
const silu = (v: number) => v / (1 + Math.exp(-v));
function erf(x: number): number {
  // Abramowitz-Stegun 7.1.26 is too coarse; use a series / continued fraction split.
  const t = Math.abs(x);
  if (t < 3) {
    let sum = t, term = t;
    for (let n = 1; n < 200; n++) {
      term *= (-t * t) / n;
      const add = term / (2 * n + 1);
      sum += add;
      if (Math.abs(add) < 1e-17) break;
    }
    return Math.sign(x) * (2 / Math.sqrt(Math.PI)) * sum;
  }
  // erfc continued fraction for large |x|
  let f = 0;
  for (let n = 60; n >= 1; n--) f = n / 2 / (t + f);
  const erfc = Math.exp(-t * t) / Math.sqrt(Math.PI) / (t + f);
  return Math.sign(x) * (1 - erfc);
}
const gelu = (v: number) => 0.5 * v * (1 + erf(v / Math.SQRT2));
function refAttention(q: Float32Array, k: Float32Array, v: Float32Array, pos: Int32Array, nh: number, nkv: number, hd: number, scale: number): Float64Array {
  const T = pos.length, out = new Float64Array(T * nh * hd), kvDim = nkv * hd, rep = nh / nkv;
  for (let t = 0; t < T; t++)
    for (let h = 0; h < nh; h++) {
      const kh = Math.floor(h / rep), n = pos[t]! + 1, s = new Float64Array(n);
      for (let j = 0; j < n; j++) {
        let d = 0;
        for (let i = 0; i < hd; i++) d += q[(t * nh + h) * hd + i]! * k[j * kvDim + kh * hd + i]!;
        s[j] = d * scale;
      }
      const m = Math.max(...s);
      let z = 0;
      for (let j = 0; j < n; j++) z += (s[j] = Math.exp(s[j]! - m));
      for (let j = 0; j < n; j++)
        for (let i = 0; i < hd; i++) out[(t * nh + h) * hd + i] += (s[j]! / z) * v[j * kvDim + kh * hd + i]!;
    }
  return out;
}
function f32ToF16Bits(v: number): number {
  // exact for the normal, representable values used here
  const f = new Float32Array([v]), u = new Uint32Array(f.buffer)[0]!;
  const sign = (u >>> 16) & 0x8000, exp = ((u >>> 23) & 0xff) - 127 + 15, mant = (u >>> 13) & 0x3ff;
  if (v === 0) return sign;
  assert.ok(exp > 0 && exp < 31 && (u & 0x1fff) === 0, `value ${v} is not exact in f16`);
  return sign | (exp << 10) | mant;
}

// ---- tests ------------------------------------------------------------------------------------
test("rmsNorm matches the reference on odd sizes at every SIMD level", () => {
  const r = rng(1);
  for (const [rows, dim] of [[1, 1], [3, 37], [5, 67], [2, 1000]] as const) {
    const x = uniformSigned(rows * dim, r, 3), w = uniformSigned(dim, r);
    const want = refRmsNorm(x, w, rows, dim, 1e-5);
    atLevels((l) => assertClose(engineOps.rmsNorm(x, w, rows, dim, 1e-5), want, 1e-5, 1e-5, `rmsNorm ${rows}x${dim} ${l}`));
  }
});

test("layerNorm (affine and not) matches the reference on odd sizes", () => {
  const r = rng(2);
  for (const [rows, dim] of [[1, 3], [4, 33], [3, 769]] as const) {
    const x = uniformSigned(rows * dim, r, 2), w = uniformSigned(dim, r), b = uniformSigned(dim, r);
    for (const l of [w, null]) {
      const want = refLayerNorm(x, l, l ? b : null, rows, dim, 1e-5);
      atLevels((lv) => assertClose(engineOps.layerNorm(x, l, l ? b : null, rows, dim, 1e-5), want, 1e-5, 1e-5, `layerNorm ${dim} ${lv}`));
    }
  }
});

test("RoPE inverse frequencies, plain and llama3-scaled", () => {
  assertClose(engineOps.ropeInvFreq(10, 10000, null), refInvFreq(10, 10000, null), 0, 1e-6, "inv_freq");
  // Llama 3.1/3.2 parameters: every branch (kept, divided, smoothed) is hit with hd 128.
  const s: RopeScalingLlama3 = { type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 };
  const want = refInvFreq(128, 500000, s), plain = refInvFreq(128, 500000, null);
  const got = engineOps.ropeInvFreq(128, 500000, s);
  assertClose(got, want, 0, 1e-6, "llama3 inv_freq");
  let kept = 0, divided = 0, smoothed = 0;
  for (let j = 0; j < 64; j++) {
    if (got[j] === plain[j]) kept++;
    else if (Math.abs(got[j]! - plain[j]! / 32) <= 1e-6 * got[j]!) divided++;
    else smoothed++;
  }
  assert.ok(kept > 0 && divided > 0 && smoothed > 0, `branches ${kept}/${divided}/${smoothed}`);
});

test("RoPE rotate_half on odd head counts and scattered positions", () => {
  const r = rng(3);
  const scalings: (RopeScalingLlama3 | null)[] = [null, { type: "llama3", factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 64 }];
  for (const sc of scalings) {
    const T = 5, nh = 3, hd = 10, pos = new Int32Array([0, 1, 7, 130, 2047]);
    const x = uniformSigned(T * nh * hd, r);
    const want = refRope(x, T, nh, hd, pos, refInvFreq(hd, 10000, sc));
    atLevels((l) => assertClose(engineOps.rope(x, T, nh, hd, pos, 10000, sc), want, 2e-5, 1e-5, `rope ${l}`));
  }
});

test("activations: silu, relu, gelu and the gated forms", () => {
  const r = rng(4);
  const x = new Float32Array([...uniformSigned(101, r, 6), 0, -0, 100, -100, 88.5, -90, 1e-8]);
  const u = uniformSigned(x.length, r);
  const refs = { silu, relu: (v: number) => Math.max(v, 0), gelu };
  atLevels((l) => {
    for (const [name, f] of Object.entries(refs) as [keyof typeof refs, (v: number) => number][]) {
      const want = Array.from(x, f);
      assertClose(engineOps.activation(name, x), want, 1e-6, 2e-6, `${name} ${l}`);
      assertClose(engineOps.gatedActivation(name, x, u), want.map((v, i) => v * u[i]!), 1e-6, 2e-6, `gated ${name} ${l}`);
    }
  });
});

test("softmax rows on odd sizes and large logits", () => {
  const r = rng(5);
  for (const [rows, n] of [[1, 1], [3, 7], [2, 33], [4, 1001]] as const) {
    const x = uniformSigned(rows * n, r, 40);
    const want = new Float64Array(rows * n);
    for (let i = 0; i < rows; i++) {
      const row = x.subarray(i * n, (i + 1) * n), m = Math.max(...row);
      let z = 0;
      for (const v of row) z += Math.exp(v - m);
      for (let j = 0; j < n; j++) want[i * n + j] = Math.exp(row[j]! - m) / z;
    }
    atLevels((l) => assertClose(engineOps.softmax(x, rows, n), want, 1e-7, 1e-5, `softmax ${n} ${l}`));
  }
});

test("attention with GQA over a causal cache", () => {
  const r = rng(6);
  for (const [nh, nkv, hd] of [[6, 2, 7], [3, 3, 5], [4, 1, 16]] as const) {
    const ctx = 23, pos = new Int32Array([0, 3, 22, 5, 11, 22]);
    const q = uniformSigned(pos.length * nh * hd, r, 2), k = uniformSigned(ctx * nkv * hd, r, 2), v = uniformSigned(ctx * nkv * hd, r);
    const scale = 1 / Math.sqrt(hd);
    const want = refAttention(q, k, v, pos, nh, nkv, hd, scale);
    atLevels((l) => assertClose(engineOps.attention(q, k, v, pos, nh, nkv, hd, scale), want, 1e-5, 1e-5, `attention ${nh}/${nkv}/${hd} ${l}`));
  }
  // large enough to take the threaded path (work above the inline threshold)
  const nh = 8, nkv = 2, hd = 64, ctx = 300, pos = Int32Array.from({ length: 40 }, (_, i) => 260 + i);
  const q = uniformSigned(pos.length * nh * hd, r), k = uniformSigned(ctx * nkv * hd, r), v = uniformSigned(ctx * nkv * hd, r);
  assertClose(engineOps.attention(q, k, v, pos, nh, nkv, hd, 0.125), refAttention(q, k, v, pos, nh, nkv, hd, 0.125), 1e-5, 1e-5, "attention threaded");
});

test("embedding rows in f32, f16, bf16 and nf4", () => {
  const r = rng(7);
  const rows = 9, cols = 13; // odd cols: nf4 rows start mid-byte and mid-block
  const vals = Float32Array.from({ length: rows * cols }, () => Math.round((r() * 2 - 1) * 64) / 16);
  const ids = new Int32Array([3, 0, 8, 3, 5]);
  const want = new Float32Array(ids.length * cols);
  ids.forEach((id, t) => want.set(vals.subarray(id * cols, (id + 1) * cols), t * cols));
  const f32 = { dtype: "f32" as const, shape: [rows, cols], data: new Uint8Array(vals.buffer) };
  assert.deepEqual(engineOps.embedding(f32, ids), want);
  const h = new Uint16Array(vals.length), b = new Uint16Array(vals.length);
  vals.forEach((v, i) => {
    h[i] = f32ToF16Bits(v);
    b[i] = new Uint32Array(new Float32Array([v]).buffer)[0]! >>> 16;
  });
  assert.deepEqual(engineOps.embedding({ dtype: "f16", shape: [rows, cols], data: new Uint8Array(h.buffer) }, ids), want);
  assert.deepEqual(engineOps.embedding({ dtype: "bf16", shape: [rows, cols], data: new Uint8Array(b.buffer) }, ids), want);
  // nf4: random codes and scales, dequantized by hand
  const NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0];
  const n = rows * cols, bs = 32;
  const packed = Uint8Array.from({ length: Math.ceil(n / 2) }, () => Math.floor(r() * 256));
  const absmax = Float32Array.from({ length: Math.ceil(n / bs) }, () => 0.5 + r());
  const nf4Want = new Float32Array(ids.length * cols);
  ids.forEach((id, t) => {
    for (let c = 0; c < cols; c++) {
      const e = id * cols + c, byte = packed[e >> 1]!, code = e & 1 ? byte & 15 : byte >> 4;
      nf4Want[t * cols + c] = Math.fround(Math.fround(NF4[code]!) * absmax[Math.floor(e / bs)]!);
    }
  });
  assert.deepEqual(engineOps.embedding({ dtype: "nf4", shape: [rows, cols], data: packed, absmax, blocksize: bs }, ids), nf4Want);
});

// ---- sampling ---------------------------------------------------------------------------------
const greedy: SamplingParams = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 };

test("sampling: greedy is argmax with ties to the lowest id, honouring offset", () => {
  const logits = new Float32Array([9, 1, 5, 7, 7, 2, 7, 0]);
  const st = seedRng(1n), before = st.slice();
  assert.equal(sampleToken(logits, 0, 8, greedy, null, st), 0);
  assert.equal(sampleToken(logits, 1, 7, greedy, null, st), 2); // ids relative to offset: [1,5,7,7,2,7,0] → 7 first at 2
  assert.equal(sampleToken(logits, 3, 5, greedy, null, st), 0);
  assert.deepEqual(st, before, "greedy draws no random numbers");
});

test("sampling: repetition penalty follows HF (divide positive, multiply negative, once per id)", () => {
  const logits = new Float32Array([4, 3.5, -1, -0.5]);
  const st = seedRng(2n);
  assert.equal(sampleToken(logits, 0, 4, { ...greedy, repetitionPenalty: 1.2 }, new Int32Array([0, 0, 0]), st), 1); // 4/1.2 < 3.5
  assert.equal(sampleToken(logits, 0, 4, { ...greedy, repetitionPenalty: 1.1 }, new Int32Array([0]), st), 0); // 3.64 > 3.5
  const neg = new Float32Array([-1, -1.05]);
  assert.equal(sampleToken(neg, 0, 2, { ...greedy, repetitionPenalty: 1.1 }, new Int32Array([0]), st), 1); // -1.1 < -1.05
  assert.deepEqual(Array.from(logits), [4, 3.5, -1, -0.5], "logits are not modified");
});

test("sampling: same seed gives the same tokens; top-k 1 and tiny top-p equal greedy", () => {
  const r = rng(8), V = 301;
  const logits = uniformSigned(V * 20, r, 3);
  const p: SamplingParams = { temperature: 0.9, topK: 40, topP: 0.95, repetitionPenalty: 1.1 };
  const run = (seed: bigint) => {
    const st = seedRng(seed);
    return Array.from({ length: 20 }, (_, i) => sampleToken(logits, i * V, V, p, new Int32Array([1, 2, 3]), st));
  };
  assert.deepEqual(run(42n), run(42n));
  assert.notDeepEqual(run(42n), run(43n));
  const st = seedRng(7n);
  for (let i = 0; i < 20; i++) {
    const g = sampleToken(logits, i * V, V, greedy, null, st);
    assert.equal(sampleToken(logits, i * V, V, { temperature: 1.3, topK: 1, topP: 1, repetitionPenalty: 1 }, null, st), g);
    assert.equal(sampleToken(logits, i * V, V, { temperature: 1.3, topK: 0, topP: 1e-6, repetitionPenalty: 1 }, null, st), g);
  }
});

test("sampling: empirical distribution follows softmax(logits/T) within top-k / top-p", () => {
  const logits = new Float32Array([2, 1, 0.5, 0, -1, 3]);
  const T = 0.8, N = 20000, st = seedRng(123n);
  const probs = Array.from(logits, (l) => Math.exp(l / T));
  const z = probs.reduce((a, b) => a + b);
  const count = (p: SamplingParams) => {
    const c = new Array(6).fill(0);
    for (let i = 0; i < N; i++) c[sampleToken(logits, 0, 6, p, null, st)]++;
    return c.map((v) => v / N);
  };
  // full distribution
  const full = count({ temperature: T, topK: 0, topP: 1, repetitionPenalty: 1 });
  full.forEach((f, i) => assert.ok(Math.abs(f - probs[i]! / z) < 0.015, `full ${i}: ${f} vs ${probs[i]! / z}`));
  // top-k 2 keeps ids 5 and 0 only, renormalised
  const k2 = count({ temperature: T, topK: 2, topP: 1, repetitionPenalty: 1 });
  const z2 = probs[5]! + probs[0]!;
  assert.ok(Math.abs(k2[5]! - probs[5]! / z2) < 0.015 && Math.abs(k2[0]! - probs[0]! / z2) < 0.015);
  assert.equal(k2[1]! + k2[2]! + k2[3]! + k2[4]!, 0);
  // top-p: smallest prefix (5, 0, 1, ...) reaching p
  const sorted = [5, 0, 1, 2, 3, 4];
  const pTop = (probs[5]! + probs[0]!) / z + 0.01; // needs a third token
  const tp = count({ temperature: T, topK: 0, topP: pTop, repetitionPenalty: 1 });
  const z3 = probs[5]! + probs[0]! + probs[1]!;
  sorted.forEach((id, rank) => {
    const want = rank < 3 ? probs[id]! / z3 : 0;
    assert.ok(Math.abs(tp[id]! - want) < 0.015, `top-p ${id}: ${tp[id]} vs ${want}`);
  });
});
