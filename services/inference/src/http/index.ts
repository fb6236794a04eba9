/**
 * Everything the inference service serves besides its own RPCs, on the same port:
 * the OpenAI API (/v1), KServe's Open Inference Protocol (gRPC inference.GRPCInferenceService
 * and REST /v2), the engine's Prometheus metrics, and the operator page (/ui).
 */
import type { InferenceService } from "@qlora/proto";
import type { ServiceImpl } from "@connectrpc/connect";
import type { HealthRegistry, HttpRoute, ServerContext, ServiceRegistration } from "@qlora/rpc";
import type { EngineClient } from "../engine-client.js";
import type { ArtifactStore, StoreAccess } from "../store-access.js";
import { Catalog } from "./catalog.js";
import { EngineObserver } from "./instrument.js";
import { kserveRoutes, kserveService } from "./kserve.js";
import { openAiRoutes, type OpenAiLimits } from "./openai.js";
import { TrainerView, trainerTransport, uiRoutes } from "./ui.js";

export interface InferenceHttpOptions {
  /** Serve the OpenAI API under /v1 (default true), with these input limits. */
  openai?: boolean | Partial<OpenAiLimits>;
  /** Serve KServe's Open Inference Protocol (default true). */
  kserve?: boolean;
  /** Serve the operator page /ui (default true). */
  ui?: boolean;
  /** Show the jobs of a trainer at this URL on /ui (default: the trainer of this server, if any). */
  trainerUrl?: string;
}

export interface InferenceHttpDeps {
  engine: EngineClient;
  store: ArtifactStore;
  access: StoreAccess;
  handlers: ServiceImpl<typeof InferenceService>;
  options?: InferenceHttpOptions;
}

export interface InferenceHttp {
  routes: HttpRoute[];
  companions: ServiceRegistration[];
  observer: EngineObserver;
  catalog: Catalog;
  onStart(ctx: ServerContext): void;
  onClose(): void;
}

export function inferenceHttp(deps: InferenceHttpDeps): InferenceHttp {
  const o = deps.options ?? {};
  const observer = new EngineObserver(deps.engine);
  const catalog = new Catalog(deps.store, deps.access, deps.engine, () => observer.engineStarted);
  let server: ServerContext | null = null;
  const health = (): HealthRegistry | null => server?.health ?? null;
  const trainer = new TrainerView(null);
  const startedAt = Date.now();

  const routes: HttpRoute[] = [];
  const companions: ServiceRegistration[] = [];
  if (o.openai !== false) {
    routes.push(...openAiRoutes({ handlers: deps.handlers, catalog, ...(typeof o.openai === "object" ? { limits: o.openai } : {}) }));
  }
  if (o.kserve !== false) {
    routes.push(...kserveRoutes({ catalog, handlers: deps.handlers, health }));
    companions.push(kserveService({ catalog, handlers: deps.handlers, health }));
  }
  if (o.ui !== false) routes.push(...uiRoutes({ catalog, observer, trainer, startedAt, ctx: () => server }));

  return {
    routes,
    companions,
    observer,
    catalog,
    onStart(ctx) {
      server = ctx;
      observer.metrics = ctx.metrics.inference;
      ctx.metrics.onCollect(() => observer.refresh());
      if (o.ui !== false) trainer.connect(trainerTransport(ctx, o.trainerUrl));
    },
    onClose() {
      trainer.stop();
    },
  };
}

export { Catalog, parseModelName, modelId, type ModelName, type CatalogEntry } from "./catalog.js";
export { EngineObserver, type LiveRequest } from "./instrument.js";
export { openAiRoutes, openAiError, DEFAULT_OPENAI_LIMITS, type OpenAiLimits } from "./openai.js";
export { kserveRoutes, kserveService } from "./kserve.js";
export { uiRoutes, TrainerView } from "./ui.js";
