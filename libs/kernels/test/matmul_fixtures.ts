// Shared by the matmul tests (matmul.test.ts, matmul_int8.test.ts): seeded data, weights of every
// dtype with their raw bytes, the float64 oracle's view of a weight, and the SIMD levels to run.
import assert from "node:assert/strict";
import { quantizeNf4, setSimd, type SimdLevel, type WeightTensor } from "../src/index.js";

export const NF4_TABLE = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
].map(Math.fround);

export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
export function normals(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = scale * Math.sqrt(-2 * Math.log(r() || 1e-12)) * Math.cos(2 * Math.PI * r());
  return out;
}
export function halfToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 31;
  const m = h & 1023;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}
export function toHalfBits(x: number): number {
  // round-toward-zero, normal range only (test data is small)
  const sign = x < 0 ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a < 2 ** -14) return sign | Math.floor(a / 2 ** -24);
  let e = Math.floor(Math.log2(a));
  if (a >= 2 ** (e + 1)) e++;
  if (a < 2 ** e) e--;
  return sign | ((e + 15) << 10) | Math.floor((a / 2 ** e - 1) * 1024);
}

export type DType = WeightTensor["dtype"];

/** A random [N,K] weight of the given dtype, its raw bytes at an odd byte offset (safetensors). */
export function makeWeight(dtype: DType, N: number, K: number, seed: number, blocksize = 64): WeightTensor {
  const vals = normals(N * K, seed, 0.05);
  if (dtype === "nf4") {
    const q = quantizeNf4(vals, "f32", N * K, blocksize);
    return { dtype, shape: [N, K], data: q.packed, absmax: q.absmax, blocksize };
  }
  const es = dtype === "f32" ? 4 : 2;
  const data = new Uint8Array(N * K * es + 1).subarray(1);
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < N * K; i++) {
    if (dtype === "f32") dv.setFloat32(4 * i, vals[i]!, true);
    else if (dtype === "f16") dv.setUint16(2 * i, toHalfBits(vals[i]!), true);
    else {
      f[0] = vals[i]!;
      dv.setUint16(2 * i, u[0]! >>> 16, true);
    }
  }
  return { dtype, shape: [N, K], data };
}

/** The oracle's view of W: float64 array decoded from the raw bytes. */
export function oracleWeight(w: WeightTensor): Float64Array {
  const [N, K] = w.shape as [number, number];
  const n = N * K;
  const out = new Float64Array(n);
  const dv = new DataView(w.data.buffer, w.data.byteOffset, w.data.byteLength);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < n; i++) {
    switch (w.dtype) {
      case "f32":
        out[i] = dv.getFloat32(4 * i, true);
        break;
      case "f16":
        out[i] = halfToNumber(dv.getUint16(2 * i, true));
        break;
      case "bf16":
        u[0] = dv.getUint16(2 * i, true) << 16;
        out[i] = f[0]!;
        break;
      case "nf4": {
        const byte = w.data[i >> 1]!;
        const code = i & 1 ? byte & 15 : byte >> 4;
        out[i] = Math.fround(NF4_TABLE[code]! * w.absmax![Math.floor(i / (w.blocksize ?? 64))]!);
        break;
      }
    }
  }
  return out;
}

/** A float64 oracle's output: the values and, per element, the sum of |terms| that bounds float32 rounding. */
export interface OracleOut {
  y: Float64Array;
  mag: Float64Array;
}

/**
 * Stores output element i = m·N + n of a forward oracle from its dot product `dot` and magnitude
 * `dotMag`, adding the bias term bias[n] and the accumulated previous value prev[i] (each with its
 * magnitude) where given: y = dot (+bias) (+prev), what every linear kernel's epilogue computes.
 */
export function storeForwardOutput(out: OracleOut, i: number, n: number, dot: number, dotMag: number, bias?: Float32Array, prev?: Float32Array): void {
  let s = dot;
  let a = dotMag;
  if (bias) {
    s += bias[n]!;
    a += Math.abs(bias[n]!);
  }
  if (prev) {
    s += prev[i]!;
    a += Math.abs(prev[i]!);
  }
  out.y[i] = s;
  out.mag[i] = a;
}

/** |got - want| <= rel · mag (+1e-30) element by element; fails with the first element outside the bound. */
export function assertWithinBound(got: Float32Array, want: OracleOut, rel: number, what: string): void {
  assert.equal(got.length, want.y.length, `${what}: length`);
  for (let i = 0; i < want.y.length; i++) {
    const err = Math.abs(got[i]! - want.y[i]!);
    if (!(err <= rel * want.mag[i]! + 1e-30)) assert.fail(`${what}: at ${i}: ${got[i]} vs ${want.y[i]} (bound ${rel * want.mag[i]!})`);
  }
}

/** Every SIMD level this CPU has (scalar first); the cap is left at the widest. */
export const LEVELS: SimdLevel[] = (() => {
  const seen = new Set<SimdLevel>();
  for (const l of ["scalar", "avx2", "avx512"] as SimdLevel[]) seen.add(setSimd(l));
  setSimd("avx512");
  return [...seen];
})();
/** Runs fn at `level`, then restores the widest level. */
export function withLevel<T>(level: SimdLevel, fn: () => T): T {
  assert.equal(setSimd(level), level);
  try {
    return fn();
  } finally {
    setSimd("avx512");
  }
}

