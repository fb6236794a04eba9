// Model runtime benchmark (run by `npm run bench`, or alone: node bench/model.bench.mjs).
// Method, caveats and how to read the figures: docs/benchmarks-method.md.
//
// Random-weight checkpoints with real shapes (bench/checkpoints.mjs → make-random-checkpoint.mjs:
// OPT-125m, SmolLM2-135M, Llama-3.2-1B, BF16 on disk, cached in bench/out/), loaded with
// loadModel(quant "nf4"): decoder linears quantized to NF4 while loading, embeddings / tied lm_head
// kept as stored (BF16). Each model runs in a fresh child process (so its peak RSS, VmHWM from
// /proc/self/status, is its own), loaded with all the threads, then measured at 1 and 2 threads
// (setThreads):
//   load       loadModel wall time (read + quantize + bind)
//   decode b1  one sequence, greedy (native sampleToken), after a 16-token prompt: tokens/s
//   decode b8  8 sequences decoding together (one NativeModel.forward with 8 one-token rows)
//   prefill    one 512-token prompt in one forward: tokens/s; TTFT = that forward + sampling the
//              first token (ids given: tokenization excluded); then decode b1 at context 512
//   RSS        after load, and the peak over the whole child (load + everything above)
// The parent measures the copy bandwidth (streamCopy, the kernels' threaded memcpy, counted as in
// bench/nf4.bench.mjs and bench/matmul.bench.mjs: (read + write) bytes / s) at 1 and 2 threads, and
// reports the decode weight bandwidth: weight bytes read per step (NF4 linears + lm_head as stored)
// × steps/s. Then where an OPT-125m decode step goes: an op-by-op replay through the kernels
// (replayChild) and, when `perf` is installed, perf samples of the decode loop by part (perfDecode).
//
// Then the same child again with loadModel(…, { embeddings: "nf4" }) (embed_tokens / tied lm_head in
// NF4 too): its peak RSS and decode rates are a second table.
//
// Env: BENCH_MODELS (opt-125m,smollm2-135m,llama-3.2-1b), BENCH_THREADS ("1,2"), BENCH_REPEATS (3),
//      BENCH_EMBEDDINGS ("stored,nf4": which embeddings modes to run),
//      BENCH_DECODE_INT8 (1; 0 skips the OPT-125m decode run with decodeMatmul "int8"),
//      BENCH_DECODE_S (0.5: seconds per decode run), BENCH_PREFILL (512), BENCH_PROFILE (1; 0 skips
//      replay and perf), BENCH_PERF (1; 0 skips perf only), QLORA_BENCH_DIR (cache, default bench/out/),
//      BENCH_DOUBLE_QUANT (1: NF4 block scales kept double-quantized, loadModel's default; 0: fp32 absmax).
import { spawnSync } from "node:child_process";
import { readFileSync, readlinkSync, statSync } from "node:fs";
import { loadavg } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const SELF = fileURLToPath(import.meta.url);
const ADDON = fileURLToPath(new URL("../libs/kernels/build/Release/qlora_kernels.node", import.meta.url));
if (!process.argv[2]) waitForAddon();
// (dynamic imports: the addon may be missing for a while when someone rebuilds it in a shared tree)
const { expectedWeights, linearWeightNames, parseModelConfig } = await import("@qlora/formats");
const { cpuInfo, engineOps, linear, sampleToken, seedRng, setThreads, streamCopy } = await import("@qlora/kernels");
const { ensureCheckpoint, PRESETS } = await import("./checkpoints.mjs");
const GREEDY = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 };
const now = () => performance.now();

function procStatus() {
  const s = readFileSync("/proc/self/status", "utf8");
  const kb = (k) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(s)?.[1] ?? NaN) * 1024;
  return { hwm: kb("VmHWM"), rss: kb("VmRSS") };
}

function randomIds(n, vocab, seed) {
  const ids = new Int32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    ids[i] = 4 + (s % (vocab - 4));
  }
  return ids;
}

const DOUBLE_QUANT = (process.env.BENCH_DOUBLE_QUANT ?? "1") !== "0";
/** Bytes of the scales of `blocks` NF4 blocks: 8-bit codes + one fp32 per 256 blocks, or fp32 each. */
const scaleBytes = (blocks) => (DOUBLE_QUANT ? blocks + 4 * Math.ceil(blocks / 256) : 4 * blocks);

/** Weight bytes one decode step reads: every decoder linear (NF4 packed + scales) + lm_head as stored. */
function stepWeightBytes(cfg, blocksize = 64, headBytesPerElem = 2) {
  let nf4 = 0;
  const exp = expectedWeights(cfg);
  for (const name of linearWeightNames(cfg)) {
    const n = exp.get(name).shape.reduce((a, b) => a * b, 1);
    nf4 += Math.ceil(n / 2) + scaleBytes(Math.ceil(n / blocksize));
  }
  const head = cfg.vocabSize * cfg.hiddenSize * headBytesPerElem;
  return { nf4, head, total: nf4 + head };
}

// =============================================================================================
// Child: one model, loaded once, measured at every thread count
// =============================================================================================
// Every figure is taken two ways: from wall time, and from this process's CPU time / threads
// (other processes on a shared machine steal time slices: that inflates the wall time but not the
// CPU time; spin-waiting pool threads inflate the CPU time, so the CPU figure is no upper bound).
function measure(fn) {
  const c0 = process.cpuUsage();
  const t0 = now();
  const r = fn();
  const wall = now() - t0;
  const c = process.cpuUsage(c0);
  return { r, wall, cpu: (c.user + c.system) / 1000 };
}

async function benchChild(opts) {
  const { loadModel } = await import("@qlora/model");
  const { dir, threadList, decodeS, repeats, prefillLen, prefillRepeats, ctxTokens } = opts;
  const c0 = process.cpuUsage();
  const t0 = now();
  const model = await loadModel(dir, { quant: "nf4", embeddings: opts.embeddings ?? "stored", decodeMatmul: opts.decodeMatmul ?? "exact", maxSequences: 8, doubleQuant: DOUBLE_QUANT });
  const loadMs = now() - t0;
  const lc = process.cpuUsage(c0);
  const loadThreads = cpuInfo().threads;
  const afterLoad = procStatus();
  const nm = model.native;
  const V = model.vocabSize;
  const rng = seedRng(1n);
  const logits = new Float32Array(8 * V);
  let threads = loadThreads;
  // rate from a {wall, cpu} measurement of `units` of work: [wall-based, CPU-based] per second
  const rate = (m, units) => [(units * 1000) / m.wall, (units * 1000 * threads) / m.cpu];
  const bestOf = (runs) => [Math.max(...runs.map((x) => x[0])), Math.max(...runs.map((x) => x[1]))];

  // decode `nrows` sequences together after a 16-token prompt each; tokens/s of the decode steps
  const decode = (nrows, seed) => {
    const seqs = Array.from({ length: nrows }, () => nm.createSequence());
    try {
      const rows = seqs.map((seq, r) => ({ seq, tokens: randomIds(16, V, seed + r), adapter: -1 }));
      nm.forward(rows, { out: logits });
      for (let r = 0; r < nrows; r++) rows[r].tokens = Int32Array.of(sampleToken(logits, r * V, V, GREEDY, null, rng));
      const m = measure(() => {
        let steps = 0;
        const start = now();
        while (steps < 256 && (steps < 3 || now() - start < decodeS * 1000)) {
          nm.forward(rows, { out: logits });
          for (let r = 0; r < nrows; r++) rows[r].tokens[0] = sampleToken(logits, r * V, V, GREEDY, null, rng);
          steps++;
        }
        return steps;
      });
      return rate(m, m.r * nrows);
    } finally {
      for (const s of seqs) nm.dropSequence(s);
    }
  };

  const byThreads = {};
  // prefill of prefillLen ids on a fresh sequence: TTFT (forward + sampling the first token), and
  // the sequence left at context prefillLen for the caller to decode on
  const prefill = (seed, then) => {
    const seq = nm.createSequence();
    try {
      const prompt = randomIds(prefillLen, V, seed);
      let fwd = 0;
      const m = measure(() => {
        const s = now();
        nm.forward([{ seq, tokens: prompt, adapter: -1 }], { out: logits });
        fwd = now() - s;
        return sampleToken(logits, 0, V, GREEDY, null, rng);
      });
      // TTFT: wall, and CPU / threads; prefill tokens/s from the forward (wall) and the CPU time
      const r = { ttft: [m.wall, m.cpu / threads], tps: [(prefillLen * 1000) / fwd, (prefillLen * 1000 * threads) / m.cpu] };
      if (then) r.after = then(seq, m.r);
      return r;
    } finally {
      nm.dropSequence(seq);
    }
  };
  // the model's first prefillLen-token forward is cold (the [T, ·] scratch grows, KV pages are
  // first touched): with prefillRepeats > 0 it runs once untimed-for-best (reported as "cold")
  let cold = null;
  if (prefillRepeats > 0 && opts.warmup) {
    threads = setThreads(Math.max(...threadList));
    await sleep(100);
    cold = prefill(299).ttft;
  }
  for (const t of threadList) {
    threads = setThreads(t);
    await sleep(100); // let new pool workers start
    const b1 = [];
    for (let i = 0; i < repeats; i++) b1.push(decode(1, 100 + i));
    const b8 = [];
    for (let i = 0; i < repeats; i++) b8.push(decode(8, 200 + 8 * i));
    const pre = [];
    const reps = opts.prefillAt.includes(t) ? prefillRepeats : 0;
    let ctx = null;
    for (let i = 0; i < reps; i++) {
      const last = i === reps - 1;
      pre.push({
        cold: cold === null && i === 0 && Object.keys(byThreads).every((k) => !byThreads[k].prefill),
        ...prefill(300 + i, last ? (seq, id) => {
          // decode at context prefillLen (attention over the long cache)
          // (best of two halves: one short run is at the mercy of the other processes)
          const row = [{ seq, tokens: Int32Array.of(id), adapter: -1 }];
          const half = Math.max(1, ctxTokens >> 1);
          const runs = [0, 1].map(() => {
            const md = measure(() => {
              for (let k = 0; k < half; k++) {
                nm.forward(row, { out: logits });
                row[0].tokens[0] = sampleToken(logits, 0, V, GREEDY, null, rng);
              }
            });
            return rate(md, half);
          });
          ctx = bestOf(runs);
        } : null),
      });
    }
    if (!pre.length) {
      byThreads[t] = { b1: bestOf(b1), b8: bestOf(b8), b1Ctx: null, prefill: null, ttft: null, ttftCold: null };
      continue;
    }
    const warm = pre.filter((p) => !p.cold);
    const use = warm.length ? warm : pre;
    byThreads[t] = {
      b1: bestOf(b1),
      b8: bestOf(b8),
      b1Ctx: ctx,
      prefill: bestOf(use.map((p) => p.tps)),
      ttft: [Math.min(...use.map((p) => p.ttft[0])), Math.min(...use.map((p) => p.ttft[1]))],
      ttftCold: warm.length ? null : pre[0].ttft,
    };
  }
  const coldTtft = cold;
  const end = procStatus();
  const result = {
    simd: cpuInfo().simd,
    loadThreads,
    load: [loadMs, (lc.user + lc.system) / 1000],
    weightBytes: model.stats.weightBytes,
    residentBytes: model.residentBytes(),
    rssAfterLoad: afterLoad.rss,
    hwmAfterLoad: afterLoad.hwm,
    hwm: end.hwm,
    coldTtft,
    byThreads,
  };
  model.dispose();
  return result;
}

// =============================================================================================
// Replay child: an OPT-125m decode step op by op (the engine's own kernels, one N-API call each)
// =============================================================================================
// The real step (NativeModel.forward of 1 row at context 32 + greedy sampling) is timed, then the
// same step is replayed op by op through the kernels' N-API entry points on the same weights in the
// same order (the NF4 weights stream from memory as in the engine): layer norms, q/k/v/out GEMVs,
// attention over a 32-row cache, fc1 / ReLU / fc2, final norm, lm_head (BF16, tied), sampling.
// Minimum over repeats per part (the least disturbed run). The replay pays one N-API call per op
// (measured on a tiny op and subtracted); what the engine step costs beyond the replay is its own
// overhead (embedding + KV append + row packing + the forward call's N-API).
// The pool: one parallel region = a GEMV just big enough to split over the threads.
async function replayChild({ dir }) {
  const { HfCheckpoint } = await import("@qlora/formats");
  const { loadModel } = await import("@qlora/model");
  const { quantizeNf4 } = await import("@qlora/kernels");
  const model = await loadModel(dir, { quant: "nf4", maxSequences: 2, doubleQuant: DOUBLE_QUANT });
  const cfg = model.engineConfig;
  if (cfg.arch !== "opt") throw new Error("the replay follows OPT's decoder layer");
  const H = cfg.hiddenSize, I = cfg.intermediateSize, V = cfg.vocabSize, L = cfg.numLayers;
  const nh = cfg.numHeads, hd = cfg.headDim;
  // the same weights the loader hands the engine (NF4 linears, BF16 embed / lm_head, f32 vectors)
  const ck = await HfCheckpoint.open(dir);
  const w = {};
  const lin = new Set(ck.linearWeights());
  for (const [name, e] of expectedWeights(ck.config)) {
    if (name === "lm_head" || (!e.required && !ck.has(name))) continue;
    let t = await ck.readWeight(name);
    if (lin.has(name)) {
      const q = quantizeNf4(t.data, t.dtype, t.shape[0] * t.shape[1], 64);
      t = { dtype: "nf4", shape: t.shape, data: q.packed, absmax: q.absmax, blocksize: 64 };
    } else if (t.shape.length === 1) {
      if (t.dtype !== "bf16") throw new Error(`replay expects BF16 vectors, ${name} is ${t.dtype}`);
      const u = new Uint16Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 2);
      const f32 = new Float32Array(u.length);
      const bits = new Uint32Array(f32.buffer);
      for (let i = 0; i < u.length; i++) bits[i] = u[i] << 16;
      t = f32;
    }
    w[name] = t;
  }
  await ck.close();
  const CTX = 32;
  const rnd = (n, seed) => {
    const a = new Float32Array(n);
    let x = seed;
    for (let i = 0; i < n; i++) {
      x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
      a[i] = x / 2 ** 32 - 0.5;
    }
    return a;
  };
  const kc = rnd(CTX * H, 3), vc = rnd(CTX * H, 4);
  const pos = Int32Array.of(CTX - 1);
  const buf = { q: new Float32Array(H), k: new Float32Array(H), v: new Float32Array(H), x: rnd(H, 5), u: new Float32Array(I), logits: new Float32Array(V) };
  const rng = seedRng(2n);
  const lp = (l, s) => w[`layers.${l}.${s}`];
  const cats = ["GEMV NF4 q/k/v/out", "GEMV NF4 fc1/fc2", "lm_head GEMV (BF16)", "attention", "norms + ReLU", "sampling (argmax)"];
  const cpuNow = () => {
    const c = process.cpuUsage();
    return (c.user + c.system) / 1000;
  };
  // acc[part] = [wall ms, CPU ms]
  const replay = (acc) => {
    let t = now();
    let tc = cpuNow();
    const tick = (c) => {
      const e = now();
      const ec = cpuNow();
      acc[c][0] += e - t;
      acc[c][1] += ec - tc;
      t = e;
      tc = ec;
    };
    const x = buf.x;
    for (let l = 0; l < L; l++) {
      const n1 = engineOps.layerNorm(x, lp(l, "self_attn_layer_norm.weight"), lp(l, "self_attn_layer_norm.bias"), 1, H, 1e-5);
      tick(cats[4]);
      linear(n1, 1, lp(l, "self_attn.q_proj.weight"), lp(l, "self_attn.q_proj.bias"), buf.q);
      linear(n1, 1, lp(l, "self_attn.k_proj.weight"), lp(l, "self_attn.k_proj.bias"), buf.k);
      linear(n1, 1, lp(l, "self_attn.v_proj.weight"), lp(l, "self_attn.v_proj.bias"), buf.v);
      tick(cats[0]);
      const a = engineOps.attention(buf.q, kc, vc, pos, nh, nh, hd, 1);
      tick(cats[3]);
      linear(a, 1, lp(l, "self_attn.out_proj.weight"), lp(l, "self_attn.out_proj.bias"), x, true);
      tick(cats[0]);
      const n2 = engineOps.layerNorm(x, lp(l, "final_layer_norm.weight"), lp(l, "final_layer_norm.bias"), 1, H, 1e-5);
      tick(cats[4]);
      linear(n2, 1, lp(l, "fc1.weight"), lp(l, "fc1.bias"), buf.u);
      tick(cats[1]);
      const r = engineOps.activation("relu", buf.u);
      tick(cats[4]);
      linear(r, 1, lp(l, "fc2.weight"), lp(l, "fc2.bias"), x, true);
      tick(cats[1]);
      engineOps.layerNorm(x, null, null, 1, H, 1e-5).forEach((v, i) => (x[i] = v)); // keep x bounded (not timed as a part)
      t = now();
      tc = cpuNow();
    }
    const xf = engineOps.layerNorm(x, w["norm.weight"], w["norm.bias"], 1, H, 1e-5);
    tick(cats[4]);
    linear(xf, 1, w["embed_tokens"], undefined, buf.logits);
    tick(cats[2]);
    sampleToken(buf.logits, 0, V, GREEDY, null, rng);
    tick(cats[5]);
  };
  const nativeCalls = L * 10 + 3;
  const minTime = (fn, n) => {
    for (let i = 0; i < Math.min(n, 500); i++) fn();
    let b = Infinity;
    for (let r = 0; r < 5; r++) {
      const s = now();
      for (let i = 0; i < n; i++) fn();
      b = Math.min(b, (now() - s) / n);
    }
    return b;
  };
  // N-API + TS-wrapper cost of one small kernel call (f32 8x8 linear, on the calling thread)
  const tinyW = { dtype: "f32", shape: [8, 8], data: new Uint8Array(256) };
  const tx = new Float32Array(8), ty = new Float32Array(8);
  const napiUs = minTime(() => linear(tx, 1, tinyW, undefined, ty), 20000) * 1000;

  const res = { cats, threads: {}, napiUs, nativeCalls, ctx: CTX };
  for (const threads of [1, 2]) {
    setThreads(threads);
    await sleep(100);
    const K = 768, N = 2 * Math.ceil(16384 / K);
    const rw = { dtype: "f32", shape: [N, K], data: new Uint8Array(4 * N * K) };
    const rx = new Float32Array(K), ry = new Float32Array(N);
    const regionUs = minTime(() => linear(rx, 1, rw, undefined, ry), 3000) * 1000;
    // the real decode step, context 32 (truncated back every few steps)
    const seq = model.native.createSequence();
    const row = [{ seq, tokens: randomIds(CTX - 1, V, 1), adapter: -1 }];
    const lg = new Float32Array(V);
    model.native.forward(row, { out: lg });
    row[0].tokens = Int32Array.of(1);
    const steps = [];
    for (let i = 0; i < 40; i++) {
      model.native.truncateSequence(seq, CTX - 1);
      const m = measure(() => {
        model.native.forward(row, { out: lg });
        row[0].tokens[0] = sampleToken(lg, 0, V, GREEDY, null, rng);
      });
      steps.push([m.wall, m.cpu / threads]);
    }
    model.native.dropSequence(seq);
    const per = Object.fromEntries(cats.map((c) => [c, [Infinity, Infinity]]));
    for (let i = 0; i < 18; i++) {
      const acc = Object.fromEntries(cats.map((c) => [c, [0, 0]]));
      replay(acc);
      if (i >= 3) for (const c of cats) for (const k of [0, 1]) per[c][k] = Math.min(per[c][k], k ? acc[c][1] / threads : acc[c][0]);
    }
    const col = (k) => steps.map((x) => x[k]).sort((a, b) => a - b);
    res.threads[threads] = { step: [col(0)[0], col(1)[0]], stepMed: [col(0)[20], col(1)[20]], per, regionUs };
  }
  model.dispose();
  return res;
}

// A plain decode loop (batch `rows`, context kept in [16, 48)) for `seconds` after a "READY" line:
// the process perf attaches to, so loading is not in the profile.
async function decodeLoopChild({ dir, seconds, rows: nrows }) {
  const { loadModel } = await import("@qlora/model");
  const model = await loadModel(dir, { quant: "nf4", maxSequences: 8, doubleQuant: DOUBLE_QUANT });
  const nm = model.native;
  const V = model.vocabSize;
  const rng = seedRng(3n);
  const logits = new Float32Array(nrows * V);
  const rows = Array.from({ length: nrows }, (_, r) => ({ seq: nm.createSequence(), tokens: randomIds(16, V, 50 + r), adapter: -1 }));
  nm.forward(rows, { out: logits });
  for (const r of rows) r.tokens = Int32Array.of(1);
  const step = () => {
    if (nm.sequenceLength(rows[0].seq) >= 48) for (const r of rows) nm.truncateSequence(r.seq, 16);
    nm.forward(rows, { out: logits });
    for (let r = 0; r < nrows; r++) rows[r].tokens[0] = sampleToken(logits, r * V, V, GREEDY, null, rng);
  };
  for (let i = 0; i < 3; i++) step();
  console.log("READY");
  let steps = 0;
  const m = measure(() => {
    const s0 = now();
    while (now() - s0 < seconds * 1000) {
      step();
      steps++;
    }
  });
  return { steps, tps: (steps * nrows * 1000) / m.wall, tpsCpu: (steps * nrows * 1000 * cpuInfo().threads) / m.cpu };
}

// =============================================================================================
// Parent
// =============================================================================================

/** On a shared tree someone may be rebuilding the addon (npm install runs node-gyp rebuild): wait. */
function waitForAddon() {
  const kernelsDir = fileURLToPath(new URL("../libs/kernels", import.meta.url));
  for (let i = 0; i < 60; i++) {
    // a node-gyp running in libs/kernels (not one in some other tree or container build)
    const pids = (spawnSync("pgrep", ["-f", "node-gyp"], { encoding: "utf8" }).stdout ?? "").split("\n").filter(Boolean);
    const building = pids.some((pid) => {
      try {
        return readlinkSync(`/proc/${pid}/cwd`).startsWith(kernelsDir);
      } catch {
        return false;
      }
    });
    let ok = false;
    try {
      ok = statSync(ADDON).isFile();
    } catch {}
    if (ok && !building) return;
    if (i === 0) console.error("model.bench: waiting for the native addon (a rebuild is running)…");
    spawnSync("sleep", ["5"]);
  }
}

function runChild(mode, args, threads, retry = true) {
  waitForAddon();
  // The young generation capped like the inference service's engine worker
  // (services/inference/src/engine-client.ts ENGINE_WORKER_YOUNG_GENERATION_MB = 3 × 2 MiB semi-spaces).
  const r = spawnSync(process.execPath, ["--max-semi-space-size=2", SELF, mode, JSON.stringify(args)], {
    env: { ...process.env, QLORA_THREADS: String(threads) },
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    maxBuffer: 1 << 24,
  });
  const line = (r.stdout ?? "").split("\n").find((l) => l.startsWith("RESULT "));
  if (r.status !== 0 || !line) {
    if (retry) {
      console.error(`model.bench: ${mode} ${args.preset ?? ""} failed (exit ${r.status}); retrying once`);
      return runChild(mode, args, threads, false);
    }
    process.stdout.write(r.stdout ?? "");
    throw new Error(`${mode} ${args.preset ?? ""} threads ${threads} failed (exit ${r.status}, signal ${r.signal})`);
  }
  return JSON.parse(line.slice(7));
}

// perf symbol → part of the decode step
const PERF_PARTS = [
  ["GEMV NF4 (+ row loop)", /rowDotNf4|forwardSmallM|permuteXNf4/],
  ["GEMV BF16 (lm_head)", /rowDotDense\w*<\d+, \(qk::FloatType\)2>/],
  ["attention", /attention|dotAvx2|axpyAvx2|expShiftSum|maxOf|qk::dot\b|qk::axpy/],
  ["norms / act / embed", /[Nn]orm|activation|relu|silu|gelu|rope|embedding|tableRow|qk::scale|scaleAvx2|bf16ToFloat/],
  ["sampling", /sampl|argmax/i],
  ["pool: spin / yield / sleep", /parallelFor|ThreadPool|sched_yield|finish_task_switch|__schedule|\bschedule\b|futex|pick_next|update_curr|switch_to|__sched_yield/],
  ["N-API / V8 / JS", /Napi|v8::|Builtins_|node::|uv_|\[JIT\]|0x0000|^0x|LazyCompile|Interpreter/],
];

/** perf record (attached after load) a decode loop; returns shares of the CPU samples by part. */
async function perfDecode(dir, threads, nrows, seconds) {
  waitForAddon();
  const { spawn } = await import("node:child_process");
  const { mkdirSync } = await import("node:fs");
  const { benchCacheDir } = await import("./checkpoints.mjs");
  const outDir = join(benchCacheDir(), "perf");
  mkdirSync(outDir, { recursive: true });
  const data = join(outDir, `opt-125m-b${nrows}-t${threads}.data`);
  const child = spawn(process.execPath, [SELF, "--decode-loop", JSON.stringify({ dir, seconds: seconds + 1.5, rows: nrows })], {
    env: { ...process.env, QLORA_THREADS: String(threads) },
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  await new Promise((resolve, reject) => {
    child.stdout.on("data", (d) => {
      out += d;
      if (out.includes("READY")) resolve();
    });
    child.on("exit", () => reject(new Error("decode loop ended before READY")));
  });
  const rec = spawnSync("perf", ["record", "-q", "-F", "1999", "-g", "-o", data, "-p", String(child.pid), "--", "sleep", String(seconds)], { encoding: "utf8" });
  const done = new Promise((resolve) => child.on("close", resolve));
  await done;
  if (rec.status !== 0) return null;
  const line = out.split("\n").find((l) => l.startsWith("RESULT "));
  const rep = spawnSync("perf", ["report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none"], { encoding: "utf8", maxBuffer: 1 << 26 });
  const parts = Object.fromEntries([...PERF_PARTS.map(([n]) => [n, 0]), ["other kernel", 0], ["other", 0]]);
  const top = [];
  for (const l of rep.stdout.split("\n")) {
    const m = /^\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$/.exec(l);
    if (!m) continue;
    const pct = Number(m[1]);
    const sym = m[4].trim();
    const hit = PERF_PARTS.find(([, re]) => re.test(sym));
    const js = m[2] === "node" || m[2].startsWith("[JIT]") || m[2].startsWith("perf-");
    const part = hit ? hit[0] : js ? "N-API / V8 / JS" : m[3] === "k" ? "other kernel" : "other";
    parts[part] += pct;
    if (top.length < 8) top.push(`${pct.toFixed(1)}% ${sym.replace(/\(anonymous namespace\)::/g, "").slice(0, 70)}`);
  }
  return { parts, top, result: line ? JSON.parse(line.slice(7)) : null, data };
}

function copyBandwidth(threads) {
  setThreads(threads);
  const n = 128 << 20;
  const src = new Uint8Array(n).fill(1);
  const dst = new Uint8Array(n);
  streamCopy(src, dst);
  let wall = Infinity, cpu = Infinity;
  for (let i = 0; i < 5; i++) {
    const m = measure(() => streamCopy(src, dst));
    wall = Math.min(wall, m.wall);
    cpu = Math.min(cpu, m.cpu / threads);
  }
  return [(2 * n) / wall / 1e6, (2 * n) / cpu / 1e6]; // GB/s (ms → s: / 1e6 for bytes → GB)
}

const f = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? "n/a" : x.toFixed(d));
const pair = (p, d = 1) => (p ? `${f(p[0], d)} (${f(p[1], d)})` : "n/a");
const mb = (b) => (b / 2 ** 20).toFixed(0);
/** Fraction of a file in the page cache (fincore), or null: the load time depends on it. */
function fileCached(path) {
  const r = spawnSync("fincore", ["--bytes", "--noheadings", "--output", "RES,SIZE", path], { encoding: "utf8" });
  const m = /(\d+)\s+(\d+)/.exec(r.stdout ?? "");
  return r.status === 0 && m ? Number(m[1]) / Number(m[2]) : null;
}
const hasPerf = () => spawnSync("perf", ["--version"], { encoding: "utf8" }).status === 0;

async function main() {
  const models = (process.env.BENCH_MODELS ?? "opt-125m,smollm2-135m,llama-3.2-1b").split(",").filter(Boolean);
  const threadList = (process.env.BENCH_THREADS ?? "1,2").split(",").map(Number);
  const repeats = Number(process.env.BENCH_REPEATS ?? 3);
  const decodeS = Number(process.env.BENCH_DECODE_S ?? 0.5);
  const prefillLen = Number(process.env.BENCH_PREFILL ?? 512);
  const profile = (process.env.BENCH_PROFILE ?? "1") !== "0";
  const t0 = now();
  const load0 = loadavg();

  const ck = {};
  for (const p of models) {
    ck[p] = await ensureCheckpoint(p);
    if (ck[p].generatedMs) console.log(`generated ${p} (${(ck[p].bytes / 1e9).toFixed(2)} GB BF16) in ${(ck[p].generatedMs / 1000).toFixed(1)} s → ${ck[p].dir}`);
  }
  const copy = {};
  for (const t of threadList) copy[t] = copyBandwidth(t);
  setThreads(0);

  const embeddingModes = (process.env.BENCH_EMBEDDINGS ?? "stored,nf4").split(",").filter(Boolean);
  const results = [];
  const perModel = {};
  const nf4Emb = {}; // preset → the child's result with embeddings "nf4"
  const int8Decode = {}; // preset → the child's result with decodeMatmul "int8"
  for (const p of models) {
    const big = PRESETS[p].hidden_size >= 2048;
    // the 1B model: one decode repeat (>= 3 steps) and one (cold for the first thread count) prefill
    const args = {
      preset: p,
      dir: ck[p].dir,
      threadList,
      decodeS: big ? 0.5 : decodeS,
      repeats: big ? 1 : repeats,
      prefillLen,
      prefillRepeats: 1,
      // the 1B model's prefill takes ~10-50 s per run here: by default only at the most threads
      prefillAt: big && process.env.BENCH_FULL !== "1" ? [Math.max(...threadList)] : threadList,
      warmup: !big,
      ctxTokens: big ? 4 : 16,
    };
    const cached = fileCached(join(ck[p].dir, "model.safetensors"));
    const load = Math.max(...threadList);
    if (embeddingModes.includes("nf4")) nf4Emb[p] = { ...runChild("--child", { ...args, embeddings: "nf4" }, load), bytes: stepWeightBytes(parseModelConfig(PRESETS[p]), 64, 0.5 + scaleBytes(1024) / 1024 / 64) };
    if (!embeddingModes.includes("stored")) continue;
    const r = runChild("--child", args, load);
    perModel[p] = { ...r, cached, bytes: stepWeightBytes(parseModelConfig(PRESETS[p])) };
    // decodeMatmul "int8" (int8-activation NF4 decode matmul, docs/engine.md): OPT-125m decode only
    if (p === "opt-125m" && process.env.BENCH_DECODE_INT8 !== "0") {
      int8Decode[p] = runChild("--child", { ...args, decodeMatmul: "int8", prefillAt: [] }, load);
      // both opt-ins together: int8 decode matmul over NF4 linears and an NF4 lm_head
      if (embeddingModes.includes("nf4")) int8Decode[p].nf4Emb = runChild("--child", { ...args, decodeMatmul: "int8", embeddings: "nf4", prefillAt: [] }, load);
    }
    for (const t of threadList) results.push({ preset: p, t, ...perModel[p], ...r.byThreads[t] });
  }
  const load1 = loadavg();

  console.log(`simd ${results[0]?.simd ?? "?"}; NF4 blocksize 64 (quantized on load), block scales ${DOUBLE_QUANT ? "double-quantized (8-bit + fp32 per 256 blocks)" : "fp32 (BENCH_DOUBLE_QUANT=0)"}, embeddings / tied lm_head BF16 as stored; one child process per model`);
  console.log(`decode: after a 16-token prompt, greedy, best of ${repeats} runs of >= ${decodeS} s; prefill: ${prefillLen} random ids in one forward, TTFT = that forward + sampling (no tokenization)`);
  console.log(`Llama-3.2-1B: one decode run (>= 3 steps) and one prefill per thread count; its first prefill is cold (scratch growth, first-touch KV pages)`);
  console.log(`figures from wall time; in parentheses from CPU time / threads (other processes steal time slices on this shared machine; see docs/benchmarks-method.md)`);
  console.log(`copy bandwidth (streamCopy 128 MiB, read+write): ${threadList.map((t) => `${t} thr ${pair(copy[t])} GB/s`).join(", ")}`);
  try {
    const root = fileURLToPath(new URL("..", import.meta.url));
    const head = spawnSync("git", ["-C", root, "rev-parse", "--short", "HEAD"], { encoding: "utf8" }).stdout.trim();
    const dirty = spawnSync("git", ["-C", root, "status", "--porcelain", "--", "libs/kernels/csrc", "libs/model/src"], { encoding: "utf8" }).stdout.trim() !== "";
    const addon = statSync(join(root, "libs/kernels/build/Release/qlora_kernels.node")).mtime.toISOString();
    console.log(`code: ${head}${dirty ? " + uncommitted kernel/model changes" : ""}; addon built ${addon}`);
  } catch {}
  console.log(`load average (1/5/15 min): before ${load0.map((x) => x.toFixed(2)).join(" ")}, after ${load1.map((x) => x.toFixed(2)).join(" ")}`);
  console.log("");
  console.log("| model | weights handed to the engine MB (NF4 linears + BF16 rest) | load s: wall (CPU), threads, file in page cache | RSS after load MiB | peak RSS MiB | engine residentBytes() at the end MiB | cold TTFT ms (first prefill, all threads) |");
  console.log("|---|---|---|---|---|---|---|");
  for (const p of models) {
    const r = perModel[p];
    if (!r) continue;
    console.log(`| ${p} | ${(r.weightBytes / 1e6).toFixed(0)} (${(r.bytes.nf4 / 1e6).toFixed(0)} + ${((r.weightBytes - r.bytes.nf4) / 1e6).toFixed(0)}) | ${pair([r.load[0] / 1000, r.load[1] / 1000], 2)}, ${r.loadThreads} thr, ${r.cached === null ? "?" : f(r.cached * 100, 0) + "%"} | ${mb(r.rssAfterLoad)} | ${mb(r.hwm)} | ${mb(r.residentBytes)} | ${r.coldTtft ? pair(r.coldTtft, 0) : "see below"} |`);
  }
  console.log("");
  console.log(`| model | threads | decode b1 tok/s | decode b1 @${prefillLen} ctx | decode b8 tok/s | prefill ${prefillLen} tok/s | TTFT ${prefillLen} ms |`);
  console.log("|---|---|---|---|---|---|---|");
  for (const r of results) {
    const ttft = !r.ttft ? "not run (BENCH_FULL=1)" : r.ttftCold ? `${pair(r.ttftCold, 0)} cold` : pair(r.ttft, 0);
    console.log(`| ${r.preset} | ${r.t} | ${pair(r.b1)} | ${pair(r.b1Ctx)} | ${pair(r.b8)} | ${pair(r.prefill)} | ${ttft} |`);
  }
  for (const [p, r] of Object.entries(int8Decode)) {
    console.log("");
    console.log(`${p} decode tok/s, decodeMatmul "exact" → "int8" (int8 activations; same checkpoint, embeddings as stored; last columns: int8 + embeddings nf4)`);
    console.log("");
    console.log("| threads | b1 exact | b1 int8 | b8 exact | b8 int8 | b1 int8 + nf4 emb | b8 int8 + nf4 emb |");
    console.log("|---|---|---|---|---|---|---|");
    for (const t of threadList) {
      const e = perModel[p].byThreads[t];
      const both = r.nf4Emb?.byThreads[t];
      console.log(`| ${t} | ${pair(e.b1)} | ${pair(r.byThreads[t].b1)} | ${pair(e.b8)} | ${pair(r.byThreads[t].b8)} | ${both ? pair(both.b1) : "—"} | ${both ? pair(both.b8) : "—"} |`);
    }
  }
  console.log("");
  console.log("Targets (issue 3, this 2-core machine):");
  for (const r of results.filter((x) => x.preset === "opt-125m")) {
    const best = Math.max(r.b1[0], r.b1[1]);
    console.log(`- decode OPT-125m batch 1 >= 140 tok/s (PyTorch fp32 ~28): ${pair(r.b1)} at ${r.t} thread(s) → ${r.b1[0] >= 140 ? "MET" : best >= 140 ? "MET on CPU time only" : "NOT MET"} (${f(r.b1[0] / 28)}x PyTorch by wall time)`);
  }
  for (const [what, r] of [["decodeMatmul int8", int8Decode["opt-125m"]], ["decodeMatmul int8 + embeddings nf4", int8Decode["opt-125m"]?.nf4Emb]]) {
    if (!r) continue;
    for (const t of threadList) {
      const b1 = r.byThreads[t].b1;
      console.log(`- decode OPT-125m batch 1 >= 140 tok/s, ${what}: ${pair(b1)} at ${t} thread(s) → ${b1[0] >= 140 ? "MET" : Math.max(...b1) >= 140 ? "MET on CPU time only" : "NOT MET"}`);
    }
  }
  for (const [what, r] of [["", perModel["llama-3.2-1b"]], [", embeddings nf4", nf4Emb["llama-3.2-1b"]]]) {
    if (!r) continue;
    const h = r.hwm;
    console.log(`- peak RSS Llama-3.2-1B${what} < 1.2 GB: ${mb(h)} MiB = ${(h / 1e9).toFixed(3)} GB → ${h < 1.2e9 ? "MET" : h < 1.2 * 2 ** 30 ? "MET only as GiB (1.2 GiB = 1229 MiB)" : "NOT MET"}`);
  }
  if (Object.keys(nf4Emb).length) {
    console.log("");
    console.log(`embeddings "nf4" (embed_tokens / lm_head NF4 blocksize 64, quantized on load; same runs as above)`);
    console.log("");
    console.log(`| model | weights MB (lm_head MB/step) | RSS after load MiB | peak RSS MiB | residentBytes() MiB | ${threadList.map((t) => `decode b1 tok/s ${t} thr`).join(" | ")} | ${threadList.map((t) => `decode b8 tok/s ${t} thr`).join(" | ")} |`);
    console.log(`|---|---|---|---|---|${threadList.map(() => "---").join("|")}|${threadList.map(() => "---").join("|")}|`);
    for (const [p, r] of Object.entries(nf4Emb)) {
      console.log(`| ${p} | ${(r.weightBytes / 1e6).toFixed(0)} (${(r.bytes.head / 1e6).toFixed(1)}) | ${mb(r.rssAfterLoad)} | ${mb(r.hwm)} | ${mb(r.residentBytes)} | ${threadList.map((t) => pair(r.byThreads[t].b1)).join(" | ")} | ${threadList.map((t) => pair(r.byThreads[t].b8)).join(" | ")} |`);
    }
  }
  console.log("");
  console.log("Decode weight bandwidth: weight bytes read per step (NF4 linears incl. absmax + lm_head BF16) × steps/s, against the copy bandwidth");
  console.log("");
  console.log("| model | threads | NF4 MB/step | lm_head MB/step | b1 GB/s | b1 vs copy | b8 GB/s (per step) | b8 vs copy |");
  console.log("|---|---|---|---|---|---|---|---|");
  for (const r of results) {
    const bw = (tps, rows) => [0, 1].map((i) => (r.bytes.total * (tps[i] / rows)) / 1e9);
    const b1 = bw(r.b1, 1), b8 = bw(r.b8, 8);
    const vs = (g) => [0, 1].map((i) => (g[i] / copy[r.t][i]) * 100);
    const pct = (p) => `${f(p[0], 0)}% (${f(p[1], 0)}%)`;
    console.log(`| ${r.preset} | ${r.t} | ${(r.bytes.nf4 / 1e6).toFixed(1)} | ${(r.bytes.head / 1e6).toFixed(1)} | ${pair(b1)} | ${pct(vs(b1))} | ${pair(b8)} | ${pct(vs(b8))} |`);
  }

  if (profile && ck["opt-125m"]) {
    const pr = runChild("--replay", { dir: ck["opt-125m"].dir }, 2);
    console.log("");
    console.log(`OPT-125m decode step, op by op (context ${pr.ctx}; per part the minimum over 15 replays, CPU time / threads, wall in parentheses;`);
    console.log(`one N-API call = ${pr.napiUs.toFixed(2)} µs wall, × ${pr.nativeCalls} calls in a replay)`);
    console.log("");
    const ts = Object.keys(pr.threads);
    const ms = (p) => `${p[1].toFixed(2)} (${p[0].toFixed(2)})`;
    console.log(`| part | ${ts.map((t) => `${t} thr: ms | share`).join(" | ")} |`);
    console.log(`|---|${ts.map(() => "---|---").join("|")}|`);
    const share = (t, v) => `${((v / pr.threads[t].step[1]) * 100).toFixed(0)}%`;
    for (const c of pr.cats) console.log(`| ${c} | ${ts.map((t) => `${ms(pr.threads[t].per[c])} | ${share(t, pr.threads[t].per[c][1])}`).join(" | ")} |`);
    const napi = (pr.napiUs * pr.nativeCalls) / 1000;
    const sum = (t, k) => pr.cats.reduce((a, c) => a + pr.threads[t].per[c][k], 0) - napi;
    console.log(`| replay total − N-API calls | ${ts.map((t) => `${ms([sum(t, 0), sum(t, 1)])} | ${share(t, sum(t, 1))}`).join(" | ")} |`);
    console.log(`| engine step (forward + sampling), min | ${ts.map((t) => `${ms(pr.threads[t].step)} | 100%`).join(" | ")} |`);
    console.log(`| engine step, median | ${ts.map((t) => `${ms(pr.threads[t].stepMed)} | `).join(" | ")} |`);
    console.log(`| one parallel region (tiny split GEMV), µs wall | ${ts.map((t) => `${pr.threads[t].regionUs.toFixed(1)} | `).join(" | ")} |`);

    if ((process.env.BENCH_PERF ?? "1") !== "0" && hasPerf()) {
      const runs = [];
      for (const [t, rows] of [[1, 1], [2, 1], [2, 8]]) {
        const r = await perfDecode(ck["opt-125m"].dir, t, rows, 2);
        if (r) runs.push({ t, rows, ...r });
      }
      if (runs.length) {
        console.log("");
        console.log("OPT-125m decode, perf (cpu-clock samples of the decode loop only, all threads; perf record -g attached after load)");
        console.log("");
        console.log(`| part | ${runs.map((r) => `b${r.rows} ${r.t} thr`).join(" | ")} |`);
        console.log(`|---|${runs.map(() => "---").join("|")}|`);
        for (const part of Object.keys(runs[0].parts)) console.log(`| ${part} | ${runs.map((r) => `${r.parts[part].toFixed(1)}%`).join(" | ")} |`);
        console.log(`| tok/s during the profile (CPU-time based) | ${runs.map((r) => pair([r.result?.tps, r.result?.tpsCpu])).join(" | ")} |`);
        for (const r of runs) console.log(`top symbols b${r.rows} ${r.t} thr: ${r.top.slice(0, 5).join("; ")}`);
      }
    }
  }
  console.log("");
  console.log(`model.bench: ${((now() - t0) / 1000).toFixed(0)} s`);
}

const mode = process.argv[2];
if (mode === "--child") {
  console.log("RESULT " + JSON.stringify(await benchChild(JSON.parse(process.argv[3]))));
} else if (mode === "--replay") {
  console.log("RESULT " + JSON.stringify(await replayChild(JSON.parse(process.argv[3]))));
} else if (mode === "--decode-loop") {
  console.log("RESULT " + JSON.stringify(await decodeLoopChild(JSON.parse(process.argv[3]))));
} else {
  await main();
}
