// Model runtime benchmark (run by `npm run bench`, or alone: node bench/model.bench.mjs).
// Method and caveats: docs/benchmarks-method.md.
//
// Random-weight checkpoints with real shapes (bench/checkpoints.mjs → make-random-checkpoint.mjs:
// OPT-125m, SmolLM2-135M, Llama-3.2-1B, BF16 on disk), loaded with loadModel(quant "nf4"):
// decoder linears quantized to NF4 while loading, embeddings / tied lm_head kept as stored (BF16).
// Every (model, threads) pair runs in a fresh child process with QLORA_THREADS set, so the load
// itself runs at that thread count and the peak RSS (/proc/self/status VmHWM) is that model's alone.
// Per child:
//   load       loadModel wall time (read + quantize + bind)
//   decode b1  one sequence, greedy (native sampleToken), after a 16-token prompt: tokens/s
//   decode b8  8 sequences decoding together (one NativeModel.forward with 8 one-token rows)
//   prefill    one 512-token prompt in one forward: tokens/s; TTFT = that forward + sampling the
//              first token (ids given: tokenization excluded); then decode b1 at context 512
//   RSS        VmHWM at the end (load + every run above), and VmRSS after load
// The parent measures the copy bandwidth (streamCopy, the kernels' threaded memcpy, as in
// bench/nf4.bench.mjs and bench/matmul.bench.mjs: (read + write) bytes / s) at 1 and 2 threads,
// and reports the decode weight bandwidth: weight bytes read per step (NF4 linears + lm_head as
// stored) × steps/s. Then a decode-step breakdown of OPT-125m (op by op, see profileChild).
//
// Env: BENCH_MODELS (opt-125m,smollm2-135m,llama-3.2-1b), BENCH_THREADS ("1,2"),
//      BENCH_REPEATS (3: best of, small models; the 1B model runs 2 decode / 1 prefill repeats),
//      BENCH_DECODE_S (1.0: seconds per decode repeat), BENCH_PREFILL (512), BENCH_PROFILE (1; 0: skip
//      the breakdown), QLORA_BENCH_DIR (checkpoint cache, default bench/out/).
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { loadavg } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { expectedWeights, linearWeightNames, parseModelConfig } from "@qlora/formats";
import { cpuInfo, engineOps, linear, sampleToken, seedRng, setThreads, streamCopy } from "@qlora/kernels";
import { ensureCheckpoint, PRESETS } from "./checkpoints.mjs";

const SELF = fileURLToPath(import.meta.url);
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

/** Weight bytes one decode step reads: every decoder linear (NF4 packed + absmax) + lm_head as stored. */
function stepWeightBytes(cfg, blocksize = 64, headBytesPerElem = 2) {
  let nf4 = 0;
  const exp = expectedWeights(cfg);
  for (const name of linearWeightNames(cfg)) {
    const n = exp.get(name).shape.reduce((a, b) => a * b, 1);
    nf4 += Math.ceil(n / 2) + 4 * Math.ceil(n / blocksize);
  }
  const head = cfg.vocabSize * cfg.hiddenSize * headBytesPerElem;
  return { nf4, head, total: nf4 + head };
}

// =============================================================================================
// Child: one model at one thread count
// =============================================================================================
async function benchChild(opts) {
  const { loadModel } = await import("@qlora/model");
  const { dir, decodeS, repeats, prefillLen, prefillRepeats } = opts;
  const t0 = now();
  const model = await loadModel(dir, { quant: "nf4", maxSequences: 8 });
  const loadMs = now() - t0;
  const afterLoad = procStatus();
  const nm = model.native;
  const V = model.vocabSize;
  const rng = seedRng(1n);
  const logits = new Float32Array(8 * V);

  // decode `rows` sequences together after a 16-token prompt each; tokens/s of the decode steps
  const decode = (nrows, seed) => {
    const seqs = Array.from({ length: nrows }, () => nm.createSequence());
    try {
      const rows = seqs.map((seq, r) => ({ seq, tokens: randomIds(16, V, seed + r), adapter: -1 }));
      nm.forward(rows, { out: logits });
      for (let r = 0; r < nrows; r++) rows[r].tokens = Int32Array.of(sampleToken(logits, r * V, V, GREEDY, null, rng));
      let steps = 0;
      const start = now();
      let el = 0;
      while (steps < 256 && (steps < 4 || el < decodeS * 1000)) {
        nm.forward(rows, { out: logits });
        for (let r = 0; r < nrows; r++) rows[r].tokens[0] = sampleToken(logits, r * V, V, GREEDY, null, rng);
        steps++;
        el = now() - start;
      }
      return { tps: (steps * nrows * 1000) / el, steps };
    } finally {
      for (const s of seqs) nm.dropSequence(s);
    }
  };
  const best = (xs, key) => xs.reduce((a, b) => (b[key] > a[key] ? b : a));

  decode(1, 7); // warm-up: scratch buffers, KV pages, caches
  const b1 = [];
  for (let i = 0; i < repeats; i++) b1.push(decode(1, 100 + i));
  decode(8, 9);
  const b8 = [];
  for (let i = 0; i < repeats; i++) b8.push(decode(8, 200 + 8 * i));

  // prefill + TTFT (first run is cold: the [512, ·] scratch grows, KV pages are first touched)
  const pre = [];
  let ctxDecode = null;
  for (let i = 0; i < prefillRepeats + 1; i++) {
    const seq = nm.createSequence();
    try {
      const prompt = randomIds(prefillLen, V, 300 + i);
      const ts = now();
      nm.forward([{ seq, tokens: prompt, adapter: -1 }], { out: logits });
      const tf = now();
      const id = sampleToken(logits, 0, V, GREEDY, null, rng);
      const te = now();
      pre.push({ cold: i === 0, prefillMs: tf - ts, ttftMs: te - ts, tps: (prefillLen * 1000) / (tf - ts) });
      if (i === prefillRepeats) {
        // decode at context prefillLen (attention over the long cache)
        const row = [{ seq, tokens: Int32Array.of(id), adapter: -1 }];
        const n = Math.max(4, Math.min(32, b1[0].steps));
        const s0 = now();
        for (let k = 0; k < n; k++) {
          nm.forward(row, { out: logits });
          row[0].tokens[0] = sampleToken(logits, 0, V, GREEDY, null, rng);
        }
        ctxDecode = (n * 1000) / (now() - s0);
      }
    } finally {
      nm.dropSequence(seq);
    }
  }
  const warm = pre.filter((p) => !p.cold);
  const bestPre = warm.length ? best(warm, "tps") : pre[0];
  const end = procStatus();
  const result = {
    threads: cpuInfo().threads,
    simd: cpuInfo().simd,
    loadMs,
    weightBytes: model.stats.weightBytes,
    residentBytes: model.residentBytes(),
    rssAfterLoad: afterLoad.rss,
    hwmAfterLoad: afterLoad.hwm,
    hwm: end.hwm,
    b1: best(b1, "tps").tps,
    b1All: b1.map((x) => x.tps),
    b8: best(b8, "tps").tps,
    b8All: b8.map((x) => x.tps),
    b1Ctx: ctxDecode,
    prefillTps: bestPre.tps,
    ttftMs: Math.min(...(warm.length ? warm : pre).map((p) => p.ttftMs)),
    ttftColdMs: pre[0].ttftMs,
  };
  model.dispose();
  return result;
}

// =============================================================================================
// Profile child: where an OPT-125m decode step goes (op by op, the engine's own kernels)
// =============================================================================================
// The real step (NativeModel.forward, 1 row, context ~32) is timed, then the same step is replayed
// op by op through the kernels' N-API entry points on the same weights in the same order (so the
// NF4 weights stream from memory as in the engine): layer norms, q/k/v/out GEMVs, attention over a
// 32-row cache, fc1 / ReLU / fc2, final norm, lm_head (BF16, tied), greedy sampling. The replay pays
// one N-API call per op (measured separately on a tiny op and subtracted); the difference between
// the real step and the replay is the engine's own overhead (KV append, row packing, N-API forward).
// Pool waits: the same GEMVs at 1 vs 2 threads, and the cost of one parallel region.
async function profileChild({ dir }) {
  const { HfCheckpoint } = await import("@qlora/formats");
  const { loadModel } = await import("@qlora/model");
  const { quantizeNf4 } = await import("@qlora/kernels");
  const model = await loadModel(dir, { quant: "nf4", maxSequences: 2 });
  const cfg = model.engineConfig;
  const H = cfg.hiddenSize, I = cfg.intermediateSize, V = cfg.vocabSize, L = cfg.numLayers;
  const nh = cfg.numHeads, hd = cfg.headDim;
  // the same weights the loader hands the engine (NF4 linears, BF16 embed / lm_head)
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
      const u = new Uint16Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 2);
      const f = new Float32Array(u.length);
      const v32 = new Uint32Array(f.buffer);
      for (let i = 0; i < u.length; i++) v32[i] = u[i] << 16;
      t = f;
    }
    w[name] = t;
  }
  await ck.close();
  const CTX = 32;
  const rnd = (n, s) => {
    const a = new Float32Array(n);
    let x = s;
    for (let i = 0; i < n; i++) {
      x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
      a[i] = x / 2 ** 32 - 0.5;
    }
    return a;
  };
  const kc = rnd(CTX * H, 3), vc = rnd(CTX * H, 4);
  const pos = Int32Array.of(CTX - 1);
  const out = {
    q: new Float32Array(H), k: new Float32Array(H), v: new Float32Array(H), x: rnd(H, 5),
    u: new Float32Array(I), logits: new Float32Array(V),
  };
  const rng = seedRng(2n);
  const lp = (l, s) => `layers.${l}.${s}`;

  // the replay, with per-category timers
  const cats = ["norms+act", "GEMV q/k/v/out", "GEMV fc1/fc2", "attention", "lm_head (bf16)", "sampling"];
  const replay = (acc) => {
    let t = now();
    const tick = (c) => {
      const e = now();
      acc[c] += e - t;
      t = e;
    };
    let x = out.x;
    for (let l = 0; l < L; l++) {
      const n1 = engineOps.layerNorm(x, w[lp(l, "self_attn_layer_norm.weight")], w[lp(l, "self_attn_layer_norm.bias")], 1, H, 1e-5);
      tick("norms+act");
      linear(n1, 1, w[lp(l, "self_attn.q_proj.weight")], w[lp(l, "self_attn.q_proj.bias")], out.q);
      linear(n1, 1, w[lp(l, "self_attn.k_proj.weight")], w[lp(l, "self_attn.k_proj.bias")], out.k);
      linear(n1, 1, w[lp(l, "self_attn.v_proj.weight")], w[lp(l, "self_attn.v_proj.bias")], out.v);
      tick("GEMV q/k/v/out");
      const a = engineOps.attention(out.q, kc, vc, pos, nh, nh, hd, 1);
      tick("attention");
      linear(a, 1, w[lp(l, "self_attn.out_proj.weight")], w[lp(l, "self_attn.out_proj.bias")], x, true);
      tick("GEMV q/k/v/out");
      const n2 = engineOps.layerNorm(x, w[lp(l, "final_layer_norm.weight")], w[lp(l, "final_layer_norm.bias")], 1, H, 1e-5);
      tick("norms+act");
      linear(n2, 1, w[lp(l, "fc1.weight")], w[lp(l, "fc1.bias")], out.u);
      tick("GEMV fc1/fc2");
      const r = engineOps.activation("relu", out.u);
      tick("norms+act");
      linear(r, 1, w[lp(l, "fc2.weight")], w[lp(l, "fc2.bias")], x, true);
      tick("GEMV fc1/fc2");
    }
    const xf = engineOps.layerNorm(x, w["norm.weight"], w["norm.bias"], 1, H, 1e-5);
    tick("norms+act");
    linear(xf, 1, w["embed_tokens"], undefined, out.logits);
    tick("lm_head (bf16)");
    sampleToken(out.logits, 0, V, GREEDY, null, rng);
    tick("sampling");
  };
  const nativeCalls = L * 11 + 3;

  // N-API cost of one small kernel call (f32 8x8 linear, stays on the calling thread)
  const tinyW = { dtype: "f32", shape: [8, 8], data: new Uint8Array(256) };
  const tx = new Float32Array(8), ty = new Float32Array(8);
  const timeCalls = (fn, n) => {
    for (let i = 0; i < 1000; i++) fn();
    let bestT = Infinity;
    for (let r = 0; r < 5; r++) {
      const s = now();
      for (let i = 0; i < n; i++) fn();
      bestT = Math.min(bestT, (now() - s) / n);
    }
    return bestT;
  };
  const napiUs = timeCalls(() => linear(tx, 1, tinyW, undefined, ty), 20000) * 1000;

  const res = { cats, threads: {}, napiUs, nativeCalls, ctx: CTX };
  for (const threads of [1, 2]) {
    setThreads(threads);
    await sleep(100);
    // a region: a GEMV just big enough to split over the threads (grain = 16384/K rows)
    const K = 768, N = 2 * Math.ceil(16384 / K);
    const rw = { dtype: "f32", shape: [N, K], data: new Uint8Array(4 * N * K) };
    const rx = new Float32Array(K), ry = new Float32Array(N);
    const regionUs = timeCalls(() => linear(rx, 1, rw, undefined, ry), 5000) * 1000;
    // the real decode step
    const seq = model.native.createSequence();
    const row = [{ seq, tokens: randomIds(CTX - 1, V, 1), adapter: -1 }];
    const lg = new Float32Array(V);
    model.native.forward(row, { out: lg });
    row[0].tokens = Int32Array.of(1);
    const steps = [];
    for (let i = 0; i < 40; i++) {
      if (model.native.sequenceLength(seq) >= CTX + 8) model.native.truncateSequence(seq, CTX - 1);
      const s = now();
      model.native.forward(row, { out: lg });
      row[0].tokens[0] = sampleToken(lg, 0, V, GREEDY, null, rng);
      steps.push(now() - s);
    }
    model.native.dropSequence(seq);
    steps.sort((a, b) => a - b);
    // replays: median per category over repeats
    const runs = [];
    for (let i = 0; i < 25; i++) {
      const acc = Object.fromEntries(cats.map((c) => [c, 0]));
      replay(acc);
      runs.push(acc);
    }
    const med = (xs) => xs.sort((a, b) => a - b)[xs.length >> 1];
    const per = Object.fromEntries(cats.map((c) => [c, med(runs.slice(5).map((r) => r[c]))]));
    res.threads[threads] = { stepMs: steps[steps.length >> 2], stepMedMs: steps[steps.length >> 1], per, regionUs };
  }
  model.dispose();
  return res;
}

// =============================================================================================
// Parent
// =============================================================================================
function runChild(mode, args, threads) {
  const r = spawnSync(process.execPath, [SELF, mode, JSON.stringify(args)], {
    env: { ...process.env, QLORA_THREADS: String(threads) },
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    maxBuffer: 1 << 24,
  });
  const line = (r.stdout ?? "").split("\n").find((l) => l.startsWith("RESULT "));
  if (r.status !== 0 || !line) {
    process.stdout.write(r.stdout ?? "");
    throw new Error(`${mode} ${args.preset ?? ""} threads ${threads} failed (exit ${r.status}, signal ${r.signal})`);
  }
  return JSON.parse(line.slice(7));
}

function copyBandwidth(threads) {
  setThreads(threads);
  const n = 128 << 20;
  const src = new Uint8Array(n).fill(1);
  const dst = new Uint8Array(n);
  streamCopy(src, dst);
  let t = Infinity;
  for (let i = 0; i < 5; i++) {
    const s = process.hrtime.bigint();
    streamCopy(src, dst);
    t = Math.min(t, Number(process.hrtime.bigint() - s) / 1e9);
  }
  return (2 * n) / t / 1e9;
}

const f = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? "n/a" : x.toFixed(d));
const mb = (b) => (b / 2 ** 20).toFixed(0);
const gb = (b) => (b / 2 ** 30).toFixed(2);

async function main() {
  const models = (process.env.BENCH_MODELS ?? "opt-125m,smollm2-135m,llama-3.2-1b").split(",").filter(Boolean);
  const threadList = (process.env.BENCH_THREADS ?? "1,2").split(",").map(Number);
  const repeats = Number(process.env.BENCH_REPEATS ?? 3);
  const decodeS = Number(process.env.BENCH_DECODE_S ?? 1.0);
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

  const results = [];
  for (const p of models) {
    const big = PRESETS[p].hidden_size >= 2048;
    for (const t of threadList) {
      const args = {
        preset: p,
        dir: ck[p].dir,
        decodeS: big ? Math.max(decodeS, 2) : decodeS,
        repeats: big ? Math.min(repeats, 2) : repeats,
        prefillLen,
        prefillRepeats: big ? 0 : Math.max(1, repeats - 1),
      };
      const r = runChild("--child", args, t);
      results.push({ preset: p, t, ...r, bytes: stepWeightBytes(parseModelConfig(PRESETS[p])) });
    }
  }
  const load1 = loadavg();

  console.log(`simd ${results[0]?.simd ?? "?"}; NF4 blocksize 64, embeddings / tied lm_head BF16 (as stored); best of ${repeats} (1B: 2 decode, 1 prefill); prompt for decode 16 tokens; prefill ${prefillLen} tokens`);
  console.log(`copy bandwidth (streamCopy 128 MiB, read+write): ${threadList.map((t) => `${t} thr ${copy[t].toFixed(1)} GB/s`).join(", ")}`);
  console.log(`load average (1/5/15 min): before ${load0.map((x) => x.toFixed(2)).join(" ")}, after ${load1.map((x) => x.toFixed(2)).join(" ")}`);
  console.log("");
  console.log("| model | threads | load s | decode b1 tok/s | decode b1 @512 ctx | decode b8 tok/s | prefill 512 tok/s | TTFT 512 ms (cold) | peak RSS MB (after load) |");
  console.log("|---|---|---|---|---|---|---|---|---|");
  for (const r of results) {
    console.log(
      `| ${r.preset} | ${r.t} | ${f(r.loadMs / 1000, 2)} | ${f(r.b1)} | ${f(r.b1Ctx)} | ${f(r.b8)} | ${f(r.prefillTps)} | ${f(r.ttftMs, 0)} (${f(r.ttftColdMs, 0)}) | ${mb(r.hwm)} (${mb(r.hwmAfterLoad)}) |`,
    );
  }
  console.log("");
  console.log("Targets (issue 3, this 2-core machine):");
  for (const r of results.filter((x) => x.preset === "opt-125m")) {
    console.log(`- decode OPT-125m batch 1 >= 140 tok/s (PyTorch fp32 ~28): ${f(r.b1)} at ${r.t} thread(s) → ${r.b1 >= 140 ? "MET" : "NOT MET"} (${f((r.b1 / 28) , 1)}x PyTorch)`);
  }
  for (const r of results.filter((x) => x.preset === "llama-3.2-1b")) {
    console.log(`- peak RSS Llama-3.2-1B < 1.2 GB (1228.8 MB): ${mb(r.hwm)} MB at ${r.t} thread(s) → ${r.hwm < 1.2 * 2 ** 30 ? "MET" : "NOT MET"}`);
  }
  console.log("");
  console.log("Decode weight bandwidth: weight bytes read per step (NF4 linears incl. absmax + lm_head BF16) × steps/s, against the copy bandwidth");
  console.log("");
  console.log("| model | threads | NF4 MB/step | lm_head MB/step | b1 GB/s | b1 vs copy | b8 GB/s (per step) | b8 vs copy |");
  console.log("|---|---|---|---|---|---|---|---|");
  for (const r of results) {
    const b1 = (r.bytes.total * r.b1) / 1e9;
    const b8 = (r.bytes.total * (r.b8 / 8)) / 1e9;
    console.log(
      `| ${r.preset} | ${r.t} | ${(r.bytes.nf4 / 1e6).toFixed(1)} | ${(r.bytes.head / 1e6).toFixed(1)} | ${f(b1)} | ${f((b1 / copy[r.t]) * 100, 0)}% | ${f(b8)} | ${f((b8 / copy[r.t]) * 100, 0)}% |`,
    );
  }

  if (profile && ck["opt-125m"]) {
    const pr = runChild("--profile", { dir: ck["opt-125m"].dir }, 2);
    console.log("");
    console.log(`OPT-125m decode step breakdown (context ${pr.ctx}; replay op by op through the kernels, medians; N-API call ${pr.napiUs.toFixed(2)} µs × ${pr.nativeCalls} calls subtracted as "replay overhead")`);
    console.log("");
    const ts = Object.keys(pr.threads);
    console.log(`| part | ${ts.map((t) => `${t} thr ms | share`).join(" | ")} |`);
    console.log(`|---|${ts.map(() => "---|---").join("|")}|`);
    const rows = [...pr.cats];
    for (const c of rows) {
      console.log(`| ${c} | ${ts.map((t) => `${pr.threads[t].per[c].toFixed(3)} | ${((pr.threads[t].per[c] / pr.threads[t].stepMs) * 100).toFixed(0)}%`).join(" | ")} |`);
    }
    const sum = (t) => pr.cats.reduce((a, c) => a + pr.threads[t].per[c], 0);
    const napi = (pr.napiUs * pr.nativeCalls) / 1000;
    console.log(`| replay total (N-API part) | ${ts.map((t) => `${sum(t).toFixed(3)} (${napi.toFixed(3)}) | ${((sum(t) / pr.threads[t].stepMs) * 100).toFixed(0)}%`).join(" | ")} |`);
    console.log(`| engine step: forward + sample (p25 / median) | ${ts.map((t) => `${pr.threads[t].stepMs.toFixed(3)} / ${pr.threads[t].stepMedMs.toFixed(3)} | 100%`).join(" | ")} |`);
    console.log(`| engine − (replay − N-API) | ${ts.map((t) => `${(pr.threads[t].stepMs - (sum(t) - napi)).toFixed(3)} | ${(((pr.threads[t].stepMs - (sum(t) - napi)) / pr.threads[t].stepMs) * 100).toFixed(0)}%`).join(" | ")} |`);
    console.log(`| one parallel region (tiny split GEMV), µs | ${ts.map((t) => `${pr.threads[t].regionUs.toFixed(1)} | `).join(" | ")} |`);
  }
  console.log("");
  console.log(`model.bench: ${((now() - t0) / 1000).toFixed(0)} s`);
}

const mode = process.argv[2];
if (mode === "--child") {
  console.log("RESULT " + JSON.stringify(await benchChild(JSON.parse(process.argv[3]))));
} else if (mode === "--profile") {
  console.log("RESULT " + JSON.stringify(await profileChild(JSON.parse(process.argv[3]))));
} else {
  await main();
}
