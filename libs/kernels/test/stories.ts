// The real stories260K checkpoint (helpers.ts: storiesDir, readSafetensors) for the training tests
// (train.test.ts, cuda-train.test.ts): the engine config, the weights with every linear quantized to
// NF4 (as the trainer loads it), and a small batch of real text (a rough tokenizer: real pieces, not
// the canonical split).
import { existsSync, readFileSync } from "node:fs";
import { quantizeNf4 } from "../src/index.js";
import type { EngineConfig, TrainBatchInput, WeightTensor } from "../src/index.js";
import { readSafetensors, storiesDir } from "./helpers.js";

export const haveStories = existsSync(`${storiesDir}/model.safetensors`);

/** Greedy longest-match over the SentencePiece vocabulary (▁ for spaces): real pieces, if not the canonical BPE split. */
export function roughTokenize(text: string, vocab: Record<string, number>): number[] {
  const s = "▁" + text.replace(/ /g, "▁");
  const ids: number[] = [1]; // BOS
  for (let i = 0; i < s.length; ) {
    let len = Math.min(16, s.length - i);
    while (len > 1 && vocab[s.slice(i, i + len)] === undefined) len--;
    const id = vocab[s.slice(i, i + len)];
    ids.push(id ?? vocab[`<0x${s.charCodeAt(i).toString(16).toUpperCase().padStart(2, "0")}>`] ?? 0);
    i += len;
  }
  return ids;
}

/** stories260K with its linears quantized to NF4 (blocksize 64), the rest f32; targets = every linear. */
export function storiesNf4(): { cfg: EngineConfig; weights: Record<string, WeightTensor>; targets: string[] } {
  const hf = JSON.parse(readFileSync(`${storiesDir}/config.json`, "utf8"));
  const cfg: EngineConfig = {
    arch: "llama", hiddenSize: hf.hidden_size, intermediateSize: hf.intermediate_size, numLayers: hf.num_hidden_layers,
    numHeads: hf.num_attention_heads, numKvHeads: hf.num_key_value_heads, headDim: hf.head_dim, vocabSize: hf.vocab_size,
    maxPositions: hf.max_position_embeddings, normEps: hf.rms_norm_eps, ropeTheta: hf.rope_theta, ropeScaling: null,
    hiddenAct: hf.hidden_act, tiedEmbeddings: hf.tie_word_embeddings, qkvBias: false, oBias: false, mlpBias: false,
  };
  const weights: Record<string, WeightTensor> = {};
  const targets: string[] = [];
  for (const [name, t] of readSafetensors(`${storiesDir}/model.safetensors`)) {
    const canon = name === "model.embed_tokens.weight" ? "embed_tokens" : name.replace(/^model\./, "");
    const isLinear = /^layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$/.test(canon);
    const f = new Float32Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 4);
    if (isLinear) {
      targets.push(canon.slice(0, -".weight".length));
      const q = quantizeNf4(f, "f32", f.length, 64);
      weights[canon] = { dtype: "nf4", shape: t.shape, data: q.packed, absmax: q.absmax, blocksize: 64 };
    } else {
      weights[canon] = { dtype: "f32", shape: t.shape, data: t.data };
    }
  }
  return { cfg, weights, targets };
}

/** Four lines of text, one per row of T positions; labels = the next token (−100 past the end). */
export function storiesBatch(T = 32): TrainBatchInput {
  const vocab = (JSON.parse(readFileSync(`${storiesDir}/tokenizer.json`, "utf8")) as { model: { vocab: Record<string, number> } }).model.vocab;
  const lines = [
    "Tom had a red kite. He took it to the hill on a windy day.",
    "The kite went up and up. Tom laughed and ran with the string.",
    "A bird flew next to the kite. The bird sang a happy song.",
    "Then the wind stopped. The kite came down into a tall tree.",
  ];
  const rows = lines.map((l) => roughTokenize(l, vocab).slice(0, T));
  const tokens = new Int32Array(rows.length * T), labels = new Int32Array(rows.length * T).fill(-100);
  rows.forEach((ids, b) => {
    tokens.set(ids, b * T);
    for (let t = 0; t + 1 < ids.length; t++) labels[b * T + t] = ids[t + 1]!;
  });
  return { tokens, labels, batchSize: rows.length, seqLen: T };
}
