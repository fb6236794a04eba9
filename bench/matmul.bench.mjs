// NF4 GEMV (decode, M = 1..8; exact fp32 decode and int8 activations) against the copy bandwidth,
// and GEMM GFLOP/s (M = 128) against the machine's FMA peak. Run by `npm run bench` (bench/run.mjs) or directly with node.
// The weights rotate over enough copies to overflow the last-level cache ("stream"); "hot" repeats
// one weight (L3-resident when it fits). Best of several runs: the machine is shared.
import { cpus } from "node:os";
import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { cpuInfo, gemm, linear, linearBackwardInput, linearInt8, quantizeNf4, setThreads, streamCopy } from "@qlora/kernels";

const reps = Number(process.env.BENCH_REPS ?? 7);
const N = 2048;
const K = 8192;
const COPIES = Number(process.env.BENCH_COPIES ?? 8); // 8 x 9.4 MB of NF4 weights > L3

// Best wall time and best "CPU time / threads" per call: on a shared machine other processes steal
// time slices, which inflates wall time but not the CPU time this process ran for.
let threads = 1;
function timeBest(fn, inner = 1) {
  fn();
  let wall = Infinity;
  let cpu = Infinity;
  for (let i = 0; i < reps; i++) {
    const c0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    for (let j = 0; j < inner; j++) fn(j);
    wall = Math.min(wall, Number(process.hrtime.bigint() - t0) / 1e9 / inner);
    const c = process.cpuUsage(c0);
    cpu = Math.min(cpu, (c.user + c.system) / 1e6 / threads / inner);
  }
  return { wall, cpu };
}
const pair = (f) => `${f("wall").toFixed(1)} (${f("cpu").toFixed(1)})`;
function randn(n, seed, scale = 1) {
  const a = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const u1 = (s + 1) / 4294967297;
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = scale * Math.sqrt(-2 * Math.log(u1)) * Math.cos((2 * Math.PI * s) / 4294967296);
  }
  return a;
}

function mhz() {
  try {
    const m = /cpu MHz\s*:\s*([\d.]+)/.exec(readFileSync("/proc/cpuinfo", "utf8"));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

const ncpu = cpus().length;
threads = setThreads(ncpu);
await sleep(200);
const info = cpuInfo();
const wf = randn(N * K, 7, 0.02);
const weights = [];
for (let c = 0; c < COPIES; c++) {
  const src = c === 0 ? wf : wf.map((v, i) => (i % 97 === c ? -v : v));
  const q = quantizeNf4(src, "f32", N * K, 64);
  weights.push({ dtype: "nf4", shape: [N, K], data: q.packed, absmax: q.absmax, blocksize: 64 });
}
const wBytes = weights[0].data.byteLength + weights[0].absmax.byteLength;

// copy bandwidth: 256 MiB buffers
const cs = new Uint8Array(256 << 20).fill(1);
const cd = new Uint8Array(256 << 20);
const tcopy = timeBest(() => streamCopy(cs, cd));
const copy = { wall: (2 * cs.byteLength) / tcopy.wall / 1e9, cpu: (2 * cs.byteLength) / tcopy.cpu / 1e9 };

console.log(`simd ${info.simd}, threads ${info.threads}, W = [${N}, ${K}] nf4 bs 64 (${(wBytes / 1e6).toFixed(1)} MB packed + absmax), ${COPIES} copies, copy bandwidth ${pair((k) => copy[k])} GB/s (r+w), best of ${reps}`);
console.log("figures from wall time; in parentheses from CPU time / threads (what an unloaded machine would show)");
console.log("");
// exact: NF4 decoded to fp32 (linear); int8: int8 activations, integer block dots (linearInt8)
const paths = { exact: linear, int8: (...a) => linearInt8(...a).y };
console.log("| M | path | stream: ms | weight GB/s | vs copy | hot: ms | weight GB/s |");
console.log("|---|---|---|---|---|---|---|");
for (const M of [1, 2, 4, 8]) {
  const x = randn(M * K, 11 + M);
  const y = new Float32Array(M * N);
  for (const [path, fn] of Object.entries(paths)) {
    const ts = timeBest((j = 0) => fn(x, M, weights[j % COPIES], undefined, y), COPIES);
    const th = timeBest(() => fn(x, M, weights[0], undefined, y), COPIES);
    const gs = (k) => wBytes / ts[k] / 1e9;
    console.log(
      `| ${M} | ${path} | ${pair((k) => ts[k] * 1e3)} | ${pair(gs)} | ${((gs("wall") / copy.wall) * 100).toFixed(0)}% (${((gs("cpu") / copy.cpu) * 100).toFixed(0)}%) | ${pair((k) => th[k] * 1e3)} | ${pair((k) => wBytes / th[k] / 1e9)} |`,
    );
  }
}

// GEMM at M = 128: dense f32 and NF4-weight linear
const freq = mhz();
const peak = freq ? (ncpu * freq * 1e6 * 2 * 8 * 2) / 1e9 : 0; // cores x Hz x 2 FMA pipes x 8 lanes x 2 flops
console.log("");
console.log(
  `GEMM, M = 128: peak ${peak ? `${peak.toFixed(0)} GFLOP/s (${ncpu} cores x ${freq.toFixed(0)} MHz x 2 FMA pipes x 8 lanes x 2 flops, AVX2)` : "n/a (no clock in /proc/cpuinfo)"}`,
);
console.log("");
console.log("| op | shape | ms | GFLOP/s | vs peak |");
console.log("|---|---|---|---|---|");
{
  const M = 128;
  const Kg = 2048;
  const Ng = 2048;
  const A = randn(M * Kg, 3);
  const B = randn(Ng * Kg, 4, 0.02);
  const C = new Float32Array(M * Ng);
  const flops = 2 * M * Ng * Kg;
  const row = (name, shape, t) =>
    console.log(
      `| ${name} | ${shape} | ${pair((k) => t[k] * 1e3)} | ${pair((k) => flops / t[k] / 1e9)} | ${peak ? `${((flops / t.wall / 1e9 / peak) * 100).toFixed(0)}% (${((flops / t.cpu / 1e9 / peak) * 100).toFixed(0)}%)` : "n/a"} |`,
    );
  row("gemmF32 (B transposed)", `${M}x${Ng}x${Kg}`, timeBest(() => gemm(M, Ng, Kg, A, B, C, { transB: true })));
  row("gemmF32", `${M}x${Ng}x${Kg}`, timeBest(() => gemm(M, Ng, Kg, A, B, C)));
  const q = quantizeNf4(B, "f32", Ng * Kg, 64);
  const w = { dtype: "nf4", shape: [Ng, Kg], data: q.packed, absmax: q.absmax, blocksize: 64 };
  row("linear nf4", `${M}x${Ng}x${Kg}`, timeBest(() => linear(A, M, w, undefined, C)));
  const wb = { dtype: "f32", shape: [Ng, Kg], data: new Uint8Array(B.buffer) };
  row("linear f32", `${M}x${Ng}x${Kg}`, timeBest(() => linear(A, M, wb, undefined, C)));
  const wh = { dtype: "bf16", shape: [Ng, Kg], data: new Uint8Array(new Uint16Array(Ng * Kg).map((_, i) => new Uint32Array(B.buffer)[i] >>> 16).buffer) };
  row("linear bf16", `${M}x${Ng}x${Kg}`, timeBest(() => linear(A, M, wh, undefined, C)));
  const dX = new Float32Array(M * Kg);
  row("linearBackwardInput nf4", `${M}x${Kg}x${Ng}`, timeBest(() => linearBackwardInput(C, M, w, dX)));
}
setThreads(0);
