// The CUDA kernel layer (csrc/cuda, docs/cuda.md).
// Always: cudaInfo()'s shape; resolveDevice; the addon has CUDA compiled in whenever nvcc is found the
// way the build finds it (so CI proves the CUDA build happened); without a device every kernel entry
// point refuses with FailedPrecondition.
// With a GPU: every kernel against the CPU kernel on random data, odd sizes included. Exact where the
// GPU does the same IEEE operations (NF4 dequantization, RoPE, AdamW, dropout masks, greedy and seeded
// sampling); fp32 reduction-order bounds elsewhere; bf16 bounds (x and W rounded to bf16: relative
// 2⁻⁸ per product) for the tensor-core GEMMs. Without a GPU these tests skip with the reason.
import { test } from "node:test";
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { FailedPrecondition } from "@qlora/core";
import {
  cudaInfo, cudaOps, decodeWeight, dequantizeNf4, dequantizeNf4Bf16, engineOps, gemm, linear, linearBackwardInput,
  quantizeNf4, resolveDevice, sampleToken, seedRng, trainOps,
} from "../src/index.js";
import type { CudaInfo, WeightTensor } from "../src/index.js";
import { rng } from "./random.js";

// ---- helpers ----------------------------------------------------------------------------------
const rand = (n: number, r: () => number, lo = -1, hi = 1) => Float32Array.from({ length: n }, () => lo + (hi - lo) * r());
const asBytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const f32Tensor = (a: Float32Array, shape: number[]): WeightTensor => ({ dtype: "f32", shape, data: asBytes(a) });
function halfTensor(a: Float32Array, shape: number[], dtype: "bf16" | "f16"): WeightTensor {
  const u = new Uint16Array(a.length);
  if (dtype === "bf16") {
    const bits = new Uint32Array(a.buffer, a.byteOffset, a.length);
    for (let i = 0; i < a.length; i++) u[i] = bits[i]! >>> 16;
  } else {
    for (let i = 0; i < a.length; i++) u[i] = toHalf(a[i]!);
  }
  return { dtype, shape, data: asBytes(u) };
}
function toHalf(x: number): number {  // round-to-nearest for the small normal values used here
  const f = new Float32Array([x]), b = new Uint32Array(f.buffer)[0]!;
  const sign = (b >>> 16) & 0x8000, e = ((b >>> 23) & 0xff) - 127 + 15, m = b & 0x7fffff;
  if (e <= 0) return sign;
  return sign | (e << 10) | ((m + 0x1000) >>> 13);
}
function nf4Tensor(a: Float32Array, shape: number[], blocksize = 64): WeightTensor {
  const q = quantizeNf4(a, "f32", a.length, blocksize);
  return { dtype: "nf4", shape, data: q.packed, absmax: q.absmax, blocksize };
}
/** |W| decoded to f32, for the Σ|x·w| error bounds. */
function absWeight(w: WeightTensor): WeightTensor {
  const [N, K] = w.shape as [number, number];
  return f32Tensor(decodeWeight(w, 0, N * K).map(Math.abs), [N, K]);
}
const abs = (a: Float32Array) => a.map(Math.abs);

/** max_i |got_i − want_i| <= tol_i, tol given per element or as one number */
function assertClose(got: ArrayLike<number>, want: ArrayLike<number>, tol: (i: number) => number, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i]! - want[i]!);
    if (!(d <= tol(i))) assert.fail(`${what}[${i}]: got ${got[i]}, want ${want[i]} (|diff| ${d} > ${tol(i)})`);
  }
}
const relTol = (want: ArrayLike<number>, rel: number, abs = 0) => (i: number) => rel * Math.abs(want[i]!) + abs;
const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
};

const info = cudaInfo();
/** A test that needs a GPU: skipped with the reason when there is none. */
function gpuTest(name: string, fn: () => void): void {
  test(name, (t) => {
    if (!info.available) {
      t.skip(`no CUDA device: ${info.reason}`);
      return;
    }
    fn();
  });
}

// ---- always ------------------------------------------------------------------------------------
test("cudaInfo() reports the build and the device", () => {
  assert.equal(typeof info.compiled, "boolean");
  assert.equal(typeof info.available, "boolean");
  assert.equal(typeof info.reason, "string");
  assert.ok(Number.isInteger(info.runtimeVersion) && Number.isInteger(info.driverVersion));
  assert.ok(Array.isArray(info.devices));
  if (info.available) {
    assert.equal(info.compiled, true);
    assert.equal(info.reason, "");
    assert.ok(info.devices.length > 0);
    for (const d of info.devices) {
      assert.equal(typeof d.name, "string");
      assert.ok(d.totalMemory > 0);
      assert.match(d.computeCapability, /^\d+\.\d+$/);
    }
  } else {
    assert.ok(info.reason.length > 0, "an unavailable device comes with a reason");
  }
  if (info.compiled) assert.ok(info.runtimeVersion >= 11000, "the static CUDA runtime reports its version");
});

test("the addon has CUDA compiled in whenever the build can find nvcc", async () => {
  // the build's own detection (CUDA_HOME/bin, /usr/local/cuda/bin, PATH; QLORA_CUDA=0 turns it off)
  const here = dirname(fileURLToPath(import.meta.url));
  const config = (await import(pathToFileURL(join(here, "..", "..", "scripts", "cuda-config.mjs")).href)) as {
    findNvcc(): string | null;
  };
  const nvcc = config.findNvcc();
  if (nvcc) assert.equal(info.compiled, true, `nvcc exists (${nvcc}) but the addon was built without CUDA: rebuild`);
  else assert.equal(info.compiled, false, "no nvcc (or QLORA_CUDA=0), yet the addon reports CUDA compiled");
});

test("resolveDevice: auto → cuda only when available; cuda without a device → FailedPrecondition", () => {
  const up: CudaInfo = { compiled: true, available: true, reason: "", runtimeVersion: 13000, driverVersion: 13000, devices: [] };
  const down: CudaInfo = { ...up, available: false, reason: "cudaErrorNoDevice: no CUDA-capable device is detected" };
  assert.equal(resolveDevice("cpu", up), "cpu");
  assert.equal(resolveDevice("auto", up), "cuda");
  assert.equal(resolveDevice("cuda", up), "cuda");
  assert.equal(resolveDevice("cpu", down), "cpu");
  assert.equal(resolveDevice("auto", down), "cpu");
  assert.throws(() => resolveDevice("cuda", down), (e: unknown) => e instanceof FailedPrecondition && /cudaErrorNoDevice/.test(e.message));
  assert.throws(() => resolveDevice("gpu" as never, up), FailedPrecondition);
  // this machine
  assert.equal(resolveDevice("auto"), info.available ? "cuda" : "cpu");
  if (!info.available) assert.throws(() => resolveDevice("cuda"), (e: unknown) => e instanceof FailedPrecondition && e.message.includes(info.reason));
});

test("without a device the CUDA kernels refuse with FailedPrecondition", (t) => {
  if (info.available) {
    t.skip("a CUDA device is present");
    return;
  }
  assert.throws(() => cudaOps.sumSquares(new Float32Array(3)), FailedPrecondition);
  assert.throws(() => cudaOps.linear(new Float32Array(4), 1, f32Tensor(new Float32Array(8), [2, 4])), FailedPrecondition);
  if (info.compiled) {
    // the raw binding refuses too (a clear error, never a crash)
    assert.throws(() => cudaOps.bench("copy"), FailedPrecondition);
  }
});

// ---- with a GPU: each kernel against the CPU path --------------------------------------------------
gpuTest("NF4 dequantization is bit-identical to the CPU (f32 and bf16, odd n, every blocksize)", () => {
  const r = rng(1);
  for (const [n, bs] of [[1, 64], [4097, 32], [12345, 64], [70001, 4096], [9999, 128]] as const) {
    const x = rand(n, r, -3, 3);
    const q = quantizeNf4(x, "f32", n, bs);
    assert.deepEqual(cudaOps.nf4Dequantize(q.packed, q.absmax, n, bs), dequantizeNf4(q.packed, q.absmax, n, bs), `f32 n=${n} bs=${bs}`);
    assert.deepEqual(cudaOps.nf4DequantizeBf16(q.packed, q.absmax, n, bs), dequantizeNf4Bf16(q.packed, q.absmax, n, bs), `bf16 n=${n} bs=${bs}`);
  }
});

gpuTest("linear: GEMV (M <= 8, fp32) and tensor-core GEMM (M > 8, bf16) match the CPU within their bounds", () => {
  const r = rng(2);
  const shapes: [number, number][] = [[96, 256], [37, 64], [33, 50], [130, 161], [257, 512]];
  for (const [N, K] of shapes) {
    const wf = rand(N * K, r, -0.5, 0.5);
    const weights: WeightTensor[] = [nf4Tensor(wf, [N, K], 64), halfTensor(wf, [N, K], "bf16"), halfTensor(wf, [N, K], "f16"), f32Tensor(wf, [N, K])];
    if ((N * K) % 32 === 0) weights.push(nf4Tensor(wf, [N, K], 32));
    for (const w of weights) {
      const aw = absWeight(w);
      for (const M of [1, 2, 3, 5, 8, 9, 13, 37, 130]) {
        const x = rand(M * K, r), bias = rand(N, r), y0 = rand(M * N, r);
        const want = linear(x, M, w, bias, Float32Array.from(y0), true);
        const got = cudaOps.linear(x, M, w, bias, y0);
        const bound = linear(abs(x), M, aw);  // Σ|x·w| per output
        // GEMV: fp32 with a different summation order; GEMM: x and W rounded to bf16 (2⁻⁸ per product)
        const rel = M <= 8 ? 4 * K * 2 ** -24 : 2 ** -7 + K * 2 ** -23;
        assertClose(got, want, (i) => rel * bound[i % (M * N)]! + 1e-6 * Math.abs(want[i]!) + 1e-7, `${w.dtype} bs=${w.blocksize ?? "-"} M=${M} N=${N} K=${K}`);
      }
    }
  }
});

gpuTest("linearForwardMany (q/k/v, gate/up in one launch) = linear per weight, bit for bit; falls back where it cannot fuse", () => {
  const r = rng(12);
  for (const K of [64, 256]) {
    const parts = [37, 5, 70].map((N) => ({ N, wf: rand(N * K, r, -0.5, 0.5), bias: rand(N, r) }));
    const nf4 = parts.map((p) => nf4Tensor(p.wf, [p.N, K], 64));
    for (const M of [1, 2, 3, 8, 9]) {  // 9: the GEMM path, one launch per weight
      const x = rand(M * K, r);
      for (const [what, ws, biases, fuses] of [
        ["3 NF4 with biases", nf4, parts.map((p) => p.bias), M <= 8],
        ["2 NF4 without", nf4.slice(0, 2), [null, null], M <= 8],
        ["NF4 + bf16", [nf4[0]!, halfTensor(parts[1]!.wf, [parts[1]!.N, K], "bf16")], [parts[0]!.bias, null], false],
      ] as const) {
        const got = cudaOps.linearMany(x, M, [...ws], [...biases]);
        assert.equal(got.fused, fuses, `${what} K=${K} M=${M}: fused`);
        ws.forEach((w, i) => assert.deepEqual(got.ys[i], cudaOps.linear(x, M, w, biases[i] ?? null), `${what} K=${K} M=${M} part ${i}`));
      }
    }
  }
});

gpuTest("gatedLinearForward (gate/up GEMVs + the gated activation in one launch) = linear, linear, gatedActivation, bit for bit", () => {
  const r = rng(13);
  for (const [N, K] of [[37, 64], [70, 256], [8, 32]] as const) {
    const [wg, wu] = [rand(N * K, r, -0.5, 0.5), rand(N * K, r, -0.5, 0.5)];
    const [bg, bu] = [rand(N, r), rand(N, r)];
    for (const M of [1, 2, 3, 8, 9]) {  // 9: not fused
      const x = rand(M * K, r);
      for (const act of ["silu", "gelu", "relu"] as const) {
        for (const [what, g, u, fuses] of [
          ["NF4", nf4Tensor(wg, [N, K], 32), nf4Tensor(wu, [N, K], 32), M <= 8],
          ["NF4 + f32", nf4Tensor(wg, [N, K], 32), f32Tensor(wu, [N, K]), false],
        ] as const) {
          const got = cudaOps.gatedLinear(x, M, g, u, bg, act === "relu" ? null : bu, act);
          assert.equal(got.fused, fuses, `${what} ${act} N=${N} K=${K} M=${M}: fused`);
          const gy = cudaOps.linear(x, M, g, bg), uy = cudaOps.linear(x, M, u, act === "relu" ? null : bu);
          const want = cudaOps.gatedActivation(act, gy, uy, new Float32Array(gy.length)).y;
          assert.deepEqual(got.y, want, `${what} ${act} N=${N} K=${K} M=${M}`);
        }
      }
    }
  }
});

gpuTest("linearBackwardInput (bf16 tensor cores) matches the CPU within the bf16 bound", () => {
  const r = rng(3);
  for (const [N, K] of [[64, 96], [37, 33], [160, 128]] as [number, number][]) {
    const wf = rand(N * K, r, -0.5, 0.5);
    for (const w of [nf4Tensor(wf, [N, K], 32), halfTensor(wf, [N, K], "bf16"), f32Tensor(wf, [N, K])]) {
      const awT = absWeight(w);
      for (const M of [1, 9, 37]) {
        const dy = rand(M * N, r), dx0 = rand(M * K, r);
        const want = linearBackwardInput(dy, M, w, Float32Array.from(dx0), true);
        const got = cudaOps.linearBackwardInput(dy, M, w, dx0);
        const bound = linearBackwardInput(abs(dy), M, awT);
        assertClose(got, want, (i) => (2 ** -7 + N * 2 ** -23) * bound[i]! + 1e-6 * Math.abs(want[i]!) + 1e-7, `${w.dtype} M=${M} N=${N} K=${K}`);
      }
    }
  }
});

gpuTest("fp32 GEMM matches the CPU gemm (transposes, alpha/beta, leading dimensions, odd sizes)", () => {
  const r = rng(4);
  for (const [M, N, K] of [[1, 1, 1], [17, 33, 65], [64, 64, 64], [100, 7, 300]]) {
    for (const transA of [false, true])
      for (const transB of [false, true])
        for (const [alpha, beta] of [[1, 0], [0.5, 1.25]]) {
          const lda = (transA ? M : K) + 3, ldb = (transB ? K : N) + 1, ldc = N + 2;
          const A = rand((transA ? K : M) * lda, r), B = rand((transB ? N : K) * ldb, r), C = rand(M * ldc, r);
          const want = gemm(M!, N!, K!, A, B, Float32Array.from(C), { transA, transB, alpha, beta, lda, ldb, ldc });
          const got = cudaOps.gemm(transA, transB, M!, N!, K!, alpha!, A, lda, B, ldb, beta!, C, ldc);
          const bound = gemm(M!, N!, K!, abs(A), abs(B), Float32Array.from(abs(C)), { transA, transB, alpha: Math.abs(alpha!), beta: Math.abs(beta!), lda, ldb, ldc });
          assertClose(got, want, (i) => 4 * (K! + 2) * 2 ** -24 * bound[i]!, `gemm ${M}x${N}x${K} tA=${transA} tB=${transB}`);
        }
  }
});

gpuTest("LoRA linear forward/backward matches trainOps.loraLinear (fp32 branch exact-order bound; dropout masks identical)", () => {
  const r = rng(5);
  for (const [N, inF, outF, rank] of [[9, 64, 48, 4], [37, 33, 65, 16], [130, 96, 64, 8]] as const) {
    for (const dropout of [0, 0.1]) {
      const a = rand(rank * inF, r, -0.2, 0.2), b = rand(outF * rank, r, -0.2, 0.2);
      const lora = { a, b, rank, scaling: 2, dropout, seed: 77n, stream: 3 };
      const x = rand(N * inF, r), dy = rand(N * outF, r), bias = rand(outF, r);
      // W = 0 (an all-zero NF4 weight): the frozen path contributes exact zeros, so y, dx, dA, dB test
      // the fp32 LoRA kernels and the dropout masks alone
      const zero = nf4Tensor(new Float32Array(outF * inF), [outF, inF], 32);
      const want = trainOps.loraLinear(x, N, zero, bias, lora, dy, true);
      const got = cudaOps.loraLinear(x, N, zero, bias, lora, dy, true);
      const fp32 = (ref: Float32Array, depth: number) => (i: number) => 8 * depth * 2 ** -24 * (maxAbs(ref) + 1) + 1e-6 * Math.abs(ref[i]!);
      assertClose(got.y, want.y, fp32(want.y, inF + rank), `y N=${N} p=${dropout}`);
      assertClose(got.dx, want.dx, fp32(want.dx, outF + rank), `dx N=${N} p=${dropout}`);
      // with W = 0, dx = drop'(du·A): exactly the dropped elements are 0, so the masks must match bit for bit
      for (let i = 0; i < want.dx.length; i++)
        if ((want.dx[i] === 0) !== (got.dx[i] === 0)) assert.fail(`dropout mask differs at dx[${i}] N=${N} p=${dropout}`);
      assertClose(got.ga!, want.ga!, fp32(want.ga!, N * 4), `dA N=${N} p=${dropout}`);
      assertClose(got.gb!, want.gb!, fp32(want.gb!, N * 4), `dB N=${N} p=${dropout}`);
      // a real NF4 weight: the frozen products carry the bf16 bound
      const w = nf4Tensor(rand(outF * inF, r, -0.5, 0.5), [outF, inF], 32);
      const want2 = trainOps.loraLinear(x, N, w, bias, lora, dy, true);
      const got2 = cudaOps.loraLinear(x, N, w, bias, lora, dy, true);
      const aw = absWeight(w);
      const by = linear(abs(x), N, aw), bdx = linearBackwardInput(abs(dy), N, aw);
      assertClose(got2.y, want2.y, (i) => 2 ** -7 * by[i]! + 1e-4, `y (nf4) N=${N}`);
      assertClose(got2.dx, want2.dx, (i) => 2 ** -7 * bdx[i]! + 1e-4, `dx (nf4) N=${N}`);
      assertClose(got2.ga!, want2.ga!, fp32(want2.ga!, N * 4), `dA (nf4) N=${N}`);
    }
  }
});

gpuTest("RMSNorm / LayerNorm forward and backward match the CPU", () => {
  const r = rng(6);
  for (const [rows, dim] of [[1, 1], [3, 37], [17, 1000], [5, 4099]]) {
    const x = rand(rows! * dim!, r, -2, 2), w = rand(dim!, r, 0.5, 1.5), b = rand(dim!, r), dy = rand(rows! * dim!, r);
    const rel = 2e-6 * Math.sqrt(dim!) + 1e-6;
    const g = cudaOps.norm("rms", x, w, null, rows!, dim!, 1e-5, dy);
    const y = engineOps.rmsNorm(x, w, rows!, dim!, 1e-5);
    assertClose(g.y, y, relTol(y, rel, 1e-6), `rms y ${rows}x${dim}`);
    const dx = trainOps.rmsNormBackward(dy, x, w, rows!, dim!, 1e-5);
    assertClose(g.dx, dx, (i) => rel * (maxAbs(dx) + 1), `rms dx ${rows}x${dim}`);
    for (const [ww, bb] of [[w, b], [null, null]] as const) {
      const gl = cudaOps.norm("layer", x, ww, bb, rows!, dim!, 1e-5, dy);
      const yl = engineOps.layerNorm(x, ww, bb, rows!, dim!, 1e-5);
      assertClose(gl.y, yl, relTol(yl, rel, 1e-5), `layer y ${rows}x${dim}`);
      const dxl = trainOps.layerNormBackward(dy, x, ww, rows!, dim!, 1e-5);
      assertClose(gl.dx, dxl, (i) => rel * (maxAbs(dxl) + 1), `layer dx ${rows}x${dim}`);
    }
  }
});

gpuTest("RoPE forward/backward are bit-identical to the CPU (same tables; llama3 scaling too)", () => {
  const r = rng(7);
  for (const [T, nh, hd] of [[1, 1, 2], [7, 3, 10], [33, 4, 64], [5, 2, 128]]) {
    const x = rand(T! * nh! * hd!, r, -2, 2);
    const pos = Int32Array.from({ length: T! }, () => Math.floor(r() * 3000));
    assert.deepEqual(cudaOps.rope(x, T!, nh!, hd!, pos, 10000, null, false), engineOps.rope(x, T!, nh!, hd!, pos, 10000, null), `fwd ${T},${nh},${hd}`);
    assert.deepEqual(cudaOps.rope(x, T!, nh!, hd!, pos, 500000, null, true), trainOps.ropeBackward(x, T!, nh!, hd!, pos, 500000), `bwd ${T},${nh},${hd}`);
    const llama3 = { type: "llama3" as const, factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 };
    assert.deepEqual(cudaOps.rope(x, T!, nh!, hd!, pos, 500000, llama3, false), engineOps.rope(x, T!, nh!, hd!, pos, 500000, llama3), `llama3 ${T},${nh},${hd}`);
  }
});

gpuTest("activations (SiLU, ReLU, GELU; gated) forward and backward match the CPU", () => {
  const r = rng(8);
  for (const n of [1, 7, 1000, 65537]) {
    const x = rand(n, r, -12, 12), u = rand(n, r, -3, 3), dy = rand(n, r);
    for (const kind of ["silu", "relu", "gelu"] as const) {
      // CUDA expf/erff are within 2 ulp, the CPU's SIMD exp within ~2 ulp: a few ulp on the composition.
      // GELU's cdf = 0.5·(1 + erf(x/√2)) cancels for x < 0: erff values a few ulp (2⁻²⁴ near −1) apart
      // move cdf by that much absolutely (x = −5: 10 % of gelu(x)), so its outputs get
      // cdfSlack·|factor of cdf| on top (y = x·cdf, dx = dy·(cdf + x·pdf), gated: ·u).
      const cdfSlack = kind === "gelu" ? 4 * 2 ** -25 : 0;
      const tol = (want: Float32Array, factor: (i: number) => number) => (i: number) =>
        2e-6 * Math.abs(want[i]!) + 1e-7 + cdfSlack * factor(i);
      const fx = (i: number) => Math.abs(x[i]!), fdy = (i: number) => Math.abs(dy[i]!);
      const g = cudaOps.activation(kind, x, dy);
      const y = engineOps.activation(kind, x);
      assertClose(g.y, y, tol(y, fx), `${kind} y n=${n}`);
      const dx = trainOps.activationBackward(kind, x, dy);
      assertClose(g.dx, dx, tol(dx, fdy), `${kind} dx n=${n}`);
      const gg = cudaOps.gatedActivation(kind, x, u, dy);
      const yg = engineOps.gatedActivation(kind, x, u);
      assertClose(gg.y, yg, tol(yg, (i) => fx(i) * Math.abs(u[i]!)), `${kind} gated y n=${n}`);
      const bg = trainOps.gatedActivationBackward(kind, x, u, dy);
      assertClose(gg.dgate, bg.dgate, tol(bg.dgate, (i) => fdy(i) * Math.abs(u[i]!)), `${kind} dgate n=${n}`);
      assertClose(gg.dup, bg.dup, tol(bg.dup, (i) => fdy(i) * fx(i)), `${kind} dup n=${n}`);
    }
  }
});

gpuTest("attention over KV caches (prefill + decode, GQA, several sequences) matches the CPU", () => {
  const r = rng(9);
  for (const [nh, nkv, hd, ctx] of [[4, 2, 8, 37], [6, 3, 6, 5], [8, 1, 64, 300], [2, 2, 130, 40]]) {
    const kw = nkv! * hd!, scale = 1 / Math.sqrt(hd!);
    // two sequences' caches back to back; prefill of sequence 0 (all positions) + a decode token of sequence 1
    const k = rand(2 * ctx! * kw, r, -2, 2), v = rand(2 * ctx! * kw, r);
    const T = ctx! + 1;
    const q = rand(T * nh! * hd!, r, -2, 2);
    const pos = Int32Array.from({ length: T }, (_, t) => (t < ctx! ? t : ctx! - 1));
    const off = Int32Array.from({ length: T }, (_, t) => (t < ctx! ? 0 : ctx!));
    const got = cudaOps.attention(q, k, v, pos, nh!, nkv!, hd!, scale, off);
    const w0 = engineOps.attention(q.subarray(0, ctx! * nh! * hd!), k.subarray(0, ctx! * kw), v.subarray(0, ctx! * kw), pos.subarray(0, ctx!), nh!, nkv!, hd!, scale);
    const w1 = engineOps.attention(q.subarray(ctx! * nh! * hd!), k.subarray(ctx! * kw), v.subarray(ctx! * kw), pos.subarray(ctx!), nh!, nkv!, hd!, scale);
    const want = new Float32Array(got.length);
    want.set(w0);
    want.set(w1, w0.length);
    assertClose(got, want, () => 2e-5 * (maxAbs(v) + 1), `attention nh=${nh} nkv=${nkv} hd=${hd} ctx=${ctx}`);
  }
});

/** Rows split into segments at the given cut positions (positions restart: start[i] = the segment's first t). */
function segmentStarts(B: number, T: number, cutsOf: (b: number) => number[]): Int32Array {
  const start = new Int32Array(B * T);
  for (let b = 0; b < B; b++) {
    const cuts = cutsOf(b);
    let s = 0;
    for (let t = 0; t < T; t++) {
      if (cuts.includes(t)) s = t;
      start[b * T + t] = s;
    }
  }
  return start;
}
const relL2 = (got: Float32Array, want: Float32Array) => {
  let d = 0, w = 0;
  for (let i = 0; i < want.length; i++) d += (got[i]! - want[i]!) ** 2, w += want[i]! ** 2;
  return Math.sqrt(d / Math.max(w, 1e-30));
};

gpuTest("prefill attention on the flash kernel (the engine's plan: long runs in tiles, the rest SIMT) matches the CPU", () => {
  const r = rng(13);
  for (const [nh, nkv, hd] of [[4, 2, 64], [2, 1, 32], [4, 4, 128], [2, 1, 64]]) {
    const kw = nkv! * hd!, scale = 1 / Math.sqrt(hd!), ctx = 150;
    // three sequences' caches of ctx rows: a prefill of 137 tokens (3 tiles, the last partial), a
    // decode token at position 90, a chunked-prefill continuation at positions 40..69 (a tile with
    // pos0 > 0), and a short run of 5 tokens (SIMT)
    const k = rand(3 * ctx * kw, r, -2, 2), v = rand(3 * ctx * kw, r);
    const runs = [[0, 0, 137], [1, 90, 1], [2, 40, 30], [1, 91, 5]] as const;  // [sequence, first position, tokens]
    const T = runs.reduce((n, [, , c]) => n + c, 0);
    const pos = new Int32Array(T), off = new Int32Array(T);
    let t = 0;
    for (const [seq, p0, n] of runs) for (let i = 0; i < n; i++, t++) pos[t] = p0 + i, off[t] = seq * ctx;
    const q = rand(T * nh! * hd!, r, -2, 2);
    let got: Float32Array;
    try {
      got = cudaOps.attention(q, k, v, pos, nh!, nkv!, hd!, scale, off, "flash");
    } catch (e) {
      if (/shared memory/.test(String(e))) continue;  // hd 128 on a GPU without the shared memory
      throw e;
    }
    const want = new Float32Array(got.length);
    const qw = nh! * hd!;
    t = 0;
    for (const [seq, , n] of runs) {
      const cache = (a: Float32Array) => a.subarray(seq * ctx * kw, (seq + 1) * ctx * kw);
      want.set(engineOps.attention(q.subarray(t * qw, (t + n) * qw), cache(k), cache(v), pos.subarray(t, t + n), nh!, nkv!, hd!, scale), t * qw);
      t += n;
    }
    const what = `prefill flash nh=${nh} nkv=${nkv} hd=${hd}`;
    const dS = 2 * scale * 2 ** -10 * hd! * maxAbs(q) * 2;  // TF32 score error bound (|k| <= 2)
    assertClose(got, want, () => maxAbs(v) * (2 * dS + 2 ** -9), what);
    assert.ok(relL2(got, want) < 2e-3, `${what}: relative L2 ${relL2(got, want)}`);
    // the SIMT tokens (decode + short run) are exactly the SIMT kernel's
    const simt = cudaOps.attention(q, k, v, pos, nh!, nkv!, hd!, scale, off, "simt");
    for (let i = 137 * qw; i < 138 * qw; i++) assert.equal(got[i], simt[i], `${what}: decode token = SIMT`);
    for (let i = (T - 5) * qw; i < T * qw; i++) assert.equal(got[i], simt[i], `${what}: short run = SIMT`);
    // and the prompt's tokens did take the flash kernel (TF32 differs from SIMT fp32 in some bits)
    assert.notDeepEqual(got.subarray(0, 137 * qw), simt.subarray(0, 137 * qw), `${what}: the flash kernel ran`);
  }
});

gpuTest("training attention, SIMT kernels (packed segments, GQA): out, lse, dq, dk, dv match trainOps.attention", () => {
  const r = rng(10);
  for (const [B, T, nh, nkv, hd] of [[1, 1, 1, 1, 4], [2, 13, 4, 2, 8], [3, 37, 6, 3, 10], [1, 70, 4, 1, 64]]) {
    const N = B! * T!, scale = 1 / Math.sqrt(hd!);
    // segments: each row split at a random point (positions restart)
    const start = segmentStarts(B!, T!, () => [Math.floor(r() * T!)]);
    const q = rand(N * nh! * hd!, r, -2, 2), k = rand(N * nkv! * hd!, r, -2, 2), v = rand(N * nkv! * hd!, r), dout = rand(N * nh! * hd!, r);
    const want = trainOps.attention(q, k, v, B!, T!, start, nh!, nkv!, hd!, scale, dout);
    const got = cudaOps.attentionTrain(q, k, v, B!, T!, start, nh!, nkv!, hd!, scale, dout, "simt");
    const what = `B=${B} T=${T} nh=${nh} nkv=${nkv} hd=${hd}`;
    assertClose(got.out, want.out, () => 2e-5 * (maxAbs(want.out) + 1), `out ${what}`);
    assertClose(got.lse, want.lse, relTol(want.lse, 2e-6, 2e-6), `lse ${what}`);
    for (const key of ["dq", "dk", "dv"] as const) {
      const w = want[key]!;
      assertClose(got[key]!, w, () => 1e-5 * Math.sqrt(T! * (nh! / nkv!)) * (maxAbs(w) + 1), `${key} ${what}`);
    }
  }
});

// The flash kernels round q, k, v, dout and the probabilities to TF32 (relative 2⁻¹¹): a score moves by
// up to scale·2⁻¹⁰·Σ|q_e·k_e|, so elementwise bounds follow from that; the gradients are checked by their
// relative L2 error (TF32 noise is ~5e-4 on these data, a wrong mask or tile bound is O(1)).
gpuTest("training attention, flash kernels (tensor cores; odd T, tiles straddling segments, GQA) match trainOps.attention", () => {
  const r = rng(12);
  const cases: [number, number, number, number, number, (b: number) => number[]][] = [
    [1, 1, 1, 1, 64, () => []],
    [2, 77, 4, 2, 32, (b) => (b === 0 ? [30] : [])],
    [1, 130, 4, 1, 64, () => [5, 70, 129]],
    [1, 200, 2, 1, 32, () => [63, 64, 128]],
    [3, 64, 2, 2, 128, (b) => [b * 20]],
    [2, 300, 8, 2, 64, () => [Math.floor(r() * 300), 250]],
  ];
  for (const [B, T, nh, nkv, hd, cutsOf] of cases) {
    const N = B * T, scale = 1 / Math.sqrt(hd);
    const start = segmentStarts(B, T, cutsOf);
    const q = rand(N * nh * hd, r, -2, 2), k = rand(N * nkv * hd, r, -2, 2), v = rand(N * nkv * hd, r), dout = rand(N * nh * hd, r);
    const want = trainOps.attention(q, k, v, B, T, start, nh, nkv, hd, scale, dout);
    let got;
    try {
      got = cudaOps.attentionTrain(q, k, v, B, T, start, nh, nkv, hd, scale, dout, "flash");
    } catch (e) {
      // the backward needs 103 KB (hd 64) / 167 KB (hd 128) of shared memory per block: sm_90 has both,
      // sm_80 has 163 KB, sm_86/89 99 KB
      if (/shared memory/.test(String(e))) continue;
      throw e;
    }
    const what = `B=${B} T=${T} nh=${nh} nkv=${nkv} hd=${hd}`;
    const dS = 2 * scale * 2 ** -10 * hd * maxAbs(q) * maxAbs(k);  // score error bound
    assertClose(got.out, want.out, () => maxAbs(v) * (2 * dS + 2 ** -9), `out ${what}`);
    assertClose(got.lse, want.lse, () => dS + 1e-5 * (maxAbs(want.lse) + 1), `lse ${what}`);
    assert.ok(relL2(got.out, want.out) < 2e-3, `out ${what}: relative L2 ${relL2(got.out, want.out)}`);
    // one token: dq = dk = 0 exactly on the CPU, TF32 leaves a residue of dp − D (no relative measure)
    for (const key of T === 1 ? (["dv"] as const) : (["dq", "dk", "dv"] as const)) {
      const e = relL2(got[key]!, want[key]!);
      assert.ok(e < 5e-3, `${key} ${what}: relative L2 error ${e}`);
    }
    // auto takes the flash kernels for this shape: the same bits
    const auto = cudaOps.attentionTrain(q, k, v, B, T, start, nh, nkv, hd, scale, dout);
    assert.deepEqual(auto.dk, got.dk, `auto = flash ${what}`);
  }
  // shapes the flash kernels do not take: forcing them is an InvalidArgument, auto falls back to SIMT
  const q = rand(8 * 2 * 48, r), k = rand(8 * 48, r), start = new Int32Array(8);
  assert.throws(() => cudaOps.attentionTrain(q, k, k, 1, 8, start, 2, 1, 48, 0.1, null, "flash"), /headDim 32, 64 or 128/);
  const simt = cudaOps.attentionTrain(q, k, k, 1, 8, start, 2, 1, 48, 0.1, null, "simt");
  assert.deepEqual(cudaOps.attentionTrain(q, k, k, 1, 8, start, 2, 1, 48, 0.1, null).out, simt.out);
});

gpuTest("softmax cross-entropy (loss and in-place gradient) matches a float64 reference", () => {
  const r = rng(11);
  for (const [rows, V] of [[1, 1], [3, 7], [5, 5000], [2, 131073]]) {
    const z = rand(rows! * V!, r, -8, 8);
    const labels = Int32Array.from({ length: rows! }, () => Math.floor(r() * V!));
    const got = cudaOps.softmaxCrossEntropy(z, rows!, V!, labels, 0.25);
    for (let i = 0; i < rows!; i++) {
      const row = z.subarray(i * V!, (i + 1) * V!);
      let m = -Infinity;
      for (const x of row) m = Math.max(m, x);
      let s = 0;
      for (const x of row) s += Math.exp(x - m);
      const loss = m + Math.log(s) - row[labels[i]!]!;
      assert.ok(Math.abs(got.loss[i]! - loss) <= 1e-5 * (Math.abs(loss) + 1), `loss row ${i}: ${got.loss[i]} vs ${loss}`);
      const grad = Float64Array.from(row, (x) => (Math.exp(x - m) / s) * 0.25);
      grad[labels[i]!]! -= 0.25;
      assertClose(got.dlogits.subarray(i * V!, (i + 1) * V!), grad, (j) => 1e-6 * Math.abs(grad[j]!) + 1e-9, `dlogits row ${i} V=${V}`);
    }
  }
});

gpuTest("fused lm_head cross-entropy matches trainOps.lmHeadCrossEntropy within the bf16 bound", () => {
  const r = rng(12);
  for (const [M, V, H, chunk] of [[5, 300, 64, 2], [40, 1000, 96, 16], [37, 517, 33, 37]]) {
    const h = rand(M! * H!, r), w = nf4Tensor(rand(V! * H!, r, -0.5, 0.5), [V!, H!], 32);
    const labels = Int32Array.from({ length: M! }, () => Math.floor(r() * V!));
    const want = trainOps.lmHeadCrossEntropy(h, w, labels, chunk!, 0.5);
    const got = cudaOps.lmHeadCrossEntropy(h, w, labels, chunk!, 0.5);
    // each logit is off by <= 2⁻⁷·Σ|h·w| (bf16 GEMM for chunks > 8 rows); a row's loss by twice that
    const zb = linear(abs(h), M!, absWeight(w));
    let lossTol = 0;
    for (let i = 0; i < M!; i++) lossTol += 2 * 2 ** -7 * maxAbs(zb.subarray(i * V!, (i + 1) * V!));
    assert.ok(Math.abs(got.loss - want.loss) <= lossTol + 1e-6 * Math.abs(want.loss), `loss ${got.loss} vs ${want.loss} (tol ${lossTol})`);
    assertClose(got.dh, want.dh, () => 0.05 * maxAbs(want.dh) + 1e-6, `dh M=${M} V=${V} H=${H}`);
  }
});

gpuTest("AdamW is bit-identical to the CPU; the gradient sum of squares matches float64", () => {
  const r = rng(13);
  for (const n of [1, 7, 1001, 100003]) {
    const p = rand(n, r), m = rand(n, r, -0.01, 0.01), v = rand(n, r, 0, 1e-4);
    const cp = [Float32Array.from(p), Float32Array.from(m), Float32Array.from(v)];
    const gp = [Float32Array.from(p), Float32Array.from(m), Float32Array.from(v)];
    for (let step = 1; step <= 3; step++) {
      const g = rand(n, r, -0.1, 0.1);
      let ss = 0;
      for (const x of g) ss += x * x;
      assert.ok(Math.abs(cudaOps.sumSquares(g) - ss) <= 1e-12 * ss + 1e-300, `sumSquares n=${n}`);
      const o = { lr: 1e-3 * step, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, step };
      const gc = Float32Array.from(g), gg = Float32Array.from(g);
      trainOps.adamw(cp[0]!, gc, cp[1]!, cp[2]!, o, 0.75);
      cudaOps.adamw(gp[0]!, gg, gp[1]!, gp[2]!, o, 0.75);
      assert.deepEqual(gp, cp, `adamw n=${n} step=${step}`);
      assert.deepEqual(gg, gc, "gradients zeroed");
    }
  }
});

gpuTest("sampling: greedy, temperature, top-k, top-p and repetition penalty give the CPU's tokens for the same seed", () => {
  const r = rng(14);
  const params = [
    { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 },
    { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1.3 },
    { temperature: 0.8, topK: 0, topP: 1, repetitionPenalty: 1 },
    { temperature: 1, topK: 40, topP: 1, repetitionPenalty: 1 },
    { temperature: 0.7, topK: 0, topP: 0.9, repetitionPenalty: 1 },
    { temperature: 1.2, topK: 50, topP: 0.8, repetitionPenalty: 1.2 },
    { temperature: 1, topK: 1, topP: 0.5, repetitionPenalty: 1 },
  ];
  for (const V of [2, 1000, 32001]) {
    for (const p of params) {
      const cpuRng = seedRng(99n), gpuRng = seedRng(99n);
      for (let draw = 0; draw < 30; draw++) {
        const logits = rand(V, r, -6, 6);
        if (draw % 5 === 0) logits[Math.floor(r() * V)] = logits[0]!;  // ties
        const recent = Int32Array.from({ length: 8 }, () => Math.floor(r() * V));
        const want = sampleToken(logits, 0, V, p, recent, cpuRng);
        const got = cudaOps.sampleToken(logits, p, recent, gpuRng);
        assert.equal(got, want, `V=${V} ${JSON.stringify(p)} draw ${draw}`);
        assert.deepEqual(gpuRng, cpuRng, "the RNG advances exactly as on the CPU");
      }
    }
  }
});
