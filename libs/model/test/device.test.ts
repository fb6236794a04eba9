// loadModel's device option (docs/cuda.md §6) on stories260K.
// Always: option validation; "auto" resolves to what cudaInfo() allows; "cpu" works; "cuda" without a
// device is FailedPrecondition carrying the driver's reason (never a silent CPU fallback).
// With a GPU: the CUDA engine against the CPU engine on the real checkpoint, NF4 and f32 — greedy
// generation gives the same tokens, last logits and the evaluation loss agree within the bounds below;
// LoRA training with device "cuda" follows the CPU's loss trajectory (docs/cuda.md §7).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { FailedPrecondition, InvalidArgument } from "@qlora/core";
import { cudaInfo } from "@qlora/kernels";
import { evaluate, generate, loadModel, type LoadedModel, type LoadModelOptions } from "../src/index.js";
import { train, type TrainEvent } from "../src/train/index.js";
import { setup } from "./train-reference-engine.js";
import { haveStories, skipNoStories, storiesDir, storiesReference, type StoriesReference } from "./fixtures.js";

const info = cudaInfo();
const noDevice = info.available ? false : `no CUDA device: ${info.reason}`;
const skipGpu = skipNoStories || noDevice;

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
const maxAbs = (a: ArrayLike<number>) => maxAbsDiff(a, new Float32Array(a.length));

/** Last-position logits of `ids`, fed in chunks of `chunk` tokens (one forward each). */
function lastLogits(m: LoadedModel, ids: number[], chunk = ids.length): Float32Array {
  const seq = m.native.createSequence();
  try {
    let out = new Float32Array(0);
    for (let i = 0; i < ids.length; i += chunk) {
      out = m.native.forward([{ seq, tokens: Int32Array.from(ids.slice(i, i + chunk)), adapter: -1 }]).slice();
    }
    return out;
  } finally {
    m.native.dropSequence(seq);
  }
}

// ---- always ------------------------------------------------------------------------------------
test("loadModel: device option validation and resolution", { skip: skipNoStories }, async () => {
  await assert.rejects(loadModel(storiesDir, { device: "gpu" } as unknown as LoadModelOptions), InvalidArgument);
  const cpu = await loadModel(storiesDir, { device: "cpu", maxSequences: 1 });
  try {
    assert.equal(cpu.device, "cpu");
    assert.equal(cpu.native.device, "cpu");
    assert.equal(cpu.native.cudaGraphStats(), null);
    assert.equal(lastLogits(cpu, [1, 403, 407]).length, cpu.vocabSize);
  } finally {
    cpu.dispose();
  }
  const dflt = await loadModel(storiesDir, { maxSequences: 1 });
  assert.equal(dflt.device, "cpu", "the default stays cpu: callers opt in to the GPU");
  dflt.dispose();
  const auto = await loadModel(storiesDir, { device: "auto", maxSequences: 1 });
  try {
    assert.equal(auto.device, info.available ? "cuda" : "cpu");
    assert.equal(auto.native.device, auto.device);
  } finally {
    auto.dispose();
  }
});

test("loadModel: device cuda without a device is FailedPrecondition with the driver's reason", { skip: skipNoStories }, async (t) => {
  if (info.available) {
    t.skip("a CUDA device is present");
    return;
  }
  await assert.rejects(loadModel(storiesDir, { device: "cuda" }), (e: unknown) => {
    assert.ok(e instanceof FailedPrecondition, String(e));
    assert.ok(e.message.includes(info.reason), `${e.message} should name ${info.reason}`);
    return true;
  });
});

// ---- GPU: CUDA engine vs CPU engine on stories260K -------------------------------------------
let ref: StoriesReference;
const models: Record<string, LoadedModel> = {};
before(async () => {
  if (skipGpu) return;
  ref = storiesReference();
  for (const quant of ["nf4", "none"] as const) {
    models[`cpu-${quant}`] = await loadModel(storiesDir, { quant, device: "cpu", maxSequences: 2 });
    models[`cuda-${quant}`] = await loadModel(storiesDir, { quant, device: "cuda", maxSequences: 2 });
  }
});
after(() => {
  for (const m of Object.values(models)) m.dispose();
});

for (const quant of ["nf4", "none"] as const) {
  test(`stories260K ${quant}: CUDA greedy generation = CPU tokens; last logits agree`, { skip: skipGpu }, async (t) => {
    const cpu = models[`cpu-${quant}`]!, gpu = models[`cuda-${quant}`]!;
    assert.equal(gpu.device, "cuda");
    assert.equal(gpu.native.device, "cuda");
    // The 5-token prompt and every decode step run through the fp32 GEMV (M <= 8): the GPU computes
    // the CPU's function in fp32, only the summation order differs, so the greedy path is the same.
    const opts = { prompt: ref.greedy.prompt, maxNewTokens: ref.greedy.new_tokens, temperature: 0 };
    const a = await generate(cpu, opts);
    const b = await generate(gpu, opts);
    assert.deepEqual(b.tokenIds, a.tokenIds);
    if (quant === "none") assert.deepEqual(b.tokenIds, ref.greedy.new_ids);
    const g = gpu.native.cudaGraphStats()!;
    t.diagnostic(`graphs captured ${g.captured}, launches ${g.launches}; gpu ${b.timings.tokensPerSecond.toFixed(0)} tok/s`);
    assert.ok(g.launches >= ref.greedy.new_tokens - 1, "decode steps replay a captured CUDA graph");

    // fp32 path (prefill in chunks of <= 8 tokens): reduction-order differences only, amplified by
    // 5 layers: 1e-4 of the logit scale.
    const ids = ref.cross_entropy.ids;
    const want = lastLogits(cpu, ids);
    const scale = Math.max(1, maxAbs(want));
    const fp32 = maxAbsDiff(lastLogits(gpu, ids, 8), want);
    // one 16-token prefill takes the bf16 tensor-core GEMM (M > 8): x and W rounded to bf16 (relative
    // 2⁻⁸ each, so ~2⁻⁷ per product before accumulation) in every linear of 5 layers; the errors are
    // sign-random, 2⁻⁷·scale·4 leaves room for their growth through the residual stream.
    const bf16 = maxAbsDiff(lastLogits(gpu, ids), want);
    t.diagnostic(`max |Δ logit| fp32 path ${fp32.toExponential(2)}, bf16 prefill ${bf16.toExponential(2)}, logit scale ${scale.toFixed(2)}`);
    assert.ok(fp32 <= 1e-4 * scale, `fp32 path: ${fp32}`);
    assert.ok(bf16 <= 2 ** -7 * 4 * scale, `bf16 prefill: ${bf16}`);

    // evaluation loss: bf16 lm_head GEMM rows (chunk > 8) → same bf16 argument on a mean of logsumexps
    const ea = await evaluate(cpu, [ref.cross_entropy.text]);
    const eb = await evaluate(gpu, [ref.cross_entropy.text]);
    assert.equal(eb.tokens, ea.tokens);
    t.diagnostic(`eval loss cpu ${ea.loss.toFixed(6)} cuda ${eb.loss.toFixed(6)}`);
    assert.ok(Math.abs(ea.loss - eb.loss) <= 2e-2 * Math.max(1, ea.loss), `loss ${eb.loss} vs ${ea.loss}`);
  });
}

test("train(): device cuda without a GPU is FailedPrecondition naming the reason, before anything is read", async (t) => {
  if (info.available) {
    t.skip("a CUDA device is present");
    return;
  }
  await assert.rejects(train({ model: "/nonexistent-model", data: "/nonexistent.txt", out: "/nonexistent-out", device: "cuda" }), (e: unknown) => {
    assert.ok(e instanceof FailedPrecondition, String(e));
    assert.match(e.message, /CUDA is not available/);
    if (info.compiled) assert.ok(e.message.includes(info.reason), e.message);
    return true;
  });
});

// The whole training loop on the GPU (engine::CudaLoraTrainer) against the CPU on stories260K (NF4):
// the same seed gives the same LoRA init, data order and dropout masks, so the logged losses follow
// the same trajectory within the bf16 bound of the base GEMMs.
test("stories260K: train() on CUDA follows the CPU's loss trajectory; the start event says cuda", { skip: skipGpu }, async () => {
  const run = async (device: "cpu" | "cuda") => {
    const events: TrainEvent[] = [];
    const r = await train(setup({ maxSteps: 6, lr: 2e-3, loggingSteps: 1, saveSteps: 0, target: "all-linear", device }), {
      onEvent: (e) => events.push(e),
    });
    const start = events.find((e) => e.type === "start");
    return { r, device: start?.type === "start" ? start.device : undefined, losses: events.flatMap((e) => (e.type === "log" ? [e.loss] : [])) };
  };
  const cpu = await run("cpu");
  const gpu = await run("cuda");
  assert.equal(cpu.device, "cpu");
  assert.equal(gpu.device, "cuda");
  assert.equal(gpu.losses.length, 6);
  for (let i = 0; i < 6; i++) {
    const rel = Math.abs(gpu.losses[i]! - cpu.losses[i]!) / cpu.losses[i]!;
    assert.ok(rel < 3e-2, `step ${i + 1}: cuda ${gpu.losses[i]} vs cpu ${cpu.losses[i]} (relative ${rel})`);
  }
  assert.ok(gpu.losses[5]! < gpu.losses[0]!, `the loss falls on the GPU: ${gpu.losses.join(", ")}`);
});
