// NF4 quantize / dequantize throughput against the machine's copy bandwidth (streamCopy, a threaded
// memcpy measured the same way). Run by `npm run bench` (bench/run.mjs) or directly with node.
// BENCH_NF4_N=elements (default 64M). Best of several runs: the machine is shared.
import { cpus } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import { cpuInfo, dequantizeNf4, quantizeNf4, setThreads, streamCopy } from "@qlora/kernels";

const n = Number(process.env.BENCH_NF4_N ?? 64 * 1024 * 1024);
const reps = Number(process.env.BENCH_REPS ?? 5);

// Best wall time, and best "CPU time / threads": on a shared machine other processes steal time
// slices, which inflates wall time but not the CPU time this process actually ran for.
let threads = 1;
function best(fn) {
  fn(); // warm: page faults, caches
  let wall = Infinity;
  let cpu = Infinity;
  for (let i = 0; i < reps; i++) {
    const c0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    fn();
    wall = Math.min(wall, Number(process.hrtime.bigint() - t0) / 1e9);
    const c = process.cpuUsage(c0);
    cpu = Math.min(cpu, (c.user + c.system) / 1e6 / threads);
  }
  return { wall, cpu };
}
const fmt = (bytes, t) => `${(bytes / t.wall / 1e9).toFixed(1)} (${(bytes / t.cpu / 1e9).toFixed(1)})`;
const ratio = (a, ta, b, tb) => `${(((a / ta.wall) / (b / tb.wall)) * 100).toFixed(0)}% (${(((a / ta.cpu) / (b / tb.cpu)) * 100).toFixed(0)}%)`;

// random-normal f32 input (Box-Muller on a fast LCG: the values only need a realistic spread)
const x = new Float32Array(n);
let s = 0x9e3779b9;
for (let i = 0; i < n; i += 2) {
  s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
  const u1 = (s + 1) / 4294967297;
  s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
  const u2 = s / 4294967296;
  const r = Math.sqrt(-2 * Math.log(u1));
  x[i] = 0.02 * r * Math.cos(2 * Math.PI * u2);
  if (i + 1 < n) x[i + 1] = 0.02 * r * Math.sin(2 * Math.PI * u2);
}
const copyDst = new Float32Array(n);
const deq = new Float32Array(n);
const q = quantizeNf4(x, "f32", n, 64);
const bf16 = new Uint8Array(2 * n);
{
  const u = new Uint32Array(x.buffer);
  const h = new Uint16Array(bf16.buffer);
  for (let i = 0; i < n; i++) h[i] = u[i] >>> 16;
}

const info = cpuInfo();
console.log(`simd ${info.simd}, ${cpus().length} cpus, n = ${n} elements (${((4 * n) / 2 ** 20).toFixed(0)} MiB f32), blocksize 64, best of ${reps}`);
console.log("");
console.log("GB/s from wall time; in parentheses from CPU time / threads (what an unloaded machine would show)");
console.log("");
console.log("| threads | copy GB/s (r+w) | quantize f32 GB/s (input) | vs copy | quantize bf16 GB/s (input) | dequantize GB/s (f32 out) | vs copy |");
console.log("|---|---|---|---|---|---|---|");
for (const t of [1, 2]) {
  threads = setThreads(t);
  await sleep(200); // let new pool workers start before the first region
  const tc = best(() => streamCopy(x, copyDst));
  const tq = best(() => quantizeNf4(x, "f32", n, 64));
  const tb = best(() => quantizeNf4(bf16, "bf16", n, 64));
  const td = best(() => dequantizeNf4(q.packed, q.absmax, n, 64, deq));
  console.log(
    `| ${threads} | ${fmt(8 * n, tc)} | ${fmt(4 * n, tq)} | ${ratio(4 * n, tq, 8 * n, tc)} | ${fmt(2 * n, tb)} | ${fmt(4 * n, td)} | ${ratio(4 * n, td, 8 * n, tc)} |`,
  );
}
setThreads(0);
