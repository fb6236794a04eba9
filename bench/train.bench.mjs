// LoRA training benchmark (run by `npm run bench`, or alone: node bench/train.bench.mjs).
//
// Random-weight checkpoints with real shapes (bench/checkpoints.mjs: OPT-125m, SmolLM2-135M, BF16 on
// disk) loaded with loadModel(quant "nf4") — decoder linears NF4, embeddings / tied lm_head BF16 as
// stored — then LoRA r = 8 (alpha 16, dropout 0.05) on every linear of every layer, one micro-batch of
// 4 × 128 random tokens (every position labelled but the last of each row), trainForwardBackward +
// adamwStep per step. Every (model, threads) pair runs in a fresh child process with QLORA_THREADS
// set, so its peak RSS (VmHWM) is its own.
// Per child, best of BENCH_STEPS steps after one warm-up step, for gradient checkpointing on and off:
//   tokens/s      B·T / (trainForwardBackward + adamwStep) wall time (and from CPU time / threads)
//   fwd           evalLoss of the same batch (forward + chunked lm_head cross-entropy, no backward)
//   GFLOP/s       the step's matrix work (below) / step time, and as a fraction of the machine's peak
//                 fp32 FMA rate: threads × MHz (/proc/cpuinfo) × 2 FMA pipes × 8 lanes (AVX2) × 2
//   RSS           VmHWM at the end of the child (load + both modes)
// Matrix work counted per step (multiply-add = 2 FLOP): every frozen linear forward (2·N·in·out), its
// input gradient (the same; none for layer 0's q/k/v whose input needs no gradient), the checkpointed
// recompute of layers 0..L-2, lm_head forward + input gradient over the labelled rows (2·2·M·V·H),
// the LoRA branches (forward 2·N·r·(in+out), backward 4·N·r·(in+out)) and attention (QKᵀ and PV
// forward; the backward recomputes the scores and computes dP, dQ, dK, dV: 2.5× the forward).
//
// Env: BENCH_MODELS (opt-125m,smollm2-135m), BENCH_THREADS ("1,2"), BENCH_STEPS (3), BENCH_B (4),
//      BENCH_T (128), BENCH_RANK (8), QLORA_BENCH_DIR (checkpoint cache, default bench/out/).
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { ensureCheckpoint, PRESETS } from "./checkpoints.mjs";

const SELF = fileURLToPath(import.meta.url);
const now = () => performance.now();

function procStatus() {
  const s = readFileSync("/proc/self/status", "utf8");
  const kb = (k) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(s)?.[1] ?? NaN) * 1024;
  return { hwm: kb("VmHWM"), rss: kb("VmRSS") };
}
function cpuMHz() {
  const m = /cpu MHz\s*:\s*([\d.]+)/.exec(readFileSync("/proc/cpuinfo", "utf8"));
  return m ? Number(m[1]) : NaN;
}

/** Matrix FLOPs of one training step (see the file comment). */
function stepFlops(cfg, B, T, r, ckpt) {
  const N = B * T, M = B * (T - 1);
  const H = cfg.hiddenSize, I = cfg.intermediateSize, q = cfg.numHeads * cfg.headDim, kv = cfg.numKvHeads * cfg.headDim;
  const llama = cfg.family !== "opt";
  const lins = [[q, H], [kv, H], [kv, H], [H, q], ...(llama ? [[I, H], [I, H], [H, I]] : [[I, H], [H, I]])];
  let fwdLayer = 0, loraLayer = 0, qkv = 0;
  lins.forEach(([o, i], k) => {
    fwdLayer += 2 * N * i * o;
    loraLayer += 2 * N * r * (i + o);
    if (k < 3) qkv += 2 * N * i * o;
  });
  const L = cfg.numLayers;
  const attnFwd = 2 * 2 * cfg.numHeads * cfg.headDim * B * ((T * (T + 1)) / 2);
  const head = 2 * 2 * M * cfg.vocabSize * H;
  const recompute = ckpt ? L - 1 : 0;
  const linears = fwdLayer * (L + recompute) + fwdLayer * L - qkv;
  const lora = loraLayer * (L + recompute) + 2 * loraLayer * L;
  const attention = attnFwd * (L + recompute) + 2.5 * attnFwd * L;
  return { linears, head, lora, attention, total: linears + head + lora + attention };
}

// =============================================================================================
// Child: one model at one thread count
// =============================================================================================
async function child(preset, threads) {
  const { loadModel } = await import("@qlora/model");
  const { cpuInfo } = await import("@qlora/kernels");
  const B = Number(process.env.BENCH_B ?? 4), T = Number(process.env.BENCH_T ?? 128), r = Number(process.env.BENCH_RANK ?? 8);
  const steps = Number(process.env.BENCH_STEPS ?? 3);
  const { dir } = await ensureCheckpoint(preset);
  const model = await loadModel(dir, { quant: "nf4", maxSequences: 1, maxContext: T });
  const cfg = model.config;
  const nm = model.native;
  const names = cfg.family === "opt"
    ? ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
    : ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
  const targets = [];
  for (let l = 0; l < cfg.numLayers; l++) for (const n of names) targets.push(`layers.${l}.${n}`);
  nm.initLora(0, { rank: r, alpha: 2 * r, useRslora: false, dropout: 0.05, targets, seed: 1n });
  const tokens = new Int32Array(B * T), labels = new Int32Array(B * T).fill(-100);
  let s = 12345;
  for (let i = 0; i < B * T; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    tokens[i] = 4 + (s % (cfg.vocabSize - 4));
  }
  for (let b = 0; b < B; b++) for (let t = 0; t + 1 < T; t++) labels[b * T + t] = tokens[b * T + t + 1];
  const batch = { tokens, labels, batchSize: B, seqLen: T };
  const adam = (step) => ({ lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1, step });
  const measure = (fn) => {
    const c0 = process.cpuUsage(), t0 = now();
    fn();
    const wall = now() - t0, c = process.cpuUsage(c0);
    return { wall, cpu: (c.user + c.system) / 1000 / threads };
  };
  const out = { preset, threads, simd: cpuInfo().simd, B, T, rank: r, modes: {} };
  let step = 0;
  for (const ckpt of [true, false]) {
    let best = null, bestFwd = null;
    for (let i = 0; i <= steps; i++) {
      const m = measure(() => {
        nm.trainForwardBackward(0, batch, { dropoutSeed: BigInt(i), gradScale: 1, checkpointing: ckpt });
        nm.adamwStep(0, adam(++step));
      });
      if (i > 0 && (!best || m.wall < best.wall)) best = m;
    }
    for (let i = 0; i < 2; i++) {
      const m = measure(() => nm.evalLoss(0, batch));
      if (!bestFwd || m.wall < bestFwd.wall) bestFwd = m;
    }
    out.modes[ckpt ? "ckpt" : "full"] = { step: best, fwd: bestFwd, flops: stepFlops(cfg, B, T, r, ckpt) };
  }
  out.hwm = procStatus().hwm;
  model.dispose();
  process.stdout.write(JSON.stringify(out) + "\n");
}

// =============================================================================================
// Parent
// =============================================================================================
async function main() {
  const models = (process.env.BENCH_MODELS ?? "opt-125m,smollm2-135m").split(",").filter((m) => PRESETS[m]);
  const threads = (process.env.BENCH_THREADS ?? "1,2").split(",").map(Number);
  const mhz = cpuMHz();
  console.log(`LoRA training step (trainForwardBackward + adamwStep), NF4 base, r=${process.env.BENCH_RANK ?? 8} on all linears, ` +
    `batch ${process.env.BENCH_B ?? 4} × ${process.env.BENCH_T ?? 128}; peak = threads × ${mhz} MHz × 32 FLOP/cycle (AVX2 FMA)`);
  console.log("| model | threads | checkpointing | tokens/s (CPU) | step s | forward s | matrix GFLOP/step | GFLOP/s | of peak | peak RSS |");
  console.log("|---|---|---|---|---|---|---|---|---|---|");
  for (const m of models) {
    await ensureCheckpoint(m);
    for (const t of threads) {
      const r = spawnSync(process.execPath, [SELF, "--child", m, String(t)], {
        env: { ...process.env, QLORA_THREADS: String(t) },
        encoding: "utf8",
        maxBuffer: 1 << 24,
      });
      if (r.status !== 0) {
        console.log(`| ${m} | ${t} | failed: ${(r.stderr || "").trim().split("\n").slice(-3).join(" ")} |`);
        continue;
      }
      const o = JSON.parse(r.stdout.trim().split("\n").pop());
      const peak = t * mhz * 1e6 * 32;
      for (const [mode, v] of Object.entries(o.modes)) {
        const tokens = o.B * o.T;
        const gf = v.flops.total / 1e9;
        console.log(`| ${m} | ${t} | ${mode === "ckpt" ? "on" : "off"} | ${(tokens / (v.step.wall / 1000)).toFixed(0)} (${(tokens / (v.step.cpu / 1000)).toFixed(0)}) ` +
          `| ${(v.step.wall / 1000).toFixed(2)} | ${(v.fwd.wall / 1000).toFixed(2)} | ${gf.toFixed(0)} | ${(gf / (v.step.wall / 1000)).toFixed(1)} ` +
          `| ${((100 * v.flops.total) / (v.step.wall / 1000) / peak).toFixed(0)}% | ${(o.hwm / 2 ** 20).toFixed(0)} MiB |`);
      }
    }
  }
}

if (process.argv[2] === "--child") await child(process.argv[3], Number(process.argv[4]));
else await main();
