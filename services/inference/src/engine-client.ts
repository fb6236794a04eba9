/**
 * The main thread's handle on the engine worker. The event loop only posts messages and routes
 * answers; every tokenization, forward pass and file parse happens in the worker.
 *
 * Backpressure lives here because it must be decided synchronously when a request arrives:
 * at most maxBatch sequences run in the worker and at most maxQueue more wait; one more is
 * refused with RESOURCE_EXHAUSTED instead of queueing without bound.
 */
import { Worker } from "node:worker_threads";
import { QloraError, ResourceExhausted, type ErrorCode } from "@qlora/core";
import { currentRequest, type RequestInfo } from "@qlora/rpc";
import type {
  AdapterEvent,
  CallRequest,
  CallResult,
  DoneEvent,
  EngineOptions,
  FromWorker,
  GenerateJob,
  QuantMode,
  SerializedError,
  ToWorker,
} from "./protocol.js";

export type GenerateEvent =
  | { kind: "tokens"; text: string; tokenIds: number[] }
  | ({ kind: "done" } & Omit<DoneEvent, "id">);

export interface EngineClientOptions extends EngineOptions {
  /** Requests allowed to wait for a batch slot beyond the maxBatch running ones. */
  maxQueue: number;
  /** Told when a base model starts/ends loading (drives the health status). */
  onModelState?: (name: string, quant: QuantMode, state: "loading" | "ready" | "failed") => void;
  /**
   * Told when the engine loads an adapter on its own (a request named one that was not resident)
   * or evicts one; `origin` is the request that started the load (its ids, caller and RPC), when
   * it was made while serving one.
   */
  onAdapterEvent?: (event: AdapterEvent, origin: RequestInfo | undefined) => void;
}

interface PendingCall {
  resolve(r: CallResult): void;
  reject(e: unknown): void;
}

/** A single-consumer async queue of one request's events. */
class EventStream implements AsyncIterable<GenerateEvent> {
  private readonly items: GenerateEvent[] = [];
  private error: unknown = null;
  private ended = false;
  private wake: (() => void) | null = null;

  push(e: GenerateEvent): void {
    this.items.push(e);
    if (e.kind === "done") this.ended = true;
    this.notify();
  }
  fail(e: unknown): void {
    this.error = e;
    this.ended = true;
    this.notify();
  }
  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }
  async *[Symbol.asyncIterator](): AsyncGenerator<GenerateEvent> {
    for (;;) {
      while (this.items.length > 0) {
        const e = this.items.shift()!;
        yield e;
        if (e.kind === "done") return;
      }
      if (this.error !== null) throw this.error;
      if (this.ended) return;
      await new Promise<void>((r) => (this.wake = r));
    }
  }
}

export function errorFromWorker(e: SerializedError): QloraError {
  return new QloraError(e.code as ErrorCode, e.message);
}


/**
 * The engine worker's V8 young generation cap (3 semi-spaces of 2 MiB). The model's memory is native;
 *  the worker's JS is the tokenizer, the scheduler and messages, and the default young generation grows
 * during a tokenizer load and stays resident (Llama-3 tokenizer: 24 MiB more peak RSS than with this cap).
 * bench/model.bench.mjs measures with the same cap (--max-semi-space-size=2).
 */
export const ENGINE_WORKER_YOUNG_GENERATION_MB = 6;

export class EngineClient {
  private worker: Worker | null = null;
  private ready: Promise<void> | null = null;
  private nextId = 1;
  private readonly calls = new Map<number, PendingCall>();
  private readonly streams = new Map<number, EventStream>();
  /** The request each engine id serves, while it is in the worker (for adapter events). */
  private readonly origins = new Map<number, RequestInfo>();
  private closed = false;

  constructor(private readonly options: EngineClientOptions) {}

  /** Generate requests in the worker now (running + waiting). */
  get inflight(): number {
    return this.streams.size;
  }

  get capacity(): number {
    return this.options.maxBatch + this.options.maxQueue;
  }

  /** One request/response exchange with the worker. */
  async call<K extends CallRequest["op"]>(
    request: Extract<CallRequest, { op: K }>,
  ): Promise<Extract<CallResult, { op: K }>> {
    const origin = currentRequest();
    await this.ensureWorker();
    const id = this.nextId++;
    if (origin && this.options.onAdapterEvent) this.origins.set(id, origin);
    return new Promise<Extract<CallResult, { op: K }>>((resolve, reject) => {
      this.calls.set(id, { resolve: resolve as (r: CallResult) => void, reject });
      this.post({ type: "call", id, request });
    });
  }

  /**
   * Starts a generation. Refuses at once (RESOURCE_EXHAUSTED) when the queue is full. Aborting
   * `signal` cancels the sequence in the worker; the stream then ends with a cancelled "done".
   */
  async generate(job: GenerateJob, signal?: AbortSignal): Promise<AsyncIterable<GenerateEvent>> {
    if (this.streams.size >= this.capacity) {
      throw new ResourceExhausted(
        `the inference queue is full (${this.options.maxBatch} running + ${this.options.maxQueue} waiting); retry later`,
      );
    }
    const id = this.nextId++;
    const stream = new EventStream();
    // Registered before the first await so concurrent arrivals see each other in inflight.
    this.streams.set(id, stream);
    const origin = currentRequest();
    if (origin && this.options.onAdapterEvent) this.origins.set(id, origin);
    try {
      await this.ensureWorker();
    } catch (e) {
      this.streams.delete(id);
      this.origins.delete(id);
      throw e;
    }
    if (signal?.aborted) {
      this.streams.delete(id);
      this.origins.delete(id);
      throw signal.reason;
    }
    const onAbort = () => {
      if (this.streams.has(id)) this.post({ type: "cancel", id });
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    this.post({ type: "generate", id, job });
    const self = this;
    return {
      async *[Symbol.asyncIterator]() {
        try {
          yield* stream;
        } finally {
          self.origins.delete(id);
          signal?.removeEventListener("abort", onAbort);
          // Still registered: the consumer stopped before "done" (client gone, write failed);
          // the sequence must not keep running in the worker.
          if (self.streams.delete(id)) self.post({ type: "cancel", id });
        }
      },
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    const w = this.worker;
    if (!w) return;
    const exited = new Promise<void>((r) => w.once("exit", () => r()));
    w.postMessage({ type: "shutdown" } satisfies ToWorker);
    // A worker stuck in a long native call is terminated after a grace period.
    const timer = setTimeout(() => void w.terminate(), 5000);
    await exited;
    clearTimeout(timer);
  }

  private post(m: ToWorker): void {
    this.worker?.postMessage(m);
  }

  private ensureWorker(): Promise<void> {
    if (this.closed) return Promise.reject(new QloraError("UNAVAILABLE", "the inference engine is shut down"));
    if (this.ready) return this.ready;
    const { maxQueue: _q, onModelState: _m, onAdapterEvent: _a, ...engineOptions } = this.options;
    const worker = new Worker(new URL("./worker/main.js", import.meta.url), {
      workerData: engineOptions,
      resourceLimits: { maxYoungGenerationSizeMb: ENGINE_WORKER_YOUNG_GENERATION_MB },
    });
    this.worker = worker;
    this.ready = new Promise<void>((resolve, reject) => {
      worker.once("error", reject);
      worker.once("message", (m: FromWorker) => {
        worker.off("error", reject);
        if (m.type === "ready") resolve();
        else reject(new Error(`engine worker: unexpected first message ${m.type}`));
        worker.on("message", (msg: FromWorker) => this.onMessage(msg));
      });
    });
    worker.on("error", (e) => this.onWorkerGone(e));
    worker.on("exit", (code) => this.onWorkerGone(new Error(`engine worker exited with code ${code}`)));
    // Node keeps the process alive for a worker; the service lifetime decides, not the worker.
    worker.unref();
    return this.ready;
  }

  private onMessage(m: FromWorker): void {
    switch (m.type) {
      case "result": {
        const c = this.calls.get(m.id);
        this.calls.delete(m.id);
        this.origins.delete(m.id);
        c?.resolve(m.result);
        break;
      }
      case "error": {
        const c = this.calls.get(m.id);
        if (c) {
          this.calls.delete(m.id);
          this.origins.delete(m.id);
          c.reject(errorFromWorker(m.error));
          break;
        }
        const s = this.streams.get(m.id);
        this.streams.delete(m.id);
        this.origins.delete(m.id);
        s?.fail(errorFromWorker(m.error));
        break;
      }
      case "step": {
        for (const t of m.tokens) {
          this.streams.get(t.id)?.push({ kind: "tokens", text: t.text, tokenIds: t.tokenIds });
        }
        for (const d of m.done) {
          const s = this.streams.get(d.id);
          this.streams.delete(d.id);
          this.origins.delete(d.id);
          s?.push({ kind: "done", finishReason: d.finishReason, usage: d.usage, timings: d.timings });
        }
        break;
      }
      case "modelState":
        this.options.onModelState?.(m.name, m.quant, m.state);
        break;
      case "adapterEvent": {
        // The worker posts the event before the answer of the request that started the load, so
        // that request's origin is still known here.
        const t = m.event.trigger;
        this.options.onAdapterEvent?.(m.event, t === null ? undefined : this.origins.get(t));
        break;
      }
      case "ready":
        break;
    }
  }

  /** The worker died: every caller gets UNAVAILABLE; the next request starts a fresh worker. */
  private onWorkerGone(e: unknown): void {
    if (!this.worker) return;
    this.worker = null;
    this.ready = null;
    const err = new QloraError("UNAVAILABLE", `the inference engine stopped: ${(e as Error)?.message ?? e}`);
    for (const c of this.calls.values()) c.reject(err);
    this.calls.clear();
    for (const s of this.streams.values()) s.fail(err);
    this.streams.clear();
    this.origins.clear();
  }
}
