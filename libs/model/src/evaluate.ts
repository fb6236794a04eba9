/**
 * Evaluation: token-weighted mean next-token cross-entropy over a set of texts, each encoded with
 * the tokenizer's special tokens (BOS + tokens), computed by the engine (vocab-chunked logits,
 * nothing [T, vocab]-sized crosses into JavaScript).
 */
import { setImmediate as yieldToEventLoop } from "node:timers/promises";
import { Cancelled, InvalidArgument } from "@qlora/core";
import type { LoadedModel } from "./loader.js";

export interface EvalResult {
  /** Σ per-token CE / Σ predicted tokens, over all examples. */
  loss: number;
  perplexity: number;
  /** Predicted tokens (each example of n tokens predicts n - 1). */
  tokens: number;
  examples: number;
}

export interface EvaluateOptions {
  signal?: AbortSignal;
  /** Called after each example (for progress output). */
  onExample?: (done: number, total: number) => void;
}

/**
 * Cross-entropy of one encoded example. An example longer than the model's context is scored in
 * consecutive windows that overlap by one token, so every next-token target is predicted exactly
 * once (later windows start without the earlier context — the usual approximation beyond it).
 */
export function exampleCrossEntropy(model: Pick<LoadedModel, "native" | "maxContext">, ids: Int32Array, adapterSlot: number): { sum: number; tokens: number } {
  if (ids.length < 2) return { sum: 0, tokens: 0 };
  const window = model.maxContext;
  let sum = 0;
  let tokens = 0;
  for (let start = 0; start < ids.length - 1; start += window - 1) {
    const chunk = ids.subarray(start, Math.min(ids.length, start + window));
    const r = model.native.crossEntropy(chunk, adapterSlot);
    sum += r.loss * r.tokens;
    tokens += r.tokens;
  }
  return { sum, tokens };
}

export async function evaluate(model: LoadedModel, texts: readonly string[], adapterSlot = -1, options: EvaluateOptions = {}): Promise<EvalResult> {
  if (texts.length === 0) throw new InvalidArgument("no examples to evaluate");
  if (!Number.isInteger(adapterSlot) || adapterSlot < -1) throw new InvalidArgument(`adapterSlot must be -1 (base) or a slot >= 0, got ${adapterSlot}`);
  let sum = 0;
  let tokens = 0;
  for (let i = 0; i < texts.length; i++) {
    if (options.signal?.aborted) throw new Cancelled("evaluation cancelled");
    const ids = Int32Array.from(model.tokenizer.encode(texts[i]!));
    const r = exampleCrossEntropy(model, ids, adapterSlot);
    sum += r.sum;
    tokens += r.tokens;
    options.onExample?.(i + 1, texts.length);
    if (i + 1 < texts.length) await yieldToEventLoop();
  }
  if (tokens === 0) throw new InvalidArgument("the examples have no next-token targets (each needs at least one token besides BOS)");
  const loss = sum / tokens;
  return { loss, perplexity: Math.exp(loss), tokens, examples: texts.length };
}
