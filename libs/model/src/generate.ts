/**
 * Single-sequence generation over the NativeModel: prefill the whole prompt in one forward, then
 * one token per step. The per-sequence logic (sampling, detokenizing, stop strings, finish rules)
 * is SequenceState, which the inference service drives the same way for batched requests.
 */
import { setImmediate as yieldToEventLoop } from "node:timers/promises";
import { InvalidArgument } from "@qlora/core";
import type { LoadedModel } from "./loader.js";
import { NativeSampler, resolveSampling, type SamplingOptions } from "./sampling.js";
import { SequenceState, type FinishReason } from "./sequence.js";
import type { ChatMessage } from "./tokenizer.js";

export interface GenerateOptions extends SamplingOptions {
  /** Plain text, encoded with the tokenizer's special tokens (BOS for Llama). */
  prompt?: string;
  /** A conversation, rendered with the model's chat template (generation prompt appended). */
  messages?: ChatMessage[];
  /** Engine adapter slot; -1 (default) = the base model. */
  adapterSlot?: number;
  /** Default 128. Greedy decoding never stops before this unless EOS (or a stop string) comes. */
  maxNewTokens?: number;
  stop?: string[];
  /** Called for every generated token with the text it completed (may be ""). */
  onToken?: (delta: string, ids: number[]) => void;
  /** Aborting ends generation with finishReason "cancelled" at the next step. */
  signal?: AbortSignal;
}

export interface GenerateResult {
  /** The completion (the prompt is not repeated), cut before a stop string. */
  text: string;
  /** Generated ids, including an EOS that ended generation. */
  tokenIds: number[];
  promptIds: number[];
  finishReason: FinishReason;
  usage: { promptTokens: number; completionTokens: number };
  timings: {
    /** Start of the call → first token sampled (tokenization + prefill + sampling). */
    timeToFirstTokenMs: number;
    /** Decode speed: tokens after the first / time after the first. */
    tokensPerSecond: number;
    totalMs: number;
  };
}

export const DEFAULT_MAX_NEW_TOKENS = 128;

/** Prompt ids for a request: text with special tokens, or messages through the chat template. */
export function encodePrompt(model: Pick<LoadedModel, "tokenizer">, options: Pick<GenerateOptions, "prompt" | "messages">): number[] {
  const hasPrompt = options.prompt !== undefined && options.prompt !== null;
  const hasMessages = options.messages !== undefined && options.messages !== null;
  if (hasPrompt && hasMessages) throw new InvalidArgument("give either a prompt or messages, not both");
  if (hasMessages) return model.tokenizer.encodeChat(options.messages!);
  if (!hasPrompt || typeof options.prompt !== "string") throw new InvalidArgument("a prompt (or messages) is required");
  return model.tokenizer.encode(options.prompt);
}

export interface SequenceRequest extends SamplingOptions {
  maxNewTokens: number;
  stop?: readonly string[];
  /** Prompt + generated tokens allowed (default: the model's maxContext). */
  maxTotalTokens?: number;
}

/**
 * The per-request state a batching loop drives: validated sampling (model defaults from
 * generation_config.json), the model's EOS ids, a native sampler with its own RNG, the
 * incremental detokenizer and stop strings. `generate` uses exactly this.
 */
export function createSequenceState(model: LoadedModel, promptIds: ArrayLike<number>, request: SequenceRequest): SequenceState {
  const sampling = resolveSampling(request, model.samplingDefaults);
  return new SequenceState(
    model.tokenizer,
    promptIds,
    {
      maxNewTokens: request.maxNewTokens,
      stop: request.stop ?? [],
      eosTokenIds: model.eosTokenIds,
      maxTotalTokens: Math.min(request.maxTotalTokens ?? model.maxContext, model.maxContext),
    },
    new NativeSampler(sampling),
  );
}

export async function generate(model: LoadedModel, options: GenerateOptions): Promise<GenerateResult> {
  const t0 = performance.now();
  const adapter = options.adapterSlot ?? -1;
  if (!Number.isInteger(adapter) || adapter < -1) throw new InvalidArgument(`adapterSlot must be -1 (base) or a slot >= 0, got ${adapter}`);
  const maxNewTokens = options.maxNewTokens ?? DEFAULT_MAX_NEW_TOKENS;
  const promptIds = encodePrompt(model, options);
  const state = createSequenceState(model, promptIds, { ...options, maxNewTokens });

  const native = model.native;
  const seq = native.createSequence();
  let firstTokenAt = 0;
  try {
    let tokens = Int32Array.from(promptIds);
    const one = new Int32Array(1);
    for (;;) {
      if (options.signal?.aborted) {
        state.cancel();
        break;
      }
      // the engine samples (on the model's device): only the token id comes back
      const id = native.forwardSample([{ seq, tokens, adapter }], [state.sampling()])[0]!;
      if (firstTokenAt === 0) firstTokenAt = performance.now();
      const r = state.accept(id);
      options.onToken?.(r.delta, [id]);
      if (r.finished) break;
      one[0] = id;
      tokens = one;
      // Let abort signals, timers and stream writes run between steps.
      await yieldToEventLoop();
    }
  } finally {
    native.dropSequence(seq);
  }

  const end = performance.now();
  const n = state.tokenIds.length;
  const decodeMs = firstTokenAt === 0 ? 0 : end - firstTokenAt;
  return {
    text: state.text,
    tokenIds: state.tokenIds.slice(),
    promptIds,
    finishReason: state.finishReason!,
    usage: { promptTokens: promptIds.length, completionTokens: n },
    timings: {
      timeToFirstTokenMs: firstTokenAt === 0 ? 0 : firstTokenAt - t0,
      tokensPerSecond: n > 1 && decodeMs > 0 ? ((n - 1) * 1000) / decodeMs : n > 0 ? (n * 1000) / (end - t0) : 0,
      totalMs: end - t0,
    },
  };
}
