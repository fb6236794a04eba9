// CUDA kernel benchmarks (device time by CUDA events, csrc/napi/cuda_napi.cpp cudaBench), run by
// bench/gpu-check.sh or `npm run bench` (skipped with the reason when there is no CUDA device).
//   --require-device  exit 2 when no device is available (gpu-check.sh)
//   --json FILE       also write the figures as JSON (gpu-check.sh prints its table from it)
// Shapes: the issue-6 targets — NF4 GEMV M=1 8192×8192 vs device copy bandwidth; NF4 GEMM with M = 4096
// tokens on 2048×2048 and 8192×2048 vs the card's dense bf16 peak; LoRA r=16 forward/backward; attention
// (decode over a 1024-token cache, training batch 8 × 512) at the Llama-3.2-1B head shape (32 q heads,
// 8 kv heads, head_dim 64); and a decode-step floor from the GEMVs of every Llama-3.2-1B linear.
import { writeFileSync } from "node:fs";
import { cudaInfo, cudaOps } from "@qlora/kernels";

const args = process.argv.slice(2);
const requireDevice = args.includes("--require-device");
const jsonAt = args.indexOf("--json");
const jsonFile = jsonAt >= 0 ? args[jsonAt + 1] : null;

const info = cudaInfo();
if (!info.available) {
  console.log(`no CUDA device: ${info.reason} (compiled with CUDA: ${info.compiled})`);
  process.exit(requireDevice ? 2 : 0);
}
const dev = info.devices[0];
// dense bf16 tensor-core peaks (vendor datasheets; sparsity excluded), TFLOP/s
function bf16Peak(name) {
  if (/H100.*PCIe/i.test(name)) return 756;
  if (/H100|H200|GH200/i.test(name)) return 989;
  if (/A100/i.test(name)) return 312;
  if (/L40S/i.test(name)) return 362;
  return null;
}
const peak = bf16Peak(dev.name);
console.log(`device: ${dev.name}, cc ${dev.computeCapability}, ${(dev.totalMemory / 2 ** 30).toFixed(0)} GiB, ` +
  `${dev.multiprocessors} SMs, CUDA runtime ${info.runtimeVersion}, driver ${info.driverVersion}, bf16 peak ${peak ?? "?"} TFLOP/s`);

const out = { device: dev.name, peakTflops: peak, rows: [] };
const row = (name, value, unit, note = "") => {
  out.rows.push({ name, value, unit, note });
  console.log(`${name.padEnd(44)} ${value.toFixed(value >= 100 ? 0 : 2).padStart(10)} ${unit.padEnd(9)} ${note}`);
};

const copy = cudaOps.bench("copy", { bytes: 1 << 30, iters: 10 });
row("device copy D2D (read+write)", copy.gbps, "GB/s");

const gemv = cudaOps.bench("gemv", { M: 1, N: 8192, K: 8192, iters: 50 });
row("NF4 GEMV M=1 8192x8192 (weights+absmax)", gemv.weightGBps, "GB/s",
  `${((gemv.weightGBps / copy.gbps) * 100).toFixed(0)}% of copy (target >= 70%), ${(gemv.ms * 1000).toFixed(1)} us`);
for (const M of [4, 8]) {
  const g = cudaOps.bench("gemv", { M, N: 8192, K: 8192, iters: 30 });
  row(`NF4 GEMV M=${M} 8192x8192`, g.weightGBps, "GB/s", `${(g.ms * 1000).toFixed(1)} us`);
}

for (const [N, K] of [[2048, 2048], [8192, 2048], [2048, 8192]]) {
  const g = cudaOps.bench("gemm", { M: 4096, N, K, iters: 10 });
  const pct = (t) => (peak ? `${((t / peak) * 100).toFixed(0)}% of peak` : "");
  row(`NF4 GEMM fwd M=4096 ${N}x${K}`, g.tflops, "TFLOP/s", `${g.ms.toFixed(3)} ms, ${pct(g.tflops)}`);
  row(`NF4 GEMM bwd-input M=4096 ${N}x${K}`, g.backwardTflops, "TFLOP/s", `${g.backwardMs.toFixed(3)} ms, ${pct(g.backwardTflops)}`);
}

for (const [inF, outF] of [[2048, 2048], [2048, 8192]]) {
  const l = cudaOps.bench("lora", { N: 4096, in: inF, out: outF, rank: 16, dropout: 0.05, iters: 10 });
  row(`LoRA r=16 fwd N=4096 ${outF}x${inF} (incl. NF4)`, l.forwardMs, "ms");
  row(`LoRA r=16 bwd N=4096 ${outF}x${inF} (incl. dx)`, l.backwardMs, "ms");
}

const dec = cudaOps.bench("attentionDecode", { ctx: 1024, batch: 1, nHeads: 32, nKvHeads: 8, headDim: 64, iters: 50 });
row("attention decode ctx=1024 (32/8 heads, hd 64)", dec.ms * 1000, "us", `${dec.kvGBps.toFixed(0)} GB/s of KV`);
const tr = cudaOps.bench("attentionTrain", { B: 8, T: 512, nHeads: 32, nKvHeads: 8, headDim: 64, iters: 3 });
row("attention train fwd 8x512 (one layer)", tr.forwardMs, "ms");
row("attention train bwd 8x512 (one layer)", tr.backwardMs, "ms");

// Decode-step floor of the frozen linears alone (Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192,
// 8 kv heads × 64, NF4 lm_head 128256 × 2048): Σ GEMV times. Not an engine measurement.
const layer = [[2048, 2048], [512, 2048], [512, 2048], [2048, 2048], [8192, 2048], [8192, 2048], [2048, 8192]];
let ms = 0;
for (const [N, K] of layer) ms += 16 * cudaOps.bench("gemv", { M: 1, N, K, iters: 30 }).ms;
ms += cudaOps.bench("gemv", { M: 1, N: 128256, K: 2048, iters: 20 }).ms;
ms += 16 * dec.ms;
row("decode floor: 1B linears + attention (est.)", 1000 / ms, "tok/s", `${ms.toFixed(3)} ms/token of kernels, no launch overhead`);

if (jsonFile) writeFileSync(jsonFile, JSON.stringify(out, null, 1));
