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
import { NativeModel, cudaInfo, quantizeNf4 } from "../src/index.js";
import type { EngineAdapter, EngineConfig, EngineOptions, WeightTensor } from "../src/index.js";
import { rng } from "./random.js";

const FP32_TOL = 2e-4;
const BF16_TOL = 2 ** -7 * 4;

// ---- random models ----------------------------------------------------------------------------
const rand = (n: number, r: () => number, amp: number) => Float32Array.from({ length: n }, () => amp * (2 * r() - 1));
const asBytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
type DType = "f32" | "nf4" | "bf16" | "f16";

function toHalf(x: number): number {  // round to nearest for the small normal values used here
  const f = new Float32Array([x]), b = new Uint32Array(f.buffer)[0]!;
  const sign = (b >>> 16) & 0x8000, e = ((b >>> 23) & 0xff) - 127 + 15, m = b & 0x7fffff;
  if (e <= 0) return sign;
  return sign | (e << 10) | ((m + 0x1000) >>> 13);
}
function tensor(a: Float32Array, shape: number[], dtype: DType): WeightTensor {
  if (dtype === "f32") return { dtype, shape, data: asBytes(a) };
  if (dtype === "nf4") {
    const q = quantizeNf4(a, "f32", a.length, 64);
    return { dtype, shape, data: q.packed, absmax: q.absmax, blocksize: 64 };
  }
  const u = new Uint16Array(a.length);
  const bits = new Uint32Array(a.buffer, a.byteOffset, a.length);
  for (let i = 0; i < a.length; i++) u[i] = dtype === "bf16" ? bits[i]! >>> 16 : toHalf(a[i]!);
  return { dtype, shape, data: asBytes(u) };
}

interface Shape {
  arch: "llama" | "opt";
  H: number; I: number; L: number; nh: number; nkv: number; hd: number; V: number;
  tied?: boolean; preLN?: boolean; bias?: boolean;
}
const LLAMA: Shape = { arch: "llama", H: 64, I: 96, L: 2, nh: 4, nkv: 2, hd: 16, V: 97 };
// K not a multiple of 32 anywhere (generic GEMV), hd 12, MHA, biases on q/k/v
const LLAMA_ODD: Shape = { arch: "llama", H: 36, I: 50, L: 2, nh: 3, nkv: 3, hd: 12, V: 61, bias: true, tied: true };
const OPT_PRE: Shape = { arch: "opt", H: 64, I: 128, L: 2, nh: 4, nkv: 4, hd: 16, V: 83, tied: true, preLN: true };
const OPT_POST: Shape = { ...OPT_PRE, preLN: false };

function makeModel(s: Shape, dtype: DType, seed: number): { cfg: EngineConfig; weights: Record<string, WeightTensor> } {
  const r = rng(seed);
  const opt = s.arch === "opt";
  const cfg: EngineConfig = {
    arch: s.arch, hiddenSize: s.H, intermediateSize: s.I, numLayers: s.L, numHeads: s.nh, numKvHeads: s.nkv,
    headDim: s.hd, vocabSize: s.V, maxPositions: 64, normEps: 1e-5, ropeTheta: 10000, ropeScaling: null,
    hiddenAct: opt ? "relu" : "silu", tiedEmbeddings: s.tied ?? false, qkvBias: opt || (s.bias ?? false),
    oBias: opt, mlpBias: opt, doLayerNormBefore: s.preLN ?? true,
  };
  const w: Record<string, WeightTensor> = {};
  const lin = (name: string, out: number, inp: number, bias: boolean) => {
    w[`${name}.weight`] = tensor(rand(out * inp, r, 1 / Math.sqrt(inp)), [out, inp], dtype);
    if (bias) w[`${name}.bias`] = tensor(rand(out, r, 0.1), [out], "f32");
  };
  const norm = (name: string, bias: boolean) => {
    w[`${name}.weight`] = tensor(Float32Array.from(rand(s.H, r, 0.2), (x) => 1 + x), [s.H], "f32");
    if (bias) w[`${name}.bias`] = tensor(rand(s.H, r, 0.1), [s.H], "f32");
  };
  w.embed_tokens = tensor(rand(s.V * s.H, r, 1), [s.V, s.H], dtype === "nf4" ? "f32" : dtype);
  if (!cfg.tiedEmbeddings) w.lm_head = tensor(rand(s.V * s.H, r, 1 / Math.sqrt(s.H)), [s.V, s.H], dtype);
  if (opt) w.embed_positions = tensor(rand((64 + 2) * s.H, r, 0.5), [66, s.H], "f32");
  if (!opt || cfg.doLayerNormBefore) norm("norm", opt);
  const q = s.nh * s.hd, kv = s.nkv * s.hd;
  for (let l = 0; l < s.L; l++) {
    const p = `layers.${l}.`;
    lin(`${p}self_attn.q_proj`, q, s.H, cfg.qkvBias);
    lin(`${p}self_attn.k_proj`, kv, s.H, cfg.qkvBias);
    lin(`${p}self_attn.v_proj`, kv, s.H, cfg.qkvBias);
    if (opt) {
      lin(`${p}self_attn.out_proj`, s.H, q, true);
      lin(`${p}fc1`, s.I, s.H, true);
      lin(`${p}fc2`, s.H, s.I, true);
      norm(`${p}self_attn_layer_norm`, true);
      norm(`${p}final_layer_norm`, true);
    } else {
      lin(`${p}self_attn.o_proj`, s.H, q, false);
      lin(`${p}mlp.gate_proj`, s.I, s.H, false);
      lin(`${p}mlp.up_proj`, s.I, s.H, false);
      lin(`${p}mlp.down_proj`, s.H, s.I, false);
      norm(`${p}input_layernorm`, false);
      norm(`${p}post_attention_layernorm`, false);
    }
  }
  return { cfg, weights: w };
}

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

// ---- comparison helpers ---------------------------------------------------------------------------
const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
};
function assertClose(got: Float32Array, want: Float32Array, rel: number, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  const tol = rel * Math.max(1, maxAbs(want));
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i]! - want[i]!);
    if (!(d <= tol)) assert.fail(`${what}[${i}]: got ${got[i]}, want ${want[i]} (|diff| ${d} > ${tol})`);
  }
}
const ids = (n: number, V: number, seed: number) => {
  const r = rng(seed);
  return Int32Array.from({ length: n }, () => Math.floor(r() * V));
};

/** The same model on both engines (the weights object is shared: the CPU engine references it). */
function pair(s: Shape, dtype: DType, seed: number, options: EngineOptions = {}): { cpu: NativeModel; gpu: NativeModel } {
  const { cfg, weights } = makeModel(s, dtype, seed);
  return {
    cpu: new NativeModel(cfg, weights, { maxSequences: 4, maxContext: 48, ...options, device: "cpu" }),
    gpu: new NativeModel(cfg, weights, { maxSequences: 4, maxContext: 48, ...options, device: "cuda" }),
  };
}
function disposeAll(...ms: NativeModel[]): void {
  for (const m of ms) m.dispose();
}

const info = cudaInfo();
/** A test that needs a GPU: skipped with the reason when there is none. */
function gpuTest(name: string, fn: () => void): void {
  test(name, (t) => {
    if (!info.available) {
      t.skip(`no CUDA device: ${info.reason}`);
      return;
    }
    fn();
  });
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

gpuTest("CUDA: LoRA training on a cuda model is refused (FailedPrecondition, no CPU fallback)", () => {
  const { cfg, weights } = makeModel(LLAMA, "nf4", 31);
  const m = new NativeModel(cfg, weights, { device: "cuda", maxSequences: 1, maxContext: 16 });
  assert.throws(
    () => m.initLora(0, { targets: ["layers.0.self_attn.q_proj"], rank: 4, alpha: 8, useRslora: false, dropout: 0, seed: 1n }),
    (e: unknown) => e instanceof FailedPrecondition && /training on CUDA is not implemented yet/.test(e.message),
  );
  m.dispose();
});
