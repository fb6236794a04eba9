/**
 * A small reference implementation of the engine's LoRA training API, for testing the training
 * loop's orchestration (step arithmetic, accumulation weights, schedules, logging, checkpoints,
 * exact resume) without the native kernels. It is not a language model: each labelled position
 * (token x → label y) asks Σ_modules scaling·(B·A)[y mod out, x mod in] to be 1 (squared error), with
 * dropout on the A side. That is enough for real gradients, a loss that goes down, dropout that
 * depends on the seed, and AdamW (torch semantics) on real state.
 */
import type {
  AdamWParams,
  LoraState,
  LoraTrainSpec,
  TrainBatchInput,
  TrainingEngine,
} from "../src/train/index.js";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { expectedWeights, parseModelConfig, type ModelConfig } from "@qlora/formats";
import { Xoshiro128 } from "../src/data/index.js";
import type { TrainOptions } from "../src/train/index.js";
import { storiesDir } from "./fixtures.js";
import { storyText } from "./test-support.js";
import { loadTokenizer, type ModelTokenizer } from "../src/tokenizer.js";

interface ModuleSlot {
  inF: number;
  outF: number;
  a: Float32Array;
  b: Float32Array;
  ga: Float64Array;
  gb: Float64Array;
  ma: Float32Array;
  va: Float32Array;
  mb: Float32Array;
  vb: Float32Array;
}

interface Slot {
  rank: number;
  scaling: number;
  dropout: number;
  modules: Map<string, ModuleSlot>;
}

export interface EngineCall {
  op: "fb" | "eval" | "adamw";
  slot: number;
  batchSize?: number;
  seqLen?: number;
  gradScale?: number;
  dropoutSeed?: bigint;
  targets?: number;
  lr?: number;
  step?: number;
}

export class ReferenceEngine implements TrainingEngine {
  readonly calls: EngineCall[] = [];
  private slots = new Map<number, Slot>();

  /** dims: module name → [out, in] (from the model config). */
  constructor(private readonly dims: Map<string, [number, number]>) {}

  private slot(i: number): Slot {
    const s = this.slots.get(i);
    if (!s) throw new Error(`no LoRA in slot ${i}`);
    return s;
  }

  initLora(slot: number, spec: LoraTrainSpec): void {
    const rng = new Xoshiro128(spec.seed);
    const modules = new Map<string, ModuleSlot>();
    for (const name of spec.targets) {
      const d = this.dims.get(name);
      if (!d) throw new Error(`unknown module ${name}`);
      const [outF, inF] = d;
      const bound = 1 / Math.sqrt(inF);
      const a = new Float32Array(spec.rank * inF);
      for (let i = 0; i < a.length; i++) a[i] = (rng.nextU32() / 2 ** 32) * 2 * bound - bound;
      modules.set(name, {
        inF,
        outF,
        a,
        b: new Float32Array(outF * spec.rank),
        ga: new Float64Array(a.length),
        gb: new Float64Array(outF * spec.rank),
        ma: new Float32Array(a.length),
        va: new Float32Array(a.length),
        mb: new Float32Array(outF * spec.rank),
        vb: new Float32Array(outF * spec.rank),
      });
    }
    const scaling = spec.useRslora ? spec.alpha / Math.sqrt(spec.rank) : spec.alpha / spec.rank;
    this.slots.set(slot, { rank: spec.rank, scaling, dropout: spec.dropout, modules });
  }

  private pass(s: Slot, batch: TrainBatchInput, dropoutSeed: bigint | null, gradScale: number): { loss: number; tokens: number } {
    const rng = dropoutSeed === null ? null : new Xoshiro128(dropoutSeed);
    const r = s.rank;
    let n = 0;
    for (let i = 0; i < batch.labels.length; i++) if (batch.labels[i] !== -100) n++;
    let loss = 0;
    for (let p = 0; p < batch.labels.length; p++) {
      const y = batch.labels[p]!;
      if (y === -100) continue;
      const x = batch.tokens[p]!;
      const contrib: { m: ModuleSlot; i: number; j: number; mask: number }[] = [];
      let pred = 0;
      for (const m of s.modules.values()) {
        let mask = 1;
        if (rng && s.dropout > 0) mask = rng.nextU32() / 2 ** 32 < s.dropout ? 0 : 1 / (1 - s.dropout);
        const i = y % m.outF;
        const j = x % m.inF;
        let v = 0;
        for (let k = 0; k < r; k++) v += m.b[i * r + k]! * m.a[k * m.inF + j]!;
        pred += s.scaling * mask * v;
        contrib.push({ m, i, j, mask });
      }
      loss += 0.5 * (pred - 1) ** 2;
      if (rng) {
        const d = ((pred - 1) / n) * gradScale;
        for (const { m, i, j, mask } of contrib) {
          const c = d * s.scaling * mask;
          for (let k = 0; k < r; k++) {
            m.gb[i * r + k]! += c * m.a[k * m.inF + j]!;
            m.ga[k * m.inF + j]! += c * m.b[i * r + k]!;
          }
        }
      }
    }
    return { loss: n > 0 ? loss / n : 0, tokens: n };
  }

  trainForwardBackward(
    slot: number,
    batch: TrainBatchInput,
    opts: { dropoutSeed: bigint; gradScale: number; checkpointing: boolean },
  ): { loss: number; tokens: number } {
    const res = this.pass(this.slot(slot), batch, opts.dropoutSeed, opts.gradScale);
    this.calls.push({
      op: "fb",
      slot,
      batchSize: batch.batchSize,
      seqLen: batch.seqLen,
      gradScale: opts.gradScale,
      dropoutSeed: opts.dropoutSeed,
      targets: res.tokens,
    });
    return res;
  }

  evalLoss(slot: number, batch: TrainBatchInput): { loss: number; tokens: number } {
    const res = this.pass(this.slot(slot), batch, null, 0);
    this.calls.push({ op: "eval", slot, batchSize: batch.batchSize, targets: res.tokens });
    return res;
  }

  adamwStep(slot: number, o: AdamWParams): { gradNorm: number } {
    const s = this.slot(slot);
    let sq = 0;
    for (const m of s.modules.values()) {
      for (const g of m.ga) sq += g * g;
      for (const g of m.gb) sq += g * g;
    }
    const norm = Math.sqrt(sq);
    const clip = o.maxGradNorm > 0 ? Math.min(1, o.maxGradNorm / (norm + 1e-6)) : 1;
    const bc1 = 1 - o.beta1 ** o.step;
    const bc2 = 1 - o.beta2 ** o.step;
    const update = (p: Float32Array, g: Float64Array, m: Float32Array, v: Float32Array) => {
      for (let i = 0; i < p.length; i++) {
        const gi = g[i]! * clip;
        let pi = p[i]! * (1 - o.lr * o.weightDecay);
        m[i] = o.beta1 * m[i]! + (1 - o.beta1) * gi;
        v[i] = o.beta2 * v[i]! + (1 - o.beta2) * gi * gi;
        pi -= (o.lr * (m[i]! / bc1)) / (Math.sqrt(v[i]! / bc2) + o.eps);
        p[i] = pi;
        g[i] = 0;
      }
    };
    for (const m of s.modules.values()) {
      update(m.a, m.ga, m.ma, m.va);
      update(m.b, m.gb, m.mb, m.vb);
    }
    this.calls.push({ op: "adamw", slot, lr: o.lr, step: o.step });
    return { gradNorm: norm };
  }

  zeroGrad(slot: number): void {
    for (const m of this.slot(slot).modules.values()) {
      m.ga.fill(0);
      m.gb.fill(0);
    }
  }

  getLoraState(slot: number): LoraState {
    const s = this.slot(slot);
    const modules: LoraState["modules"] = {};
    for (const [name, m] of s.modules) {
      modules[name] = {
        a: m.a.slice(),
        b: m.b.slice(),
        ma: m.ma.slice(),
        va: m.va.slice(),
        mb: m.mb.slice(),
        vb: m.vb.slice(),
      };
    }
    return { rank: s.rank, scaling: s.scaling, modules };
  }

  setLoraState(slot: number, state: LoraState): void {
    const s = this.slot(slot);
    for (const [name, st] of Object.entries(state.modules)) {
      const m = s.modules.get(name);
      if (!m) throw new Error(`setLoraState: ${name} is not in slot ${slot}`);
      m.a.set(st.a);
      m.b.set(st.b);
      m.ma.set(st.ma);
      m.va.set(st.va);
      m.mb.set(st.mb);
      m.vb.set(st.vb);
      m.ga.fill(0);
      m.gb.fill(0);
    }
  }
}

/** A TrainModel over a real model directory's config and tokenizer, with the reference engine. */
export async function referenceModel(dir: string): Promise<{ engine: ReferenceEngine; tokenizer: ModelTokenizer; config: ModelConfig }> {
  const tokenizer = await loadTokenizer(dir);
  const config = parseModelConfig(JSON.parse(readFileSync(join(dir, "config.json"), "utf8")));
  const dims = new Map<string, [number, number]>();
  for (const [name, t] of expectedWeights(config)) {
    if (name.startsWith("layers.") && name.endsWith(".weight") && t.shape.length === 2) {
      dims.set(name.slice(0, -".weight".length), t.shape as [number, number]);
    }
  }
  return { engine: new ReferenceEngine(dims), tokenizer, config };
}

/** The loader hook trainInWorker's `loaderModule` looks for. */
export async function loadTrainModel(dir: string, _quant: "nf4" | "none"): Promise<{ engine: ReferenceEngine; tokenizer: ModelTokenizer; config: ModelConfig }> {
  return referenceModel(dir);
}

/** The whole shared story (test-support.ts): new text to fine-tune on. */
export const STORY = storyText();

/** A temp dir with the story as story.txt; options for a small run on stories260K. */
export function setup(extra: Partial<TrainOptions> = {}): TrainOptions {
  const dir = mkdtempSync(join(tmpdir(), "qlora-train-"));
  writeFileSync(join(dir, "story.txt"), STORY);
  return { model: storiesDir, data: join(dir, "story.txt"), out: join(dir, "out"), blockSize: 32, ...extra };
}
