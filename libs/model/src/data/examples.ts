/**
 * Records → tokenized examples with loss masks.
 *
 * Token boundaries between the part that is not trained on (prompt, chat headers, user turns) and the
 * part that is (completion, output, assistant turns) are found by tokenizing the text up to the
 * boundary and comparing with the tokens of the whole text: the longest common prefix is the boundary.
 * This is what TRL does for prompt/completion data, and it is robust to a BPE merge across the
 * boundary (the merged token then counts as trained-on).
 */
import { InvalidArgument } from "@qlora/core";
import type { ChatMessage, DataTokenizer, Example } from "./types.js";

/** The special tokens the tokenizer wraps around a sequence (HF build_inputs_with_special_tokens). */
export interface SpecialWrap {
  prefix: number[];
  suffix: number[];
}

/**
 * Finds what `encode(x, true)` adds around `encode(x, false)`, e.g. BOS for Llama and OPT
 * (HF `num_special_tokens_to_add` = prefix + suffix length).
 */
export function specialWrap(tok: DataTokenizer): SpecialWrap {
  const probe = "hello world";
  const bare = tok.encode(probe, false);
  const full = tok.encode(probe, true);
  for (let i = 0; i + bare.length <= full.length; i++) {
    let ok = true;
    for (let j = 0; j < bare.length; j++) {
      if (full[i + j] !== bare[j]) {
        ok = false;
        break;
      }
    }
    if (ok) return { prefix: full.slice(0, i), suffix: full.slice(i + bare.length) };
  }
  throw new InvalidArgument(
    "the tokenizer's special tokens are not a plain prefix/suffix of the text; cannot build blocks",
  );
}

export interface TextBlocks {
  examples: Example[];
  /** Tokens of the whole file, without special tokens. */
  fileTokens: number;
  /** Tokens after the last whole block (dropped, as in TextDataset). */
  remainder: number;
  /** Content tokens per block (block_size minus the special tokens). */
  contentPerBlock: number;
}

/**
 * Hugging Face `TextDataset`: the whole text tokenized without special tokens, cut into consecutive
 * runs of (blockSize − number of special tokens) tokens, each wrapped with the special tokens; the
 * remainder is dropped. Every token after the first is a target (labels = input_ids, shifted by the
 * model).
 */
export function textBlocks(text: string, tok: DataTokenizer, blockSize: number): TextBlocks {
  const wrap = specialWrap(tok);
  const n = blockSize - wrap.prefix.length - wrap.suffix.length;
  if (n < 1) {
    throw new InvalidArgument(
      `block size ${blockSize} leaves no room for text after ${wrap.prefix.length + wrap.suffix.length} special tokens`,
    );
  }
  const ids = tok.encode(text, false);
  const examples: Example[] = [];
  let i = 0;
  for (; i + n <= ids.length; i += n) {
    const tokens = new Int32Array(blockSize);
    tokens.set(wrap.prefix, 0);
    for (let j = 0; j < n; j++) tokens[wrap.prefix.length + j] = ids[i + j]!;
    tokens.set(wrap.suffix, wrap.prefix.length + n);
    const targets = new Uint8Array(blockSize).fill(1);
    targets[0] = 0;
    examples.push({ tokens, targets });
  }
  return { examples, fileTokens: ids.length, remainder: ids.length - i, contentPerBlock: n };
}

function commonPrefix(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = Math.min(a.length, b.length);
  let k = 0;
  while (k < n && a[k] === b[k]) k++;
  return k;
}

function withEos(ids: number[], eos: number | undefined): number[] {
  if (eos !== undefined && ids[ids.length - 1] !== eos) return [...ids, eos];
  return ids;
}

function makeExample(ids: number[], firstTarget: number): Example {
  const tokens = Int32Array.from(ids);
  const targets = new Uint8Array(ids.length);
  // Position 0 is never predicted (nothing precedes it).
  for (let i = Math.max(1, firstTarget); i < ids.length; i++) targets[i] = 1;
  return { tokens, targets };
}

/** `{"text"}`: the text with the tokenizer's special tokens, then EOS; every token is a target. */
export function textExample(tok: DataTokenizer, text: string): Example {
  return makeExample(withEos(tok.encode(text, true), tok.eosId), 1);
}

/**
 * `{"prompt","completion"}` (and alpaca after formatting): prompt + completion tokenized as one text
 * with special tokens, EOS appended; targets are the tokens after the prompt's own tokens.
 */
export function promptCompletionExample(tok: DataTokenizer, prompt: string, completion: string): Example {
  const wrap = specialWrap(tok);
  const full = tok.encode(prompt + completion, true);
  let p = tok.encode(prompt, true);
  // A suffix special (add_eos_token) ends the prompt's encoding but not the prefix of the full text.
  if (wrap.suffix.length > 0) p = p.slice(0, p.length - wrap.suffix.length);
  const k = commonPrefix(p, full);
  return makeExample(withEos(full, tok.eosId), k);
}

/**
 * `{"messages"}`: the conversation rendered with the chat template (which carries its own BOS etc., so
 * it is tokenized without added special tokens, like `apply_chat_template(tokenize=True)`). Each
 * assistant turn's span is found by rendering incrementally: it starts where
 * render(messages[:i], add_generation_prompt=True) ends and stops where render(messages[:i+1]) ends,
 * so it includes the template's end-of-turn marker (the model learns to stop).
 */
export function chatExample(
  tok: DataTokenizer,
  messages: ChatMessage[],
  where: string,
): Example {
  const render = tok.renderChat;
  if (!render) {
    throw new InvalidArgument(`${where}: chat records need a chat template, and this model has none`);
  }
  const full = render(messages, false);
  const ids = tok.encode(full, false);
  const targets = new Uint8Array(ids.length);
  for (let i = 0; i < messages.length; i++) {
    if (messages[i]!.role !== "assistant") continue;
    // An assistant turn that opens the conversation starts at token 0 (there is nothing to render
    // before it; templates reject an empty conversation).
    const startText = i === 0 ? "" : render(messages.slice(0, i), true);
    const endText = render(messages.slice(0, i + 1), false);
    if (!endText.startsWith(startText) || !full.startsWith(endText)) {
      throw new InvalidArgument(
        `${where}: the chat template does not render this conversation incrementally ` +
          `(a prefix of the conversation is not a prefix of its rendering), so assistant turns cannot be located`,
      );
    }
    const start = tokenBoundary(tok, startText, ids, false);
    const end = tokenBoundary(tok, endText, ids, true);
    for (let t = Math.max(1, start); t < end; t++) targets[t] = 1;
  }
  return { tokens: Int32Array.from(ids), targets };
}

/**
 * Index in `ids` (the tokens of the whole text) where the text prefix `prefix` ends. When a token
 * straddles the boundary, `includeStraddling` decides whether it counts as before (false: the span
 * that starts here includes it) or after it (true: the span that ends here includes it).
 */
function tokenBoundary(tok: DataTokenizer, prefix: string, ids: number[], includeStraddling: boolean): number {
  if (prefix === "") return 0;
  const p = tok.encode(prefix, false);
  const k = commonPrefix(p, ids);
  if (k === p.length) return k;
  return includeStraddling ? Math.min(k + 1, ids.length) : k;
}
