/**
 * qlora.v1.InferenceService: NF4 base models + hot-swapped LoRA adapters with continuous
 * batching in an engine worker. `inferenceService({ store })` is what `qlora serve` registers.
 */
import { codeName, codeOf, defineService, type AuditEvent, type RequestInfo, type ServerContext, type ServiceRegistration } from "@qlora/rpc";
import { InferenceService } from "@qlora/proto";
import { errorMessage } from "@qlora/core";
import { EngineClient } from "./engine-client.js";
import { inferenceHandlers } from "./handlers.js";
import { inferenceHttp, type InferenceHttpOptions } from "./http/index.js";
import type { AdapterEvent, DecodeMatmul, EmbeddingsMode, QuantMode } from "./protocol.js";
import { StoreAccess, type ArtifactStore } from "./store-access.js";

export interface InferenceServiceOptions {
  store: ArtifactStore;
  /** Base models loaded at start; the service reports NOT_SERVING until they are resident. */
  preload?: { name: string; quant?: QuantMode }[];
  /** Model for requests that name neither a model nor an adapter (default: the only loaded one). */
  defaultModel?: string;
  /** Sequences decoding together (default 8). */
  maxBatch?: number;
  /** Tokens per forward call: decode rows + prefill chunks (default 256). */
  maxTokensPerStep?: number;
  /** Requests waiting beyond the running batch before RESOURCE_EXHAUSTED (default 32). */
  maxQueue?: number;
  /** Per-sequence context (prompt + new tokens); 0: the model's max_position_embeddings. */
  maxContext?: number;
  /** Resident adapter bytes per base model (default 256 MiB). */
  adapterBudgetBytes?: number;
  /**
   * Adapters with a larger LoRA rank (adapter_config.json or tensor shapes) are refused with
   * INVALID_ARGUMENT before their weights are read (default 256).
   */
  maxAdapterRank?: number;
  /** Adapters whose adapter_model.safetensors is larger are refused likewise (default 1 GiB). */
  maxAdapterBytes?: number;
  /** Kernel threads in the engine worker (0: the addon's default: QLORA_THREADS or all cores). */
  threads?: number;
  /**
   * Decode-step NF4 matmul of every model: "exact" (default) or "int8" (int8 activations: faster,
   * ~1% relative error per output; docs/engine.md).
   */
  decodeMatmul?: DecodeMatmul;
  /**
   * Token embeddings / lm_head of every model: "stored" (default, as in the file) or "nf4"
   * (quantized while loading: Llama-3.2-1B 525 MB → 148 MB; docs/model.md).
   */
  embeddings?: EmbeddingsMode;
  /**
   * Where base models are loaded (default "cpu"): a resolved device — `qlora serve --device` resolves
   * "auto" first. "cuda" loads fail with FailedPrecondition when no GPU can be used.
   */
  device?: "cpu" | "cuda";
  /** Where failures of background work (preloading) are reported. Default: stderr. */
  log?: (line: string) => void;
  /** The OpenAI API, KServe protocol and operator page on the same port (all on by default). */
  http?: InferenceHttpOptions;
}

export interface InferenceServiceRegistration extends ServiceRegistration {
  /** The engine behind the handlers (tests and benchmarks read its stats). */
  readonly engine: EngineClient;
}

/**
 * The audit record of an adapter the engine loaded on its own (a Generate, GenerateStream, Score,
 * OpenAI or KServe request named it while it was not resident) or evicted for the budget. A load
 * has the fields of an explicit LoadAdapter's record (the request's ids and caller come with
 * `origin`) plus where the files came from; `rpc` is the request that needed it.
 */
export function adapterAuditEvent(e: AdapterEvent, origin: RequestInfo | undefined): AuditEvent {
  const resources = { adapters: [e.name], models: [e.model] };
  if (e.kind === "evict") {
    return { event: "adapter_evict", outcome: "ok", reason: "adapter budget", resources, quant: e.quant, sha256: e.sha256, bytes: e.bytes };
  }
  return {
    event: "adapter_load",
    ...(origin?.rpc ? { rpc: origin.rpc } : {}),
    outcome: e.error ? codeName(codeOf(e.error.code)) : "ok",
    ...(e.error ? { message: e.error.message } : {}),
    resources,
    source: e.dir,
    quant: e.quant,
    ...(e.error ? {} : { sha256: e.sha256, bytes: e.bytes, rank: e.rank, load_ms: e.loadMs }),
  };
}

export function inferenceService(options: InferenceServiceOptions): InferenceServiceRegistration {
  const log = options.log ?? ((line: string) => process.stderr.write(`[inference] ${line}\n`));
  const maxBatch = options.maxBatch ?? 8;
  /** Set on start: where adapter events go (the server's audit log and logger). */
  let server: ServerContext | null = null;
  const engine = new EngineClient({
    onAdapterEvent(e, origin) {
      if (!server) return;
      const record = adapterAuditEvent(e, origin);
      server.audit.record(record, origin);
      server.log.log(e.error ? "warn" : "info", record.event, {
        adapter: e.name,
        model: e.model,
        outcome: record.outcome,
        ...(origin ? { request_id: origin.requestId, rpc: origin.rpc } : {}),
        ...(e.error ? { message: e.error.message } : {}),
      });
    },
    maxBatch,
    maxTokensPerStep: Math.max(options.maxTokensPerStep ?? 256, maxBatch),
    maxQueue: options.maxQueue ?? 32,
    maxContext: options.maxContext ?? 0,
    adapterBudgetBytes: options.adapterBudgetBytes ?? 256 * 1024 * 1024,
    threads: options.threads ?? 0,
    device: options.device ?? "cpu",
    decodeMatmul: options.decodeMatmul ?? "exact",
    embeddings: options.embeddings ?? "stored",
  });
  const store = new StoreAccess(options.store, {
    ...(options.maxAdapterRank !== undefined ? { maxRank: options.maxAdapterRank } : {}),
    ...(options.maxAdapterBytes !== undefined ? { maxBytes: options.maxAdapterBytes } : {}),
  });
  const handlers = inferenceHandlers({ engine, store, defaultModel: options.defaultModel });
  const web = inferenceHttp({ engine, store: options.store, access: store, handlers, options: options.http });
  const name = InferenceService.typeName;
  const registration = defineService(InferenceService, handlers, {
    http: web.routes,
    companions: web.companions,
    onStart(ctx) {
      server = ctx;
      web.onStart(ctx);
      const preload = options.preload ?? [];
      if (preload.length === 0) return;
      // Not awaited: the server listens (health answers NOT_SERVING) while the base loads.
      ctx.health.set(name, "NOT_SERVING");
      void (async () => {
        try {
          for (const p of preload) {
            const dir = await store.modelDir(p.name);
            await engine.call({ op: "loadModel", model: { name: p.name, quant: p.quant ?? "nf4", dir } });
          }
          ctx.health.set(name, "SERVING");
        } catch (e) {
          log(`preloading failed, the service stays NOT_SERVING: ${errorMessage(e)}`);
        }
      })();
    },
    async onClose() {
      web.onClose();
      await engine.close();
    },
  });
  return { ...registration, engine };
}

export { EngineClient, type GenerateEvent } from "./engine-client.js";
export { inferenceHandlers, type HandlerDeps } from "./handlers.js";
export { StoreAccess, DEFAULT_ADAPTER_LIMITS, type AdapterLimits, type ArtifactStore, type StoredAdapter } from "./store-access.js";
export type { AdapterEvent, EngineStats, QuantMode } from "./protocol.js";
export { inferenceHttp, type InferenceHttpOptions } from "./http/index.js";
