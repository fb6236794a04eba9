/**
 * Shared test material. stories260K lives outside the repository (../shared/models) and the
 * project must not need it: tests that use it skip, with a reason, when it is absent.
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
/** Repository root (this file runs from libs/model/dist/test). */
export const repoRoot = resolve(here, "../../../..");

export const storiesDir: string = process.env.QLORA_STORIES_DIR ?? resolve(repoRoot, "../shared/models/stories260K");
export const haveStories = existsSync(join(storiesDir, "model.safetensors"));
export const skipNoStories = haveStories ? false : `stories260K not found at ${storiesDir}`;

export interface StoriesReference {
  greedy: { prompt: string; prompt_ids: number[]; new_tokens: number; new_ids: number[]; text: string };
  cross_entropy: { text: string; ids: number[]; mean_next_token_ce: number; final_position_logits: number[] };
}

export function storiesReference(): StoriesReference {
  return JSON.parse(readFileSync(join(storiesDir, "reference.json"), "utf8")) as StoriesReference;
}

/**
 * A tiny Llama-2-style tokenizer (sentencepiece BPE with byte fallback, BOS by the
 * post-processor) written into `dir`, so tokenizer-level tests do not need the shared model.
 */
export function writeTinyTokenizer(dir: string, config: Record<string, unknown> = {}): void {
  const vocab: Record<string, number> = { "<unk>": 0, "<s>": 1, "</s>": 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`] = 3 + b;
  const pieces = ["▁", "a", "b", "c", "h", "i", "o", "t", "e", "n", "s", "▁h", "▁t", "he", "▁the", "▁a", "ab", "▁ab", "hi", "▁hi", ".", ",", "!"];
  pieces.forEach((p, i) => (vocab[p] = 259 + i));
  const merges = ["▁ h", "▁ t", "h e", "▁t he", "▁ a", "a b", "▁a b", "h i", "▁h i"];
  const tokenizer = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [
      { id: 0, content: "<unk>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 1, content: "<s>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
      { id: 2, content: "</s>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    ],
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: "▁" },
        { type: "Replace", pattern: { String: " " }, content: "▁" },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: "<s>", type_id: 1 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "▁" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      vocab,
      merges,
    },
  };
  writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tokenizer));
  writeFileSync(
    join(dir, "tokenizer_config.json"),
    JSON.stringify({ add_bos_token: true, add_eos_token: false, bos_token: "<s>", eos_token: "</s>", unk_token: "<unk>", clean_up_tokenization_spaces: false, ...config }),
  );
}

/** A tiny GPT-2-style byte-level BPE tokenizer (OPT / Llama 3 family) written into `dir`. */
export function writeTinyByteLevelTokenizer(dir: string): void {
  // GPT-2's byte → printable-character map.
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const vocab: Record<string, number> = { "</s>": 0 };
  bs.forEach((b, i) => (vocab[String.fromCharCode(cs[i]!)] = b + 1));
  const merges = ["Ġ t", "h e", "Ġt he", "Ġ a"];
  for (const m of merges) vocab[m.replace(" ", "")] = Object.keys(vocab).length;
  const tokenizer = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [{ id: 0, content: "</s>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "</s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ SpecialToken: { id: "</s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { Sequence: { id: "B", type_id: 1 } }],
      special_tokens: { "</s>": { id: "</s>", ids: [0], tokens: ["</s>"] } },
    },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: "", end_of_word_suffix: "", fuse_unk: false, byte_fallback: false, vocab, merges },
  };
  writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tokenizer));
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify({ bos_token: "</s>", eos_token: "</s>", clean_up_tokenization_spaces: false }));
}
