/**
 * qlora.v1.InferenceService: NF4 base models + hot-swapped LoRA adapters with continuous
 * batching in an engine worker. `inferenceService({ store })` is what `qlora serve` registers.
 */
import { defineService, type ServiceRegistration } from "@qlora/rpc";
import { InferenceService } from "@qlora/proto";
import { errorMessage } from "@qlora/core";
import { EngineClient } from "./engine-client.js";
import { inferenceHandlers } from "./handlers.js";
import { inferenceHttp, type InferenceHttpOptions } from "./http/index.js";
import type { QuantMode } from "./protocol.js";
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
  /** Kernel threads in the engine worker (0: the addon's default: QLORA_THREADS or all cores). */
  threads?: number;
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

export function inferenceService(options: InferenceServiceOptions): InferenceServiceRegistration {
  const log = options.log ?? ((line: string) => process.stderr.write(`[inference] ${line}\n`));
  const maxBatch = options.maxBatch ?? 8;
  const engine = new EngineClient({
    maxBatch,
    maxTokensPerStep: Math.max(options.maxTokensPerStep ?? 256, maxBatch),
    maxQueue: options.maxQueue ?? 32,
    maxContext: options.maxContext ?? 0,
    adapterBudgetBytes: options.adapterBudgetBytes ?? 256 * 1024 * 1024,
    threads: options.threads ?? 0,
    device: options.device ?? "cpu",
  });
  const store = new StoreAccess(options.store);
  const handlers = inferenceHandlers({ engine, store, defaultModel: options.defaultModel });
  const web = inferenceHttp({ engine, store: options.store, access: store, handlers, options: options.http });
  const name = InferenceService.typeName;
  const registration = defineService(InferenceService, handlers, {
    http: web.routes,
    companions: web.companions,
    onStart(ctx) {
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
export { StoreAccess, type ArtifactStore, type StoredAdapter } from "./store-access.js";
export type { EngineStats, QuantMode } from "./protocol.js";
export { inferenceHttp, type InferenceHttpOptions } from "./http/index.js";
