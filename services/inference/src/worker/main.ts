/**
 * The engine worker: owns the loaded base models and runs the scheduling loop.
 *
 * The loop is a chain of setImmediate callbacks: one tick = one scheduler step per model with
 * work (+ one Score text). Between ticks the worker's event loop delivers new requests, cancels
 * and adapter operations, so requests join and leave between steps with no locking. When there
 * is nothing to do the chain stops and the worker sleeps until a message arrives.
 */
import { parentPort, workerData } from "node:worker_threads";
import type {
  CallRequest,
  CallResult,
  EngineOptions,
  EngineStats,
  FromWorker,
  GenerateJob,
  ModelRef,
  ToWorker,
} from "../protocol.js";
import { ModelHost, serializeError } from "./model-host.js";
import { openModel, setEngineThreads } from "./runtime.js";
import type { StepOutput } from "./scheduler.js";

const port = parentPort!;
const options = workerData as EngineOptions;
if (options.threads > 0) setEngineThreads(options.threads);

const hosts = new Map<string, Promise<ModelHost>>();
/** Hosts whose model finished loading, for the synchronous tick. */
const ready = new Map<string, ModelHost>();
/** Generate requests between arrival and submit (tokenizing, loading their adapter/model). */
const admitting = new Map<number, { cancelled: boolean }>();
/** Which host runs each submitted request (for cancel). */
const owner = new Map<number, ModelHost>();
let scoreChain: Promise<unknown> = Promise.resolve();
let tickScheduled = false;
let shuttingDown = false;
/** Resolvers of Score jobs waiting for the next tick (so generation keeps going). */
let tickWaiters: (() => void)[] = [];

function post(m: FromWorker): void {
  port.postMessage(m);
}

const keyOf = (name: string, quant: string) => `${name}\u0000${quant}`;

function getHost(ref: ModelRef): Promise<ModelHost> {
  const key = keyOf(ref.name, ref.quant);
  let p = hosts.get(key);
  if (!p) {
    post({ type: "modelState", name: ref.name, quant: ref.quant, state: "loading" });
    p = openModel(ref, {
      maxSequences: options.maxBatch,
      maxContext: options.maxContext,
      device: options.device,
      decodeMatmul: options.decodeMatmul ?? "exact",
      embeddings: options.embeddings ?? "stored",
    }).then(
      (model) => {
        const host = new ModelHost(
          model,
          { maxBatch: options.maxBatch, maxTokensPerStep: options.maxTokensPerStep },
          options.adapterBudgetBytes,
          schedule,
          (event) => post({ type: "adapterEvent", event }),
        );
        ready.set(key, host);
        post({ type: "modelState", name: ref.name, quant: ref.quant, state: "ready" });
        return host;
      },
      (e: unknown) => {
        // A failed load is forgotten so that a later request can retry (e.g. after a fix in the store).
        hosts.delete(key);
        post({ type: "modelState", name: ref.name, quant: ref.quant, state: "failed" });
        throw e;
      },
    );
    hosts.set(key, p);
  }
  return p;
}

function readyHosts(): ModelHost[] {
  return [...ready.values()];
}

function emit(out: StepOutput): void {
  for (const f of out.failed) {
    owner.delete(f.id);
    post({ type: "error", id: f.id, error: f.error });
  }
  for (const d of out.done) owner.delete(d.id);
  if (out.tokens.length > 0 || out.done.length > 0) post({ type: "step", tokens: out.tokens, done: out.done });
}

function schedule(): void {
  if (tickScheduled || shuttingDown) return;
  tickScheduled = true;
  setImmediate(tick);
}

function tick(): void {
  tickScheduled = false;
  let busy = false;
  for (const host of ready.values()) {
    if (!host.scheduler.hasWork()) continue;
    const out = host.step();
    emit(out);
    // Only a step that did something warrants another right away; requests that wait for
    // their adapter to load are woken by that load (no spinning on an idle batch).
    if (host.scheduler.hasWork() && (out.rows > 0 || out.done.length > 0 || out.failed.length > 0)) busy = true;
  }
  const waiters = tickWaiters;
  tickWaiters = [];
  for (const w of waiters) w();
  if (busy || tickWaiters.length > 0) schedule();
}

function nextTick(): Promise<void> {
  return new Promise<void>((resolve) => {
    tickWaiters.push(resolve);
    schedule();
  });
}

async function startGenerate(id: number, job: GenerateJob): Promise<void> {
  const state = { cancelled: false };
  admitting.set(id, state);
  try {
    const host = await getHost(job.model);
    const req = await host.prepare(id, job, () => state.cancelled);
    if (req === null) {
      // Cancelled while it was being prepared: it never reached the scheduler.
      const waited = Date.now() - job.receivedAt;
      const timings = { queueMs: waited, timeToFirstTokenMs: 0, totalMs: waited, tokensPerSecond: 0 };
      const done = { id, finishReason: "cancelled" as const, usage: { promptTokens: 0, completionTokens: 0 }, timings };
      post({ type: "step", tokens: [], done: [done] });
      return;
    }
    host.scheduler.submit(req);
    owner.set(id, host);
    schedule();
  } catch (e) {
    post({ type: "error", id, error: serializeError(e) });
  } finally {
    admitting.delete(id);
  }
}

function cancel(id: number): void {
  const a = admitting.get(id);
  if (a) a.cancelled = true;
  const host = owner.get(id);
  if (host && host.scheduler.cancel(id)) schedule();
}

/** `id`: the call's engine id (named in the events of adapters a Score loads). */
async function handleCall(req: CallRequest, id: number): Promise<CallResult> {
  switch (req.op) {
    case "loadModel": {
      const host = await getHost(req.model);
      return { op: "loadModel", model: host.info() };
    }
    case "listModels":
      return { op: "listModels", models: readyHosts().map((h) => h.info()) };
    case "loadAdapter": {
      const host = await getHost(req.model);
      return { op: "loadAdapter", adapter: await host.loadAdapter(req.adapter) };
    }
    case "unloadAdapter": {
      let found = false;
      for (const h of readyHosts()) found = h.adapters.unload(req.name) || found;
      return { op: "unloadAdapter", found };
    }
    case "listAdapters":
      return { op: "listAdapters", adapters: readyHosts().flatMap((h) => h.adapters.list()) };
    case "score": {
      const host = await getHost(req.job.model);
      // Score jobs run one after another, interleaved with generation steps.
      const run = scoreChain.then(() => host.score(req.job, nextTick, id));
      scoreChain = run.catch(() => undefined);
      return { op: "score", result: await run };
    }
    case "stats": {
      const hs = readyHosts();
      const stats: EngineStats = {
        running: 0,
        waiting: 0,
        steps: 0,
        tokensGenerated: 0,
        cancelled: 0,
        maxRowsInStep: 0,
        maxAdaptersInStep: 0,
        adapterLoads: 0,
        adapterEvictions: 0,
        adapterBytes: 0,
        adapterBudgetBytes: options.adapterBudgetBytes,
      };
      for (const h of hs) {
        stats.running += h.scheduler.runningCount;
        stats.waiting += h.scheduler.waitingCount;
        stats.steps += h.scheduler.steps;
        stats.tokensGenerated += h.scheduler.tokensGenerated;
        stats.cancelled += h.scheduler.cancelled;
        stats.maxRowsInStep = Math.max(stats.maxRowsInStep, h.scheduler.maxRowsInStep);
        stats.maxAdaptersInStep = Math.max(stats.maxAdaptersInStep, h.scheduler.maxAdaptersInStep);
        stats.adapterLoads += h.adapters.loads;
        stats.adapterEvictions += h.adapters.evictions;
        stats.adapterBytes += h.adapters.residentBytes;
      }
      return { op: "stats", stats };
    }
  }
}

async function shutdown(): Promise<void> {
  shuttingDown = true;
  for (const h of readyHosts()) {
    emit(h.scheduler.failAll({ code: "UNAVAILABLE", message: "the inference engine is shutting down" }));
    h.adapters.clear();
    h.model.dispose();
  }
  port.close();
}

port.on("message", (m: ToWorker) => {
  switch (m.type) {
    case "generate":
      void startGenerate(m.id, m.job);
      break;
    case "cancel":
      cancel(m.id);
      break;
    case "call":
      handleCall(m.request, m.id).then(
        (result) => post({ type: "result", id: m.id, result }),
        (e: unknown) => post({ type: "error", id: m.id, error: serializeError(e) }),
      );
      break;
    case "shutdown":
      void shutdown();
      break;
  }
});

post({ type: "ready" });
