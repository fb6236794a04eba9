/**
 * What the operator sees of the engine: every generation (gRPC, Connect or OpenAI HTTP alike) is
 * observed at the EngineClient, so metrics, the live-request list and the tokens/s figure cover
 * all doors. Engine-side totals (steps, queue, adapter cache) are pulled from the worker's stats
 * before each scrape or page refresh.
 */
import type { InferenceMetrics } from "@qlora/rpc";
import type { EngineClient, GenerateEvent } from "../engine-client.js";
import type { GenerateJob } from "../protocol.js";

export interface LiveRequest {
  id: number;
  model: string;
  adapter: string;
  startedAt: number;
  /** Completion tokens so far. */
  tokens: number;
  firstTokenAt: number | null;
}

/** Completion tokens per second over a sliding window of one-second buckets. */
class Throughput {
  private readonly buckets = new Map<number, number>();
  constructor(private readonly windowS = 10) {}

  add(n: number, now = Date.now()): void {
    const s = Math.floor(now / 1000);
    this.buckets.set(s, (this.buckets.get(s) ?? 0) + n);
    for (const k of this.buckets.keys()) if (k <= s - this.windowS) this.buckets.delete(k);
  }

  /** Mean tokens/s over the last full window (the current, partial second excluded). */
  rate(now = Date.now()): number {
    const s = Math.floor(now / 1000);
    let sum = 0;
    for (const [k, v] of this.buckets) if (k < s && k >= s - this.windowS) sum += v;
    return sum / this.windowS;
  }
}

export class EngineObserver {
  /** Set on server start: the server's inference metrics. */
  metrics: InferenceMetrics | null = null;
  private started = false;
  private nextId = 1;
  readonly live = new Map<number, LiveRequest>();
  private readonly throughput = new Throughput();
  totalRequests = 0;
  totalTokens = 0;
  private seenLoads = new Set<string>();

  constructor(private readonly engine: EngineClient) {
    const generate = engine.generate.bind(engine);
    const call = engine.call.bind(engine);
    engine.generate = async (job, signal) => {
      this.started = true;
      if (job.adapter) this.metrics?.countAdapterRequest();
      return this.observe(job, await generate(job, signal));
    };
    engine.call = ((request: Parameters<EngineClient["call"]>[0]) => {
      this.started = true;
      return call(request);
    }) as EngineClient["call"];
  }

  /** Whether the engine worker was ever asked for anything (polling must not start it). */
  get engineStarted(): boolean {
    return this.started;
  }

  tokensPerSecond(): number {
    return this.throughput.rate();
  }

  private observe(job: GenerateJob, events: AsyncIterable<GenerateEvent>): AsyncIterable<GenerateEvent> {
    const self = this;
    const id = this.nextId++;
    const live: LiveRequest = { id, model: job.model.name, adapter: job.adapter?.name ?? "", startedAt: job.receivedAt, tokens: 0, firstTokenAt: null };
    this.live.set(id, live);
    this.totalRequests++;
    return {
      async *[Symbol.asyncIterator]() {
        let finished = false;
        try {
          for await (const e of events) {
            if (e.kind === "tokens") {
              const n = e.tokenIds.length;
              live.tokens += n;
              if (n > 0) {
                live.firstTokenAt ??= Date.now();
                self.throughput.add(n);
                self.totalTokens += n;
              }
            } else {
              finished = true;
              self.metrics?.observeGeneration({
                model: job.model.name,
                adapter: job.adapter?.name ?? "",
                finishReason: e.finishReason,
                promptTokens: e.usage.promptTokens,
                completionTokens: e.usage.completionTokens,
                queueMs: e.timings.queueMs,
                timeToFirstTokenMs: e.timings.timeToFirstTokenMs,
                tokensPerSecond: e.timings.tokensPerSecond,
              });
            }
            yield e;
          }
        } catch (err) {
          if (!finished) {
            finished = true;
            self.metrics?.observeGeneration({
              model: job.model.name,
              adapter: job.adapter?.name ?? "",
              finishReason: "error",
              promptTokens: 0,
              completionTokens: live.tokens,
              queueMs: -1,
              timeToFirstTokenMs: 0,
              tokensPerSecond: 0,
            });
          }
          throw err;
        } finally {
          if (!finished) {
            // The consumer stopped early (client gone): the engine cancels the sequence.
            self.metrics?.observeGeneration({
              model: job.model.name,
              adapter: job.adapter?.name ?? "",
              finishReason: "cancelled",
              promptTokens: 0,
              completionTokens: live.tokens,
              queueMs: -1,
              timeToFirstTokenMs: 0,
              tokensPerSecond: 0,
            });
          }
          self.live.delete(id);
        }
      },
    };
  }

  /** Pulls the worker's totals into the metrics (before a scrape). No-op until the engine runs. */
  async refresh(): Promise<void> {
    const m = this.metrics;
    if (!m || !this.started) return;
    const { stats } = await this.engine.call({ op: "stats" });
    m.setEngineTotals({
      running: stats.running,
      waiting: stats.waiting,
      steps: stats.steps,
      tokensGenerated: stats.tokensGenerated,
      maxRowsInStep: stats.maxRowsInStep,
      ...((stats as { adapterHits?: number }).adapterHits !== undefined ? { adapterHits: (stats as { adapterHits?: number }).adapterHits } : {}),
      adapterMisses: stats.adapterLoads,
      adapterEvictions: stats.adapterEvictions,
      adapterBytes: stats.adapterBytes,
      adapterBudgetBytes: stats.adapterBudgetBytes,
    });
    const { models } = await this.engine.call({ op: "listModels" });
    m.modelResidentBytes.reset();
    for (const mm of models) m.modelResidentBytes.set({ model: mm.name, quant: mm.quant }, mm.residentBytes);
    // Load times of adapters that became resident since the last look (keyed by content).
    const { adapters } = await this.engine.call({ op: "listAdapters" });
    const now = new Set<string>();
    for (const a of adapters) {
      const key = `${a.model}\u0000${a.quant}\u0000${a.name}\u0000${a.sha256}\u0000${a.loadMs}`;
      now.add(key);
      if (!this.seenLoads.has(key)) m.observeAdapterLoad(a.loadMs / 1000);
    }
    this.seenLoads = now;
  }
}
