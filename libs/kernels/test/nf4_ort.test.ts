// Independent oracle: onnxruntime-node's CPU contrib op com.microsoft.MatMulBnb4 (quant_type 1 =
// NF4), which implements the bitsandbytes layout (flat W[N,K], even element in the high nibble,
// absmax per block of the flat index). The one-node ONNX model is written by hand below.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { dequantizeNf4, linear, quantizeNf4, setSimd, type SimdLevel } from "../src/index.js";

// ---------------------------------------------------------------------------------------------
// A tiny protobuf writer (just what onnx.proto's ModelProto needs: varints, strings, sub-messages)

class Pb {
  private readonly parts: number[] = [];
  private varint(v: number | bigint): void {
    let x = BigInt(v);
    if (x < 0n) x += 1n << 64n; // two's complement, as protobuf encodes negative int64
    do {
      let b = Number(x & 0x7fn);
      x >>= 7n;
      if (x) b |= 0x80;
      this.parts.push(b);
    } while (x);
  }
  int(field: number, v: number): this {
    this.varint(field << 3);
    this.varint(v);
    return this;
  }
  bytes(field: number, b: Uint8Array): this {
    this.varint((field << 3) | 2);
    this.varint(b.length);
    for (const x of b) this.parts.push(x);
    return this;
  }
  str(field: number, s: string): this {
    return this.bytes(field, new TextEncoder().encode(s));
  }
  msg(field: number, m: Pb): this {
    return this.bytes(field, m.finish());
  }
  finish(): Uint8Array {
    return Uint8Array.from(this.parts);
  }
}

const FLOAT = 1;
const UINT8 = 2;
const ATTR_INT = 2;

/** ValueInfoProto { name, type: TypeProto { tensor_type { elem_type, shape { dim { dim_value } } } } } */
function valueInfo(name: string, elemType: number, dims: number[]): Pb {
  const shape = new Pb();
  for (const d of dims) shape.msg(1, new Pb().int(1, d));
  const tensor = new Pb().int(1, elemType).msg(2, shape);
  return new Pb().str(1, name).msg(2, new Pb().msg(1, tensor));
}

function matMulBnb4Model(M: number, N: number, K: number, blockSize: number): Uint8Array {
  const attr = (name: string, v: number) => new Pb().str(1, name).int(3, v).int(20, ATTR_INT);
  const node = new Pb()
    .str(1, "A")
    .str(1, "B")
    .str(1, "absmax")
    .str(2, "Y")
    .str(3, "bnb4")
    .str(4, "MatMulBnb4")
    .msg(5, attr("K", K))
    .msg(5, attr("N", N))
    .msg(5, attr("block_size", blockSize))
    .msg(5, attr("quant_type", 1))
    .str(7, "com.microsoft");
  const graph = new Pb()
    .msg(1, node)
    .str(2, "g")
    .msg(11, valueInfo("A", FLOAT, [M, K]))
    .msg(11, valueInfo("B", UINT8, [Math.ceil((N * K) / 2)]))
    .msg(11, valueInfo("absmax", FLOAT, [Math.ceil((N * K) / blockSize)]))
    .msg(12, valueInfo("Y", FLOAT, [M, N]));
  return new Pb()
    .int(1, 8) // ir_version
    .str(2, "qlora-test")
    .msg(7, graph)
    .msg(8, new Pb().str(1, "").int(2, 17))
    .msg(8, new Pb().str(1, "com.microsoft").int(2, 1))
    .finish();
}

// ---------------------------------------------------------------------------------------------

type Ort = typeof import("onnxruntime-node");
let ort: Ort | undefined;
let loadError = "";
try {
  ort = createRequire(import.meta.url)("onnxruntime-node") as Ort;
} catch (e) {
  loadError = `onnxruntime-node cannot load here (${(e as Error).message.split("\n")[0]}); its CPU backend ships in the npm package, so this means the devDependency is not installed`;
}

async function runOrt(M: number, N: number, K: number, bs: number, x: Float32Array, packed: Uint8Array, absmax: Float32Array) {
  const o = ort!;
  const session = await o.InferenceSession.create(matMulBnb4Model(M, N, K, bs), { executionProviders: ["cpu"], intraOpNumThreads: 1 });
  try {
    const out = await session.run({
      A: new o.Tensor("float32", x, [M, K]),
      B: new o.Tensor("uint8", packed, [packed.length]),
      absmax: new o.Tensor("float32", absmax, [absmax.length]),
    });
    return out.Y!.data as Float32Array;
  } finally {
    await session.release();
  }
}

function normals(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0;
  const r = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = scale * Math.sqrt(-2 * Math.log(r() || 1e-12)) * Math.cos(2 * Math.PI * r());
  return out;
}

const LEVELS: SimdLevel[] = (() => {
  const seen = new Set<SimdLevel>();
  for (const l of ["scalar", "avx2", "avx512"] as SimdLevel[]) seen.add(setSimd(l));
  setSimd("avx512");
  return [...seen];
})();

test("MatMulBnb4 (onnxruntime) with A = identity reproduces dequantizeNf4 bit for bit", { skip: ort ? false : loadError }, async () => {
  // Y[m,n] = sum_k I[m,k] W[n,k] = W[n,m]: a single exact product per output
  for (const [N, K, bs] of [[7, 64, 64], [5, 33, 32], [3, 256, 128]] as const) {
    const n = N * K;
    const q = quantizeNf4(normals(n, N * K + bs, 2), "f32", n, bs);
    const eye = new Float32Array(K * K);
    for (let i = 0; i < K; i++) eye[i * K + i] = 1;
    const y = await runOrt(K, N, K, bs, eye, q.packed, q.absmax);
    const w = dequantizeNf4(q.packed, q.absmax, n, bs);
    for (let nn = 0; nn < N; nn++) {
      for (let k = 0; k < K; k++) assert.equal(y[k * N + nn], w[nn * K + k], `N=${N} K=${K} bs=${bs} W[${nn},${k}]`);
    }
  }
});

test("linear on NF4 weights matches MatMulBnb4 (onnxruntime) within 1e-5 relative, every SIMD level", { skip: ort ? false : loadError }, async () => {
  let seed = 1;
  for (const [M, N, K, bs] of [
    [1, 64, 256, 64],
    [1, 37, 129, 32],
    [3, 50, 128, 128],
    [8, 31, 64, 64],
    [17, 45, 200, 64],
    [33, 129, 77, 32],
  ] as const) {
    const n = N * K;
    const q = quantizeNf4(normals(n, seed++, 0.05), "f32", n, bs);
    const x = normals(M * K, seed++);
    const want = await runOrt(M, N, K, bs, x, q.packed, q.absmax);
    const w = { dtype: "nf4" as const, shape: [N, K], data: q.packed, absmax: q.absmax, blocksize: bs };
    // scale of the terms: sum_k |x||w| bounds the rounding of either implementation
    const deq = dequantizeNf4(q.packed, q.absmax, n, bs);
    for (const level of LEVELS) {
      setSimd(level);
      const got = linear(x, M, w);
      setSimd("avx512");
      for (let m = 0; m < M; m++) {
        for (let j = 0; j < N; j++) {
          let mag = 0;
          for (let k = 0; k < K; k++) mag += Math.abs(x[m * K + k]! * deq[j * K + k]!);
          const i = m * N + j;
          assert.ok(Math.abs(got[i]! - want[i]!) <= 1e-5 * mag + 1e-30, `M=${M} N=${N} K=${K} bs=${bs} ${level} y[${m},${j}]: ${got[i]} vs ${want[i]}`);
        }
      }
    }
  }
});
