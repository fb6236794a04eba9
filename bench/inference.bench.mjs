// Inference service benchmark (run by `npm run bench`, or alone: node bench/inference.bench.mjs).
// A random-weight OPT-125m-shaped checkpoint (bench/checkpoints.mjs cache) served NF4 by
// the real service (engine worker + continuous batching) through a gRPC client, for 1 and 2
// kernel threads:
//   - decode tokens/s at batch 1 and batch 8 (8 concurrent requests, summed);
//   - time to first token of a 512-token prompt;
//   - 8 concurrent requests on 8 different adapters vs the same requests on one adapter
//     (throughput ratio; target >= 80%);
//   - adapter switch: extra latency of a request whose adapter differs from the previous
//     request's (both resident), and the cold load time of one adapter;
//   - peak RSS of the process (the worker runs in it).
// Env: BENCH_PRESET (opt-125m), BENCH_TOKENS (decode tokens per request, 32), BENCH_THREADS
// ("1,2"), BENCH_REPEATS (3: interleaved repeats, medians reported), QLORA_BENCH_DIR (where checkpoints and the store live; default $TMPDIR/qlora-bench).
import { mkdir, readlink, rm, symlink } from "node:fs/promises";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { writePeftAdapter, parseModelConfig } from "@qlora/formats";
import { inferenceService } from "@qlora/inference";
import { InferenceService } from "@qlora/proto";
import { startServer } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { benchCacheDir, ensureCheckpoint, PRESETS } from "./checkpoints.mjs";

const preset = process.env.BENCH_PRESET ?? "opt-125m";
const TOKENS = Number(process.env.BENCH_TOKENS ?? 32);
const THREADS = (process.env.BENCH_THREADS ?? "1,2").split(",").map(Number);
const root = join(benchCacheDir(), "inference-store");
const MODEL = `${preset}-random`;
const N_ADAPTERS = 8;
const RANK = 16;

function rand(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** PEFT's default targets for OPT/Llama: q_proj + v_proj, on every layer. */
async function makeAdapters(store, cfg) {
  const names = [];
  for (let k = 0; k < N_ADAPTERS; k++) {
    const name = `bench-r${RANK}-${k}`;
    names.push(name);
    if (await store.exists("adapters", name)) continue;
    const r = rand(1000 + k);
    const tensors = new Map();
    const H = cfg.hiddenSize;
    const kv = cfg.family === "opt" ? H : cfg.numKvHeads * cfg.headDim;
    const q = cfg.family === "opt" ? H : cfg.numHeads * cfg.headDim;
    for (let l = 0; l < cfg.numLayers; l++) {
      for (const [mod, out] of [["self_attn.q_proj", q], ["self_attn.v_proj", kv]]) {
        const a = Float32Array.from({ length: RANK * H }, () => (r() * 2 - 1) / Math.sqrt(H));
        const b = Float32Array.from({ length: out * RANK }, () => (r() * 2 - 1) * 0.01);
        tensors.set(`layers.${l}.${mod}`, { a, b });
      }
    }
    await writePeftAdapter(join(root, "adapters", name), {
      config: { r: RANK, loraAlpha: 2 * RANK, targetModules: ["q_proj", "v_proj"], baseModelNameOrPath: MODEL },
      family: cfg.family,
      tensors,
    });
  }
  return names;
}

const REPEATS = Number(process.env.BENCH_REPEATS ?? 3);
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

async function runFor(threads, store, adapters) {
  const reg = inferenceService({ store, maxBatch: 8, maxTokensPerStep: 512, threads, adapterBudgetBytes: 512 * 2 ** 20 });
  const server = await startServer({ services: [reg], gracePeriodMs: 100 });
  const client = createClient(InferenceService, createGrpcTransport({ baseUrl: server.url }));
  const res = {};
  try {
    const t0 = performance.now();
    const loaded = await client.loadModel({ name: MODEL });
    res.loadMs = performance.now() - t0;
    res.residentMB = Number(loaded.model.residentBytes) / 2 ** 20;
    const gen = (over = {}) => client.generate({ model: MODEL, prompt: "Once upon a time there was", maxNewTokens: TOKENS, ...over });
    await gen({ maxNewTokens: 2 }); // warm-up

    // Decode, batch 1.
    res.decode1 = (await gen()).timings.tokensPerSecond;

    // Decode, batch 8: all eight decode in the same steps, so the sum is the engine's rate.
    const eight = await Promise.all(Array.from({ length: 8 }, (_, i) => gen({ prompt: `Request ${i} starts here` })));
    res.decode8 = eight.reduce((s, r) => s + r.timings.tokensPerSecond, 0);

    // Time to first token of a 512-token prompt (511 bytes + BOS with the byte-level tokenizer).
    const r = rand(7);
    const letters = "abcdefghij klmnopqrstuvwxyz ";
    const prompt = Array.from({ length: 511 }, () => letters[Math.floor(r() * letters.length)]).join("");
    const long = await gen({ prompt, maxNewTokens: 1 });
    if (long.usage.promptTokens !== 512) throw new Error(`prompt is ${long.usage.promptTokens} tokens, not 512`);
    res.ttft512 = long.timings.timeToFirstTokenMs;

    // 8 adapters vs 1 adapter, same requests. Adapters are resident first (load time is
    // measured separately): this compares the steady state.
    const coldStart = performance.now();
    const first = await client.loadAdapter({ name: adapters[0], model: MODEL });
    res.adapterColdMs = performance.now() - coldStart;
    res.adapterLoadMs = first.adapter.loadMs;
    for (const a of adapters.slice(1)) await client.loadAdapter({ name: a, model: MODEL });
    const wave = async (pick) => {
      const t = performance.now();
      const out = await Promise.all(adapters.map((_, i) => gen({ adapter: pick(i), prompt: `Request ${i} starts here` })));
      const tokens = out.reduce((s, o) => s + o.usage.completionTokens, 0);
      return tokens / ((performance.now() - t) / 1000);
    };
    await wave((i) => adapters[i]); // warm-up of the mixed path
    // Interleaved repeats and medians: on a shared machine, load drifts between runs.
    const one = [];
    const mixed = [];
    for (let k = 0; k < REPEATS; k++) {
      one.push(await wave(() => adapters[0]));
      mixed.push(await wave((i) => adapters[i]));
    }
    res.oneAdapterTps = median(one);
    res.mixedTps = median(mixed);
    res.ratio = res.mixedTps / res.oneAdapterTps;

    // Adapter switch between consecutive requests (both resident): TTFT of a request whose
    // adapter differs from the previous request's, against one with the same adapter.
    const ttft = async (a) => (await gen({ adapter: a, maxNewTokens: 1 })).timings.timeToFirstTokenMs;
    const same = [];
    const switched = [];
    await ttft(adapters[0]);
    for (let k = 0; k < 4 * REPEATS; k++) {
      same.push(await ttft(adapters[0])); // previous request: adapters[0]
      switched.push(await ttft(adapters[1])); // previous request: adapters[0]
      await ttft(adapters[0]);
    }
    res.switchMs = median(switched) - median(same);
    res.sameTtft = median(same);
  } finally {
    await server.close();
  }
  return res;
}

const t0 = Date.now();
const store = new LocalStore(root);
await mkdir(join(root, "models"), { recursive: true });
await mkdir(join(root, "adapters"), { recursive: true });
// The store names the shared cached checkpoint through a link instead of holding a copy.
const { dir: checkpoint } = await ensureCheckpoint(preset);
const modelLink = join(root, "models", MODEL);
if ((await readlink(modelLink).catch(() => null)) !== checkpoint) {
  await rm(modelLink, { recursive: true, force: true });
  await symlink(checkpoint, modelLink, "dir");
}
const cfg = parseModelConfig(PRESETS[preset]);
const adapters = await makeAdapters(store, cfg);
console.log(`inference service, ${preset} shapes (random weights, NF4), ${TOKENS} new tokens per request, rank-${RANK} q/v adapters`);

const rows = [];
for (const threads of THREADS) rows.push([threads, await runFor(threads, store, adapters)]);
const rssMB = process.resourceUsage().maxRSS / 1024;

const f = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : "n/a");
console.log("");
console.log("| threads | decode tok/s b=1 | decode tok/s b=8 | TTFT 512-token prompt (ms) | 8 adapters / 1 adapter | adapter switch (ms, median) | adapter cold load (ms) | model load (ms) | resident (MB) |");
console.log("|---|---|---|---|---|---|---|---|---|");
for (const [t, r] of rows) {
  console.log(
    `| ${t} | ${f(r.decode1)} | ${f(r.decode8)} | ${f(r.ttft512, 0)} | ${f(r.mixedTps)} / ${f(r.oneAdapterTps)} tok/s = ${f(r.ratio * 100, 0)}% | ${f(r.switchMs, 2)} (TTFT ${f(r.sameTtft, 1)}) | ${f(r.adapterColdMs, 1)} (engine ${f(r.adapterLoadMs, 1)}) | ${f(r.loadMs, 0)} | ${f(r.residentMB, 1)} |`,
  );
}
console.log(`\npeak RSS (whole process, worker included): ${f(rssMB, 0)} MB; total ${((Date.now() - t0) / 1000).toFixed(0)} s`);
