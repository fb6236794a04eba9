// The CUDA decoder (engine::CudaModel, csrc/cuda/model_cuda.cu; docs/cuda.md §6) against the CPU
// engine (the reference) on small random Llama and OPT models.
// Always: the device option's validation; device "cuda" without a device → FailedPrecondition naming
// the reason; device "cpu" as before.
// With a GPU: logits of prefill + decode (NF4, f32, bf16, f16 weights; sizes that take the GEMV fast
// path and odd ones that take the generic path), mixed batches with two adapters + base vs one row at a
// time, KV-cache decode vs recomputation without a cache, CUDA graphs vs eager launches (bit-identical),
// the KV pool growing under live sequences, truncation, crossEntropy, OPT pre-/post-LN, errors.
//
// Tolerances. Steps of <= 8 packed tokens run every linear as the fp32 GEMV: the GPU computes the
// CPU's function in fp32 and only the summation order differs (relative ~1e-6 per dot product), so
// logits agree to FP32_TOL of their scale. More tokens take the bf16 tensor-core GEMM: x and W are
// rounded to bf16 (2⁻⁸ relative each, ~2⁻⁷ per product), sign-random across K, compounded over two
// layers: BF16_TOL = 2⁻⁷·4 of the logit scale.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted } from "@qlora/core";
import { NativeModel } from "../src/index.js";
import type { EngineAdapter } from "../src/index.js";
import { checkForwardSample } from "./helpers.js";
import { rng } from "./random.js";
import { LLAMA, LLAMA_HD32, LLAMA_ODD, OPT_POST, OPT_PRE, assertClose, disposeAll, gpuTest, ids, info, makeModel, pair, rand, simtAttentionModel, type Shape } from "./cuda-fixtures.js";

const FP32_TOL = 2e-4;
const BF16_TOL = 2 ** -7 * 4;

function makeAdapter(s: Shape, seed: number, modules: string[], rank: number): EngineAdapter {
  const r = rng(seed);
  const q = s.nh * s.hd, kv = s.nkv * s.hd;
  const dims: Record<string, [number, number]> = {
    "self_attn.q_proj": [q, s.H], "self_attn.k_proj": [kv, s.H], "self_attn.v_proj": [kv, s.H],
    "self_attn.o_proj": [s.H, q], "self_attn.out_proj": [s.H, q], "mlp.gate_proj": [s.I, s.H], "mlp.up_proj": [s.I, s.H],
    "mlp.down_proj": [s.H, s.I], fc1: [s.I, s.H], fc2: [s.H, s.I],
  };
  const out: EngineAdapter = { scaling: 2, modules: {} };
  for (let l = 0; l < s.L; l++) {
    for (const m of modules) {
      const [o, i] = dims[m]!;
      out.modules[`layers.${l}.${m}`] = { a: rand(rank * i, r, 0.3), b: rand(o * rank, r, 0.3), rank };
    }
  }
  return out;
}

// ---- always ------------------------------------------------------------------------------------
test("NativeModel device option: validation, cpu as before", () => {
  const { cfg, weights } = makeModel(LLAMA, "f32", 1);
  assert.throws(() => new NativeModel(cfg, weights, { device: "gpu" as unknown as "cpu" }), InvalidArgument);
  const m = new NativeModel(cfg, weights, { device: "cpu", maxSequences: 1, maxContext: 16 });
  assert.equal(m.device, "cpu");
  assert.equal(m.cudaGraphStats(), null);
  const seq = m.createSequence();
  assert.equal(m.forward([{ seq, tokens: Int32Array.of(1, 2, 3), adapter: -1 }]).length, cfg.vocabSize);
  m.dispose();
  const d = new NativeModel(cfg, weights, { maxSequences: 1, maxContext: 16 });
  assert.equal(d.device, "cpu", "the default device is cpu");
  d.dispose();
});

test("NativeModel device cuda without a device → FailedPrecondition with the reason", (t) => {
  if (info.available) {
    t.skip("a CUDA device is present");
    return;
  }
  const { cfg, weights } = makeModel(LLAMA, "nf4", 1);
  assert.throws(() => new NativeModel(cfg, weights, { device: "cuda" }), (e: unknown) => {
    assert.ok(e instanceof FailedPrecondition, String(e));
    assert.ok(e.message.includes(info.compiled ? info.reason : "built without CUDA"), e.message);
    return true;
  });
});

// ---- GPU ----------------------------------------------------------------------------------------
for (const [label, shape] of [["llama", LLAMA], ["llama odd sizes", LLAMA_ODD]] as const) {
  for (const dtype of ["nf4", "f32", "bf16", "f16"] as const) {
    gpuTest(`CUDA ${label} ${dtype}: prefill (<= 8 tokens) + decode logits = CPU (fp32 path)`, () => {
      const { cpu, gpu } = pair(shape, dtype, 7);
      assert.equal(gpu.device, "cuda");
      const a = cpu.createSequence(), b = gpu.createSequence();
      let tok = ids(6, shape.V, 3);
      for (let step = 0; step < 10; step++) {
        const want = cpu.forward([{ seq: a, tokens: tok, adapter: -1 }]);
        const got = gpu.forward([{ seq: b, tokens: tok, adapter: -1 }]);
        assertClose(got, want, FP32_TOL, `step ${step}`);
        tok = Int32Array.of((step * 37 + 11) % shape.V);
      }
      assert.equal(gpu.sequenceLength(b), cpu.sequenceLength(a));
      const g = gpu.cudaGraphStats()!;
      assert.equal(g.captured, 1, "one decode signature → one captured graph");
      assert.equal(g.launches, 9);
      disposeAll(cpu, gpu);
    });
  }
}

gpuTest("CUDA llama nf4: long prefill (bf16 GEMM), allLogits, within the bf16 bound", () => {
  const { cpu, gpu } = pair(LLAMA, "nf4", 9);
  const tok = ids(29, LLAMA.V, 5);
  const want = cpu.forward([{ seq: cpu.createSequence(), tokens: tok, adapter: -1 }], { allLogits: true });
  const got = gpu.forward([{ seq: gpu.createSequence(), tokens: tok, adapter: -1 }], { allLogits: true });
  assertClose(got, want, BF16_TOL, "allLogits");
  disposeAll(cpu, gpu);
});

gpuTest("CUDA llama hd 32: prefill rows on the flash attention kernel (several tiles, a continuation chunk) = CPU within the bf16 bound", () => {
  const { cfg, weights } = makeModel(LLAMA_HD32, "nf4", 21);
  const opts = { maxSequences: 2, maxContext: 160 };
  const cpu = new NativeModel(cfg, weights, { ...opts, device: "cpu" });
  const gpu = new NativeModel(cfg, weights, { ...opts, device: "cuda" });
  const simt = simtAttentionModel(cfg, weights, opts);  // prefill on the SIMT kernel
  const seqs = [cpu, gpu, simt].map((m) => m.createSequence());
  // a 137-token prompt (tiles of 64, 64, 9), a 20-token continuation (a tile at positions 137..156), a decode step
  for (const [what, tok] of [["prompt", ids(137, LLAMA_HD32.V, 7)], ["continuation", ids(20, LLAMA_HD32.V, 8)], ["decode", ids(1, LLAMA_HD32.V, 9)]] as const) {
    const [want, got, ref] = [cpu, gpu, simt].map((m, i) => m.forward([{ seq: seqs[i]!, tokens: tok, adapter: -1 }], { allLogits: true }));
    assertClose(got!, want!, BF16_TOL, `flash ${what}`);
    assertClose(ref!, want!, BF16_TOL, `SIMT ${what}`);
    if (what !== "decode") assert.notDeepEqual(got, ref, `${what}: the flash kernel ran (TF32 differs from SIMT fp32 in some bits)`);
  }
  const text = ids(150, LLAMA_HD32.V, 10);  // crossEntropy's private prefill takes the flash kernel too
  const ce = [cpu, gpu].map((m) => m.crossEntropy(text, -1));
  assert.ok(Math.abs(ce[1]!.loss - ce[0]!.loss) <= BF16_TOL * Math.abs(ce[0]!.loss), `crossEntropy ${ce[1]!.loss} vs ${ce[0]!.loss}`);
  disposeAll(cpu, gpu, simt);
});

gpuTest("CUDA: a mixed batch with 2 adapters + base = each row alone, and = the CPU batch", () => {
  const { cpu, gpu } = pair(LLAMA, "nf4", 11);
  for (const m of [cpu, gpu]) {
    m.setAdapter(3, makeAdapter(LLAMA, 1, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], 4));
    m.setAdapter(0, makeAdapter(LLAMA, 2, ["self_attn.o_proj", "mlp.gate_proj"], 8));
  }
  const prompts = [ids(3, LLAMA.V, 1), ids(2, LLAMA.V, 2), ids(3, LLAMA.V, 3)];
  const adapters = [3, -1, 0];
  // batch: every row prefilled together (8 tokens), then mixed decode / prefill steps
  const seqs = prompts.map(() => gpu.createSequence());
  const cseqs = prompts.map(() => cpu.createSequence());
  const batch = gpu.forward(prompts.map((tokens, i) => ({ seq: seqs[i]!, tokens, adapter: adapters[i]! })));
  const cbatch = cpu.forward(prompts.map((tokens, i) => ({ seq: cseqs[i]!, tokens, adapter: adapters[i]! })));
  assertClose(batch, cbatch, FP32_TOL, "batch vs CPU batch");
  // one at a time on fresh sequences
  const V = LLAMA.V;
  prompts.forEach((tokens, i) => {
    const s = gpu.createSequence();
    const alone = gpu.forward([{ seq: s, tokens, adapter: adapters[i]! }]);
    assertClose(batch.slice(i * V, (i + 1) * V), alone, FP32_TOL, `row ${i} alone`);
    gpu.dropSequence(s);
  });
  // decode row 0 + a 2-token prefill on row 1 + decode row 2, twice (mixed prefill/decode)
  for (let step = 0; step < 2; step++) {
    const rows = [Int32Array.of(5 + step), Int32Array.of(7, 8 + step), Int32Array.of(9 + step)];
    const got = gpu.forward(rows.map((tokens, i) => ({ seq: seqs[i]!, tokens, adapter: adapters[i]! })));
    const want = cpu.forward(rows.map((tokens, i) => ({ seq: cseqs[i]!, tokens, adapter: adapters[i]! })));
    assertClose(got, want, FP32_TOL, `mixed step ${step}`);
  }
  // replacing an adapter changes the result exactly as on the CPU (captured graphs are dropped)
  const decodeAll = (m: NativeModel, ss: number[]) =>
    m.forward(ss.map((seq, i) => ({ seq, tokens: Int32Array.of(4), adapter: adapters[i]! })));
  assertClose(decodeAll(gpu, seqs), decodeAll(cpu, cseqs), FP32_TOL, "decode before replacement");
  for (const m of [cpu, gpu]) m.setAdapter(3, makeAdapter(LLAMA, 5, ["mlp.up_proj"], 2));
  assertClose(decodeAll(gpu, seqs), decodeAll(cpu, cseqs), FP32_TOL, "decode after replacement");
  for (const m of [cpu, gpu]) m.removeAdapter(0);
  assert.throws(() => gpu.forward([{ seq: seqs[2]!, tokens: Int32Array.of(1), adapter: 0 }]), NotFound);
  disposeAll(cpu, gpu);
});

gpuTest("CUDA: decode steps over 6 adapters (ranks 1..8, different modules) in one batch = CPU; a 70-token two-adapter prefill too", () => {
  // Short steps run every adapter segment's LoRA in two launches per module (loraSegmentsForward),
  // long ones (> 64 tokens) a GEMM pair per segment: both against the CPU engine.
  const { cpu, gpu } = pair(LLAMA, "nf4", 29, { maxSequences: 8, maxContext: 48 });
  const all = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
  const sets = [all, ["self_attn.q_proj", "self_attn.v_proj"], ["mlp.down_proj"], all.slice(2, 6), ["self_attn.k_proj", "mlp.up_proj"], all];
  const ranks = [8, 4, 1, 3, 2, 5];
  for (const m of [cpu, gpu]) sets.forEach((mods, i) => m.setAdapter(i, makeAdapter(LLAMA, 40 + i, mods, ranks[i]!)));
  const adapters = [5, -1, 0, 3, 1, 4, 2, 0];  // rows; two rows share adapter 0
  const [cs, gs] = [cpu, gpu].map((m) => adapters.map(() => m.createSequence()));
  // every step <= 8 tokens: the fp32 GEMV path, so the CPU's function to FP32_TOL
  const step = (tok: (i: number) => Int32Array, what: string) => {
    const rows = (ss: number[]) => adapters.map((adapter, i) => ({ seq: ss[i]!, tokens: tok(i), adapter }));
    assertClose(gpu.forward(rows(gs!)), cpu.forward(rows(cs!)), FP32_TOL, what);
  };
  for (let k = 0; k < 5; k++) step((i) => Int32Array.of((k * 11 + i * 5) % LLAMA.V), `step ${k}`);
  assert.ok(gpu.cudaGraphStats()!.launches >= 3, "the decode steps replayed a graph");
  const long = [Int32Array.from(ids(40, LLAMA.V, 60)), Int32Array.from(ids(30, LLAMA.V, 61))];  // 70 tokens: the GEMM path
  const longRows = (ss: number[]) => long.map((tokens, i) => ({ seq: ss[i]!, tokens, adapter: [0, 3][i]! }));
  const [fresh, gfresh] = [cpu, gpu].map((m) => { for (const s of m === cpu ? cs! : gs!) m.dropSequence(s); return [m.createSequence(), m.createSequence()]; });
  assertClose(gpu.forward(longRows(gfresh!), { allLogits: true }), cpu.forward(longRows(fresh!), { allLogits: true }), BF16_TOL, "70-token prefill");
  disposeAll(cpu, gpu);
});

gpuTest("CUDA forwardSample: tokens picked on the device = sampleToken (CPU) over the downloaded logits, graphs and eager, mixed adapters", () => {
  const { cfg, weights } = makeModel(LLAMA_ODD, "nf4", 23);
  for (const cudaGraphs of [true, false]) {
    const gpu = new NativeModel(cfg, weights, { device: "cuda", maxSequences: 8, maxContext: 40, cudaGraphs });
    gpu.setAdapter(1, makeAdapter(LLAMA_ODD, 4, ["self_attn.q_proj", "mlp.down_proj"], 3));
    checkForwardSample(gpu, LLAMA_ODD.V, [1, -1, -1, 1]);
    if (cudaGraphs) assert.ok(gpu.cudaGraphStats()!.launches >= 10, "the decode steps replayed graphs");
    gpu.dispose();
  }
});

gpuTest("CUDA: KV-cache decode = recomputation without a cache", () => {
  const { cpu, gpu } = pair(LLAMA, "nf4", 13);
  const tok = ids(8, LLAMA.V, 8), V = LLAMA.V;
  const s = gpu.createSequence();
  const steps: Float32Array[] = [];
  for (let i = 0; i < tok.length; i++) steps.push(gpu.forward([{ seq: s, tokens: tok.subarray(i, i + 1), adapter: -1 }]).slice());
  const all = gpu.forward([{ seq: gpu.createSequence(), tokens: tok, adapter: -1 }], { allLogits: true });
  steps.forEach((l, i) => assertClose(l, all.slice(i * V, (i + 1) * V), FP32_TOL, `position ${i}`));
  disposeAll(cpu, gpu);
});

gpuTest("CUDA graphs: replayed decode steps are bit-identical to eager launches", () => {
  const { cfg, weights } = makeModel(LLAMA, "nf4", 17);
  const graphs = new NativeModel(cfg, weights, { device: "cuda", maxSequences: 2, maxContext: 40 });
  const eager = new NativeModel(cfg, weights, { device: "cuda", maxSequences: 2, maxContext: 40, cudaGraphs: false });
  const adapter = makeAdapter(LLAMA, 3, ["self_attn.k_proj", "mlp.up_proj"], 4);
  graphs.setAdapter(1, adapter);
  eager.setAdapter(1, adapter);
  const sg = [graphs.createSequence(), graphs.createSequence()], se = [eager.createSequence(), eager.createSequence()];
  const prompt = ids(5, LLAMA.V, 4);
  for (const [m, s] of [[graphs, sg], [eager, se]] as const) {
    m.forward([{ seq: s[0]!, tokens: prompt, adapter: 1 }, { seq: s[1]!, tokens: prompt, adapter: -1 }]);
  }
  for (let step = 0; step < 6; step++) {
    const tok = Int32Array.of((step * 13) % LLAMA.V);
    const rows = (s: number[]) => [{ seq: s[0]!, tokens: tok, adapter: 1 }, { seq: s[1]!, tokens: tok, adapter: -1 }];
    assert.deepEqual(graphs.forward(rows(sg)), eager.forward(rows(se)), `step ${step}`);
    // batch 1 too (another graph signature)
    assert.deepEqual(graphs.forward([{ seq: sg[1]!, tokens: tok, adapter: -1 }]), eager.forward([{ seq: se[1]!, tokens: tok, adapter: -1 }]));
  }
  assert.deepEqual(graphs.cudaGraphStats(), { captured: 2, launches: 12 });
  assert.deepEqual(eager.cudaGraphStats(), { captured: 0, launches: 0 });
  disposeAll(graphs, eager);
});

gpuTest("CUDA: the KV pool grows under live sequences; truncate; slots and context limits", () => {
  const { cpu, gpu } = pair(LLAMA, "f32", 19, { maxSequences: 5, maxContext: 20 });
  const a = gpu.createSequence(), ca = cpu.createSequence();
  const p = ids(6, LLAMA.V, 6);
  gpu.forward([{ seq: a, tokens: p, adapter: -1 }]);
  cpu.forward([{ seq: ca, tokens: p, adapter: -1 }]);
  const before = gpu.residentBytes();
  const more = [1, 2, 3, 4].map(() => gpu.createSequence());  // pool 1 → 2 → 4 → 5 slots, contents copied
  assert.ok(gpu.residentBytes() > before);
  assert.throws(() => gpu.createSequence(), ResourceExhausted);
  const t1 = Int32Array.of(3);
  assertClose(gpu.forward([{ seq: a, tokens: t1, adapter: -1 }]), cpu.forward([{ seq: ca, tokens: t1, adapter: -1 }]), FP32_TOL, "after growth");
  // truncate back to 4 tokens and decode a different token: = CPU doing the same
  gpu.truncateSequence(a, 4);
  cpu.truncateSequence(ca, 4);
  const t2 = Int32Array.of(9);
  assertClose(gpu.forward([{ seq: a, tokens: t2, adapter: -1 }]), cpu.forward([{ seq: ca, tokens: t2, adapter: -1 }]), FP32_TOL, "after truncate");
  assert.equal(gpu.sequenceLength(a), 5);
  assert.throws(() => gpu.forward([{ seq: a, tokens: ids(16, LLAMA.V, 1), adapter: -1 }]), ResourceExhausted);
  assert.throws(() => gpu.forward([{ seq: a, tokens: Int32Array.of(LLAMA.V), adapter: -1 }]), InvalidArgument);
  assert.throws(() => gpu.forward([{ seq: more[0]!, tokens: t1, adapter: 4 }]), NotFound);
  gpu.dropSequence(more[3]!);
  assert.equal(gpu.createSequence(), more[3]);
  disposeAll(cpu, gpu);
  assert.throws(() => gpu.createSequence(), FailedPrecondition);
});

gpuTest("CUDA crossEntropy = CPU (fp32 rows: 1e-4; bf16 lm_head GEMM rows: bf16 bound)", () => {
  const { cpu, gpu } = pair(LLAMA, "nf4", 23);
  gpu.setAdapter(0, makeAdapter(LLAMA, 9, ["self_attn.q_proj", "mlp.down_proj"], 4));
  cpu.setAdapter(0, makeAdapter(LLAMA, 9, ["self_attn.q_proj", "mlp.down_proj"], 4));
  for (const [n, tol] of [[6, 1e-4], [30, BF16_TOL]] as const) {
    for (const adapter of [-1, 0]) {
      const tok = ids(n, LLAMA.V, n);
      const want = cpu.crossEntropy(tok, adapter), got = gpu.crossEntropy(tok, adapter);
      assert.equal(got.tokens, want.tokens);
      assert.ok(Math.abs(got.loss - want.loss) <= tol * Math.max(1, want.loss), `T=${n} adapter ${adapter}: ${got.loss} vs ${want.loss}`);
    }
  }
  disposeAll(cpu, gpu);
});

for (const [label, shape] of [["OPT pre-LN", OPT_PRE], ["OPT post-LN", OPT_POST]] as const) {
  gpuTest(`CUDA ${label} (biases, learned positions, tied, relu): prefill + decode = CPU`, () => {
    const { cpu, gpu } = pair(shape, "nf4", 29);
    const ad = makeAdapter(shape, 4, ["self_attn.q_proj", "fc1"], 4);
    cpu.setAdapter(0, ad);
    gpu.setAdapter(0, ad);
    const a = cpu.createSequence(), b = gpu.createSequence();
    let tok = ids(7, shape.V, 2);
    for (let step = 0; step < 6; step++) {
      assertClose(gpu.forward([{ seq: b, tokens: tok, adapter: 0 }]), cpu.forward([{ seq: a, tokens: tok, adapter: 0 }]), FP32_TOL, `step ${step}`);
      tok = Int32Array.of((step * 5 + 1) % shape.V);
    }
    const ce = ids(12, shape.V, 3);
    assert.ok(Math.abs(gpu.crossEntropy(ce, -1).loss - cpu.crossEntropy(ce, -1).loss) <= BF16_TOL * 4);
    disposeAll(cpu, gpu);
  });
}
