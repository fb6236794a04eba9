/**
 * Per-sequence generation state, driven one token at a time.
 *
 * `generate()` drives one of these for a single request; the inference service drives many of
 * them from its continuous-batching loop over the same NativeModel (one forwardSample for all
 * rows with each row's `sampling()`, then `accept` per row). Everything that is per sequence lives here: the ids
 * generated so far, the repetition-penalty context, the RNG, the incremental detokenizer, the
 * stop-string matcher and the finish rules.
 */
import { InvalidArgument } from "@qlora/core";
import type { RowSampling } from "@qlora/kernels";
import { IncrementalDetokenizer, type DetokenizerSource } from "./detokenizer.js";
import { StopMatcher } from "./stop.js";

export type FinishReason = "length" | "stop" | "cancelled";

export interface AcceptResult {
  /** Text made complete by this token (may be ""). */
  delta: string;
  finished: boolean;
  finishReason: FinishReason | null;
}

/** How the engine picks this sequence's next token (sampling.ts: the native sampler). */
export interface TokenSampler {
  /** `context`: prompt + generated ids (a view valid until the next accept). */
  rowSampling(context: Int32Array): RowSampling;
}

export interface SequenceOptions {
  /** Generate at most this many tokens (>= 1). */
  maxNewTokens: number;
  /** Stop strings: the text is cut before the first one produced. */
  stop?: readonly string[];
  /** Token ids that end the sequence (from config.json / generation_config.json). */
  eosTokenIds?: Iterable<number>;
  /**
   * The most tokens (prompt + generated) the model may hold; generation ends with "length"
   * when it is reached even if maxNewTokens is not.
   */
  maxTotalTokens?: number;
}

export class SequenceState {
  readonly promptIds: readonly number[];
  /** Generated ids (an EOS that ended the sequence included; it produces no text). */
  readonly tokenIds: number[] = [];
  private readonly detok: IncrementalDetokenizer;
  private readonly stopper: StopMatcher;
  private readonly eos: Set<number>;
  private readonly maxNewTokens: number;
  private readonly maxTotal: number;
  /** prompt + generated ids, for the repetition penalty (grown by doubling). */
  private context: Int32Array;
  private contextLength: number;
  private out = "";
  private reason: FinishReason | null = null;

  constructor(
    source: DetokenizerSource,
    promptIds: ArrayLike<number>,
    options: SequenceOptions,
    private readonly sampler: TokenSampler | null = null,
  ) {
    if (!Number.isInteger(options.maxNewTokens) || options.maxNewTokens < 1) {
      throw new InvalidArgument(`maxNewTokens must be a positive integer, got ${options.maxNewTokens}`);
    }
    if (promptIds.length === 0) throw new InvalidArgument("the prompt encodes to no tokens");
    this.promptIds = Array.from(promptIds);
    this.maxNewTokens = options.maxNewTokens;
    this.maxTotal = options.maxTotalTokens ?? Number.POSITIVE_INFINITY;
    if (this.promptIds.length >= this.maxTotal) {
      throw new InvalidArgument(
        `the prompt has ${this.promptIds.length} tokens; this model holds at most ${this.maxTotal} (prompt + new tokens)`,
      );
    }
    this.eos = new Set(options.eosTokenIds ?? []);
    this.detok = new IncrementalDetokenizer(source, this.promptIds);
    this.stopper = new StopMatcher(options.stop ?? []);
    this.context = new Int32Array(Math.max(16, this.promptIds.length * 2));
    this.context.set(this.promptIds);
    this.contextLength = this.promptIds.length;
  }

  get finished(): boolean {
    return this.reason !== null;
  }

  get finishReason(): FinishReason | null {
    return this.reason;
  }

  /** The completion text emitted so far (all deltas). */
  get text(): string {
    return this.out;
  }

  /** prompt + generated ids (a view; valid until the next accept). */
  get contextIds(): Int32Array {
    return this.context.subarray(0, this.contextLength);
  }

  /** The next token's sampling, for NativeModel.forwardSample (valid until the next accept). */
  sampling(): RowSampling {
    if (this.sampler === null) throw new InvalidArgument("this sequence has no sampler");
    return this.sampler.rowSampling(this.contextIds);
  }

  /** Record the token the model produced; returns its text and whether the sequence ended. */
  accept(tokenId: number): AcceptResult {
    if (this.reason !== null) return { delta: "", finished: true, finishReason: this.reason };
    this.tokenIds.push(tokenId);
    this.pushContext(tokenId);
    let delta = "";
    if (this.eos.has(tokenId)) {
      return this.finish("stop", this.drain().text);
    }
    const piece = this.detok.push(tokenId);
    if (piece.length > 0) {
      const r = this.stopper.push(piece);
      delta = r.text;
      if (r.stopped) return this.finish("stop", delta);
    }
    if (this.tokenIds.length >= this.maxNewTokens || this.contextLength >= this.maxTotal) {
      const rest = this.drain();
      return this.finish(rest.stopped ? "stop" : "length", delta + rest.text);
    }
    this.out += delta;
    return { delta, finished: false, finishReason: null };
  }

  /** End the sequence early (client cancelled / deadline); held-back text is dropped. */
  cancel(): AcceptResult {
    if (this.reason !== null) return { delta: "", finished: true, finishReason: this.reason };
    this.reason = "cancelled";
    return { delta: "", finished: true, finishReason: "cancelled" };
  }

  /** Release text the detokenizer and the stop matcher still hold (a stop may still match). */
  private drain(): { text: string; stopped: boolean } {
    const rest = this.detok.flush();
    if (rest.length > 0) {
      const r = this.stopper.push(rest);
      if (r.stopped) return { text: r.text, stopped: true };
      return { text: r.text + this.stopper.flush(), stopped: false };
    }
    return { text: this.stopper.flush(), stopped: false };
  }

  private finish(reason: FinishReason, delta: string): AcceptResult {
    this.reason = reason;
    this.out += delta;
    return { delta, finished: true, finishReason: reason };
  }

  private pushContext(id: number): void {
    if (this.contextLength === this.context.length) {
      const grown = new Int32Array(this.context.length * 2);
      grown.set(this.context);
      this.context = grown;
    }
    this.context[this.contextLength++] = id;
  }
}
