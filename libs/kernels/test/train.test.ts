// LoRA training on the native engine (NativeModel.initLora / trainForwardBackward / evalLoss /
// adamwStep / zeroGrad / getLoraState / setLoraState), on tiny random models:
//  - Llama (GQA, head_dim 8 > hidden/heads, qkv bias, NF4 / bf16 / f32 linears) and OPT (pre-LN and post-LN): the loss equals a
//    float64 TypeScript reference forward, and the LoRA gradients dA, dB equal that reference's
//    own backward (a small reverse-mode autodiff, independent of the native math) and central finite
//    differences of the float64 loss — 1- and 2-layer models, with and without LoRA dropout;
//  - gradient checkpointing on/off give the same bits; packed segments = separate sequences;
//    dropout p = 0 = evalLoss, same seed = same result; accumulation; AdamW against a hand-computed
//    step; state get/set and a resumed run equal to an uninterrupted one, bit for bit;
//  - fine-tuning the real stories260K (NF4) for 30 steps on a few lines of text lowers the loss.
// Gradients are read back exactly with an AdamW step of lr 0, β1 = β2 = 0 (then m = g).
import { test } from "node:test";
import assert from "node:assert/strict";
import { FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import { NativeModel, decodeWeight, trainOps } from "../src/index.js";
import type { EngineConfig, LoraState, TrainBatchInput, WeightTensor } from "../src/index.js";
import { assertGradClose, bf16Tensor, erf, f32Tensor, nf4Tensor, rand } from "./helpers.js";
import { rng } from "./random.js";
import { haveStories, storiesBatch, storiesNf4 } from "./stories.js";
import { LLAMA_LINS, OPT_LINS, gradsOf, makeBatch } from "./train-fixtures.js";

// ---- helpers ----------------------------------------------------------------------------------
function assertGrad(a: ArrayLike<number>, b: ArrayLike<number>, what: string, rtol = 1e-3, atol = 1e-7): void {
  assertGradClose(a, b, what, rtol, atol);
}
const relClose = (a: number, b: number, tol: number, what: string) =>
  assert.ok(Math.abs(a - b) <= tol * Math.max(1, Math.abs(b)), `${what}: ${a} vs ${b}`);

// ---- tiny random models -----------------------------------------------------------------------
/** Module stream ids as the engine numbers them (layer·7 + q,k,v,o,gate,up,down; OPT fc1 = up, fc2 = down). */
function streamOf(cfg: EngineConfig, name: string): number {
  const m = /^layers\.(\d+)\.(.+)$/.exec(name)!;
  const l = Number(m[1]);
  const idx = cfg.arch === "llama" ? LLAMA_LINS.indexOf(m[2]!) : [0, 1, 2, 3, 5, 6][OPT_LINS.indexOf(m[2]!)]!;
  return l * 7 + idx;
}

interface Tiny {
  cfg: EngineConfig;
  tensors: Record<string, WeightTensor>;
  /** every tensor's values as the engine sees them (NF4 / bf16 decoded) */
  vals: Map<string, Float32Array>;
  targets: string[];
  dims: Map<string, [number, number]>; // [out, in]
}

function tinyModel(kind: "llama" | "opt" | "opt-post", layers: number, seed: number): Tiny {
  const r = rng(seed);
  const llama = kind === "llama";
  const cfg: EngineConfig = llama
    ? { arch: "llama", hiddenSize: 16, intermediateSize: 24, numLayers: layers, numHeads: 4, numKvHeads: 2, headDim: 8, vocabSize: 37,
        maxPositions: 64, normEps: 1e-5, ropeTheta: 10000, ropeScaling: null, hiddenAct: "silu", tiedEmbeddings: false,
        qkvBias: true, oBias: false, mlpBias: false }
    : { arch: "opt", hiddenSize: 16, intermediateSize: 24, numLayers: layers, numHeads: 4, numKvHeads: 4, headDim: 4, vocabSize: 37,
        maxPositions: 16, normEps: 1e-5, ropeTheta: 10000, ropeScaling: null, hiddenAct: kind === "opt" ? "relu" : "gelu",
        tiedEmbeddings: true, qkvBias: true, oBias: true, mlpBias: true, doLayerNormBefore: kind === "opt" };
  const H = cfg.hiddenSize, I = cfg.intermediateSize, q = cfg.numHeads * cfg.headDim, kv = cfg.numKvHeads * cfg.headDim;
  const tensors: Record<string, WeightTensor> = {};
  const vals = new Map<string, Float32Array>();
  const dims = new Map<string, [number, number]>();
  const targets: string[] = [];
  const put = (name: string, a: Float32Array, shape: number[], dtype: "f32" | "bf16" | "nf4" = "f32") => {
    const t = dtype === "nf4" ? nf4Tensor(a, shape) : dtype === "bf16" ? bf16Tensor(a, shape) : f32Tensor(a, shape);
    tensors[name] = t;
    vals.set(name, shape.length === 2 ? decodeWeight(t, 0, shape[0]! * shape[1]!) : a);
  };
  put("embed_tokens", rand(cfg.vocabSize * H, r), [cfg.vocabSize, H]);
  if (!cfg.tiedEmbeddings) put("lm_head", rand(cfg.vocabSize * H, r, -0.5, 0.5), [cfg.vocabSize, H]);
  if (!llama) put("embed_positions", rand((cfg.maxPositions + 2) * H, r, -0.5, 0.5), [cfg.maxPositions + 2, H]);
  if (kind !== "opt-post") {
    put("norm.weight", rand(H, r, 0.7, 1.3), [H]);
    if (!llama) put("norm.bias", rand(H, r, -0.2, 0.2), [H]);
  }
  for (let l = 0; l < layers; l++) {
    const p = `layers.${l}.`;
    const lin = (name: string, o: number, i: number, bias: boolean, dtype: "f32" | "bf16" | "nf4" = "f32") => {
      put(`${p}${name}.weight`, rand(o * i, r, -1.5 / Math.sqrt(i), 1.5 / Math.sqrt(i)), [o, i], dtype);
      if (bias) put(`${p}${name}.bias`, rand(o, r, -0.2, 0.2), [o]);
      targets.push(`${p}${name}`);
      dims.set(`${p}${name}`, [o, i]);
    };
    if (llama) {
      lin("self_attn.q_proj", q, H, cfg.qkvBias, "nf4");
      lin("self_attn.k_proj", kv, H, cfg.qkvBias, "bf16");
      lin("self_attn.v_proj", kv, H, cfg.qkvBias);
      lin("self_attn.o_proj", H, q, cfg.oBias);
      lin("mlp.gate_proj", I, H, cfg.mlpBias);
      lin("mlp.up_proj", I, H, cfg.mlpBias);
      lin("mlp.down_proj", H, I, cfg.mlpBias, "nf4");
      put(`${p}input_layernorm.weight`, rand(H, r, 0.7, 1.3), [H]);
      put(`${p}post_attention_layernorm.weight`, rand(H, r, 0.7, 1.3), [H]);
    } else {
      lin("self_attn.q_proj", q, H, true, "nf4");
      lin("self_attn.k_proj", kv, H, true);
      lin("self_attn.v_proj", kv, H, true);
      lin("self_attn.out_proj", H, q, true);
      lin("fc1", I, H, true);
      lin("fc2", H, I, true, "nf4");
      for (const n of ["self_attn_layer_norm", "final_layer_norm"]) {
        put(`${p}${n}.weight`, rand(H, r, 0.7, 1.3), [H]);
        put(`${p}${n}.bias`, rand(H, r, -0.2, 0.2), [H]);
      }
    }
  }
  return { cfg, tensors, vals, targets, dims };
}


/** A LoRA state with random A and B (B = 0 after init would make dA vanish) and zero moments. */
function randomState(m: NativeModel, slot: number, seed: number): LoraState {
  const s = m.getLoraState(slot), r = rng(seed);
  for (const mod of Object.values(s.modules)) {
    mod.a.set(rand(mod.a.length, r, -0.3, 0.3));
    mod.b.set(rand(mod.b.length, r, -0.3, 0.3));
  }
  return s;
}

// ---- a tiny reverse-mode autodiff over float64 scalars ------------------------------------------
// Node i has value val[i] and parents par[off[i]..off[i+1]) with local partials der[…].
class Tape {
  val: number[] = [];
  off: number[] = [0];
  par: number[] = [];
  der: number[] = [];
  leaf(v: number): number {
    this.val.push(v);
    this.off.push(this.par.length);
    return this.val.length - 1;
  }
  node(v: number, ps: ArrayLike<number>, ds: ArrayLike<number>): number {
    for (let k = 0; k < ps.length; k++) {
      this.par.push(ps[k]!);
      this.der.push(ds[k]!);
    }
    return this.leaf(v);
  }
  v(i: number): number {
    return this.val[i]!;
  }
  /** d out / d node, for every node */
  grad(out: number): Float64Array {
    const g = new Float64Array(this.val.length);
    g[out] = 1;
    for (let i = out; i >= 0; i--) {
      const gi = g[i]!;
      if (gi === 0) continue;
      for (let k = this.off[i]!; k < this.off[i + 1]!; k++) g[this.par[k]!] += gi * this.der[k]!;
    }
    return g;
  }
}

interface RefLora {
  scaling: number;
  rank: number;
  a: Map<string, number[]>; // node ids [r·in]
  b: Map<string, number[]>; // node ids [out·r]
  masks: Map<string, Float32Array> | null; // drop(x) multipliers [N·in]
}

/**
 * The mean cross-entropy of the batch as a tape node: a straightforward float64 transcription of the
 * Hugging Face forward (Llama / OPT pre- and post-LN), LoRA with per-module dropout masks.
 */
function refLoss(t: Tape, m: Tiny, lora: RefLora | null, batch: TrainBatchInput): { loss: number; count: number } {
  const c = m.cfg, llama = c.arch === "llama", preLN = llama || c.doLayerNormBefore !== false;
  const H = c.hiddenSize, I = c.intermediateSize, nh = c.numHeads, nkv = c.numKvHeads, hd = c.headDim;
  const B = batch.batchSize, T = batch.seqLen, N = B * T, V = c.vocabSize;
  const W = (n: string) => m.vals.get(n)!;
  const pos = new Int32Array(N), start = new Int32Array(N);
  for (let b = 0; b < B; b++) {
    let run = 0;
    for (let tt = 0; tt < T; tt++) {
      const i = b * T + tt;
      if (tt > 0 && batch.segments && batch.segments[i] !== batch.segments[i - 1]) run = tt;
      pos[i] = tt - run;
      start[i] = run;
    }
  }
  // x: node ids [N, H]
  let x: number[] = [];
  const E = W("embed_tokens");
  for (let i = 0; i < N; i++)
    for (let e = 0; e < H; e++) {
      let v = E[batch.tokens[i]! * H + e]!;
      if (!llama) v += W("embed_positions")[(pos[i]! + 2) * H + e]!;
      x.push(t.leaf(v));
    }
  const norm = (xs: number[], w: Float32Array, bias: Float32Array | null): number[] => {
    const out: number[] = [];
    for (let i = 0; i < N; i++) {
      const row = xs.slice(i * H, (i + 1) * H);
      if (llama) {
        const ss = t.node(row.reduce((s, id) => s + t.v(id) ** 2, 0), row, row.map((id) => 2 * t.v(id)));
        const a = t.v(ss) / H + c.normEps;
        const inv = t.node(1 / Math.sqrt(a), [ss], [-0.5 * a ** -1.5 / H]);
        row.forEach((id, e) => out.push(t.node(t.v(id) * t.v(inv) * w[e]!, [id, inv], [t.v(inv) * w[e]!, t.v(id) * w[e]!])));
      } else {
        const mean = t.node(row.reduce((s, id) => s + t.v(id), 0) / H, row, row.map(() => 1 / H));
        const xc = row.map((id) => t.node(t.v(id) - t.v(mean), [id, mean], [1, -1]));
        const vr = t.node(xc.reduce((s, id) => s + t.v(id) ** 2, 0) / H, xc, xc.map((id) => (2 * t.v(id)) / H));
        const a = t.v(vr) + c.normEps;
        const rstd = t.node(1 / Math.sqrt(a), [vr], [-0.5 * a ** -1.5]);
        xc.forEach((id, e) => out.push(t.node(t.v(id) * t.v(rstd) * w[e]! + bias![e]!, [id, rstd], [t.v(rstd) * w[e]!, t.v(id) * w[e]!])));
      }
    }
    return out;
  };
  const linear = (xs: number[], name: string): number[] => {
    const w = W(`${name}.weight`), bias = m.vals.get(`${name}.bias`) ?? null;
    const [outF, inF] = m.dims.get(name)!;
    const A = lora?.a.get(name), Bm = lora?.b.get(name), mask = lora?.masks?.get(name);
    const out: number[] = [];
    for (let i = 0; i < N; i++) {
      const row = xs.slice(i * inF, (i + 1) * inF);
      let u: number[] = [];
      if (A && Bm) {
        const xd = mask ? row.map((id, e) => t.node(t.v(id) * mask[i * inF + e]!, [id], [mask[i * inF + e]!])) : row;
        for (let j = 0; j < lora!.rank; j++) {
          const aj = A.slice(j * inF, (j + 1) * inF);
          let s = 0;
          for (let e = 0; e < inF; e++) s += t.v(xd[e]!) * t.v(aj[e]!);
          u.push(t.node(s, [...xd, ...aj], [...aj.map((id) => t.v(id)), ...xd.map((id) => t.v(id))]));
        }
      }
      for (let o = 0; o < outF; o++) {
        const wr = w.subarray(o * inF, (o + 1) * inF);
        let s = bias ? bias[o]! : 0;
        for (let e = 0; e < inF; e++) s += t.v(row[e]!) * wr[e]!;
        let y = t.node(s, row, wr);
        if (A && Bm) {
          const s2 = lora!.scaling, bo = Bm.slice(o * lora!.rank, (o + 1) * lora!.rank);
          let d = 0;
          for (let j = 0; j < lora!.rank; j++) d += t.v(u[j]!) * t.v(bo[j]!);
          y = t.node(t.v(y) + s2 * d, [y, ...u, ...bo], [1, ...bo.map((id) => s2 * t.v(id)), ...u.map((id) => s2 * t.v(id))]);
        }
        out.push(y);
      }
    }
    return out;
  };
  const add = (a: number[], b: number[]) => a.map((id, k) => t.node(t.v(id) + t.v(b[k]!), [id, b[k]!], [1, 1]));
  const actNode = (id: number) => {
    const z = t.v(id);
    if (c.hiddenAct === "silu") {
      const sg = 1 / (1 + Math.exp(-z));
      return t.node(z * sg, [id], [sg * (1 + z * (1 - sg))]);
    }
    if (c.hiddenAct === "relu") return t.node(z > 0 ? z : 0, [id], [z > 0 ? 1 : 0]);
    const cdf = 0.5 * (1 + erf(z / Math.SQRT2));
    return t.node(z * cdf, [id], [cdf + z * Math.exp(-0.5 * z * z) / Math.sqrt(2 * Math.PI)]);
  };

  for (let l = 0; l < c.numLayers; l++) {
    const p = `layers.${l}.`;
    const n1 = llama ? "input_layernorm" : "self_attn_layer_norm", n2 = llama ? "post_attention_layernorm" : "final_layer_norm";
    const normL = (xs: number[], n: string) => norm(xs, W(`${p}${n}.weight`), m.vals.get(`${p}${n}.bias`) ?? null);
    const ain = preLN ? normL(x, n1) : x;
    let q = linear(ain, `${p}self_attn.q_proj`);
    let k = linear(ain, `${p}self_attn.k_proj`);
    const v = linear(ain, `${p}self_attn.v_proj`);
    const rope = (xs: number[], heads: number) => {
      const out = xs.slice();
      for (let i = 0; i < N; i++)
        for (let h = 0; h < heads; h++)
          for (let j = 0; j < hd / 2; j++) {
            const ang = pos[i]! / 10000 ** ((2 * j) / hd), cs = Math.cos(ang), sn = Math.sin(ang);
            const o1 = i * heads * hd + h * hd + j, o2 = o1 + hd / 2, a1 = xs[o1]!, a2 = xs[o2]!;
            out[o1] = t.node(t.v(a1) * cs - t.v(a2) * sn, [a1, a2], [cs, -sn]);
            out[o2] = t.node(t.v(a2) * cs + t.v(a1) * sn, [a1, a2], [sn, cs]);
          }
      return out;
    };
    if (llama) {
      q = rope(q, nh);
      k = rope(k, nkv);
    } else {
      q = q.map((id) => t.node(t.v(id) / Math.sqrt(hd), [id], [1 / Math.sqrt(hd)]));
    }
    const scale = llama ? 1 / Math.sqrt(hd) : 1;
    const att: number[] = new Array(N * nh * hd);
    for (let b = 0; b < B; b++)
      for (let h = 0; h < nh; h++) {
        const g = Math.floor(h / (nh / nkv));
        for (let tt = 0; tt < T; tt++) {
          const i = b * T + tt, j0 = b * T + start[i]!;
          const qi = q.slice(i * nh * hd + h * hd, i * nh * hd + (h + 1) * hd);
          const sc: number[] = [];
          for (let j = j0; j <= i; j++) {
            const kj = k.slice(j * nkv * hd + g * hd, j * nkv * hd + (g + 1) * hd);
            let d = 0;
            for (let e = 0; e < hd; e++) d += t.v(qi[e]!) * t.v(kj[e]!);
            sc.push(t.node(d * scale, [...qi, ...kj], [...kj.map((id) => scale * t.v(id)), ...qi.map((id) => scale * t.v(id))]));
          }
          const mx = Math.max(...sc.map((id) => t.v(id)));
          const ex = sc.map((id) => t.node(Math.exp(t.v(id) - mx), [id], [Math.exp(t.v(id) - mx)]));
          const sum = t.node(ex.reduce((s, id) => s + t.v(id), 0), ex, ex.map(() => 1));
          const pr = ex.map((id) => t.node(t.v(id) / t.v(sum), [id, sum], [1 / t.v(sum), -t.v(id) / t.v(sum) ** 2]));
          for (let e = 0; e < hd; e++) {
            const vs: number[] = [];
            for (let j = j0; j <= i; j++) vs.push(v[j * nkv * hd + g * hd + e]!);
            let s = 0;
            pr.forEach((pid, jj) => (s += t.v(pid) * t.v(vs[jj]!)));
            att[i * nh * hd + h * hd + e] = t.node(s, [...pr, ...vs], [...vs.map((id) => t.v(id)), ...pr.map((id) => t.v(id))]);
          }
        }
      }
    const r1 = add(x, linear(att, llama ? `${p}self_attn.o_proj` : `${p}self_attn.out_proj`));
    const mlpIn = preLN ? normL(r1, n2) : normL(r1, n1);
    let h: number[];
    if (llama) {
      const gt = linear(mlpIn, `${p}mlp.gate_proj`), up = linear(mlpIn, `${p}mlp.up_proj`);
      h = gt.map((id, kk) => {
        const a = actNode(id);
        return t.node(t.v(a) * t.v(up[kk]!), [a, up[kk]!], [t.v(up[kk]!), t.v(a)]);
      });
    } else {
      h = linear(mlpIn, `${p}fc1`).map(actNode);
    }
    const r2 = add(preLN ? r1 : mlpIn, linear(h, llama ? `${p}mlp.down_proj` : `${p}fc2`));
    x = preLN ? r2 : normL(r2, n2);
  }
  const hfin = m.vals.has("norm.weight") ? norm(x, W("norm.weight"), m.vals.get("norm.bias") ?? null) : x;
  const LM = c.tiedEmbeddings ? W("embed_tokens") : W("lm_head");
  const losses: number[] = [];
  for (let i = 0; i < N; i++) {
    const y = batch.labels[i]!;
    if (y === -100) continue;
    const row = hfin.slice(i * H, (i + 1) * H);
    const z = [];
    for (let o = 0; o < V; o++) {
      const wr = LM.subarray(o * H, (o + 1) * H);
      let s = 0;
      for (let e = 0; e < H; e++) s += t.v(row[e]!) * wr[e]!;
      z.push(t.node(s, row, wr));
    }
    const mx = Math.max(...z.map((id) => t.v(id)));
    const S = t.node(z.reduce((s, id) => s + Math.exp(t.v(id) - mx), 0), z, z.map((id) => Math.exp(t.v(id) - mx)));
    const lse = t.node(mx + Math.log(t.v(S)), [S], [1 / t.v(S)]);
    losses.push(t.node(t.v(lse) - t.v(z[y]!), [lse, z[y]!], [1, -1]));
  }
  const count = losses.length;
  const loss = t.node(losses.reduce((s, id) => s + t.v(id), 0) / count, losses, losses.map(() => 1 / count));
  return { loss, count };
}

/** Builds the reference LoRA leaves from a state; returns the tape, the leaves and the loss node. */
function refRun(m: Tiny, state: LoraState | null, batch: TrainBatchInput, dropout: { p: number; seed: bigint } | null) {
  const t = new Tape();
  let lora: RefLora | null = null;
  if (state) {
    lora = { scaling: state.scaling, rank: state.rank, a: new Map(), b: new Map(), masks: dropout && dropout.p > 0 ? new Map() : null };
    for (const [name, mod] of Object.entries(state.modules)) {
      lora.a.set(name, Array.from(mod.a, (v) => t.leaf(v)));
      lora.b.set(name, Array.from(mod.b, (v) => t.leaf(v)));
      if (lora.masks) {
        const inF = m.dims.get(name)![1], N = batch.batchSize * batch.seqLen;
        lora.masks.set(name, trainOps.dropout(new Float32Array(N * inF).fill(1), N, inF, dropout!.p, dropout!.seed, streamOf(m.cfg, name)));
      }
    }
  }
  const { loss, count } = refLoss(t, m, lora, batch);
  return { t, lora, loss, count };
}

function nativeOf(m: Tiny): NativeModel {
  return new NativeModel(m.cfg, m.tensors, { maxSequences: 2, maxContext: 16 });
}

// ---- the gradient checks ----------------------------------------------------------------------
const CASES: { kind: "llama" | "opt" | "opt-post"; layers: number; dropout: number }[] = [
  { kind: "llama", layers: 1, dropout: 0 },
  { kind: "llama", layers: 2, dropout: 0.25 },
  { kind: "opt", layers: 1, dropout: 0 },
  { kind: "opt", layers: 2, dropout: 0.25 },
  { kind: "opt-post", layers: 2, dropout: 0 },
];

for (const cs of CASES) {
  test(`${cs.kind} ${cs.layers} layer(s), dropout ${cs.dropout}: loss = float64 reference; dA, dB = reference backward and finite differences`, () => {
    const m = tinyModel(cs.kind, cs.layers, 11 + cs.layers);
    const nm = nativeOf(m);
    try {
      const B = 2, T = 6, gradScale = 0.7, seed = 1234n;
      const batch = makeBatch(m.cfg, B, T, 5);
      nm.initLora(3, { rank: 3, alpha: 6, useRslora: false, dropout: cs.dropout, targets: m.targets, seed: 7n });
      const state = randomState(nm, 3, 21);
      nm.setLoraState(3, state);
      assert.equal(state.scaling, 2);

      // evaluation loss (no dropout) against the reference forward, with LoRA and base-only
      const ev = nm.evalLoss(3, batch);
      const refEv = refRun(m, state, batch, null);
      assert.equal(ev.tokens, refEv.count);
      relClose(ev.loss, refEv.t.v(refEv.loss), 2e-5, "evalLoss vs reference");
      relClose(nm.evalLoss(-1, batch).loss, (() => { const r = refRun(m, null, batch, null); return r.t.v(r.loss); })(), 2e-5, "base evalLoss");

      // training step: loss and gradients (× gradScale)
      const res = nm.trainForwardBackward(3, batch, { dropoutSeed: seed, gradScale, checkpointing: true });
      const ref = refRun(m, state, batch, { p: cs.dropout, seed });
      relClose(res.loss, ref.t.v(ref.loss), 2e-5, "train loss vs reference");
      if (cs.dropout === 0) assert.equal(res.loss, ev.loss, "p = 0: the training forward is the evaluation forward");
      const g = ref.t.grad(ref.loss);
      const { g: got, norm } = gradsOf(nm, 3);
      let sq = 0;
      for (const name of m.targets) {
        const ga = ref.lora!.a.get(name)!.map((id) => gradScale * g[id]!);
        const gb = ref.lora!.b.get(name)!.map((id) => gradScale * g[id]!);
        assertGrad(got.get(name)!.a, ga, `${name} dA`);
        assertGrad(got.get(name)!.b, gb, `${name} dB`);
        for (const v of [...ga, ...gb]) sq += v * v;
      }
      relClose(norm, Math.sqrt(sq), 1e-4, "global grad norm");

      // central finite differences of the float64 loss, on a few entries of a few modules
      const r = rng(77);
      const mods = [m.targets[0]!, m.targets[3]!, m.targets[m.targets.length - 1]!];
      for (const name of mods) {
        for (const which of ["a", "b"] as const) {
          const arr = state.modules[name]![which];
          for (let s = 0; s < 3; s++) {
            const idx = Math.floor(r() * arr.length), h = 1e-5;
            const lossAt = (v: number) => {
              const st: LoraState = { ...state, modules: { ...state.modules, [name]: { ...state.modules[name]!, [which]: arr.slice() } } };
              st.modules[name]![which][idx] = v; // float32 storage: use a float32-exact step below
              const rr = refRun(m, st, batch, { p: cs.dropout, seed });
              return rr.t.v(rr.loss);
            };
            const x0 = arr[idx]!;
            const xp = Math.fround(x0 + h), xm = Math.fround(x0 - h);
            const fd = (gradScale * (lossAt(xp) - lossAt(xm))) / (xp - xm);
            const ad = gradScale * g[(which === "a" ? ref.lora!.a : ref.lora!.b).get(name)![idx]!]!;
            const nat = got.get(name)![which][idx]!;
            const scale = Math.max(...Array.from(got.get(name)![which], Math.abs), 1e-3);
            assert.ok(Math.abs(fd - ad) <= 1e-6 * scale + 1e-9, `${name}.${which}[${idx}]: FD ${fd} vs reference backward ${ad}`);
            assert.ok(Math.abs(fd - nat) <= 2e-3 * scale, `${name}.${which}[${idx}]: FD ${fd} vs native ${nat}`);
          }
        }
      }
    } finally {
      nm.dispose();
    }
  });
}

// ---- checkpointing, packing, dropout, accumulation ---------------------------------------------
test("gradient checkpointing on / off: the same loss and the same gradient bits (Llama and OPT, dropout on)", () => {
  for (const kind of ["llama", "opt", "opt-post"] as const) {
    const m = tinyModel(kind, 3, 31);
    const nm = nativeOf(m);
    try {
      nm.initLora(0, { rank: 4, alpha: 8, useRslora: true, dropout: 0.1, targets: m.targets, seed: 3n });
      nm.setLoraState(0, randomState(nm, 0, 4));
      const batch = makeBatch(m.cfg, 3, 9, 8);
      const opts = { dropoutSeed: 99n, gradScale: 1, checkpointing: true };
      const a = nm.trainForwardBackward(0, batch, opts);
      const ga = gradsOf(nm, 0);
      const b = nm.trainForwardBackward(0, batch, { ...opts, checkpointing: false });
      const gb = gradsOf(nm, 0);
      assert.equal(a.loss, b.loss);
      assert.equal(ga.norm, gb.norm);
      for (const [name, v] of ga.g) {
        assert.deepEqual(gb.g.get(name)!.a, v.a, `${kind} ${name} dA`);
        assert.deepEqual(gb.g.get(name)!.b, v.b, `${kind} ${name} dB`);
      }
      assert.ok(ga.norm > 0);
    } finally {
      nm.dispose();
    }
  }
});

test("packing: two examples packed into one row with segments = the same two examples as separate rows", () => {
  for (const kind of ["llama", "opt"] as const) {
    const m = tinyModel(kind, 2, 41);
    const nm = nativeOf(m);
    try {
      nm.initLora(0, { rank: 2, alpha: 4, useRslora: false, dropout: 0, targets: m.targets, seed: 5n });
      nm.setLoraState(0, randomState(nm, 0, 6));
      const r = rng(9), L1 = 5, L2 = 4, pad = 0;
      const e1 = Int32Array.from({ length: L1 }, () => Math.floor(r() * m.cfg.vocabSize));
      const e2 = Int32Array.from({ length: L2 }, () => Math.floor(r() * m.cfg.vocabSize));
      const labelsOf = (e: Int32Array) => Int32Array.from(e, (_, t) => (t + 1 < e.length ? e[t + 1]! : -100));
      // packed: [e1 e2] in one row of 9, segment ids 0 0 0 0 0 1 1 1 1
      const packed: TrainBatchInput = {
        tokens: Int32Array.from([...e1, ...e2]), labels: Int32Array.from([...labelsOf(e1), ...labelsOf(e2)]),
        batchSize: 1, seqLen: L1 + L2, segments: Int32Array.from([...new Array(L1).fill(0), ...new Array(L2).fill(1)]),
      };
      // separate rows, right-padded to 5
      const sep: TrainBatchInput = {
        tokens: Int32Array.from([...e1, ...e2, pad]), labels: Int32Array.from([...labelsOf(e1), ...labelsOf(e2), -100]),
        batchSize: 2, seqLen: L1,
      };
      const ep = nm.evalLoss(0, packed), es = nm.evalLoss(0, sep);
      assert.equal(ep.tokens, es.tokens);
      relClose(ep.loss, es.loss, 1e-6, `${kind} packed vs separate eval loss`);
      const tp = nm.trainForwardBackward(0, packed, { dropoutSeed: 1n, gradScale: 1, checkpointing: true });
      const gp = gradsOf(nm, 0);
      const ts = nm.trainForwardBackward(0, sep, { dropoutSeed: 1n, gradScale: 1, checkpointing: false });
      const gs = gradsOf(nm, 0);
      relClose(tp.loss, ts.loss, 1e-6, `${kind} packed vs separate train loss`);
      for (const [name, v] of gp.g) {
        assertGrad(v.a, gs.g.get(name)!.a, `${kind} ${name} dA packed vs separate`, 1e-4);
        assertGrad(v.b, gs.g.get(name)!.b, `${kind} ${name} dB packed vs separate`, 1e-4);
      }
      // without the segment ids the second example would see the first: the loss changes
      const { segments: _s, ...unsegmented } = packed;
      assert.notEqual(nm.evalLoss(0, unsegmented).loss, ep.loss);
    } finally {
      nm.dispose();
    }
  }
});

test("dropout: p = 0 equals evalLoss; the same seed gives the same loss and gradients, another seed does not", () => {
  const m = tinyModel("llama", 2, 51);
  const nm = nativeOf(m);
  try {
    const batch = makeBatch(m.cfg, 2, 7, 3);
    nm.initLora(0, { rank: 2, alpha: 4, useRslora: false, dropout: 0, targets: m.targets, seed: 1n });
    nm.setLoraState(0, randomState(nm, 0, 2));
    const ev = nm.evalLoss(0, batch);
    assert.equal(nm.trainForwardBackward(0, batch, { dropoutSeed: 5n, gradScale: 1, checkpointing: true }).loss, ev.loss);
    nm.zeroGrad(0);

    nm.initLora(1, { rank: 2, alpha: 4, useRslora: false, dropout: 0.3, targets: m.targets, seed: 1n });
    nm.setLoraState(1, randomState(nm, 1, 2));
    assert.equal(nm.evalLoss(1, batch).loss, ev.loss, "evaluation ignores dropout");
    const a = nm.trainForwardBackward(1, batch, { dropoutSeed: 5n, gradScale: 1, checkpointing: true });
    const ga = gradsOf(nm, 1);
    const b = nm.trainForwardBackward(1, batch, { dropoutSeed: 5n, gradScale: 1, checkpointing: false });
    const gb = gradsOf(nm, 1);
    const c = nm.trainForwardBackward(1, batch, { dropoutSeed: 6n, gradScale: 1, checkpointing: true });
    nm.zeroGrad(1);
    assert.equal(a.loss, b.loss);
    assert.notEqual(a.loss, ev.loss);
    assert.notEqual(c.loss, a.loss);
    for (const [name, v] of ga.g) assert.deepEqual(gb.g.get(name), v, name);
  } finally {
    nm.dispose();
  }
});

test("gradients accumulate (× gradScale): two calls at 0.5 = one call at 1, bit for bit; zeroGrad clears", () => {
  const m = tinyModel("opt", 2, 61);
  const nm = nativeOf(m);
  try {
    nm.initLora(0, { rank: 2, alpha: 2, useRslora: false, dropout: 0.2, targets: m.targets, seed: 1n });
    nm.setLoraState(0, randomState(nm, 0, 3));
    const batch = makeBatch(m.cfg, 2, 8, 4);
    const o = { dropoutSeed: 7n, checkpointing: true };
    nm.trainForwardBackward(0, batch, { ...o, gradScale: 1 });
    const one = gradsOf(nm, 0);
    nm.trainForwardBackward(0, batch, { ...o, gradScale: 0.5 });
    nm.trainForwardBackward(0, batch, { ...o, gradScale: 0.5 });
    const two = gradsOf(nm, 0);
    for (const [name, v] of one.g) assert.deepEqual(two.g.get(name), v, name);
    nm.trainForwardBackward(0, batch, { ...o, gradScale: 1 });
    nm.zeroGrad(0);
    assert.equal(gradsOf(nm, 0).norm, 0);
  } finally {
    nm.dispose();
  }
});

// ---- AdamW, state, resume ---------------------------------------------------------------------
test("adamwStep = torch AdamW by hand (clip by global norm, decoupled decay, bias correction); gradients zeroed", () => {
  const m = tinyModel("llama", 1, 71);
  const nm = nativeOf(m);
  try {
    nm.initLora(0, { rank: 2, alpha: 16, useRslora: false, dropout: 0, targets: m.targets, seed: 1n });
    const s0 = randomState(nm, 0, 5);
    const r = rng(6);
    for (const mod of Object.values(s0.modules)) {
      mod.ma.set(rand(mod.ma.length, r, -0.01, 0.01));
      mod.va.set(rand(mod.va.length, r, 0, 1e-4));
      mod.mb.set(rand(mod.mb.length, r, -0.01, 0.01));
      mod.vb.set(rand(mod.vb.length, r, 0, 1e-4));
    }
    nm.setLoraState(0, s0);
    const batch = makeBatch(m.cfg, 2, 6, 9);
    nm.trainForwardBackward(0, batch, { dropoutSeed: 1n, gradScale: 1, checkpointing: false });
    const { g, norm } = gradsOf(nm, 0);
    nm.trainForwardBackward(0, batch, { dropoutSeed: 1n, gradScale: 1, checkpointing: false }); // the same gradients again
    const o = { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.05, maxGradNorm: norm / 3, step: 4 };
    const res = nm.adamwStep(0, o);
    assert.equal(res.gradNorm, norm);
    const clip = o.maxGradNorm / (norm + 1e-6);
    const bc1 = 1 - o.beta1 ** o.step, bc2 = 1 - o.beta2 ** o.step;
    const s1 = nm.getLoraState(0);
    for (const name of m.targets) {
      for (const [pk, mk, vk, gk] of [["a", "ma", "va", "a"], ["b", "mb", "vb", "b"]] as const) {
        const p0 = s0.modules[name]![pk], m0 = s0.modules[name]![mk], v0 = s0.modules[name]![vk], gg = g.get(name)![gk];
        const ep = new Float64Array(p0.length), em = new Float64Array(p0.length), evv = new Float64Array(p0.length);
        for (let i = 0; i < p0.length; i++) {
          const gi = gg[i]! * clip;
          em[i] = o.beta1 * m0[i]! + (1 - o.beta1) * gi;
          evv[i] = o.beta2 * v0[i]! + (1 - o.beta2) * gi * gi;
          ep[i] = p0[i]! * (1 - o.lr * o.weightDecay) - (o.lr / bc1) * (em[i]! / (Math.sqrt(evv[i]!) / Math.sqrt(bc2) + o.eps));
        }
        assertGrad(s1.modules[name]![pk], ep, `${name}.${pk}`, 1e-5);
        assertGrad(s1.modules[name]![mk], em, `${name}.${mk}`, 1e-5);
        assertGrad(s1.modules[name]![vk], evv, `${name}.${vk}`, 1e-5);
      }
    }
    assert.equal(gradsOf(nm, 0).norm, 0, "adamwStep zeroes the gradients");
  } finally {
    nm.dispose();
  }
});

test("initLora (PEFT init), the trained slot serves forward(); state round trip; a resumed run = an uninterrupted run, bit for bit", () => {
  const m = tinyModel("llama", 2, 81);
  const spec = { rank: 4, alpha: 8, useRslora: false, dropout: 0.1, targets: m.targets, seed: 42n };
  const batches = [1, 2, 3, 4, 5, 6].map((s) => makeBatch(m.cfg, 2, 8, s));
  const adam = (step: number) => ({ lr: 5e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, maxGradNorm: 1, step });
  const run = (nm: NativeModel, from: number, to: number) => {
    for (let s = from; s < to; s++) {
      nm.trainForwardBackward(0, batches[s]!, { dropoutSeed: BigInt(100 + s), gradScale: 1, checkpointing: s % 2 === 0 });
      nm.adamwStep(0, adam(s + 1));
    }
  };
  const a = nativeOf(m), b = nativeOf(m);
  try {
    a.initLora(0, spec);
    const init = a.getLoraState(0);
    assert.equal(init.rank, 4);
    assert.equal(init.scaling, 2);
    assert.deepEqual(Object.keys(init.modules).sort(), [...m.targets].sort());
    for (const [name, mod] of Object.entries(init.modules)) {
      const inF = m.dims.get(name)![1], bound = 1 / Math.sqrt(inF);
      assert.ok(mod.a.every((v) => Math.abs(v) <= bound) && mod.a.some((v) => v !== 0), `${name}: A ~ U(-1/√in, 1/√in)`);
      assert.ok(mod.b.every((v) => v === 0) && mod.ma.every((v) => v === 0), `${name}: B = 0, moments 0`);
      assert.ok(Math.max(...Array.from(mod.a, Math.abs)) > 0.8 * bound, `${name}: A fills the range`);
    }
    b.initLora(0, spec);
    assert.deepEqual(b.getLoraState(0), init, "the seed fixes the init");
    // B = 0: the adapter changes nothing yet
    assert.equal(a.evalLoss(0, batches[0]!).loss, a.evalLoss(-1, batches[0]!).loss);

    run(a, 0, 6); // uninterrupted
    run(b, 0, 3);
    const mid = b.getLoraState(0);
    b.dispose();
    const c = nativeOf(m); // a fresh model: only the saved state survives
    try {
      c.initLora(0, { ...spec, seed: 999n });
      c.setLoraState(0, mid);
      run(c, 3, 6);
      assert.deepEqual(c.getLoraState(0), a.getLoraState(0), "resumed = uninterrupted");
    } finally {
      c.dispose();
    }

    // the trained slot serves inference: crossEntropy through forward() = evalLoss of the same tokens
    const tokens = batches[0]!.tokens.subarray(0, 8);
    const labels = Int32Array.from(tokens, (_, t) => (t + 1 < tokens.length ? tokens[t + 1]! : -100));
    const ce = a.crossEntropy(tokens, 0);
    const ev = a.evalLoss(0, { tokens, labels, batchSize: 1, seqLen: 8 });
    relClose(ce.loss, ev.loss, 1e-5, "crossEntropy vs evalLoss");
    assert.notEqual(ev.loss, a.evalLoss(-1, { tokens, labels, batchSize: 1, seqLen: 8 }).loss);
    // a JS-set adapter in another slot can be evaluated too
    const st = a.getLoraState(0);
    const modules: Record<string, { a: Float32Array; b: Float32Array; rank: number }> = {};
    for (const [name, mod] of Object.entries(st.modules)) modules[name] = { a: mod.a, b: mod.b, rank: st.rank };
    a.setAdapter(5, { scaling: st.scaling, modules });
    assert.equal(a.evalLoss(5, { tokens, labels, batchSize: 1, seqLen: 8 }).loss, ev.loss);
  } finally {
    a.dispose();
  }
});

test("training API errors: bad arguments, unknown slot, replaced adapter, disposed model", () => {
  const m = tinyModel("opt", 1, 91);
  const nm = nativeOf(m);
  const batch = makeBatch(m.cfg, 1, 4, 1);
  const opts = { dropoutSeed: 0n, gradScale: 1, checkpointing: true };
  const spec = { rank: 2, alpha: 4, useRslora: false, dropout: 0, targets: ["layers.0.fc1"], seed: 1n };
  assert.throws(() => nm.initLora(0, { ...spec, targets: ["layers.0.mlp.gate_proj"] }), InvalidArgument);
  assert.throws(() => nm.initLora(0, { ...spec, targets: ["layers.3.fc1"] }), InvalidArgument);
  assert.throws(() => nm.initLora(0, { ...spec, targets: ["layers.0.fc1", "layers.0.fc1"] }), InvalidArgument);
  assert.throws(() => nm.initLora(0, { ...spec, targets: [] }), InvalidArgument);
  assert.throws(() => nm.initLora(0, { ...spec, rank: 0 }), InvalidArgument);
  assert.throws(() => nm.initLora(0, { ...spec, dropout: 1 }), InvalidArgument);
  assert.throws(() => nm.trainForwardBackward(0, batch, opts), NotFound);
  nm.initLora(0, spec);
  assert.throws(() => nm.trainForwardBackward(0, { ...batch, labels: batch.labels.map(() => 37) }, opts), InvalidArgument);
  assert.throws(() => nm.trainForwardBackward(0, { ...batch, tokens: batch.tokens.map(() => -1) }, opts), InvalidArgument);
  assert.throws(() => nm.trainForwardBackward(0, { ...batch, seqLen: 5 }, opts), InvalidArgument);
  assert.throws(() => nm.trainForwardBackward(0, { ...batch, batchSize: 1, seqLen: 17, tokens: new Int32Array(17), labels: new Int32Array(17) }, opts), InvalidArgument, "beyond OPT's positions");
  assert.throws(() => nm.evalLoss(9, batch), NotFound);
  assert.throws(() => nm.adamwStep(0, { lr: -1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 0, step: 1 }), InvalidArgument);
  assert.throws(() => nm.adamwStep(0, { lr: 1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 0, step: 0 }), InvalidArgument);
  const st = nm.getLoraState(0);
  assert.throws(() => nm.setLoraState(0, { ...st, rank: 3 }), InvalidArgument);
  assert.throws(() => nm.setLoraState(0, { ...st, modules: {} }), InvalidArgument);
  assert.deepEqual(nm.trainForwardBackward(0, { ...batch, labels: batch.labels.map(() => -100) }, opts), { loss: 0, tokens: 0 });
  nm.removeAdapter(0);
  assert.throws(() => nm.trainForwardBackward(0, batch, opts), FailedPrecondition);
  nm.initLora(0, spec);
  nm.trainForwardBackward(0, batch, opts);
  nm.dispose();
  assert.throws(() => nm.trainForwardBackward(0, batch, opts), FailedPrecondition);
});

// ---- the real checkpoint: fine-tuning lowers the loss ------------------------------------------
test("stories260K (NF4 linears): 30 LoRA steps on a few lines of text drive the loss down", { skip: !haveStories }, () => {
  const { cfg, weights, targets } = storiesNf4();
  const batch = storiesBatch();
  const nm = new NativeModel(cfg, weights, { maxSequences: 1, maxContext: 64 });
  try {
    nm.initLora(0, { rank: 8, alpha: 16, useRslora: false, dropout: 0.05, targets, seed: 42n });
    const base = nm.evalLoss(-1, batch).loss;
    let first = 0, last = 0;
    for (let step = 1; step <= 30; step++) {
      const r = nm.trainForwardBackward(0, batch, { dropoutSeed: BigInt(step), gradScale: 1, checkpointing: true });
      if (step === 1) first = r.loss;
      last = r.loss;
      const { gradNorm } = nm.adamwStep(0, { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1, step });
      assert.ok(Number.isFinite(gradNorm) && gradNorm > 0);
    }
    const tuned = nm.evalLoss(0, batch).loss;
    assert.ok(Math.abs(first - base) < 0.05, `the first step runs the base model (B = 0, dropout only): ${first} vs ${base}`);
    assert.ok(last < 0.6 * first, `training loss ${first} → ${last}`);
    assert.ok(tuned < 0.6 * base, `eval loss base ${base} → tuned ${tuned}`);
  } finally {
    nm.dispose();
  }
});
