/**
 * Continuous batching over one base model (the Orca/vLLM iteration-level scheme).
 *
 * Each step builds ONE forward batch:
 *   1. a decode row (one token: the last sampled one) for every sequence that finished its prompt;
 *   2. the next prompt chunk of sequences still in prefill (chunked so a long prompt cannot stall
 *      the decoders for a whole prompt's worth of compute);
 *   3. new requests, admitted in arrival order while there is room (maxBatch sequences) and token
 *      budget left (maxTokensPerStep).
 * Every row carries its own adapter slot, so requests for different adapters share the step
 * (Punica/S-LoRA style); the engine applies each row's LoRA after the shared base product.
 * The same call samples one token for every row whose prompt is now complete, each with its own
 * sampling (own params, own RNG; on the engine's device); finished sequences (EOS, stop string, length, cancel, deadline)
 * leave the batch at once, and their KV slot and adapter reference are released.
 *
 * Requests join and leave only between steps, so nothing here needs locking: the worker's event
 * loop delivers messages between steps.
 */
import type { RowSampling } from "@qlora/kernels";
import type { DoneEvent, FinishReasonName, SerializedError, TokenEvent } from "../protocol.js";

export interface ForwardRow {
  seq: number;
  tokens: Int32Array;
  /** Engine adapter slot; -1: the base alone. */
  adapter: number;
}

/** The slice of the engine the scheduler drives (the real one is libs/kernels' NativeModel). */
export interface BatchModel {
  createSequence(): number;
  dropSequence(seq: number): void;
  /** Runs the rows; returns one sampled token per row whose `sampling` entry is set, -1 for the others. */
  forwardSample(rows: ForwardRow[], sampling: (RowSampling | null)[]): Int32Array;
}

export interface SampleOutcome {
  /** Text that became final with this token (may be empty: partial UTF-8, held-back stop prefix). */
  delta: string;
  finished: boolean;
  finishReason?: FinishReasonName | null;
}

/** Per-sequence sampling + detokenization state (the real one is libs/model's SequenceState). */
export interface TokenSampler {
  /** What the engine needs to pick this sequence's next token (valid until the next accept). */
  sampling(): RowSampling;
  accept(token: number): SampleOutcome;
}

export interface SchedRequest {
  id: number;
  promptIds: Int32Array;
  /**
   * Called when the request is about to join the running batch: takes a reference on its
   * adapter and returns the engine slot (-1: the base), or null when the adapter is not resident
   * right now (it is being loaded again): the request keeps its place and later ones may pass.
   */
  acquire(): number | null;
  sampler: TokenSampler;
  maxNewTokens: number;
  /** Date.now() ms after which the sequence is abandoned; 0: none. */
  deadline: number;
  receivedAt: number;
  /** Called exactly once when the request leaves the scheduler (releases what acquire took). */
  release(): void;
}

export interface SchedulerLimits {
  maxBatch: number;
  maxTokensPerStep: number;
  /** KV capacity of one sequence (prompt + generated). */
  maxContext: number;
}

export interface StepOutput {
  tokens: TokenEvent[];
  done: DoneEvent[];
  failed: { id: number; error: SerializedError }[];
  rows: number;
  adapters: number;
}

interface Seq {
  req: SchedRequest;
  engineSeq: number;
  /** Engine adapter slot, set at admission. */
  adapter: number;
  /** Set by fail(): the request leaves with this error at the next step. */
  error: SerializedError | null;
  /** Prompt tokens already fed to the engine. */
  prefilled: number;
  /** Token sampled last step, fed in this step's decode row. */
  pending: number;
  generated: number;
  cancelled: boolean;
  admittedAt: number;
  firstTokenAt: number;
  lastTokenAt: number;
}

export class Scheduler {
  private readonly waiting: Seq[] = [];
  private readonly running: Seq[] = [];
  private readonly byId = new Map<number, Seq>();
  steps = 0;
  /** Tokens sampled so far (all sequences). */
  tokensGenerated = 0;
  /** Sequences retired by cancel or deadline. */
  cancelled = 0;
  maxRowsInStep = 0;
  maxAdaptersInStep = 0;

  constructor(
    private readonly model: BatchModel,
    readonly limits: SchedulerLimits,
    private readonly now: () => number = Date.now,
  ) {
    if (limits.maxTokensPerStep < limits.maxBatch) {
      throw new Error("maxTokensPerStep must be >= maxBatch (every running sequence decodes each step)");
    }
  }

  get runningCount(): number {
    return this.running.length;
  }
  get waitingCount(): number {
    return this.waiting.length;
  }
  hasWork(): boolean {
    return this.running.length > 0 || this.waiting.length > 0;
  }

  submit(req: SchedRequest): void {
    if (req.promptIds.length === 0) throw new Error("empty prompt");
    const seq: Seq = {
      req,
      engineSeq: -1,
      adapter: -1,
      error: null,
      prefilled: 0,
      pending: -1,
      generated: 0,
      cancelled: false,
      admittedAt: 0,
      firstTokenAt: 0,
      lastTokenAt: 0,
    };
    this.waiting.push(seq);
    this.byId.set(req.id, seq);
  }

  /** Marks the request cancelled; it leaves at the start of the next step. */
  cancel(id: number): boolean {
    const s = this.byId.get(id);
    if (!s) return false;
    s.cancelled = true;
    return true;
  }

  /** Fails one request at the next step (e.g. its adapter could not be loaded again). */
  fail(id: number, error: SerializedError): boolean {
    const s = this.byId.get(id);
    if (!s) return false;
    s.error = error;
    return true;
  }

  /** Abandons everything (model unload / fatal engine error). */
  failAll(error: SerializedError): StepOutput {
    const out = emptyOutput();
    for (const s of [...this.running, ...this.waiting]) this.drop(s, error, out);
    return out;
  }

  step(): StepOutput {
    const out = emptyOutput();
    const now = this.now();
    this.retireCancelled(now, out);

    const rows: ForwardRow[] = [];
    const rowSeqs: Seq[] = [];
    let budget = this.limits.maxTokensPerStep;

    for (const s of this.running) {
      if (s.prefilled === s.req.promptIds.length) {
        rows.push({ seq: s.engineSeq, tokens: Int32Array.of(s.pending), adapter: s.adapter });
        rowSeqs.push(s);
        budget--;
      }
    }
    for (const s of this.running) {
      if (budget <= 0) break;
      if (s.prefilled < s.req.promptIds.length) budget -= this.addPrefill(s, budget, rows, rowSeqs);
    }
    // Admission in arrival order; a request whose adapter is being reloaded keeps its place
    // while later ones go ahead (no head-of-line blocking on adapter I/O).
    for (let i = 0; i < this.waiting.length && budget > 0 && this.running.length < this.limits.maxBatch; ) {
      const s = this.waiting[i]!;
      let engineSeq: number;
      try {
        engineSeq = this.model.createSequence();
      } catch {
        break; // KV slots exhausted: the engine is smaller than maxBatch; wait for a finisher
      }
      const adapter = s.req.acquire();
      if (adapter === null) {
        this.model.dropSequence(engineSeq);
        i++;
        continue;
      }
      this.waiting.splice(i, 1);
      s.engineSeq = engineSeq;
      s.adapter = adapter;
      s.admittedAt = now;
      this.running.push(s);
      budget -= this.addPrefill(s, budget, rows, rowSeqs);
    }
    if (rows.length === 0) return out;

    let tokens: Int32Array;
    try {
      // a mid-prompt chunk's row is not sampled (its logits are not used)
      const sampling = rowSeqs.map((s) => (s.prefilled < s.req.promptIds.length ? null : s.req.sampler.sampling()));
      tokens = this.model.forwardSample(rows, sampling);
    } catch (e) {
      // An engine failure poisons only the sequences in this batch; each gets the error.
      const error: SerializedError = { code: "INTERNAL", message: `forward failed: ${(e as Error)?.message ?? e}` };
      for (const s of new Set(rowSeqs)) this.drop(s, error, out);
      return out;
    }
    this.steps++;
    out.rows = rows.length;
    out.adapters = new Set(rows.map((r) => r.adapter)).size;
    this.maxRowsInStep = Math.max(this.maxRowsInStep, out.rows);
    this.maxAdaptersInStep = Math.max(this.maxAdaptersInStep, out.adapters);

    const t = this.now();
    for (let i = 0; i < rowSeqs.length; i++) {
      const s = rowSeqs[i]!;
      if (s.prefilled < s.req.promptIds.length) continue;
      const token = tokens[i]!;
      let res: SampleOutcome;
      try {
        res = s.req.sampler.accept(token);
      } catch (e) {
        this.drop(s, { code: "INTERNAL", message: `sampling failed: ${(e as Error)?.message ?? e}` }, out);
        continue;
      }
      s.generated++;
      this.tokensGenerated++;
      if (s.firstTokenAt === 0) s.firstTokenAt = t;
      s.lastTokenAt = t;
      s.pending = token;
      out.tokens.push({ id: s.req.id, text: res.delta, tokenIds: [token] });
      let reason: FinishReasonName | null = res.finished ? (res.finishReason ?? "stop") : null;
      if (!reason && s.generated >= s.req.maxNewTokens) reason = "length";
      // The next decode row would need one more KV position than the sequence may hold.
      if (!reason && s.req.promptIds.length + s.generated >= this.limits.maxContext) reason = "length";
      if (reason) this.finish(s, reason, out);
    }
    return out;
  }

  /** Adds the sequence's next prompt chunk (at most `budget` tokens); returns its length. */
  private addPrefill(s: Seq, budget: number, rows: ForwardRow[], rowSeqs: Seq[]): number {
    const prompt = s.req.promptIds;
    const n = Math.min(prompt.length - s.prefilled, budget);
    rows.push({ seq: s.engineSeq, tokens: prompt.subarray(s.prefilled, s.prefilled + n), adapter: s.adapter });
    rowSeqs.push(s);
    s.prefilled += n;
    return n;
  }

  private retireCancelled(now: number, out: StepOutput): void {
    for (const s of [...this.running, ...this.waiting]) {
      if (s.error) {
        this.drop(s, s.error, out);
        continue;
      }
      if (s.cancelled || (s.req.deadline > 0 && now >= s.req.deadline)) {
        this.cancelled++;
        this.finish(s, "cancelled", out);
      }
    }
  }

  private finish(s: Seq, reason: FinishReasonName, out: StepOutput): void {
    const t = this.now();
    const r = s.req;
    const decodeMs = s.lastTokenAt - s.firstTokenAt;
    out.done.push({
      id: r.id,
      finishReason: reason,
      usage: { promptTokens: r.promptIds.length, completionTokens: s.generated },
      timings: {
        queueMs: Math.max(0, (s.admittedAt || t) - r.receivedAt),
        timeToFirstTokenMs: s.firstTokenAt ? s.firstTokenAt - r.receivedAt : 0,
        totalMs: t - r.receivedAt,
        // Decode speed after the first token (the first one is prefill-bound).
        tokensPerSecond: s.generated > 1 && decodeMs > 0 ? ((s.generated - 1) * 1000) / decodeMs : 0,
      },
    });
    this.remove(s);
  }

  private drop(s: Seq, error: SerializedError, out: StepOutput): void {
    out.failed.push({ id: s.req.id, error });
    this.remove(s);
  }

  private remove(s: Seq): void {
    if (!this.byId.delete(s.req.id)) return;
    const ri = this.running.indexOf(s);
    if (ri >= 0) this.running.splice(ri, 1);
    const wi = this.waiting.indexOf(s);
    if (wi >= 0) this.waiting.splice(wi, 1);
    if (s.engineSeq >= 0) {
      try {
        this.model.dropSequence(s.engineSeq);
      } catch {
        // A failed drop leaks one KV slot at worst; the request must still complete.
      }
      s.engineSeq = -1;
    }
    s.req.release();
  }
}

function emptyOutput(): StepOutput {
  return { tokens: [], done: [], failed: [], rows: 0, adapters: 0 };
}
