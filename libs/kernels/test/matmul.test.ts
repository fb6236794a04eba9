// linear / linearBackwardInput / gemm: the scalar path against a float64 TypeScript oracle (weights
// decoded independently from their raw bytes), then every SIMD level against the scalar path.
// Summation order differs between paths, so comparisons use an error bound relative to sum |a|·|b|.
import { test } from "node:test";
import assert from "node:assert/strict";
import { decodeWeight, gemm, linear, linearBackwardInput } from "../src/index.js";
import { assertWithinBound, LEVELS, makeWeight, normals, oracleWeight, storeForwardOutput, withLevel, type OracleOut } from "./matmul_fixtures.js";

/** y = x·Wᵀ (+bias) (+prev) in float64, with the per-element bound sum |x||w| (+|bias|+|prev|). */
function oracleForward(x: Float32Array, M: number, W: Float64Array, N: number, K: number, bias?: Float32Array, prev?: Float32Array): OracleOut {
  const out: OracleOut = { y: new Float64Array(M * N), mag: new Float64Array(M * N) };
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      let a = 0;
      for (let k = 0; k < K; k++) {
        const p = x[m * K + k]! * W[n * K + k]!;
        s += p;
        a += Math.abs(p);
      }
      storeForwardOutput(out, m * N + n, n, s, a, bias, prev);
    }
  }
  return out;
}

function oracleBackward(dy: Float32Array, M: number, W: Float64Array, N: number, K: number, prev?: Float32Array) {
  const y = new Float64Array(M * K);
  const mag = new Float64Array(M * K);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      const g = dy[m * N + n]!;
      for (let k = 0; k < K; k++) {
        const p = g * W[n * K + k]!;
        y[m * K + k] += p;
        mag[m * K + k] += Math.abs(p);
      }
    }
    if (prev) {
      for (let k = 0; k < K; k++) {
        y[m * K + k] += prev[m * K + k]!;
        mag[m * K + k] += Math.abs(prev[m * K + k]!);
      }
    }
  }
  return { y, mag };
}

/** |got - want| <= rel * mag + abs: float32 accumulation of depth K has error ~ K·eps·sum|terms|. */
function assertClose(got: Float32Array, want: OracleOut, depth: number, what: string): void {
  assertWithinBound(got, want, Math.max(64, 2 * depth) * 2 ** -24, what);
}

// Shapes: M covers the M<=8 streaming kernels (each template) and the packed GEMM (9+, partial
// tiles); K covers block-aligned rows (in-register NF4 decode) and odd K (rows straddling bytes
// and blocks); N covers partial strips/panels (> 256 = more than one column panel).
const SHAPES: Array<{ M: number; N: number; K: number; bs: number }> = [
  { M: 1, N: 37, K: 64, bs: 64 },
  { M: 1, N: 300, K: 512, bs: 128 },
  { M: 2, N: 19, K: 96, bs: 32 },
  { M: 3, N: 21, K: 33, bs: 32 },
  { M: 4, N: 64, K: 4096, bs: 4096 },
  { M: 5, N: 13, K: 77, bs: 64 },
  { M: 6, N: 40, K: 128, bs: 64 },
  { M: 7, N: 9, K: 101, bs: 32 },
  { M: 8, N: 33, K: 192, bs: 64 },
  { M: 9, N: 17, K: 64, bs: 64 },
  { M: 13, N: 270, K: 65, bs: 64 },
  { M: 37, N: 41, K: 300, bs: 128 },
  { M: 20, N: 23, K: 4096 + 64, bs: 4096 },
];

test("linear: scalar = float64 oracle; every SIMD level = scalar; all dtypes, bias, accumulate", () => {
  let seed = 1;
  for (const { M, N, K, bs } of SHAPES) {
    for (const dtype of ["nf4", "f32", "f16", "bf16"] as const) {
      const w = makeWeight(dtype, N, K, seed++, bs);
      const W = oracleWeight(w);
      const x = normals(M * K, seed++);
      const bias = seed % 2 ? normals(N, seed++) : undefined;
      const prev = normals(M * N, seed++);
      const plain = oracleForward(x, M, W, N, K, bias);
      const acc = oracleForward(x, M, W, N, K, bias, prev);
      for (const level of LEVELS) {
        const tag = `${dtype} M=${M} N=${N} K=${K} bs=${bs} ${level}`;
        const y = withLevel(level, () => linear(x, M, w, bias));
        assertClose(y, plain, K, tag);
        const out = prev.slice();
        withLevel(level, () => linear(x, M, w, bias, out, true));
        assertClose(out, acc, K, `${tag} accumulate`);
      }
    }
  }
});

test("linearBackwardInput: scalar = oracle; SIMD = scalar; all dtypes, accumulate", () => {
  let seed = 1000;
  for (const { M, N, K, bs } of SHAPES) {
    for (const dtype of ["nf4", "f32", "bf16", "f16"] as const) {
      const w = makeWeight(dtype, N, K, seed++, bs);
      const W = oracleWeight(w);
      const dy = normals(M * N, seed++);
      const prev = normals(M * K, seed++);
      const plain = oracleBackward(dy, M, W, N, K);
      const acc = oracleBackward(dy, M, W, N, K, prev);
      for (const level of LEVELS) {
        const tag = `${dtype} M=${M} N=${N} K=${K} ${level}`;
        assertClose(withLevel(level, () => linearBackwardInput(dy, M, w)), plain, N, tag);
        const out = prev.slice();
        withLevel(level, () => linearBackwardInput(dy, M, w, out, true));
        assertClose(out, acc, N, `${tag} accumulate`);
      }
    }
  }
});

test("decodeWeight returns the exact dequantized values at any offset", () => {
  for (const dtype of ["nf4", "f16", "bf16", "f32"] as const) {
    const w = makeWeight(dtype, 7, 99, 5, 32);
    const W = oracleWeight(w);
    for (const level of LEVELS) {
      for (const [start, len] of [[0, 693], [1, 100], [33, 1], [99, 99], [692, 1]] as const) {
        const got = withLevel(level, () => decodeWeight(w, start, len));
        for (let i = 0; i < len; i++) assert.equal(got[i], W[start + i], `${dtype} ${level} at ${start + i}`);
      }
    }
  }
});

function oracleGemm(tA: boolean, tB: boolean, M: number, N: number, K: number, alpha: number, A: Float32Array, lda: number, B: Float32Array, ldb: number, beta: number, C: Float32Array, ldc: number) {
  const y = new Float64Array(M * N);
  const mag = new Float64Array(M * N);
  for (let i = 0; i < M; i++) {
    for (let j = 0; j < N; j++) {
      let s = 0;
      let a = 0;
      for (let k = 0; k < K; k++) {
        const p = (tA ? A[k * lda + i]! : A[i * lda + k]!) * (tB ? B[j * ldb + k]! : B[k * ldb + j]!);
        s += p;
        a += Math.abs(p);
      }
      const c = beta === 0 ? 0 : beta * C[i * ldc + j]!;
      y[i * N + j] = alpha * s + c;
      mag[i * N + j] = Math.abs(alpha) * a + Math.abs(c);
    }
  }
  return { y, mag };
}

test("gemm: every transpose combination, alpha/beta, padded leading dimensions; beta=0 ignores NaN in C", () => {
  let seed = 5000;
  for (const [M, N, K] of [[1, 1, 1], [5, 7, 3], [17, 33, 65], [64, 300, 31], [130, 20, 257]] as const) {
    for (const tA of [false, true]) {
      for (const tB of [false, true]) {
        const lda = (tA ? M : K) + 3;
        const ldb = (tB ? K : N) + 1;
        const ldc = N + 2;
        const A = normals((tA ? K : M) * lda, seed++);
        const B = normals((tB ? N : K) * ldb, seed++);
        const C0 = normals(M * ldc, seed++);
        for (const [alpha, beta] of [[1, 0], [0.5, 1], [-2, 0.25]] as const) {
          const want = oracleGemm(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C0, ldc);
          for (const level of LEVELS) {
            const C = C0.slice();
            if (beta === 0) for (let i = 0; i < C.length; i++) if (i % (N + 2) < N) C[i] = NaN;
            withLevel(level, () => gemm(M, N, K, A, B, C, { transA: tA, transB: tB, alpha, beta, lda, ldb, ldc }));
            const got = new Float32Array(M * N);
            for (let i = 0; i < M; i++) {
              for (let j = 0; j < N; j++) got[i * N + j] = C[i * ldc + j]!;
              // the padding columns of C are never touched
              for (let j = N; j < ldc; j++) assert.equal(C[i * ldc + j], C0[i * ldc + j]);
            }
            assertClose(got, want, K, `gemm ${M}x${N}x${K} tA=${tA} tB=${tB} a=${alpha} b=${beta} ${level}`);
          }
        }
      }
    }
  }
});

test("NaN and inf propagate through linear like IEEE arithmetic (no masking by padding)", () => {
  const N = 20;
  const K = 64;
  const w = makeWeight("nf4", N, K, 9, 64);
  for (const M of [1, 12]) {
    const x = normals(M * K, 10);
    x[3] = NaN; // row 0 of x
    for (const level of LEVELS) {
      const y = withLevel(level, () => linear(x, M, w));
      for (let n = 0; n < N; n++) assert.ok(Number.isNaN(y[n]), `${level} M=${M} row 0 is NaN`);
      if (M > 1) for (let i = N; i < M * N; i++) assert.ok(Number.isFinite(y[i]!), `${level} other rows finite`);
    }
  }
});

test("argument validation", () => {
  const w = makeWeight("nf4", 4, 64, 1);
  const x = new Float32Array(64);
  assert.throws(() => linear(x, 2, w), /x must be/);
  assert.throws(() => linear(x, 1, { ...w, shape: [4, 64, 1] }), /2-D/);
  assert.throws(() => linear(x, 1, { ...w, absmax: undefined }), /absmax/);
  assert.throws(() => linear(x, 1, { ...w, blocksize: 48 }), /blocksize/);
  assert.throws(() => linear(x, 1, { ...w, data: w.data.subarray(1) }), /bytes/);
  assert.throws(() => linear(x, 1, w, new Float32Array(3)), /bias/);
  assert.throws(() => linear(x, 1, w, undefined, undefined, true), /accumulate/);
  assert.throws(() => linear(x, 1, { ...w, dtype: "int8" as never }), /dtype/);
  assert.throws(() => linearBackwardInput(new Float32Array(3), 1, w), /dy/);
  assert.throws(() => decodeWeight(w, 250, 7), /outside/);
  assert.equal(linear(new Float32Array(0), 0, w).length, 0);
});
