// CUDA kernel benchmarks (device time by CUDA events, csrc/napi/cuda_napi.cpp cudaBench), run by
// bench/gpu-check.sh or `npm run bench` (skipped with the reason when there is no CUDA device).
//   --require-device  exit 2 when no device is available (gpu-check.sh)
//   --json FILE       also write the figures as JSON (gpu-check.sh prints its table from it)
// Shapes: the issue-6 targets — NF4 GEMV M=1 8192×8192 vs device copy bandwidth; NF4 GEMM with M = 4096
// tokens on 2048×2048 and 8192×2048 vs the card's dense bf16 peak; LoRA r=16 forward/backward; attention
// (decode over a 1024-token cache, training batch 8 × 512) at the Llama-3.2-1B head shape (32 q heads,
// 8 kv heads, head_dim 64); and a decode-step floor from the GEMVs of every Llama-3.2-1B linear.
// Then the engine itself (engine::CudaModel through NativeModel, docs/cuda.md §6) on the Llama-3.2-1B
// shape: decode tok/s at batch 1 (CUDA graphs on and off) and batch 8, prefill tok/s; and the LoRA
// training step (engine::CudaLoraTrainer, docs/cuda.md §7) at batch 8 × 512, r = 16 on all 7 linear
// types, gradient checkpointing on: tokens/s and the fraction of the card's dense bf16 peak.
//   --engine-only         skip the kernel rows
//   --from-checkpoint     load the random BF16 checkpoint of bench/checkpoints.mjs through loadModel
//                         (NF4 on load; ~2.5 GB written on first use) instead of random NF4 weights
//                         made in memory (the default: seconds, no disk)
import { randomFillSync } from "node:crypto";
import { writeFileSync } from "node:fs";
import { cudaInfo, cudaOps, NativeModel, seedRng } from "@qlora/kernels";
import { PRESETS } from "./checkpoints.mjs";

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

// The JSON is rewritten after every row, and each section (kernels, engine, training) runs on its own:
// a GPU run is short and scarce, so a section that throws, crashes the process later or hits
// gpu-check's timeout must not take the figures measured before it along.
const out = { device: dev.name, peakTflops: peak, rows: [], errors: [] };
const save = () => jsonFile && writeFileSync(jsonFile, JSON.stringify(out, null, 1));
const row = (name, value, unit, note = "") => {
  out.rows.push({ name, value, unit, note });
  save();
  console.log(`${name.padEnd(44)} ${value.toFixed(value >= 100 ? 0 : 2).padStart(10)} ${unit.padEnd(9)} ${note}`);
};
async function section(name, fn) {
  try {
    await fn();
  } catch (e) {
    out.errors.push({ section: name, message: String(e?.message ?? e).split("\n")[0] });
    save();
    console.log(`${name}: FAILED\n${e?.stack ?? e}`);
  }
}

const engineOnly = args.includes("--engine-only");
save();
if (!engineOnly) await section("kernels", kernelRows);
await section("engine", engineRows);
await section("training", () => trainRows(PRESETS["llama-3.2-1b"]));

function kernelRows() {
const copy = cudaOps.bench("copy", { bytes: 1 << 30, iters: 10 });
row("device copy D2D (read+write)", copy.gbps, "GB/s");

const gemv = cudaOps.bench("gemv", { M: 1, N: 8192, K: 8192, iters: 50 });
row("NF4 GEMV M=1 8192x8192 (weights+absmax)", gemv.weightGBps, "GB/s",
  `${((gemv.weightGBps / copy.gbps) * 100).toFixed(0)}% of copy (target >= 70%), ${(gemv.ms * 1000).toFixed(1)} us`);
for (const M of [4, 8]) {
  const g = cudaOps.bench("gemv", { M, N: 8192, K: 8192, iters: 30 });
  row(`NF4 GEMV M=${M} 8192x8192`, g.weightGBps, "GB/s", `${(g.ms * 1000).toFixed(1)} us`);
}

// decode-step fusion (1B shape, M=1): q/k/v and gate/up read the same x — one launch vs one per weight
for (const [what, shape] of [["q/k/v 2048+512+512 x2048", { N0: 2048, N1: 512, N2: 512 }], ["gate/up 2x8192 x2048 + SwiGLU", { N0: 8192, N1: 8192, gated: 1 }]]) {
  const g = cudaOps.bench("gemvMany", { M: 1, K: 2048, iters: 100, ...shape });
  row(`NF4 GEMV fused ${what}`, g.ms * 1000, "us", `${g.fused ? "one launch" : "NOT FUSED"}, ${(g.separateMs * 1000).toFixed(1)} us as separate launches; ${g.weightGBps.toFixed(0)} GB/s`);
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
// training attention, one layer of the 1B shape: the flash kernels (TF32 tensor cores, what training
// uses) and the SIMT fp32 kernels. TFLOP/s of the causal work: QKᵀ and PV = 2 units forward, 5 backward
// (QKᵀ recomputed, dP, dQ, dK, dV; the kernels' second recomputation in the dK/dV pass not counted).
const attnUnit = 2 * 8 * 64 * ((512 * 513) / 2) * 32;
for (const [kernel, flash] of [["flash", 1], ["SIMT", 0]]) {
  try {
    const tr = cudaOps.bench("attentionTrain", { B: 8, T: 512, nHeads: 32, nKvHeads: 8, headDim: 64, iters: 3, flash });
    row(`attention train fwd 8x512 (one layer, ${kernel})`, tr.forwardMs, "ms", `${((2 * attnUnit) / (tr.forwardMs * 1e9)).toFixed(1)} TFLOP/s`);
    row(`attention train bwd 8x512 (one layer, ${kernel})`, tr.backwardMs, "ms", `${((5 * attnUnit) / (tr.backwardMs * 1e9)).toFixed(1)} TFLOP/s`);
  } catch (e) {
    out.errors.push({ section: `attention train (${kernel})`, message: String(e?.message ?? e).split("\n")[0] });
    save();
    console.log(`attention train (${kernel}): FAILED: ${e?.message ?? e}`);
  }
}

// Decode-step floor of the frozen linears alone (Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192,
// 8 kv heads × 64, NF4 lm_head 128256 × 2048): Σ GEMV times. Not an engine measurement.
const layer = [[2048, 2048], [512, 2048], [512, 2048], [2048, 2048], [8192, 2048], [8192, 2048], [2048, 8192]];
let ms = 0;
for (const [N, K] of layer) ms += 16 * cudaOps.bench("gemv", { M: 1, N, K, iters: 30 }).ms;
ms += cudaOps.bench("gemv", { M: 1, N: 128256, K: 2048, iters: 20 }).ms;
ms += 16 * dec.ms;
row("decode floor: 1B linears + attention (est.)", 1000 / ms, "tok/s", `${ms.toFixed(3)} ms/token of kernels, no launch overhead`);
}

// ---- the engine on the Llama-3.2-1B shape -------------------------------------------------------
/** Random weights of the preset's shapes: NF4 linears (blocksize 64), the tied embedding in BF16. */
function randomWeights(hf) {
  const H = hf.hidden_size, I = hf.intermediate_size, V = hf.vocab_size, hd = hf.head_dim;
  const q = hf.num_attention_heads * hd, kv = hf.num_key_value_heads * hd;
  const nf4 = (out, inp) => {
    const n = out * inp, data = new Uint8Array(n / 2), absmax = new Float32Array(n / 64);
    randomFillSync(data);  // uniform codes: a worst case for nothing, the kernels read every byte anyway
    absmax.fill(0.02);
    return { dtype: "nf4", shape: [out, inp], data, absmax, blocksize: 64 };
  };
  const ones = (n) => ({ dtype: "f32", shape: [n], data: new Uint8Array(new Float32Array(n).fill(1).buffer) });
  // bf16 values in ±[2⁻⁸, 2⁻⁷): exponent 119, random sign and mantissa (never NaN/Inf)
  const emb = new Uint16Array(V * H);
  randomFillSync(emb);
  for (let i = 0; i < emb.length; i++) emb[i] = (emb[i] & 0x807f) | (119 << 7);
  const w = { embed_tokens: { dtype: "bf16", shape: [V, H], data: new Uint8Array(emb.buffer) }, "norm.weight": ones(H) };
  for (let l = 0; l < hf.num_hidden_layers; l++) {
    const p = `layers.${l}.`;
    Object.assign(w, {
      [`${p}self_attn.q_proj.weight`]: nf4(q, H), [`${p}self_attn.k_proj.weight`]: nf4(kv, H),
      [`${p}self_attn.v_proj.weight`]: nf4(kv, H), [`${p}self_attn.o_proj.weight`]: nf4(H, q),
      [`${p}mlp.gate_proj.weight`]: nf4(I, H), [`${p}mlp.up_proj.weight`]: nf4(I, H), [`${p}mlp.down_proj.weight`]: nf4(H, I),
      [`${p}input_layernorm.weight`]: ones(H), [`${p}post_attention_layernorm.weight`]: ones(H),
    });
  }
  return w;
}

/** A random LoRA of rank r on all 7 linears of every layer (A ~ U(±0.01), B ~ U(±0.01)). */
function randomAdapter(hf, r) {
  const H = hf.hidden_size, I = hf.intermediate_size, hd = hf.head_dim;
  const q = hf.num_attention_heads * hd, kv = hf.num_key_value_heads * hd;
  const dims = { "self_attn.q_proj": [q, H], "self_attn.k_proj": [kv, H], "self_attn.v_proj": [kv, H], "self_attn.o_proj": [H, q],
    "mlp.gate_proj": [I, H], "mlp.up_proj": [I, H], "mlp.down_proj": [H, I] };
  const rand = (n) => Float32Array.from({ length: n }, () => (Math.random() * 2 - 1) * 0.01);
  const modules = {};
  for (let l = 0; l < hf.num_hidden_layers; l++)
    for (const [m, [o, i]] of Object.entries(dims)) modules[`layers.${l}.${m}`] = { a: rand(r * i), b: rand(o * r), rank: r };
  return { scaling: 2, modules };
}

function engineConfig(hf) {
  const rs = hf.rope_scaling;
  return {
    arch: "llama", hiddenSize: hf.hidden_size, intermediateSize: hf.intermediate_size, numLayers: hf.num_hidden_layers,
    numHeads: hf.num_attention_heads, numKvHeads: hf.num_key_value_heads, headDim: hf.head_dim, vocabSize: hf.vocab_size,
    maxPositions: hf.max_position_embeddings, normEps: hf.rms_norm_eps, ropeTheta: hf.rope_theta,
    ropeScaling: rs ? { type: "llama3", factor: rs.factor, lowFreqFactor: rs.low_freq_factor, highFreqFactor: rs.high_freq_factor,
      originalMaxPositions: rs.original_max_position_embeddings } : null,
    hiddenAct: "silu", tiedEmbeddings: hf.tie_word_embeddings, qkvBias: false, oBias: false, mlpBias: false,
  };
}

async function engineRows() {
  const preset = "llama-3.2-1b", hf = PRESETS[preset];
  const maxContext = 1024, maxSequences = 8;
  const t0 = performance.now();
  const models = [];
  let source;
  if (args.includes("--from-checkpoint")) {
    const { ensureCheckpoint } = await import("./checkpoints.mjs");
    const { loadModel } = await import("@qlora/model");
    const { dir } = await ensureCheckpoint(preset);
    models.push((await loadModel(dir, { device: "cuda", maxSequences, maxContext })).native);  // no eager twin
    source = "checkpoint (NF4 on load)";
  } else {
    const cfg = engineConfig(hf), weights = randomWeights(hf);
    models.push(new NativeModel(cfg, weights, { device: "cuda", maxSequences, maxContext }));
    // the eager twin also keeps prefill attention on the SIMT kernel (read when a model is made): its
    // prefill row is the flash kernel's baseline
    process.env.QLORA_CUDA_FLASH = "0";
    models.push(new NativeModel(cfg, weights, { device: "cuda", maxSequences, maxContext, cudaGraphs: false }));
    delete process.env.QLORA_CUDA_FLASH;
    source = "random NF4 in memory";
  }
  const [m, eager] = models;
  console.log(`engine: ${preset} shape, ${source}, ${(m.residentBytes() / 2 ** 30).toFixed(2)} GiB on the device, built in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const V = hf.vocab_size, out = new Float32Array(maxSequences * V);
  const prompt = Int32Array.from({ length: 128 }, (_, i) => (i * 7919 + 3) % V);

  // decode: `steps` steps of `batch` rows after a 128-token prefill per row; wall clock (host
  // overhead, H2D of the token ids, graph launch included), best of 3. "sample": greedy generation
  // as the services run it (forwardSample: the token picked on the device, only the ids come back,
  // fed to the next step); "logits": forward with the [batch, V] logits downloaded (the old path).
  const greedy = { params: { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 }, recent: null, rng: seedRng(1n) };
  const decode = (model, batch, steps, mode = "sample", adapterOf = () => -1) => {
    let best = Infinity;
    for (let rep = 0; rep < 3; rep++) {
      const seqs = Array.from({ length: batch }, () => model.createSequence());
      model.forward(seqs.map((seq, i) => ({ seq, tokens: prompt, adapter: adapterOf(i) })), { out });
      const rows = seqs.map((seq, i) => ({ seq, tokens: Int32Array.of(i + 5), adapter: adapterOf(i) }));
      const sampling = rows.map(() => greedy);
      const step = mode === "sample"
        ? () => model.forwardSample(rows, sampling).forEach((t, i) => (rows[i].tokens[0] = t))
        : () => model.forward(rows, { out });
      step();  // first decode step: captures the graph
      const ts = performance.now();
      for (let s = 0; s < steps; s++) step();
      best = Math.min(best, performance.now() - ts);
      for (const seq of seqs) model.dropSequence(seq);
    }
    return (batch * steps * 1000) / best;
  };
  const tps1 = decode(m, 1, 200);
  row("engine decode batch 1 (1B, CUDA graphs)", tps1, "tok/s", `${(1000 / tps1).toFixed(3)} ms/token, greedy on the device; target >= 500`);
  const l1 = decode(m, 1, 200, "logits");
  row("engine decode batch 1 (1B, graphs, logits to host)", l1, "tok/s", `${(1000 / l1).toFixed(3)} ms/token, no sampling`);
  if (eager) {
    const e1 = decode(eager, 1, 100);
    row("engine decode batch 1 (1B, eager launches)", e1, "tok/s", `${(1000 / e1).toFixed(3)} ms/token`);
  }
  const tps8 = decode(m, 8, 100);
  row("engine decode batch 8 (1B, CUDA graphs)", tps8, "tok/s", `${((8 * 1000) / tps8).toFixed(3)} ms/step, greedy on the device`);
  // LoRA r=16 on all 7 linears (the QLoRA recipe), unmerged: one adapter for every row, then 8
  // adapters in one batch (each row its own; the segmented LoRA kernels run all of them in 2
  // launches per module). The 8 slots hold copies of one random adapter: the work is the same.
  const lora = randomAdapter(hf, 16);
  for (let s = 0; s < 8; s++) m.setAdapter(s, lora);
  const a1 = decode(m, 1, 100, "sample", () => 0);
  row("engine decode batch 1, LoRA r=16 all-linear (1B)", a1, "tok/s", `${(1000 / a1).toFixed(3)} ms/token (base: ${(1000 / tps1).toFixed(3)})`);
  const a8 = decode(m, 8, 50, "sample", (i) => i);
  row("engine decode batch 8, 8 different adapters (1B)", a8, "tok/s", `${((8 * 1000) / a8).toFixed(3)} ms/step (base: ${((8 * 1000) / tps8).toFixed(3)})`);
  for (let s = 0; s < 8; s++) m.removeAdapter(s);
  // prefill: one row of n tokens on a fresh sequence (bf16 tensor-core GEMMs; attention on the flash
  // kernel, or SIMT on the eager twin), best of 3
  const prefill = (model, n) => {
    const long = Int32Array.from({ length: n }, (_, i) => (i * 104729 + 11) % V);
    let best = Infinity;
    for (let rep = 0; rep < 3; rep++) {
      const seq = model.createSequence();
      const ts = performance.now();
      model.forward([{ seq, tokens: long, adapter: -1 }], { out });
      best = Math.min(best, performance.now() - ts);
      model.dropSequence(seq);
    }
    return best;
  };
  for (const n of [512, 1024]) {
    const best = prefill(m, n);
    row(`engine prefill ${n} tokens (1B, flash attention)`, (n * 1000) / best, "tok/s", `${best.toFixed(1)} ms`);
    if (eager) {
      const e = prefill(eager, n);
      row(`engine prefill ${n} tokens (1B, SIMT attention)`, (n * 1000) / e, "tok/s", `${e.toFixed(1)} ms`);
    }
  }
  const g = m.cudaGraphStats();
  console.log(`graphs captured ${g.captured}, replayed ${g.launches}`);
  for (const x of models) x.dispose();
}

/**
 * The real FLOPs of one LoRA training step (multiply-add = 2 FLOP), counted as the engine computes
 * them (model/train.cpp, cuda/train_cuda.cu), for N = B·T tokens, M labelled rows, L layers:
 *   frozen linears   forward 2·P·N, again for the recomputed layers with checkpointing
 *                    (L−1 of L: the last layer's activations are still there) 2·P·N·(L−1)/L,
 *                    input gradients 2·P·N minus layer 0's q/k/v (embeddings are frozen: not needed)
 *                    — P = the linear weights of the decoder layers (a 6·P·N "training = 3 forwards"
 *                    rule would overcount: no weight gradients for the frozen base)
 *   lm_head          forward + input gradient over the labelled rows only: 2·2·V·H·M
 *   attention        causal, per layer and head: QKᵀ and P·V over T(T+1)/2 pairs per row = 2 units
 *                    forward (unit = 2·B·hd·T(T+1)/2 per head), backward 5 units (S recomputed from lse,
 *                    dP = dO·Vᵀ, dQ, dK, dV), and the forward again for recomputed layers
 *   LoRA (rank r)    per adapted linear (in → out): forward 2·N·r·(in + out) (u = x·Aᵀ, u·Bᵀ), backward
 *                    2·N·r·2·(in + out) (du, dB, dA, dx), forward again when recomputed
 * Norms, RoPE, activations, dropout and the optimizer are elementwise (not counted).
 */
function trainStepFlops(hf, B, T, r, checkpointing) {
  const H = hf.hidden_size, I = hf.intermediate_size, V = hf.vocab_size, L = hf.num_hidden_layers, hd = hf.head_dim;
  const q = hf.num_attention_heads * hd, kv = hf.num_key_value_heads * hd;
  const N = B * T, M = B * (T - 1);
  const lins = [[H, q], [H, kv], [H, kv], [q, H], [H, I], [H, I], [I, H]];  // [in, out]: q k v o gate up down
  const P = lins.reduce((s, [i, o]) => s + i * o, 0);
  const qkv = lins.slice(0, 3).reduce((s, [i, o]) => s + i * o, 0);
  const rec = checkpointing ? (L - 1) / L : 0;  // recomputed fraction of the layers
  const linear = 2 * P * N * L * (1 + rec) + 2 * (P * L - qkv) * N;
  const head = 2 * 2 * V * H * M;
  const unit = 2 * B * hd * ((T * (T + 1)) / 2) * hf.num_attention_heads;
  const attention = L * unit * (2 * (1 + rec) + 5);
  const loraPerLayer = lins.reduce((s, [i, o]) => s + 2 * N * r * (i + o), 0);
  const lora = L * loraPerLayer * (1 + rec + 2);
  return { total: linear + head + attention + lora, linear, head, attention, lora };
}

function trainRows(hf) {
  const B = 8, T = 512, rank = 16;
  const cfg = engineConfig(hf), weights = randomWeights(hf);
  const m = new NativeModel(cfg, weights, { device: "cuda", maxSequences: 1, maxContext: T });
  const V = hf.vocab_size;
  const tokens = Int32Array.from({ length: B * T }, (_, i) => (i * 7919 + 17) % V);
  const labels = new Int32Array(B * T).fill(-100);
  for (let b = 0; b < B; b++) for (let t = 0; t + 1 < T; t++) labels[b * T + t] = tokens[b * T + t + 1];
  const batch = { tokens, labels, batchSize: B, seqLen: T };
  const names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
  const targets = [];
  for (let l = 0; l < hf.num_hidden_layers; l++) for (const n of names) targets.push(`layers.${l}.${n}`);
  m.initLora(0, { rank, alpha: 32, useRslora: false, dropout: 0.05, targets, seed: 1n });
  // one optimizer step = forward + backward (synchronised at the end) + AdamW; wall clock, best of 3
  // after a warm-up step (workspace allocation)
  const step = (s) => {
    const r = m.trainForwardBackward(0, batch, { dropoutSeed: BigInt(s), gradScale: 1, checkpointing: true });
    m.adamwStep(0, { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1, step: s });
    return r.loss;
  };
  const loss0 = step(1);
  let best = Infinity, loss = loss0;
  for (let s = 2; s <= 4; s++) {
    const ts = performance.now();
    loss = step(s);
    best = Math.min(best, performance.now() - ts);
  }
  const f = trainStepFlops(hf, B, T, rank, true);
  const tflops = f.total / (best / 1000) / 1e12;
  const tps = (B * T * 1000) / best;
  console.log(`train step: ${(f.total / 1e12).toFixed(2)} TFLOP (linears ${(f.linear / 1e12).toFixed(2)}, lm_head ${(f.head / 1e12).toFixed(2)}, ` +
    `attention ${(f.attention / 1e12).toFixed(2)}, LoRA ${(f.lora / 1e12).toFixed(2)}), loss ${loss0.toFixed(3)} → ${loss.toFixed(3)}`);
  row("engine LoRA train step 8x512 r=16 all-linear (1B, ckpt)", tps, "tok/s", `${best.toFixed(0)} ms/step; target >= 25000 tok/s (H100)`);
  row("engine LoRA train step (1B) real FLOP/s", tflops, "TFLOP/s", peak ? `${((tflops / peak) * 100).toFixed(1)}% of the bf16 dense peak` : "");
  m.dispose();
}

save();
if (out.errors.length) process.exitCode = 1;
