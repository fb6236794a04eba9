// LoRA training on the GPU (engine::CudaLoraTrainer, csrc/cuda/train_cuda.{h,cu}; docs/cuda.md §7)
// against the CPU trainer (the reference, itself checked against float64 autodiff in train.test.ts)
// on small random Llama / OPT models (odd sizes included) and on the real stories260K (NF4).
// Without a GPU every test skips with "no CUDA device: <reason>" (a cuda NativeModel cannot be
// created; cuda-engine.test.ts checks that refusal).
//
// Tolerances. The frozen-base GEMMs run on bf16 tensor cores (x and W rounded to bf16, ~2⁻⁷ relative
// per product, sign-random), the LoRA branch, norms, attention and the loss in fp32. So the GPU is
// close to the CPU, not equal: the loss within 2e-2 relative, each module's gradient within cosine
// similarity 0.99 and 5e-2 relative norm, the loss after AdamW steps within 2e-2. What must be exact
// is exact: the initial A (generated on the host by the CPU code), checkpointing on = off (the same
// kernels on the same inputs), a resumed run = an uninterrupted one, the same dropout seed twice.
import assert from "node:assert/strict";
import { FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import { NativeModel } from "../src/index.js";
import type { EngineConfig, LoraState, LoraTrainSpec, TrainBatchInput } from "../src/index.js";
import { LLAMA, LLAMA_HD32, LLAMA_ODD, OPT_POST, OPT_PRE, gpuTest, makeModel, pair, rand, simtAttentionModel, type DType, type Shape } from "./cuda-fixtures.js";
import { rng } from "./random.js";
import { haveStories, storiesBatch, storiesNf4 } from "./stories.js";
import { LLAMA_LINS, OPT_LINS, gradsOf, makeBatch } from "./train-fixtures.js";

const LOSS_TOL = 2e-2;
const COS_MIN = 0.99;
const NORM_TOL = 5e-2;

const allTargets = (cfg: EngineConfig): string[] =>
  Array.from({ length: cfg.numLayers }, (_, l) => (cfg.arch === "llama" ? LLAMA_LINS : OPT_LINS).map((m) => `layers.${l}.${m}`)).flat();
const spec = (targets: string[], dropout = 0): LoraTrainSpec => ({ rank: 4, alpha: 8, useRslora: false, dropout, targets, seed: 11n });
// lr 1e-3 and a B of trained-adapter size (below): with lr 1e-2 and B ~ 0.3 the small random models
// are chaotic — three Adam steps (which move every parameter by ~lr whatever its gradient's size)
// turned bf16-level gradient differences into 2-30 % loss differences in the emulator, while the same
// run with fp32 GEMMs matched the CPU to 2e-2 (docs/cuda.md §8).
const ADAMW = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, maxGradNorm: 1, step: 1 };

/** A state with random A and B (B ≠ 0, so dA ≠ 0 and the LoRA branch changes the output). */
function randomState(m: NativeModel, seed: number): LoraState {
  const s = m.getLoraState(0), r = rng(seed);
  for (const mod of Object.values(s.modules)) {
    mod.a.set(rand(mod.a.length, r, 0.3));
    mod.b.set(rand(mod.b.length, r, 0.05));
  }
  return s;
}

function norm(a: Float32Array): number {
  let s = 0;
  for (const x of a) s += x * x;
  return Math.sqrt(s);
}
function cosine(a: Float32Array, b: Float32Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s / (norm(a) * norm(b));
}
/** A, B and both moments of every module, bit for bit. */
function assertSameState(got: LoraState, want: LoraState, what: string): void {
  assert.deepEqual(Object.keys(got.modules).sort(), Object.keys(want.modules).sort(), `${what}: modules`);
  for (const [name, m] of Object.entries(want.modules)) {
    for (const k of ["a", "b", "ma", "va", "mb", "vb"] as const) assert.deepEqual(got.modules[name]![k], m[k], `${what}: ${name}.${k}`);
  }
}
const relDiff = (got: number, want: number) => Math.abs(got - want) / Math.max(Math.abs(want), 1e-30);

/**
 * The CUDA trainer against the CPU trainer on the same model: the same initial A (bit for bit), the
 * loss of the first step, every module's gradients and the global norm, then three AdamW steps.
 */
function compareWithCpu(cpu: NativeModel, gpu: NativeModel, targets: string[], batch: TrainBatchInput, what: string): void {
  for (const m of [cpu, gpu]) m.initLora(0, spec(targets));
  const c0 = cpu.getLoraState(0), g0 = gpu.getLoraState(0);
  for (const name of Object.keys(c0.modules)) {
    assert.deepEqual(g0.modules[name]!.a, c0.modules[name]!.a, `${what} ${name}: the initial A is the CPU's`);
    assert.ok(g0.modules[name]!.b.every((x) => x === 0), `${what} ${name}: B starts at 0`);
  }
  const state = randomState(cpu, 5);
  cpu.setLoraState(0, state);
  gpu.setLoraState(0, state);

  const opts = { dropoutSeed: 3n, gradScale: 1, checkpointing: true };
  const lc = cpu.trainForwardBackward(0, batch, opts), lg = gpu.trainForwardBackward(0, batch, opts);
  assert.equal(lg.tokens, lc.tokens, `${what}: labelled tokens`);
  assert.ok(relDiff(lg.loss, lc.loss) < LOSS_TOL, `${what}: first-step loss cuda ${lg.loss} vs cpu ${lc.loss}`);
  const gc = gradsOf(cpu, 0), gg = gradsOf(gpu, 0);
  assert.ok(relDiff(gg.norm, gc.norm) < NORM_TOL, `${what}: global grad norm cuda ${gg.norm} vs cpu ${gc.norm}`);
  // adamwStep's norm (one Σg² kernel per tensor, one download) = the norm of the gradients it returned
  let sq = 0;
  for (const { a: ga, b: gb } of gg.g.values()) sq += norm(ga) ** 2 + norm(gb) ** 2;
  assert.ok(relDiff(gg.norm, Math.sqrt(sq)) < 1e-6, `${what}: adamwStep norm ${gg.norm} vs Σg² of the gradients ${Math.sqrt(sq)}`);
  for (const [name, c] of gc.g) {
    const g = gg.g.get(name)!;
    for (const [k, cv, gv] of [["dA", c.a, g.a], ["dB", c.b, g.b]] as const) {
      const cs = cosine(gv, cv), nd = relDiff(norm(gv), norm(cv));
      assert.ok(cs > COS_MIN, `${what} ${name} ${k}: cosine ${cs}`);
      assert.ok(nd < NORM_TOL, `${what} ${name} ${k}: relative norm difference ${nd}`);
    }
  }

  // three optimizer steps from the same state (gradsOf restored it; gradients are zero)
  for (let step = 1; step <= 3; step++) {
    const o = { ...opts, dropoutSeed: BigInt(step) };
    const c = cpu.trainForwardBackward(0, batch, o).loss, g = gpu.trainForwardBackward(0, batch, o).loss;
    assert.ok(relDiff(g, c) < LOSS_TOL, `${what} step ${step}: loss cuda ${g} vs cpu ${c}`);
    const nc = cpu.adamwStep(0, { ...ADAMW, step }).gradNorm, ng = gpu.adamwStep(0, { ...ADAMW, step }).gradNorm;
    assert.ok(relDiff(ng, nc) < NORM_TOL, `${what} step ${step}: grad norm cuda ${ng} vs cpu ${nc}`);
  }
  const ec = cpu.evalLoss(0, batch).loss, eg = gpu.evalLoss(0, batch).loss;
  assert.ok(relDiff(eg, ec) < LOSS_TOL, `${what}: loss after 3 AdamW steps cuda ${eg} vs cpu ${ec}`);
}

// ---- random models, every architecture, odd sizes -----------------------------------------------
const CASES: [string, Shape, DType][] = [
  ["llama NF4", LLAMA, "nf4"],
  ["llama odd sizes NF4 (generic GEMV/GEMM paths, biases, tied)", LLAMA_ODD, "nf4"],
  ["llama bf16", LLAMA, "bf16"],
  ["OPT pre-LN NF4", OPT_PRE, "nf4"],
  ["OPT post-LN f32", OPT_POST, "f32"],
];
for (const [label, shape, dtype] of CASES) {
  gpuTest(`CUDA trainer = CPU trainer (${label}): init, loss, LoRA gradients, 3 AdamW steps`, () => {
    const { cpu, gpu } = pair(shape, dtype, 21);
    try {
      const targets = allTargets(cpu.config);
      compareWithCpu(cpu, gpu, targets, makeBatch(cpu.config, 3, 13, 4), label);
      // packed segments (positions restart, attention stays inside each example)
      const seg = Int32Array.from({ length: 2 * 17 }, (_, i) => ((i % 17) < 6 ? 0 : (i % 17) < 12 ? 1 : 2));
      compareWithCpu(cpu, gpu, targets, makeBatch(cpu.config, 2, 17, 8, seg), `${label} packed`);
    } finally {
      cpu.dispose();
      gpu.dispose();
    }
  });
}

gpuTest("CUDA trainer with flash attention (hd 32, 2 × 150 tokens: several tiles, segments straddling them) = CPU trainer; = SIMT attention", () => {
  const { cfg, weights } = makeModel(LLAMA_HD32, "nf4", 23);
  const opts = { maxSequences: 1, maxContext: 160 };
  const cpu = new NativeModel(cfg, weights, { ...opts, device: "cpu" });
  const gpu = new NativeModel(cfg, weights, { ...opts, device: "cuda" });
  const simt = simtAttentionModel(cfg, weights, opts);  // its trainer's attention on the SIMT kernels
  try {
    const targets = allTargets(cpu.config);
    compareWithCpu(cpu, gpu, targets, makeBatch(cfg, 2, 150, 9), "hd 32 flash");
    const seg = Int32Array.from({ length: 2 * 150 }, (_, i) => ((i % 150) < 50 ? 0 : (i % 150) < 100 ? 1 : 2));
    const packed = makeBatch(cfg, 2, 150, 10, seg);
    compareWithCpu(cpu, gpu, targets, packed, "hd 32 flash packed");
    // flash (TF32) vs SIMT (fp32) attention on the same GPU model: close, and not the same bits
    for (const m of [gpu, simt]) {
      m.initLora(0, spec(targets));
      m.setLoraState(0, randomState(cpu, 8));
    }
    const o = { dropoutSeed: 1n, gradScale: 1, checkpointing: true };
    const lf = gpu.trainForwardBackward(0, packed, o).loss, ls = simt.trainForwardBackward(0, packed, o).loss;
    assert.ok(relDiff(lf, ls) < 1e-3, `flash loss ${lf} vs SIMT ${ls}`);
    const gf = gradsOf(gpu, 0), gs = gradsOf(simt, 0);
    let same = true;
    for (const [name, g] of gs.g) {
      const f = gf.g.get(name)!;
      assert.ok(cosine(f.a, g.a) > 0.999 && cosine(f.b, g.b) > 0.999, `${name}: flash vs SIMT gradients`);
      same &&= f.a.every((x, i) => x === g.a[i]);
    }
    assert.ok(!same, "the trainer ran the flash kernels (TF32 changes some bits)");
  } finally {
    for (const m of [cpu, gpu, simt]) m.dispose();
  }
});

gpuTest("CUDA trainer: checkpointing on = off bit for bit; gradients accumulate; dropout masks = the CPU's", () => {
  const { cpu, gpu } = pair(LLAMA, "nf4", 22);
  try {
    const targets = allTargets(gpu.config);
    const batch = makeBatch(gpu.config, 2, 19, 9);
    for (const m of [cpu, gpu]) m.initLora(0, spec(targets, 0.25));
    const state = randomState(cpu, 6);
    cpu.setLoraState(0, state);
    gpu.setLoraState(0, state);
    const run = (m: NativeModel, checkpointing: boolean, dropoutSeed = 5n, gradScale = 1) =>
      m.trainForwardBackward(0, batch, { dropoutSeed, gradScale, checkpointing }).loss;

    const on = run(gpu, true), gOn = gradsOf(gpu, 0);
    const off = run(gpu, false), gOff = gradsOf(gpu, 0);
    assert.equal(off, on, "the same loss bits");
    for (const [name, g] of gOn.g) {
      assert.deepEqual(gOff.g.get(name)!.a, g.a, `${name} dA`);
      assert.deepEqual(gOff.g.get(name)!.b, g.b, `${name} dB`);
    }
    // two half-scaled calls accumulate to the full gradient (fp32 sums: close, same direction)
    run(gpu, true, 5n, 0.5);
    run(gpu, true, 5n, 0.5);
    const half = gradsOf(gpu, 0);
    assert.ok(relDiff(half.norm, gOn.norm) < 1e-5, `accumulated norm ${half.norm} vs ${gOn.norm}`);
    gpu.zeroGrad(0);
    assert.equal(gradsOf(gpu, 0).norm, 0, "zeroGrad clears");

    // dropout: the same seed twice = the same bits, another seed another loss, the CPU's masks
    assert.equal(run(gpu, true), on);
    gpu.zeroGrad(0);
    const other = run(gpu, true, 99n);
    gpu.zeroGrad(0);
    assert.notEqual(other, on, "another dropout seed, another loss");
    const cpuLoss = run(cpu, true);
    assert.ok(relDiff(on, cpuLoss) < LOSS_TOL, `dropout 0.25: cuda ${on} vs cpu ${cpuLoss} (same masks)`);
    assert.ok(Number.isFinite(on) && on > 0);
  } finally {
    cpu.dispose();
    gpu.dispose();
  }
});

gpuTest("CUDA trainer: evalLoss = CudaModel.crossEntropy (base and trained slot); the trained slot serves forward()", () => {
  const { cpu, gpu } = pair(LLAMA, "nf4", 23);
  const cfg = gpu.config;
  try {
    const T = 24;
    const r = rng(12);
    const tokens = Int32Array.from({ length: T }, () => Math.floor(r() * cfg.vocabSize));
    const labels = new Int32Array(T).fill(-100);
    for (let t = 0; t + 1 < T; t++) labels[t] = tokens[t + 1]!;
    const batch: TrainBatchInput = { tokens, labels, batchSize: 1, seqLen: T };
    const ce = gpu.crossEntropy(tokens, -1), ev = gpu.evalLoss(-1, batch);
    assert.equal(ev.tokens, ce.tokens);
    assert.ok(relDiff(ev.loss, ce.loss) < 1e-4, `base: evalLoss ${ev.loss} vs crossEntropy ${ce.loss}`);

    gpu.initLora(0, spec(allTargets(gpu.config)));
    gpu.setLoraState(0, randomState(gpu, 7));
    for (let step = 1; step <= 2; step++) {
      gpu.trainForwardBackward(0, batch, { dropoutSeed: 1n, gradScale: 1, checkpointing: true });
      gpu.adamwStep(0, { ...ADAMW, step });
    }
    const ceT = gpu.crossEntropy(tokens, 0), evT = gpu.evalLoss(0, batch);
    assert.ok(relDiff(evT.loss, ceT.loss) < 1e-4, `trained slot: evalLoss ${evT.loss} vs crossEntropy ${ceT.loss}`);
    assert.ok(Math.abs(evT.loss - ev.loss) > 1e-3, "the trained adapter changes the loss");
    // the same trained state on the CPU engine: forward() with the slot agrees within the bf16 bound
    cpu.initLora(0, spec(allTargets(cpu.config)));
    cpu.setLoraState(0, gpu.getLoraState(0));
    const a = cpu.createSequence(), b = gpu.createSequence();
    const prompt = tokens.subarray(0, 6); // <= 8 tokens: the fp32 GEMV path on the GPU
    const lc = cpu.forward([{ seq: a, tokens: prompt, adapter: 0 }]), lg = gpu.forward([{ seq: b, tokens: prompt, adapter: 0 }]);
    let scale = 1, diff = 0;
    for (let i = 0; i < lc.length; i++) {
      scale = Math.max(scale, Math.abs(lc[i]!));
      diff = Math.max(diff, Math.abs(lc[i]! - lg[i]!));
    }
    assert.ok(diff <= 2e-4 * scale, `forward with the trained slot: max |Δ| ${diff} (scale ${scale})`);
  } finally {
    cpu.dispose();
    gpu.dispose();
  }
});

gpuTest("CUDA trainer: getLoraState / setLoraState round trip; a resumed run = the uninterrupted run, bit for bit", () => {
  const { cpu, gpu } = pair(OPT_PRE, "nf4", 24);
  cpu.dispose();
  const { gpu: gpu2 } = pair(OPT_PRE, "nf4", 24);
  try {
    const targets = allTargets(gpu.config);
    const batch = makeBatch(gpu.config, 2, 15, 10);
    const step = (m: NativeModel, s: number) => {
      const loss = m.trainForwardBackward(0, batch, { dropoutSeed: BigInt(s), gradScale: 1, checkpointing: s % 2 === 0 }).loss;
      m.adamwStep(0, { ...ADAMW, step: s });
      return loss;
    };
    gpu.initLora(0, spec(targets, 0.1));
    step(gpu, 1);
    step(gpu, 2);
    const saved = gpu.getLoraState(0);
    const l3 = step(gpu, 3);
    const end = gpu.getLoraState(0);

    gpu2.initLora(0, spec(targets, 0.1));
    gpu2.setLoraState(0, saved);
    const back = gpu2.getLoraState(0);
    assertSameState(back, saved, "round trip");
    assert.equal(step(gpu2, 3), l3, "the resumed step's loss");
    assertSameState(gpu2.getLoraState(0), end, "after the resumed step");
    assert.throws(() => gpu2.setLoraState(0, { ...saved, rank: 5 }), InvalidArgument);
  } finally {
    gpu.dispose();
    gpu2.dispose();
  }
});

gpuTest("CUDA trainer errors: unknown slot, bad batch, replaced adapter, disposed model", () => {
  const { cpu, gpu } = pair(LLAMA, "nf4", 25);
  cpu.dispose();
  const targets = allTargets(gpu.config);
  const batch = makeBatch(gpu.config, 1, 9, 11);
  const opts = { dropoutSeed: 1n, gradScale: 1, checkpointing: true };
  assert.throws(() => gpu.trainForwardBackward(0, batch, opts), NotFound);
  assert.throws(() => gpu.initLora(0, spec(["layers.9.self_attn.q_proj"])), InvalidArgument);
  gpu.initLora(0, spec(targets));
  assert.throws(() => gpu.trainForwardBackward(0, { ...batch, tokens: batch.tokens.map(() => 100000) }, opts), InvalidArgument);
  assert.deepEqual(gpu.trainForwardBackward(0, { ...batch, labels: batch.labels.map(() => -100) }, opts), { loss: 0, tokens: 0 });
  gpu.removeAdapter(0);
  assert.throws(() => gpu.trainForwardBackward(0, batch, opts), FailedPrecondition);
  gpu.initLora(0, spec(targets));
  gpu.trainForwardBackward(0, batch, opts);
  gpu.dispose();
  assert.throws(() => gpu.trainForwardBackward(0, batch, opts), FailedPrecondition);
});

// ---- the real checkpoint -----------------------------------------------------------------------
gpuTest("CUDA trainer = CPU trainer on stories260K (NF4 linears): loss, gradients, 3 AdamW steps", () => {
  const { cfg, weights, targets } = storiesNf4();
  const cpu = new NativeModel(cfg, weights, { maxSequences: 1, maxContext: 64, device: "cpu" });
  const gpu = new NativeModel(cfg, weights, { maxSequences: 1, maxContext: 64, device: "cuda" });
  try {
    compareWithCpu(cpu, gpu, targets, storiesBatch(), "stories260K");
  } finally {
    cpu.dispose();
    gpu.dispose();
  }
}, haveStories ? false : "stories260K is not in /work/shared");
