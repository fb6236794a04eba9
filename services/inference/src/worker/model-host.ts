/**
 * One loaded base model inside the worker: its engine, its scheduler and its resident adapters.
 * Turns a GenerateJob into a scheduler request (tokenize, validate against the context, take an
 * adapter reference, build the per-sequence sampler) and runs Score texts.
 */
import { InvalidArgument, QloraError, errorMessage } from "@qlora/core";
import type {
  AdapterEvent,
  AdapterRef,
  GenerateJob,
  LoadedModelInfo,
  QuantMode,
  ResidentAdapterInfo,
  ScoreJob,
  ScoreResult,
  SerializedError,
} from "../protocol.js";
import { AdapterCache, type AdapterCacheEvent, type AdapterEntry } from "./adapter-cache.js";
import type { RuntimeModel } from "./runtime.js";
import { Scheduler, type SchedulerLimits, type SchedRequest, type StepOutput } from "./scheduler.js";

export function serializeError(e: unknown): SerializedError {
  if (e instanceof QloraError) return { code: e.code, message: e.message };
  return { code: "INTERNAL", message: errorMessage(e) };
}

/** max_new_tokens when the request leaves it 0 (the proto's documented default). */
export const DEFAULT_MAX_NEW_TOKENS = 64;

export class ModelHost {
  readonly scheduler: Scheduler;
  readonly adapters: AdapterCache<unknown>;

  constructor(
    readonly model: RuntimeModel,
    limits: Omit<SchedulerLimits, "maxContext">,
    adapterBudgetBytes: number,
    /** Asks the worker loop for a step (something changed outside a step). */
    private readonly wake: () => void,
    /** Told about the adapter loads and evictions the cache does on its own (audit log). */
    onAdapterEvent: (e: AdapterEvent) => void = () => {},
  ) {
    this.scheduler = new Scheduler(model.batch, { ...limits, maxContext: model.maxContext });
    this.adapters = new AdapterCache(
      {
        read: (ref) => model.readAdapter(ref),
        install: (slot, w) => model.installAdapter(slot, w),
        remove: (slot) => model.removeAdapter(slot),
      },
      adapterBudgetBytes,
      { name: model.name, quant: model.quant },
      Date.now,
      (e) => onAdapterEvent(this.adapterEvent(e)),
    );
  }

  /** A cache event as plain data for the main thread. */
  private adapterEvent(e: AdapterCacheEvent): AdapterEvent {
    const where = { model: this.model.name, quant: this.model.quant };
    if (e.kind === "loadFailed") {
      return { kind: "load", name: e.ref.name, ...where, dir: e.ref.dir, sha256: "", bytes: 0, rank: 0, loadMs: 0, error: serializeError(e.error), trigger: e.trigger };
    }
    const x = e.entry;
    const base = { name: x.name, ...where, sha256: x.sha256, bytes: x.bytes, rank: x.meta.rank, loadMs: x.loadMs };
    return e.kind === "loaded" ? { kind: "load", ...base, dir: e.ref.dir, trigger: e.trigger } : { kind: "evict", ...base, dir: "", trigger: null };
  }

  /** One scheduler step, then the adapters installed before it become evictable. */
  step(): StepOutput {
    const out = this.scheduler.step();
    this.adapters.endStep();
    return out;
  }

  get name(): string {
    return this.model.name;
  }
  get quant(): QuantMode {
    return this.model.quant;
  }

  info(): LoadedModelInfo {
    return {
      name: this.model.name,
      quant: this.model.quant,
      device: this.model.device,
      residentBytes: this.model.residentBytes(),
      modelType: this.model.modelType,
      maxContext: this.model.maxContext,
    };
  }

  /**
   * Everything a request needs before it can join a batch. Throws typed errors for bad requests;
   * on success the returned request holds an adapter reference that the scheduler releases.
   */
  async prepare(
    id: number,
    job: GenerateJob,
    isCancelled: () => boolean,
  ): Promise<SchedRequest | null> {
    const m = this.model;
    const promptIds =
      job.messages.length > 0 ? m.encodeChat(job.messages) : m.encode(job.prompt);
    if (promptIds.length === 0) throw new InvalidArgument("the prompt encodes to no tokens");
    const room = m.maxContext - promptIds.length;
    if (room < 1) {
      throw new InvalidArgument(
        `the prompt has ${promptIds.length} tokens; model ${m.name} holds at most ${m.maxContext} (prompt + new tokens)`,
      );
    }
    let maxNewTokens = job.maxNewTokens;
    if (maxNewTokens === 0) {
      maxNewTokens = Math.min(DEFAULT_MAX_NEW_TOKENS, room);
    } else if (maxNewTokens > room) {
      throw new InvalidArgument(
        `max_new_tokens ${maxNewTokens} does not fit: the prompt has ${promptIds.length} tokens and model ${m.name} ` +
          `holds at most ${m.maxContext} (at most ${room} new tokens for this prompt)`,
      );
    }
    // Built before the adapter is taken: a bad stop string must not leave a reference behind.
    const sampler = m.newSampler(promptIds, {
      sampling: job.sampling,
      maxNewTokens,
      stop: job.stop,
      maxTotalTokens: m.maxContext,
    });
    // The adapter is read and validated now, so bad files fail the request at once; the
    // reference is taken only when the scheduler admits the request into the running batch.
    const adapter = job.adapter;
    if (adapter) await this.adapters.ensure(adapter, id);
    if (isCancelled()) return null;
    let held: AdapterEntry | null = null;
    return {
      id,
      promptIds: Int32Array.from(promptIds),
      acquire: () => {
        if (!adapter) return -1;
        held = this.adapters.tryAcquire(adapter.name);
        if (held) return held.slot;
        // Evicted or unloaded since the request arrived: load it again, then retry admission.
        this.adapters.ensure(adapter, id).then(
          () => this.wake(),
          (e: unknown) => {
            this.scheduler.fail(id, serializeError(e));
            this.wake();
          },
        );
        return null;
      },
      sampler,
      maxNewTokens,
      deadline: job.deadline,
      receivedAt: job.receivedAt,
      release: () => {
        if (!held) return;
        const e = held;
        held = null;
        this.adapters.release(e);
      },
    };
  }

  async loadAdapter(ref: AdapterRef): Promise<ResidentAdapterInfo> {
    const e = await this.adapters.load(ref);
    return this.adapters.describe(e);
  }

  /**
   * Scores texts one at a time; `yieldToScheduler` runs between texts so that generation keeps
   * streaming while a long Score request is in progress.
   */
  async score(job: ScoreJob, yieldToScheduler: () => Promise<void>, trigger: number | null = null): Promise<ScoreResult> {
    if (job.texts.length === 0) throw new InvalidArgument("texts is empty");
    const encoded = job.texts.map((t, i) => {
      if (t.length === 0) throw new InvalidArgument(`texts[${i}] is empty`);
      const ids = this.model.encode(t);
      if (ids.length < 2) throw new InvalidArgument(`texts[${i}] encodes to fewer than 2 tokens: nothing to predict`);
      // Longer than the context is fine: it is scored in windows, like `qlora eval`.
      return Int32Array.from(ids);
    });
    let entry: AdapterEntry | null = null;
    if (job.adapter) entry = await this.adapters.acquire(job.adapter, trigger);
    try {
      const losses: number[] = [];
      let sum = 0;
      let tokens = 0;
      for (const ids of encoded) {
        if (job.deadline > 0 && Date.now() >= job.deadline) {
          throw new QloraError("DEADLINE_EXCEEDED", "Score: deadline exceeded");
        }
        const r = this.model.crossEntropy(ids, entry ? entry.slot : -1);
        losses.push(r.loss);
        sum += r.loss * r.tokens;
        tokens += r.tokens;
        await yieldToScheduler();
      }
      return { loss: sum / tokens, tokens, losses };
    } finally {
      if (entry) this.adapters.release(entry);
    }
  }
}
