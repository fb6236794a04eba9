/**
 * The seam between the service and the model runtime: the ONLY file of this package that
 * imports libs/model and libs/kernels. Everything the worker needs from a loaded base model is
 * the RuntimeModel interface below; the implementation is a thin wrapper over libs/model's
 * LoadedModel (its NativeModel, tokenizer, SequenceState, NativeSampler, adapter loader).
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { join } from "node:path";
import { InvalidArgument } from "@qlora/core";
import { setThreads, type DecodeMatmul } from "@qlora/kernels";
import {
  NativeSampler,
  SequenceState,
  exampleCrossEntropy,
  loadAdapter,
  loadModel,
  resolveSampling,
  type EmbeddingsMode,
  type LoadedAdapter,
  type LoadedModel,
} from "@qlora/model";
import type { AdapterRef, ModelRef, QuantMode, SamplingSpec } from "../protocol.js";
import type { AdapterMeta } from "./adapter-cache.js";
import type { BatchModel, TokenSampler } from "./scheduler.js";

export interface SamplerOptions {
  sampling: SamplingSpec;
  maxNewTokens: number;
  stop: string[];
  maxTotalTokens: number;
}

export interface AdapterRead {
  weights: unknown;
  meta: AdapterMeta;
  bytes: number;
  sha256: string;
}

export interface RuntimeModel {
  readonly name: string;
  readonly quant: QuantMode;
  readonly modelType: string;
  readonly device: "cpu" | "cuda";
  /** Tokens one sequence may hold (prompt + generated). */
  readonly maxContext: number;
  readonly batch: BatchModel;
  residentBytes(): number;
  /** Encodes with the tokenizer's special tokens (BOS for Llama). */
  encode(text: string): number[];
  /** Renders the chat template (with the generation prompt) and encodes it. */
  encodeChat(messages: { role: string; content: string }[]): number[];
  newSampler(promptIds: number[], options: SamplerOptions): TokenSampler;
  /** Mean next-token cross-entropy of one encoded text and how many tokens were predicted. */
  crossEntropy(ids: Int32Array, adapterSlot: number): { loss: number; tokens: number };
  /** Reads, validates against this base and hashes an adapter (typed errors on bad files). */
  readAdapter(ref: AdapterRef): Promise<AdapterRead>;
  installAdapter(slot: number, weights: unknown): void;
  removeAdapter(slot: number): void;
  dispose(): void;
}

export interface OpenOptions {
  /** KV slots (the scheduler's maxBatch). */
  maxSequences: number;
  /** 0: the model's own limit. */
  maxContext: number;
  /** Where the engine runs (FailedPrecondition from loadModel when "cuda" is unavailable). */
  device: "cpu" | "cuda";
  /** Decode-step NF4 matmul (default "exact"). */
  decodeMatmul?: DecodeMatmul;
  /** embed_tokens / lm_head as stored (default) or NF4. */
  embeddings?: EmbeddingsMode;
}

export function setEngineThreads(n: number): void {
  setThreads(n);
}

async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest("hex");
}

/**
 * The proto's sampling semantics → libs/model's: 0 means "off" for top_p and the repetition
 * penalty (their neutral value is 1), temperature 0 is greedy. The request fully specifies
 * sampling, so generation_config.json defaults do not apply (a client asking for temperature 0
 * gets greedy even if the model's config says do_sample).
 */
function toSamplingOptions(s: SamplingSpec) {
  return {
    temperature: s.temperature,
    topK: s.topK,
    topP: s.topP === 0 ? 1 : s.topP,
    repetitionPenalty: s.repetitionPenalty === 0 ? 1 : s.repetitionPenalty,
    ...(s.seed !== undefined ? { seed: s.seed } : {}),
  };
}

class Runtime implements RuntimeModel {
  readonly batch: BatchModel;

  constructor(
    readonly name: string,
    private readonly lm: LoadedModel,
  ) {
    const native = lm.native;
    this.batch = {
      createSequence: () => native.createSequence(),
      dropSequence: (seq: number) => native.dropSequence(seq),
      forwardSample: (rows, sampling) => native.forwardSample(rows, sampling),
    };
  }

  get quant(): QuantMode {
    return this.lm.quant;
  }
  get modelType(): string {
    return this.lm.config.modelType;
  }
  get device(): "cpu" | "cuda" {
    return this.lm.device;
  }
  get maxContext(): number {
    return this.lm.maxContext;
  }
  residentBytes(): number {
    return this.lm.residentBytes();
  }
  encode(text: string): number[] {
    return this.lm.tokenizer.encode(text);
  }
  encodeChat(messages: { role: string; content: string }[]): number[] {
    if (!this.lm.tokenizer.hasChatTemplate) {
      throw new InvalidArgument(`model ${this.name} has no chat template; send a prompt instead of messages`);
    }
    return this.lm.tokenizer.encodeChat(messages);
  }

  newSampler(promptIds: number[], o: SamplerOptions): TokenSampler {
    const sampling = resolveSampling(toSamplingOptions(o.sampling));
    return new SequenceState(
      this.lm.tokenizer,
      promptIds,
      { maxNewTokens: o.maxNewTokens, stop: o.stop, eosTokenIds: this.lm.eosTokenIds, maxTotalTokens: o.maxTotalTokens },
      new NativeSampler(sampling),
    );
  }

  crossEntropy(ids: Int32Array, adapterSlot: number): { loss: number; tokens: number } {
    // Windowed like `qlora eval` (libs/model evaluate): texts longer than the context still score.
    const r = exampleCrossEntropy(this.lm, ids, adapterSlot);
    return { loss: r.tokens > 0 ? r.sum / r.tokens : 0, tokens: r.tokens };
  }

  async readAdapter(ref: AdapterRef): Promise<AdapterRead> {
    const a = await loadAdapter(ref.dir, this.lm);
    const sha256 = await sha256File(join(ref.dir, "adapter_model.safetensors"));
    const tm = a.config.targetModules;
    return {
      weights: a,
      meta: {
        baseModel: a.config.baseModelNameOrPath ?? "",
        rank: a.rank,
        alpha: a.config.loraAlpha,
        targetModules: tm === null ? [] : typeof tm === "string" ? [tm] : tm,
        useRslora: a.config.useRslora,
      },
      bytes: a.bytes,
      sha256,
    };
  }

  installAdapter(slot: number, weights: unknown): void {
    this.lm.native.setAdapter(slot, (weights as LoadedAdapter).engine);
  }

  removeAdapter(slot: number): void {
    this.lm.native.removeAdapter(slot);
  }

  dispose(): void {
    this.lm.dispose();
  }
}

export async function openModel(ref: ModelRef, options: OpenOptions): Promise<RuntimeModel> {
  const lm = await loadModel(ref.dir, {
    quant: ref.quant,
    maxSequences: options.maxSequences,
    device: options.device,
    ...(options.maxContext > 0 ? { maxContext: options.maxContext } : {}),
    ...(options.decodeMatmul ? { decodeMatmul: options.decodeMatmul } : {}),
    ...(options.embeddings ? { embeddings: options.embeddings } : {}),
  });
  return new Runtime(ref.name, lm);
}
