// Fixtures of the LoRA training tests (train.test.ts, cuda-train.test.ts): the target module names,
// random batches, and the slot's accumulated gradients read through the public API (an AdamW step with
// lr 0 and β1 = β2 = 0 leaves m = g and the parameters unchanged; the saved state is restored).
import assert from "node:assert/strict";
import type { EngineConfig, NativeModel, TrainBatchInput } from "../src/index.js";
import { rng } from "./random.js";

export const LLAMA_LINS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
export const OPT_LINS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"];

/** Random tokens; labels = next token of the same segment (else -100), plus a few ignored positions. */
export function makeBatch(cfg: EngineConfig, B: number, T: number, seed: number, segments?: Int32Array): TrainBatchInput {
  const r = rng(seed);
  const tokens = Int32Array.from({ length: B * T }, () => Math.floor(r() * cfg.vocabSize));
  const labels = new Int32Array(B * T).fill(-100);
  for (let b = 0; b < B; b++)
    for (let t = 0; t + 1 < T; t++) {
      const i = b * T + t;
      if (segments && segments[i + 1] !== segments[i]) continue;
      if (r() < 0.15) continue;
      labels[i] = tokens[i + 1]!;
    }
  const batch: TrainBatchInput = { tokens, labels, batchSize: B, seqLen: T };
  if (segments) batch.segments = segments;
  return batch;
}


/** The slot's accumulated gradients, read exactly: AdamW with lr 0, β1 = β2 = 0 leaves m = g (and p unchanged). */
export function gradsOf(m: NativeModel, slot: number): { norm: number; g: Map<string, { a: Float32Array; b: Float32Array }> } {
  const saved = m.getLoraState(slot);
  const { gradNorm } = m.adamwStep(slot, { lr: 0, beta1: 0, beta2: 0, eps: 1, weightDecay: 0, maxGradNorm: 0, step: 1 });
  const st = m.getLoraState(slot);
  const g = new Map<string, { a: Float32Array; b: Float32Array }>();
  for (const [name, mod] of Object.entries(st.modules)) {
    assert.deepEqual(mod.a, saved.modules[name]!.a, "lr 0 keeps A");
    g.set(name, { a: mod.ma, b: mod.mb });
  }
  m.setLoraState(slot, saved); // restore the moments (zeroes the gradients, already zero)
  return { norm: gradNorm, g };
}
