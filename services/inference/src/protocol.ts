/**
 * Messages between the service (main thread) and the engine worker. Everything here is plain
 * data: it crosses a MessagePort by structured clone, so no classes, no protobuf messages, no
 * functions. The main thread resolves names to store directories; the worker does all model work.
 */
import type { ErrorCode } from "@qlora/core";
import type { DecodeMatmul } from "@qlora/kernels";
import type { EmbeddingsMode } from "@qlora/model";

export type { DecodeMatmul, EmbeddingsMode };

export type QuantMode = "nf4" | "none";

/** Per-request sampling parameters, already normalised (0 / 1 mean "off" as in the proto). */
export interface SamplingSpec {
  temperature: number;
  topK: number;
  topP: number;
  repetitionPenalty: number;
  /** undefined: a seed is drawn per request. */
  seed?: bigint;
}

export interface ModelRef {
  /** Store name of the base model. */
  name: string;
  quant: QuantMode;
  /** Directory of the model in the store. */
  dir: string;
}

export interface AdapterRef {
  name: string;
  /** Directory of the adapter in the store. */
  dir: string;
}

export interface GenerateJob {
  model: ModelRef;
  adapter: AdapterRef | null;
  prompt: string;
  messages: { role: string; content: string }[];
  sampling: SamplingSpec;
  maxNewTokens: number;
  stop: string[];
  /** Absolute time (Date.now() ms) after which the sequence is abandoned; 0: none. */
  deadline: number;
  /** Date.now() when the service received the request (queue time counts from here). */
  receivedAt: number;
}

export interface ScoreJob {
  model: ModelRef;
  adapter: AdapterRef | null;
  texts: string[];
  deadline: number;
}

export type FinishReasonName = "length" | "stop" | "cancelled";

export interface UsageInfo {
  promptTokens: number;
  completionTokens: number;
}

export interface TimingInfo {
  queueMs: number;
  timeToFirstTokenMs: number;
  totalMs: number;
  tokensPerSecond: number;
}

/** A resident adapter as the worker sees it. */
export interface ResidentAdapterInfo {
  name: string;
  model: string;
  quant: QuantMode;
  sha256: string;
  baseModel: string;
  rank: number;
  alpha: number;
  targetModules: string[];
  useRslora: boolean;
  residentBytes: number;
  lastUsedAt: number;
  loadMs: number;
  /** Requests using it right now. */
  refs: number;
  /** Unloaded by a client but still used by running requests (removed when the last one ends). */
  unloading: boolean;
}

export interface LoadedModelInfo {
  name: string;
  quant: QuantMode;
  /** Where the engine holds this base (the service's device). */
  device: "cpu" | "cuda";
  residentBytes: number;
  modelType: string;
  maxContext: number;
}

export interface ScoreResult {
  loss: number;
  tokens: number;
  losses: number[];
}

/** Requests that get exactly one answer. */
export type CallRequest =
  | { op: "loadModel"; model: ModelRef }
  | { op: "loadAdapter"; model: ModelRef; adapter: AdapterRef }
  | { op: "unloadAdapter"; name: string }
  | { op: "listAdapters" }
  | { op: "listModels" }
  | { op: "score"; job: ScoreJob }
  | { op: "stats" };

export interface EngineStats {
  running: number;
  waiting: number;
  steps: number;
  tokensGenerated: number;
  cancelled: number;
  /** Rows in the largest batch so far (shows that requests were batched together). */
  maxRowsInStep: number;
  /** Distinct adapters (incl. the base) in the most mixed step so far. */
  maxAdaptersInStep: number;
  adapterLoads: number;
  adapterEvictions: number;
  adapterBytes: number;
  adapterBudgetBytes: number;
}

export type CallResult =
  | { op: "loadModel"; model: LoadedModelInfo }
  | { op: "loadAdapter"; adapter: ResidentAdapterInfo }
  | { op: "unloadAdapter"; found: boolean }
  | { op: "listAdapters"; adapters: ResidentAdapterInfo[] }
  | { op: "listModels"; models: LoadedModelInfo[] }
  | { op: "score"; result: ScoreResult }
  | { op: "stats"; stats: EngineStats };

export interface SerializedError {
  code: ErrorCode;
  message: string;
}

export type ToWorker =
  | { type: "call"; id: number; request: CallRequest }
  | { type: "generate"; id: number; job: GenerateJob }
  | { type: "cancel"; id: number }
  | { type: "shutdown" };

/** One piece of generated output for one request. */
export interface TokenEvent {
  id: number;
  text: string;
  tokenIds: number[];
}

export interface DoneEvent {
  id: number;
  finishReason: FinishReasonName;
  usage: UsageInfo;
  timings: TimingInfo;
}

/**
 * What the engine did with adapters on its own, for the audit log: a load it started because a
 * request named an adapter that was not resident (once per load, however many requests waited
 * for it), or an eviction to stay within the adapter budget.
 */
export interface AdapterEvent {
  kind: "load" | "evict";
  name: string;
  /** The base model (and variant) whose cache it is. */
  model: string;
  quant: QuantMode;
  /** Store directory the adapter was read from. */
  dir: string;
  sha256: string;
  bytes: number;
  rank: number;
  loadMs: number;
  /** A load that failed (nothing was installed). */
  error?: SerializedError;
  /** The engine id (generate or call) of the request that started the load; null for evictions. */
  trigger: number | null;
}

export type FromWorker =
  | { type: "ready" }
  | { type: "result"; id: number; result: CallResult }
  | { type: "error"; id: number; error: SerializedError }
  /**
   * Everything one scheduler step produced, in one message: a step serves many sequences, and
   * one postMessage per step keeps the per-token overhead off both threads.
   */
  | { type: "step"; tokens: TokenEvent[]; done: DoneEvent[] }
  | { type: "modelState"; name: string; quant: QuantMode; state: "loading" | "ready" | "failed" }
  | { type: "adapterEvent"; event: AdapterEvent };

/** Options of the engine worker (workerData). */
export interface EngineOptions {
  /** Most sequences decoding at once (rows of decode in a step). */
  maxBatch: number;
  /** Token budget of one forward call: decode rows + prefill chunks. */
  maxTokensPerStep: number;
  /** KV-cache context per sequence (prompt + generated); 0: the model's max_position_embeddings. */
  maxContext: number;
  /** Byte budget of resident adapters per base model. */
  adapterBudgetBytes: number;
  /** Kernel threads in the worker (<= 0: the addon's default). */
  threads: number;
  /** Where base models are loaded (resolved by the caller: "auto" never reaches the worker). */
  device: "cpu" | "cuda";
  /** Decode-step NF4 matmul of the models it loads (default "exact"; @qlora/kernels EngineOptions). */
  decodeMatmul?: DecodeMatmul;
  /** embed_tokens / lm_head of the models it loads: "stored" (default) or "nf4" (@qlora/model LoadModelOptions). */
  embeddings?: EmbeddingsMode;
}
