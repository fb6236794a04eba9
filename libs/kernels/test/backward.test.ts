// Every backward kernel of the training engine (csrc/cpu/backward.cpp, adamw.cpp) against central
// finite differences of a float64 TypeScript reference of its forward, on small random odd shapes,
// at every SIMD level the CPU has: RMSNorm, LayerNorm, RoPE, SiLU/ReLU/GELU (plain and gated),
// causal GQA attention with packed segments, the chunked lm_head + softmax + cross-entropy (f32 and
// NF4 weights), the linear with its LoRA branch and dropout (f32 / bf16 / NF4 frozen weights), the
// dropout mask itself, and the AdamW update.
import { test } from "node:test";
import assert from "node:assert/strict";
import { cpuInfo, decodeWeight, setSimd, trainOps } from "../src/index.js";
import type { SimdLevel, WeightTensor } from "../src/index.js";
import { assertGradClose, bf16Tensor, erf, f32Tensor, nf4Tensor, rand } from "./helpers.js";
import { rng } from "./random.js";

// ---- helpers ----------------------------------------------------------------------------------
const f64 = (a: ArrayLike<number>) => Float64Array.from(a as ArrayLike<number>);

/** Central finite difference of f at x (float64), every coordinate. */
function fdGrad(f: (x: Float64Array) => number, x0: ArrayLike<number>, h = 1e-5): Float64Array {
  const x = f64(x0);
  const g = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const xi = x[i]!;
    x[i] = xi + h;
    const fp = f(x);
    x[i] = xi - h;
    const fm = f(x);
    x[i] = xi;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

/** max |a - b| <= rtol · max |b| + atol */
function assertGrad(a: ArrayLike<number>, b: ArrayLike<number>, what: string, rtol = 2e-4, atol = 1e-6): void {
  assertGradClose(a, b, what, rtol, atol, { nonZeroReference: true });
}
const dotR = (y: ArrayLike<number>, R: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < y.length; i++) s += y[i]! * R[i]!;
  return s;
};

function levels(): SimdLevel[] {
  const info = cpuInfo();
  const out: SimdLevel[] = ["scalar"];
  if (info.avx2) out.push("avx2");
  if (info.avx512) out.push("avx512");
  return out;
}
function eachLevel(fn: (level: SimdLevel) => void): void {
  const before = cpuInfo().simd;
  try {
    for (const l of levels()) {
      setSimd(l);
      fn(l);
    }
  } finally {
    setSimd(before);
  }
}

function act(kind: string, x: number): number {
  if (kind === "silu") return x / (1 + Math.exp(-x));
  if (kind === "relu") return x > 0 ? x : 0;
  return 0.5 * x * (1 + erf(x / Math.SQRT2));
}

/** The weight's values as the kernels see them (decoded). */
const valuesOf = (w: WeightTensor) => decodeWeight(w, 0, w.shape[0]! * w.shape[1]!);

// ---- norms ------------------------------------------------------------------------------------
test("RMSNorm backward = finite differences of the float64 forward", () => {
  const r = rng(1), rows = 3, dim = 37, eps = 1e-5;
  const x = rand(rows * dim, r, -2, 2), w = rand(dim, r, 0.5, 1.5), R = rand(rows * dim, r);
  const f = (xx: Float64Array) => {
    let L = 0;
    for (let i = 0; i < rows; i++) {
      let ss = 0;
      for (let j = 0; j < dim; j++) ss += xx[i * dim + j]! ** 2;
      const inv = 1 / Math.sqrt(ss / dim + eps);
      for (let j = 0; j < dim; j++) L += xx[i * dim + j]! * inv * w[j]! * R[i * dim + j]!;
    }
    return L;
  };
  const ref = fdGrad(f, x);
  eachLevel((l) => assertGrad(trainOps.rmsNormBackward(R, x, w, rows, dim, eps), ref, `rmsnorm dx (${l})`));
});

test("LayerNorm backward (with and without weight) = finite differences", () => {
  const r = rng(2), rows = 4, dim = 29, eps = 1e-5;
  const x = rand(rows * dim, r, -2, 3), w = rand(dim, r, 0.5, 1.5), R = rand(rows * dim, r);
  for (const wt of [w, null]) {
    const f = (xx: Float64Array) => {
      let L = 0;
      for (let i = 0; i < rows; i++) {
        let s = 0;
        for (let j = 0; j < dim; j++) s += xx[i * dim + j]!;
        const mean = s / dim;
        let v = 0;
        for (let j = 0; j < dim; j++) v += (xx[i * dim + j]! - mean) ** 2;
        const rstd = 1 / Math.sqrt(v / dim + eps);
        for (let j = 0; j < dim; j++) L += (xx[i * dim + j]! - mean) * rstd * (wt ? wt[j]! : 1) * R[i * dim + j]!;
      }
      return L;
    };
    const ref = fdGrad(f, x);
    eachLevel((l) => assertGrad(trainOps.layerNormBackward(R, x, wt, rows, dim, eps), ref, `layernorm dx (${l}, w ${wt ? "yes" : "null"})`));
  }
});

// ---- RoPE -------------------------------------------------------------------------------------
test("RoPE backward (inverse rotation) = finite differences", () => {
  const r = rng(3), T = 5, nh = 3, hd = 10, theta = 10000;
  const pos = Int32Array.of(0, 7, 3, 12, 1);
  const x = rand(T * nh * hd, r), R = rand(T * nh * hd, r);
  const half = hd / 2;
  const f = (xx: Float64Array) => {
    let L = 0;
    for (let t = 0; t < T; t++)
      for (let h = 0; h < nh; h++) {
        const o = (t * nh + h) * hd;
        for (let j = 0; j < half; j++) {
          const ang = pos[t]! * (1 / theta ** ((2 * j) / hd));
          const c = Math.cos(ang), s = Math.sin(ang), x1 = xx[o + j]!, x2 = xx[o + j + half]!;
          L += (x1 * c - x2 * s) * R[o + j]! + (x2 * c + x1 * s) * R[o + j + half]!;
        }
      }
    return L;
  };
  const ref = fdGrad(f, x);
  eachLevel((l) => assertGrad(trainOps.ropeBackward(R, T, nh, hd, pos, theta), ref, `rope dx (${l})`, 1e-5));
});

// ---- activations ----------------------------------------------------------------------------
test("SiLU / ReLU / GELU backward, plain and gated, = finite differences", () => {
  const r = rng(4), n = 203; // odd: SIMD tails
  const x = Float32Array.from({ length: n }, () => {
    let v = 0;
    while (Math.abs(v) < 1e-3) v = -4 + 8 * r(); // away from ReLU's kink
    return v;
  });
  const up = rand(n, r, -2, 2), R = rand(n, r);
  for (const kind of ["silu", "relu", "gelu"] as const) {
    const ref = fdGrad((xx) => {
      let L = 0;
      for (let i = 0; i < n; i++) L += act(kind, xx[i]!) * R[i]!;
      return L;
    }, x);
    const refG = fdGrad((g) => {
      let L = 0;
      for (let i = 0; i < n; i++) L += act(kind, g[i]!) * up[i]! * R[i]!;
      return L;
    }, x);
    const refU = fdGrad((u) => {
      let L = 0;
      for (let i = 0; i < n; i++) L += act(kind, x[i]!) * u[i]! * R[i]!;
      return L;
    }, up);
    eachLevel((l) => {
      assertGrad(trainOps.activationBackward(kind, x, R), ref, `${kind} dx (${l})`, 1e-5);
      const g = trainOps.gatedActivationBackward(kind, x, up, R);
      assertGrad(g.dgate, refG, `${kind} gated dgate (${l})`, 1e-5);
      assertGrad(g.dup, refU, `${kind} gated dup (${l})`, 1e-5);
    });
  }
});

// ---- attention --------------------------------------------------------------------------------
for (const [B, T, nh, nkv, hd] of [[2, 7, 4, 2, 5], [2, 9, 2, 1, 16], [2, 37, 2, 2, 8]] as const) test(`attention (causal, GQA, packed segments), B ${B} T ${T} heads ${nh}/${nkv} hd ${hd}: forward and dq/dk/dv = finite differences`, () => {
  const r = rng(5 + hd), scale = 1 / Math.sqrt(hd);
  const N = B * T, qw = nh * hd, kw = nkv * hd, group = nh / nkv;
  // row 0: one sequence; row 1: packed examples starting at 0, 3, 5, 20, 30 (those < T)
  const starts = [0, 3, 5, 20, 30];
  const start = Int32Array.from({ length: N }, (_, i) => {
    const b = Math.floor(i / T), t = i % T;
    return b === 0 ? 0 : Math.max(...starts.filter((s0) => s0 <= t));
  });
  const q = rand(N * qw, r, -2, 2), k = rand(N * kw, r, -2, 2), v = rand(N * kw, r), R = rand(N * qw, r);
  const forward = (qq: ArrayLike<number>, kk: ArrayLike<number>, vv: ArrayLike<number>) => {
    const out = new Float64Array(N * qw);
    for (let b = 0; b < B; b++)
      for (let h = 0; h < nh; h++)
        for (let t = 0; t < T; t++) {
          const i = b * T + t, g = Math.floor(h / group), j0 = b * T + start[i]!;
          const s: number[] = [];
          for (let j = j0; j <= i; j++) {
            let d = 0;
            for (let e = 0; e < hd; e++) d += qq[i * qw + h * hd + e]! * kk[j * kw + g * hd + e]!;
            s.push(d * scale);
          }
          const m = Math.max(...s);
          const p = s.map((z) => Math.exp(z - m));
          const sum = p.reduce((a, c) => a + c, 0);
          for (let j = j0; j <= i; j++)
            for (let e = 0; e < hd; e++) out[i * qw + h * hd + e] += (p[j - j0]! / sum) * vv[j * kw + g * hd + e]!;
        }
    return out;
  };
  const refOut = forward(q, k, v);
  const dq = fdGrad((qq) => dotR(forward(qq, k, v), R), q);
  const dk = fdGrad((kk) => dotR(forward(q, kk, v), R), k);
  const dv = fdGrad((vv) => dotR(forward(q, k, vv), R), v);
  eachLevel((l) => {
    const got = trainOps.attention(q, k, v, B, T, start, nh, nkv, hd, scale, R);
    assertGrad(got.out, refOut, `attention out (${l})`, 1e-5);
    assertGrad(got.dq!, dq, `attention dq (${l})`);
    assertGrad(got.dk!, dk, `attention dk (${l})`);
    assertGrad(got.dv!, dv, `attention dv (${l})`);
  });
});

// ---- lm_head + softmax + cross-entropy ---------------------------------------------------------
test("chunked lm_head cross-entropy: loss and dh = finite differences (f32 and NF4 lm_head) for any chunk size", () => {
  const r = rng(6), M = 5, H = 32, V = 37, gradScale = 0.7;
  const h = rand(M * H, r, -1, 1), labels = Int32Array.from({ length: M }, () => Math.floor(r() * V));
  const wf = rand(V * H, r, -0.5, 0.5);
  for (const w of [f32Tensor(wf, [V, H]), nf4Tensor(wf, [V, H])]) {
    const W = valuesOf(w);
    const lossOf = (hh: ArrayLike<number>) => {
      let L = 0;
      for (let i = 0; i < M; i++) {
        const z: number[] = [];
        for (let o = 0; o < V; o++) {
          let d = 0;
          for (let e = 0; e < H; e++) d += hh[i * H + e]! * W[o * H + e]!;
          z.push(d);
        }
        const m = Math.max(...z);
        L += m + Math.log(z.reduce((a, c) => a + Math.exp(c - m), 0)) - z[labels[i]!]!;
      }
      return L;
    };
    const loss = lossOf(h);
    const dh = fdGrad((hh) => gradScale * lossOf(hh), h);
    eachLevel((l) => {
      let first: Float32Array | null = null;
      for (const chunk of [1, 2, 5, 64]) {
        const got = trainOps.lmHeadCrossEntropy(h, w, labels, chunk, gradScale);
        assert.ok(Math.abs(got.loss - loss) < 1e-5 * Math.abs(loss), `${w.dtype} loss ${got.loss} vs ${loss}`);
        assert.ok(got.logitsFloats <= Math.min(chunk, M) * V, `at most [chunk, V] logits (${got.logitsFloats})`);
        assertGrad(got.dh, dh, `${w.dtype} dh (${l}, chunk ${chunk})`);
        // rows are independent: the chunking changes only the matmul kernels' summation order
        if (first) assertGrad(got.dh, first, `${w.dtype} dh chunk ${chunk} vs chunk 1 (${l})`, 1e-6);
        first = got.dh;
      }
    });
  }
});

// ---- dropout ----------------------------------------------------------------------------------
test("dropout mask: inverted scaling, rate p, keyed by (seed, stream, element), p = 0 is the identity", () => {
  const rows = 100, cols = 1001, p = 0.3;
  const ones = new Float32Array(rows * cols).fill(1);
  const a = trainOps.dropout(ones, rows, cols, p, 42n, 3);
  const inv = Math.fround(1 / Math.fround(1 - p));
  let dropped = 0;
  for (const v of a) {
    assert.ok(v === 0 || v === inv, `mask value ${v}`);
    if (v === 0) dropped++;
  }
  const rate = dropped / a.length;
  assert.ok(Math.abs(rate - p) < 0.01, `drop rate ${rate}`);
  assert.deepEqual(trainOps.dropout(ones, rows, cols, p, 42n, 3), a, "same key → same mask");
  assert.notDeepEqual(trainOps.dropout(ones, rows, cols, p, 42n, 4), a, "other stream → other mask");
  assert.notDeepEqual(trainOps.dropout(ones, rows, cols, p, 43n, 3), a, "other seed → other mask");
  const x = rand(rows * cols, rng(7));
  assert.deepEqual(trainOps.dropout(x, rows, cols, 0, 42n, 3), x);
  // the SIMD and scalar mask generators agree bit for bit
  eachLevel((l) => assert.deepEqual(trainOps.dropout(x, rows, cols, p, 42n, 3), Float32Array.from(x, (v, i) => Math.fround(v * a[i]!)), `mask (${l})`));
});

// ---- linear + LoRA ------------------------------------------------------------------------------
test("linear with LoRA branch (+dropout): dx, dA, dB = finite differences, through f32 / bf16 / NF4 frozen weights", () => {
  const r = rng(8), N = 7, inF = 64, outF = 11, rank = 3, scaling = 1.7;
  const x = rand(N * inF, r), wf = rand(outF * inF, r, -0.3, 0.3), bias = rand(outF, r), R = rand(N * outF, r);
  const a = rand(rank * inF, r, -0.2, 0.2), b = rand(outF * rank, r, -0.5, 0.5);
  for (const w of [f32Tensor(wf, [outF, inF]), bf16Tensor(wf, [outF, inF]), nf4Tensor(wf, [outF, inF], 32)]) {
    const W = valuesOf(w);
    for (const p of [0, 0.25]) {
      const seed = 99n, stream = 5;
      const mask = trainOps.dropout(new Float32Array(N * inF).fill(1), N, inF, p, seed, stream);
      const fwd = (xx: ArrayLike<number>, aa: ArrayLike<number>, bb: ArrayLike<number>) => {
        const y = new Float64Array(N * outF);
        for (let t = 0; t < N; t++) {
          const u = new Float64Array(rank);
          for (let j = 0; j < rank; j++) for (let i = 0; i < inF; i++) u[j] += mask[t * inF + i]! * xx[t * inF + i]! * aa[j * inF + i]!;
          for (let o = 0; o < outF; o++) {
            let s = bias[o]!;
            for (let i = 0; i < inF; i++) s += xx[t * inF + i]! * W[o * inF + i]!;
            for (let j = 0; j < rank; j++) s += scaling * u[j]! * bb[o * rank + j]!;
            y[t * outF + o] = s;
          }
        }
        return y;
      };
      const y = fwd(x, a, b);
      const dx = fdGrad((xx) => dotR(fwd(xx, a, b), R), x);
      const da = fdGrad((aa) => dotR(fwd(x, aa, b), R), a);
      const db = fdGrad((bb) => dotR(fwd(x, a, bb), R), b);
      eachLevel((l) => {
        const what = `${w.dtype} p=${p} (${l})`;
        const got = trainOps.loraLinear(x, N, w, bias, { a, b, rank, scaling, dropout: p, seed, stream }, R, true);
        assertGrad(got.y, y, `y ${what}`, 1e-5);
        assertGrad(got.dx, dx, `dx ${what}`);
        assertGrad(got.ga!, da, `dA ${what}`);
        assertGrad(got.gb!, db, `dB ${what}`);
        // needDx = false: only the LoRA gradients
        const noDx = trainOps.loraLinear(x, N, w, bias, { a, b, rank, scaling, dropout: p, seed, stream }, R, false);
        assert.deepEqual(noDx.ga, got.ga);
        assert.deepEqual(noDx.gb, got.gb);
        assert.ok(noDx.dx.every((v) => v === 0));
      });
    }
    // frozen linear alone: dx = dy·W
    const plain = fdGrad((xx) => dotR(fwdPlain(xx, W, bias, N, inF, outF), R), x);
    eachLevel((l) => assertGrad(trainOps.loraLinear(x, N, w, bias, null, R, true).dx, plain, `${w.dtype} frozen dx (${l})`));
  }
});
function fwdPlain(x: ArrayLike<number>, W: ArrayLike<number>, bias: ArrayLike<number>, N: number, inF: number, outF: number): Float64Array {
  const y = new Float64Array(N * outF);
  for (let t = 0; t < N; t++)
    for (let o = 0; o < outF; o++) {
      let s = bias[o]!;
      for (let i = 0; i < inF; i++) s += x[t * inF + i]! * W[o * inF + i]!;
      y[t * outF + o] = s;
    }
  return y;
}

// ---- AdamW ------------------------------------------------------------------------------------
test("AdamW update = torch AdamW computed by hand (decoupled decay, bias correction, clip), scalar = SIMD bit for bit", () => {
  const r = rng(9), n = 45;
  const p0 = rand(n, r), m0 = rand(n, r, -0.1, 0.1), v0 = rand(n, r, 0, 0.01), g0 = rand(n, r, -2, 2);
  const o = { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-6, weightDecay: 0.1, step: 3 };
  const clip = 0.6;
  // float64 hand computation of torch.optim.AdamW (single tensor)
  const bc1 = 1 - o.beta1 ** o.step, bc2 = 1 - o.beta2 ** o.step;
  const expP = new Float64Array(n), expM = new Float64Array(n), expV = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const g = g0[i]! * clip;
    const m = o.beta1 * m0[i]! + (1 - o.beta1) * g;
    const v = o.beta2 * v0[i]! + (1 - o.beta2) * g * g;
    const p = p0[i]! * (1 - o.lr * o.weightDecay);
    expM[i] = m;
    expV[i] = v;
    expP[i] = p - (o.lr / bc1) * (m / (Math.sqrt(v) / Math.sqrt(bc2) + o.eps));
  }
  const results: Float32Array[][] = [];
  eachLevel((l) => {
    const p = p0.slice(), g = g0.slice(), m = m0.slice(), v = v0.slice();
    trainOps.adamw(p, g, m, v, o, clip);
    assertGrad(p, expP, `p (${l})`, 1e-6);
    assertGrad(m, expM, `m (${l})`, 1e-6);
    assertGrad(v, expV, `v (${l})`, 1e-6);
    assert.ok(g.every((x) => x === 0), "gradients zeroed");
    results.push([p, m, v]);
  });
  for (const res of results.slice(1)) assert.deepEqual(res, results[0], "every SIMD level gives the same bits");
});
