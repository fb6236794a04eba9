/**
 * Prometheus metrics (prom-client), one registry per server, served on `GET /metrics`.
 *
 * - RPCs: `qlora_rpc_requests_total` / `qlora_rpc_request_duration_seconds` per service, method and
 *   status code (an interceptor; server streams are timed to their end), `qlora_rpc_in_flight`.
 * - HTTP routes: `qlora_http_requests_total` / `qlora_http_request_duration_seconds` per route and status.
 * - Inference (fed by the inference service): time to first token, decode tokens/s, queue time,
 *   tokens, queue depth, running sequences, batch size, adapter cache hits/misses/evictions,
 *   adapter load time, resident bytes.
 * - Training (fed by the trainer through `ctx.metrics.training`): jobs by state, tokens/s, loss.
 * - The process: prom-client's default metrics (`process_resident_memory_bytes`, heap, event loop lag, …).
 *
 * Pull-style values (queue depth, totals kept elsewhere) are refreshed by `onCollect` hooks that
 * run before each scrape.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { codeName } from "./http-routes.js";

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];
const TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30];
const TPS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
const LOAD_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export const JOB_STATE_NAMES = ["queued", "running", "succeeded", "failed", "cancelled"] as const;

export interface GenerationObservation {
  /** Base model name. */
  model: string;
  /** Adapter name, "" for the base alone. */
  adapter: string;
  /** "length" | "stop" | "cancelled" | "error". */
  finishReason: string;
  promptTokens: number;
  completionTokens: number;
  queueMs: number;
  timeToFirstTokenMs: number;
  tokensPerSecond: number;
}

/** Cumulative totals kept elsewhere (e.g. in the engine worker), mirrored into counters. */
export interface EngineTotals {
  running: number;
  waiting: number;
  steps: number;
  /** Decode rows so far (tokens generated), with `steps` gives the mean batch size. */
  tokensGenerated: number;
  maxRowsInStep: number;
  adapterHits?: number;
  adapterMisses: number;
  adapterEvictions: number;
  adapterBytes: number;
  adapterBudgetBytes: number;
}

export class InferenceMetrics {
  readonly requests: Counter<"model" | "kind" | "finish_reason">;
  readonly timeToFirstToken: Histogram<"model">;
  readonly tokensPerSecond: Histogram<"model">;
  readonly queueTime: Histogram<"model">;
  readonly generatedTokens: Counter<"model">;
  readonly promptTokens: Counter<"model">;
  readonly queueDepth: Gauge;
  readonly running: Gauge;
  readonly batchSize: Gauge;
  readonly batchSizeMax: Gauge;
  readonly steps: Counter;
  readonly adapterHits: Counter;
  readonly adapterMisses: Counter;
  readonly adapterEvictions: Counter;
  readonly adapterLoadSeconds: Histogram;
  readonly adapterResidentBytes: Gauge;
  readonly adapterBudgetBytes: Gauge;
  readonly modelResidentBytes: Gauge<"model" | "quant">;
  private last: EngineTotals | null = null;
  /** Requests naming an adapter, counted as they arrive (hits are derived when the engine has no count). */
  private adapterRequests = 0;

  constructor(registry: Registry) {
    const r = [registry];
    this.requests = new Counter({ name: "qlora_inference_requests_total", help: "Finished generation requests by base model, kind (base|adapter) and finish reason", labelNames: ["model", "kind", "finish_reason"], registers: r });
    this.timeToFirstToken = new Histogram({ name: "qlora_inference_time_to_first_token_seconds", help: "Arrival to first generated token", labelNames: ["model"], buckets: TTFT_BUCKETS, registers: r });
    this.tokensPerSecond = new Histogram({ name: "qlora_inference_tokens_per_second", help: "Decode speed of a request after its first token", labelNames: ["model"], buckets: TPS_BUCKETS, registers: r });
    this.queueTime = new Histogram({ name: "qlora_inference_queue_seconds", help: "Arrival to first scheduled step", labelNames: ["model"], buckets: TTFT_BUCKETS, registers: r });
    this.generatedTokens = new Counter({ name: "qlora_inference_generated_tokens_total", help: "Completion tokens generated (rate() gives tokens/s)", labelNames: ["model"], registers: r });
    this.promptTokens = new Counter({ name: "qlora_inference_prompt_tokens_total", help: "Prompt tokens processed", labelNames: ["model"], registers: r });
    this.queueDepth = new Gauge({ name: "qlora_inference_queue_depth", help: "Requests waiting for a batch slot", registers: r });
    this.running = new Gauge({ name: "qlora_inference_running_sequences", help: "Sequences in the running batch", registers: r });
    this.batchSize = new Gauge({ name: "qlora_inference_batch_size", help: "Mean decode rows per scheduler step since the previous scrape", registers: r });
    this.batchSizeMax = new Gauge({ name: "qlora_inference_batch_size_max", help: "Largest number of rows in one step so far", registers: r });
    this.steps = new Counter({ name: "qlora_inference_steps_total", help: "Scheduler steps (forward calls)", registers: r });
    this.adapterHits = new Counter({ name: "qlora_adapter_cache_hits_total", help: "Adapter uses served from the resident cache", registers: r });
    this.adapterMisses = new Counter({ name: "qlora_adapter_cache_misses_total", help: "Adapter loads (a use or LoadAdapter that found it not resident)", registers: r });
    this.adapterEvictions = new Counter({ name: "qlora_adapter_cache_evictions_total", help: "Adapters evicted to stay within the byte budget", registers: r });
    this.adapterLoadSeconds = new Histogram({ name: "qlora_adapter_load_seconds", help: "Time to read, check and install an adapter", buckets: LOAD_BUCKETS, registers: r });
    this.adapterResidentBytes = new Gauge({ name: "qlora_adapter_resident_bytes", help: "Bytes of resident adapters", registers: r });
    this.adapterBudgetBytes = new Gauge({ name: "qlora_adapter_budget_bytes", help: "Adapter byte budget per base model", registers: r });
    this.modelResidentBytes = new Gauge({ name: "qlora_model_resident_bytes", help: "Bytes held by a loaded base model", labelNames: ["model", "quant"], registers: r });
  }

  /** One finished generation (any API: gRPC, Connect, OpenAI HTTP). */
  observeGeneration(o: GenerationObservation): void {
    const model = o.model || "unknown";
    this.requests.inc({ model, kind: o.adapter ? "adapter" : "base", finish_reason: o.finishReason });
    if (o.completionTokens > 0) this.generatedTokens.inc({ model }, o.completionTokens);
    if (o.promptTokens > 0) this.promptTokens.inc({ model }, o.promptTokens);
    if (o.finishReason === "error") return;
    // Timings come in whole milliseconds: 0 is a real (sub-millisecond) time to first token.
    if (o.completionTokens > 0 && o.timeToFirstTokenMs >= 0) this.timeToFirstToken.observe({ model }, o.timeToFirstTokenMs / 1000);
    if (o.queueMs >= 0) this.queueTime.observe({ model }, o.queueMs / 1000);
    if (o.completionTokens > 1 && o.tokensPerSecond > 0 && Number.isFinite(o.tokensPerSecond)) {
      this.tokensPerSecond.observe({ model }, o.tokensPerSecond);
    }
  }

  /** A request naming an adapter arrived (used to derive cache hits when the engine has no hit count). */
  countAdapterRequest(): void {
    this.adapterRequests++;
  }

  observeAdapterLoad(seconds: number): void {
    if (Number.isFinite(seconds) && seconds >= 0) this.adapterLoadSeconds.observe(seconds);
  }

  /** Mirrors the engine's cumulative totals (counters grow by the difference; a restart resets the baseline). */
  setEngineTotals(t: EngineTotals): void {
    const prev = this.last;
    const delta = (now: number, before: number | undefined) => (before === undefined || now < before ? now : now - before);
    this.queueDepth.set(t.waiting);
    this.running.set(t.running);
    this.batchSizeMax.set(t.maxRowsInStep);
    const dSteps = delta(t.steps, prev?.steps);
    const dTokens = delta(t.tokensGenerated, prev?.tokensGenerated);
    this.batchSize.set(dSteps > 0 ? dTokens / dSteps : 0);
    this.steps.inc(dSteps);
    const dMiss = delta(t.adapterMisses, prev?.adapterMisses);
    this.adapterMisses.inc(dMiss);
    this.adapterEvictions.inc(delta(t.adapterEvictions, prev?.adapterEvictions));
    if (t.adapterHits !== undefined) {
      this.adapterHits.inc(delta(t.adapterHits, prev?.adapterHits));
    } else {
      // Uses that did not need a load: adapter requests minus loads (LoadAdapter calls make this
      // an underestimate, never an overestimate).
      const hits = Math.max(0, this.adapterRequests - dMiss);
      this.adapterHits.inc(hits);
      this.adapterRequests = 0;
    }
    this.adapterResidentBytes.set(t.adapterBytes);
    this.adapterBudgetBytes.set(t.adapterBudgetBytes);
    this.last = { ...t };
  }
}

export interface TrainingStep {
  jobId: string;
  step: number;
  loss: number;
  tokensPerSecond: number;
  learningRate?: number;
}

export class TrainingMetrics {
  readonly jobs: Gauge<"state">;
  readonly tokensPerSecond: Gauge<"job">;
  readonly loss: Gauge<"job">;
  readonly step: Gauge<"job">;
  readonly learningRate: Gauge<"job">;
  readonly steps: Counter;
  private readonly live = new Set<string>();

  constructor(registry: Registry) {
    const r = [registry];
    this.jobs = new Gauge({ name: "qlora_training_jobs", help: "Training jobs by state", labelNames: ["state"], registers: r });
    this.tokensPerSecond = new Gauge({ name: "qlora_training_tokens_per_second", help: "Training throughput of a running job (last logged step)", labelNames: ["job"], registers: r });
    this.loss = new Gauge({ name: "qlora_training_loss", help: "Training loss of a running job (last logged step)", labelNames: ["job"], registers: r });
    this.step = new Gauge({ name: "qlora_training_step", help: "Last logged optimizer step of a running job", labelNames: ["job"], registers: r });
    this.learningRate = new Gauge({ name: "qlora_training_learning_rate", help: "Learning rate of a running job (last logged step)", labelNames: ["job"], registers: r });
    this.steps = new Counter({ name: "qlora_training_logged_steps_total", help: "Logged training steps (all jobs)", registers: r });
    for (const s of JOB_STATE_NAMES) this.jobs.set({ state: s }, 0);
  }

  /** Jobs per state (states not given are 0). Call on every state change, or from an onCollect hook. */
  setJobCounts(counts: Partial<Record<string, number>>): void {
    for (const s of JOB_STATE_NAMES) this.jobs.set({ state: s }, counts[s] ?? 0);
    for (const [s, n] of Object.entries(counts)) if (!(JOB_STATE_NAMES as readonly string[]).includes(s)) this.jobs.set({ state: s }, n ?? 0);
  }

  /** A logged training step of a running job. */
  observeStep(s: TrainingStep): void {
    const job = s.jobId;
    this.live.add(job);
    if (Number.isFinite(s.loss)) this.loss.set({ job }, s.loss);
    if (Number.isFinite(s.tokensPerSecond)) this.tokensPerSecond.set({ job }, s.tokensPerSecond);
    this.step.set({ job }, s.step);
    if (s.learningRate !== undefined && Number.isFinite(s.learningRate)) this.learningRate.set({ job }, s.learningRate);
    this.steps.inc();
  }

  /** The job ended (or moved away): its per-job series go, so label cardinality stays bounded. */
  jobEnded(jobId: string): void {
    if (!this.live.delete(jobId)) return;
    for (const g of [this.loss, this.tokensPerSecond, this.step, this.learningRate]) g.remove({ job: jobId });
  }
}

export interface ServerMetricsOptions {
  /** Collect prom-client's default process metrics (default true). */
  defaultMetrics?: boolean;
  /** Labels on every series (e.g. { replica: "inference-0" }). */
  defaultLabels?: Record<string, string>;
}

type CollectHook = () => void | Promise<void>;

export class ServerMetrics {
  readonly registry = new Registry();
  readonly rpcRequests: Counter<"service" | "method" | "code">;
  readonly rpcDuration: Histogram<"service" | "method" | "code">;
  readonly rpcInFlight: Gauge<"service" | "method">;
  readonly httpRequests: Counter<"route" | "method" | "status">;
  readonly httpDuration: Histogram<"route" | "method" | "status">;
  readonly authFailures: Counter<"reason">;
  readonly inference: InferenceMetrics;
  readonly training: TrainingMetrics;
  private readonly hooks = new Set<CollectHook>();

  constructor(options: ServerMetricsOptions = {}) {
    if (options.defaultLabels) this.registry.setDefaultLabels(options.defaultLabels);
    if (options.defaultMetrics !== false) collectDefaultMetrics({ register: this.registry });
    const r = [this.registry];
    this.rpcRequests = new Counter({ name: "qlora_rpc_requests_total", help: "RPCs handled, by service, method and status code", labelNames: ["service", "method", "code"], registers: r });
    this.rpcDuration = new Histogram({ name: "qlora_rpc_request_duration_seconds", help: "RPC latency (server streams: to the end of the stream)", labelNames: ["service", "method", "code"], buckets: LATENCY_BUCKETS, registers: r });
    this.rpcInFlight = new Gauge({ name: "qlora_rpc_in_flight", help: "RPCs being handled now", labelNames: ["service", "method"], registers: r });
    this.httpRequests = new Counter({ name: "qlora_http_requests_total", help: "Plain HTTP route requests (OpenAI, KServe REST, /metrics, /ui)", labelNames: ["route", "method", "status"], registers: r });
    this.httpDuration = new Histogram({ name: "qlora_http_request_duration_seconds", help: "Plain HTTP route latency (streams: to the end)", labelNames: ["route", "method", "status"], buckets: LATENCY_BUCKETS, registers: r });
    this.authFailures = new Counter({ name: "qlora_auth_failures_total", help: "Refused calls by reason (unauthenticated, permission_denied, resource_exhausted)", labelNames: ["reason"], registers: r });
    this.inference = new InferenceMetrics(this.registry);
    this.training = new TrainingMetrics(this.registry);
  }

  /** Runs `hook` before every scrape (refresh gauges from their source). Returns an unsubscribe. */
  onCollect(hook: CollectHook): () => void {
    this.hooks.add(hook);
    return () => this.hooks.delete(hook);
  }

  /** Refreshes (hooks, each bounded to 2 s) and renders the text exposition format. */
  async scrape(): Promise<{ contentType: string; body: string }> {
    await Promise.all(
      [...this.hooks].map(async (h) => {
        let timer: NodeJS.Timeout | undefined;
        try {
          await Promise.race([h(), new Promise<void>((resolve) => (timer = setTimeout(resolve, 2000)))]);
        } catch {
          // A failing source must not break the scrape; its gauges keep their last values.
        } finally {
          clearTimeout(timer);
        }
      }),
    );
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }

  observeRpc(service: string, method: string, code: Code | null, seconds: number): void {
    const labels = { service, method, code: code === null ? "ok" : codeName(code) };
    this.rpcRequests.inc(labels);
    this.rpcDuration.observe(labels, seconds);
  }

  observeHttp(route: string, method: string, status: number, seconds: number): void {
    const labels = { route, method, status: String(status) };
    this.httpRequests.inc(labels);
    this.httpDuration.observe(labels, seconds);
  }

  /** Server interceptor: counts and times every RPC by its final status (streams at their end). */
  interceptor(): Interceptor {
    return (next) => async (req) => {
      const service = req.service.typeName;
      const method = req.method.name;
      const start = process.hrtime.bigint();
      const seconds = () => Number(process.hrtime.bigint() - start) / 1e9;
      this.rpcInFlight.inc({ service, method });
      let settled = false;
      const finish = (e: unknown) => {
        if (settled) return;
        settled = true;
        this.rpcInFlight.dec({ service, method });
        this.observeRpc(service, method, e === null ? null : ConnectError.from(e).code, seconds());
      };
      let res;
      try {
        res = await next(req);
      } catch (e) {
        finish(e);
        throw e;
      }
      if (!res.stream) {
        finish(null);
        return res;
      }
      const source = res.message;
      const self = finish;
      async function* timed() {
        let error: unknown = null;
        try {
          yield* source;
        } catch (e) {
          error = e;
          throw e;
        } finally {
          // A consumer that stopped early (client gone) ends the generator here with no error.
          self(error ?? (req.signal.aborted ? new ConnectError("cancelled", Code.Canceled) : null));
        }
      }
      return { ...res, message: timed() };
    };
  }
}

// ---- reading the exposition format (tests, tools) ----------------------------------------------

export interface PromSample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface PromFamily {
  name: string;
  type: string;
  help: string;
  samples: PromSample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function parseValue(s: string, line: number): number {
  // As Prometheus (Go's ParseFloat): NaN and Inf in any case (prom-client writes "Nan").
  const l = s.toLowerCase();
  if (l === "+inf" || l === "inf") return Infinity;
  if (l === "-inf") return -Infinity;
  if (l === "nan") return NaN;
  const v = Number(s);
  if (s.trim() === "" || Number.isNaN(v)) throw new Error(`line ${line}: bad value ${JSON.stringify(s)}`);
  return v;
}

/**
 * Parses Prometheus text exposition format 0.0.4 strictly (throws on any malformed line): every
 * sample must belong to a family declared by # TYPE (histogram/summary samples by suffix).
 */
export function parsePrometheusText(text: string): Map<string, PromFamily> {
  const families = new Map<string, PromFamily>();
  const familyOf = (sample: string): PromFamily | undefined => {
    const direct = families.get(sample);
    if (direct) return direct;
    for (const suffix of ["_bucket", "_sum", "_count", "_total", "_created"]) {
      if (sample.endsWith(suffix)) {
        const f = families.get(sample.slice(0, -suffix.length));
        if (f) return f;
      }
    }
    return undefined;
  };
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!;
    const n = i + 1;
    if (raw.trim() === "") continue;
    if (raw.startsWith("#")) {
      const m = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(raw);
      if (!m) continue; // a plain comment
      const [, kind, name, rest] = m;
      if (!METRIC_NAME.test(name!)) throw new Error(`line ${n}: bad metric name ${name}`);
      let f = families.get(name!);
      if (!f) families.set(name!, (f = { name: name!, type: "untyped", help: "", samples: [] }));
      if (kind === "TYPE") {
        if (!["counter", "gauge", "histogram", "summary", "untyped"].includes(rest!)) throw new Error(`line ${n}: bad type ${rest}`);
        f.type = rest!;
      } else {
        f.help = rest!;
      }
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)( -?\d+)?$/.exec(raw);
    if (!m) throw new Error(`line ${n}: not a sample: ${JSON.stringify(raw)}`);
    const [, name, , labelText, value] = m;
    const labels: Record<string, string> = {};
    if (labelText) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/y;
      let pos = 0;
      while (pos < labelText.length) {
        re.lastIndex = pos;
        const lm = re.exec(labelText);
        if (!lm || !LABEL_NAME.test(lm[1]!)) throw new Error(`line ${n}: bad labels ${JSON.stringify(labelText)}`);
        labels[lm[1]!] = lm[2]!.replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
        pos = re.lastIndex;
      }
    }
    const f = familyOf(name!);
    if (!f) throw new Error(`line ${n}: sample ${name} has no # TYPE`);
    f.samples.push({ name: name!, labels, value: parseValue(value!, n) });
  }
  return families;
}

/** The value of one sample (labels must match exactly the given ones, others ignored); 0 when absent. */
export function sampleValue(families: Map<string, PromFamily>, name: string, labels: Record<string, string> = {}): number {
  for (const f of families.values()) {
    for (const s of f.samples) {
      if (s.name !== name) continue;
      if (Object.entries(labels).every(([k, v]) => s.labels[k] === v)) return s.value;
    }
  }
  return 0;
}
