/** Shared types of the training data pipeline. */
import type { ChatMessage } from "../tokenizer.js";

export type { ChatMessage };

/**
 * What the data pipeline needs from a tokenizer. The model runtime's tokenizer is adapted to this
 * shape (see `dataTokenizer`); tests can wrap any tokenizer.
 */
export interface DataTokenizer {
  /** Token ids of `text`; with `addSpecialTokens` the tokenizer's post-processor adds BOS/EOS as configured. */
  encode(text: string, addSpecialTokens: boolean): number[];
  /** End-of-sequence id (appended to jsonl examples so the model learns to stop), if the model has one. */
  readonly eosId: number | undefined;
  /** Padding id; undefined means "use eos, else 0" (padding positions never carry a label). */
  readonly padId: number | undefined;
  /**
   * Renders a conversation with the model's chat template, or undefined when the model has none.
   * `addGenerationPrompt` appends the assistant header, as `apply_chat_template(add_generation_prompt=True)`.
   */
  renderChat?: ((messages: ChatMessage[], addGenerationPrompt: boolean) => string) | undefined;
}

/** The kinds of example a dataset file can hold. */
export type RecordKind = "text-blocks" | "text" | "prompt-completion" | "alpaca" | "chat";

/**
 * One tokenized example before blocking/packing. `targets[i] = 1` when token i is predicted by the
 * model (contributes to the loss as the label of position i-1).
 */
export interface Example {
  tokens: Int32Array;
  targets: Uint8Array;
}

/**
 * One row of a micro-batch: what the model sees in one sequence. With packing it holds several
 * examples, told apart by `segments` (attention never crosses a segment; the first token of a
 * segment is never a target of the previous one).
 */
export interface Row {
  tokens: Int32Array;
  targets: Uint8Array;
  segments?: Int32Array;
}

/** A micro-batch in the engine's layout: B rows × T positions, right-padded. */
export interface Batch {
  tokens: Int32Array;
  /** labels[b*T+t] = the token expected at t+1, or -100 where nothing is predicted. */
  labels: Int32Array;
  batchSize: number;
  seqLen: number;
  segments?: Int32Array;
  /** Number of labels that are not -100 (the loss is their mean). */
  targetTokens: number;
  /** Number of non-padding input tokens (for tokens/s). */
  inputTokens: number;
}

export interface DatasetStats {
  /** Lines (jsonl records) or blocks (txt) read from the file. */
  examples: number;
  /** Examples cut to block_size. */
  truncated: number;
  /** Examples dropped because nothing was left to predict (e.g. a prompt longer than the block). */
  dropped: number;
  /** Rows after blocking/packing. */
  rows: number;
  /** Tokens over all rows (without padding). */
  tokens: number;
  /** Predicted tokens (the loss denominator of one epoch). */
  targetTokens: number;
  /** txt only: tokens of the file left over after the last whole block (dropped, as TextDataset). */
  remainderTokens?: number;
}

/** A dataset ready for training: rows plus what produced them. */
export interface TrainDataset {
  /** The file it was read from (or a name given by the caller). */
  source: string;
  format: "txt" | "jsonl";
  kinds: RecordKind[];
  blockSize: number;
  packing: boolean;
  padId: number;
  rows: Row[];
  stats: DatasetStats;
  /** sha256 of the file bytes: a resumed run checks it trains on the same data. */
  sha256: string;
}

export interface DatasetOptions {
  /** Maximum tokens per row (TextDataset block size; truncation length for jsonl). */
  blockSize: number;
  /** Pack several short jsonl examples into one row with segment ids. Ignored for .txt (blocks are full). */
  packing?: boolean;
}
