/**
 * Incremental detokenization for streaming.
 *
 * Decoding token by token is wrong for two reasons: a character may be split over several
 * byte-fallback tokens (`<0xE6><0x97><0xA5>` = "日"), and decoders look at neighbours
 * (sentencepiece strips the leading space of the first token only). So each step decodes a
 * small window that starts a few tokens back — at a point where the text is known to be
 * complete — and emits the part of the window's text past what was already emitted. A delta
 * that ends in U+FFFD (an unfinished UTF-8 sequence) is held back until later tokens finish it.
 *
 * The deltas concatenate to decode(context + generated) minus decode(context): the completion
 * as it reads after the prompt (so " there" keeps its space after "Once upon a time,").
 */

/** What the detokenizer needs from a tokenizer (ModelTokenizer implements it). */
export interface DetokenizerSource {
  decodeRaw(ids: ArrayLike<number>, skipSpecialTokens?: boolean): string;
  isSpecial(id: number): boolean;
}

/** How many context tokens the first window reaches back (enough for any decoder's look-behind). */
const CONTEXT_WINDOW = 5;
const REPLACEMENT = "\uFFFD";

export class IncrementalDetokenizer {
  private ids: number[];
  /** Window start: ids before it are never decoded again. */
  private prefixOffset: number;
  /** ids before it have had their text emitted. */
  private readOffset: number;
  private emitted = "";

  constructor(
    private readonly source: DetokenizerSource,
    contextIds: ArrayLike<number> = [],
  ) {
    this.ids = Array.from(contextIds);
    this.readOffset = this.ids.length;
    this.prefixOffset = this.safeStart(Math.max(0, this.ids.length - CONTEXT_WINDOW));
  }

  /**
   * A window must not start at a special token: it decodes to nothing, and the decoder would
   * then strip the leading space of the next (real) token, which the full decode keeps.
   */
  private safeStart(p: number): number {
    while (p > 0 && this.source.isSpecial(this.ids[p]!)) p--;
    return p;
  }

  /** Text emitted so far (all deltas joined). */
  get text(): string {
    return this.emitted;
  }

  /** Add one token; returns the newly complete text (often "", e.g. mid-character). */
  push(id: number): string {
    this.ids.push(id);
    const prefixText = this.source.decodeRaw(this.ids.slice(this.prefixOffset, this.readOffset));
    const fullText = this.source.decodeRaw(this.ids.slice(this.prefixOffset));
    if (fullText.length <= prefixText.length || fullText.endsWith(REPLACEMENT)) return "";
    const delta = fullText.slice(prefixText.length);
    const nextStart = this.safeStart(this.readOffset);
    // Only move the window start forward to a position where decoding restarts cleanly.
    if (nextStart > this.prefixOffset) this.prefixOffset = nextStart;
    this.readOffset = this.ids.length;
    this.emitted += delta;
    return delta;
  }

  /**
   * End of stream: emit whatever is still held back (an unfinished UTF-8 sequence comes out as
   * U+FFFD, as a full decode would show it).
   */
  flush(): string {
    if (this.readOffset >= this.ids.length) return "";
    const prefixText = this.source.decodeRaw(this.ids.slice(this.prefixOffset, this.readOffset));
    const fullText = this.source.decodeRaw(this.ids.slice(this.prefixOffset));
    const delta = fullText.length > prefixText.length ? fullText.slice(prefixText.length) : "";
    this.readOffset = this.ids.length;
    this.emitted += delta;
    return delta;
  }
}
