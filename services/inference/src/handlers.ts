/**
 * qlora.v1.InferenceService handlers: plain functions over the generated message types.
 *
 * They validate and resolve names against the store (cheap, on the event loop), then hand the
 * work to the engine worker. Errors are thrown as typed QloraErrors; libs/rpc maps them to gRPC
 * status codes in one place.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { ConnectError, Code } from "@connectrpc/connect";
import { FailedPrecondition, InvalidArgument, NotFound, QloraError } from "@qlora/core";
import {
  AdapterSchema,
  Device,
  FinishReason,
  InferenceService,
  LoadedModelSchema,
  Quantization,
  type Adapter,
  type GenerateRequest,
  type LoadedModel,
} from "@qlora/proto";
import { callerOf, visibleOnly } from "@qlora/rpc";
import type { EngineClient, GenerateEvent } from "./engine-client.js";
import type {
  FinishReasonName,
  GenerateJob,
  LoadedModelInfo,
  ModelRef,
  QuantMode,
  ResidentAdapterInfo,
  SamplingSpec,
  TimingInfo,
  UsageInfo,
} from "./protocol.js";
import type { StoreAccess, StoredAdapter } from "./store-access.js";

/** Largest max_new_tokens considered at all; the precise check is against the model's context. */
const MAX_NEW_TOKENS_CEILING = 1 << 20;
const MAX_STOP_STRINGS = 16;

export interface HandlerDeps {
  engine: EngineClient;
  store: StoreAccess;
  /** Model used when a request names neither a model nor an adapter. */
  defaultModel?: string;
}

export function quantMode(q: Quantization): QuantMode {
  switch (q) {
    case Quantization.UNSPECIFIED:
    case Quantization.NF4:
      return "nf4";
    case Quantization.NONE:
      return "none";
    default:
      throw new InvalidArgument(`unknown quantization ${q}`);
  }
}

function quantEnum(q: QuantMode): Quantization {
  return q === "none" ? Quantization.NONE : Quantization.NF4;
}

const FINISH: Record<FinishReasonName, FinishReason> = {
  length: FinishReason.LENGTH,
  stop: FinishReason.STOP,
  cancelled: FinishReason.CANCELLED,
};

function usageMsg(u: UsageInfo) {
  return {
    promptTokens: u.promptTokens,
    completionTokens: u.completionTokens,
    totalTokens: u.promptTokens + u.completionTokens,
  };
}

function timingsMsg(t: TimingInfo) {
  return {
    queueMs: t.queueMs,
    timeToFirstTokenMs: t.timeToFirstTokenMs,
    totalMs: t.totalMs,
    tokensPerSecond: t.tokensPerSecond,
  };
}

function loadedModelMsg(m: LoadedModelInfo): LoadedModel {
  return create(LoadedModelSchema, {
    name: m.name,
    quant: quantEnum(m.quant),
    residentBytes: BigInt(m.residentBytes),
    device: m.device === "cuda" ? Device.CUDA : Device.CPU,
    modelType: m.modelType,
  });
}

function adapterMsg(stored: StoredAdapter | null, resident: ResidentAdapterInfo | null): Adapter {
  const base = stored?.baseModel ?? resident?.baseModel ?? "";
  const lora = stored?.lora ?? {
    rank: resident?.rank ?? 0,
    alpha: resident?.alpha ?? 0,
    targetModules: resident?.targetModules ?? [],
    useRslora: resident?.useRslora ?? false,
  };
  return create(AdapterSchema, {
    name: stored?.name ?? resident!.name,
    baseModel: base,
    lora: { rank: lora.rank, alpha: lora.alpha, targetModules: lora.targetModules, useRslora: lora.useRslora },
    sizeBytes: BigInt(stored?.sizeBytes ?? 0),
    sha256: resident?.sha256 ?? stored?.sha256 ?? "",
    resident: resident !== null,
    residentBytes: BigInt(resident?.residentBytes ?? 0),
    lastUsedAt: resident ? timestampFromMs(resident.lastUsedAt) : undefined,
    loadMs: resident?.loadMs ?? 0,
    jobId: stored?.jobId ?? "",
  });
}

function validateSampling(req: GenerateRequest): SamplingSpec {
  const s = req.sampling;
  const spec: SamplingSpec = {
    temperature: s?.temperature ?? 0,
    topK: s?.topK ?? 0,
    topP: s?.topP ?? 0,
    repetitionPenalty: s?.repetitionPenalty ?? 0,
    seed: s?.seed,
  };
  if (!Number.isFinite(spec.temperature) || spec.temperature < 0) {
    throw new InvalidArgument(`sampling.temperature must be >= 0, got ${spec.temperature}`);
  }
  if (!Number.isFinite(spec.topP) || spec.topP < 0 || spec.topP > 1) {
    throw new InvalidArgument(`sampling.top_p must be in [0, 1], got ${spec.topP}`);
  }
  if (!Number.isFinite(spec.repetitionPenalty) || spec.repetitionPenalty < 0) {
    throw new InvalidArgument(`sampling.repetition_penalty must be >= 0, got ${spec.repetitionPenalty}`);
  }
  return spec;
}

/** Absolute deadline of the call (0: none), from the client's grpc-timeout / connect-timeout-ms. */
function deadlineOf(ctx: HandlerContext): number {
  const t = ctx.timeoutMs();
  return t === undefined ? 0 : Date.now() + Math.max(0, t);
}

/**
 * The error for a generation that ended "cancelled": the client's abort reason if it went away,
 * DEADLINE_EXCEEDED if the worker hit the deadline first, else CANCELLED.
 */
function cancelledError(ctx: HandlerContext, deadline: number): Error {
  if (ctx.signal.aborted) {
    const r: unknown = ctx.signal.reason;
    return r instanceof Error ? r : new ConnectError("cancelled", Code.Canceled);
  }
  if (deadline > 0 && Date.now() >= deadline) {
    return new QloraError("DEADLINE_EXCEEDED", "the deadline expired before generation finished");
  }
  return new QloraError("CANCELLED", "generation was cancelled");
}

export function inferenceHandlers(deps: HandlerDeps): ServiceImpl<typeof InferenceService> {
  const { engine, store } = deps;

  /** The model a Generate/Score request runs on, resolved in the store. */
  async function resolveModel(model: string, adapter: StoredAdapter | null, quant: Quantization): Promise<ModelRef> {
    const q = quantMode(quant);
    let name = model;
    if (!name && adapter) {
      name = (await store.modelForAdapterBase(adapter.baseModel)) ?? "";
      if (!name) {
        throw new FailedPrecondition(
          `adapter ${adapter.name} names base model ${JSON.stringify(adapter.baseModel)}, which is not in the store; set model`,
        );
      }
    }
    if (!name) name = deps.defaultModel ?? "";
    if (!name) {
      const loaded = (await engine.call({ op: "listModels" })).models;
      const names = [...new Set(loaded.map((m) => m.name))];
      if (names.length !== 1) {
        throw new InvalidArgument(
          names.length === 0 ? "model is required (no model is loaded)" : `model is required (loaded: ${names.join(", ")})`,
        );
      }
      name = names[0]!;
    }
    const dir = await store.modelDir(name);
    if (adapter) await store.checkAdapterBase(adapter, name);
    return { name, quant: q, dir };
  }

  async function buildJob(req: GenerateRequest, ctx: HandlerContext): Promise<GenerateJob> {
    const receivedAt = Date.now();
    const hasPrompt = req.prompt.length > 0;
    const hasMessages = req.messages.length > 0;
    if (!hasPrompt && !hasMessages) throw new InvalidArgument("prompt is empty (set prompt or messages)");
    if (hasPrompt && hasMessages) throw new InvalidArgument("set either prompt or messages, not both");
    for (const [i, m] of req.messages.entries()) {
      if (!m.role) throw new InvalidArgument(`messages[${i}].role is empty`);
    }
    if (req.maxNewTokens > MAX_NEW_TOKENS_CEILING) {
      throw new InvalidArgument(`max_new_tokens ${req.maxNewTokens} is beyond any model's context`);
    }
    if (req.stop.length > MAX_STOP_STRINGS) throw new InvalidArgument(`at most ${MAX_STOP_STRINGS} stop strings`);
    if (req.stop.some((s) => s.length === 0)) throw new InvalidArgument("stop strings must be non-empty");
    const sampling = validateSampling(req);
    const adapter = req.adapter ? await store.servableAdapter(req.adapter) : null;
    const model = await resolveModel(req.model, adapter, req.quant);
    return {
      model,
      adapter: adapter ? { name: adapter.name, dir: adapter.dir } : null,
      prompt: req.prompt,
      messages: req.messages.map((m) => ({ role: m.role, content: m.content })),
      sampling,
      maxNewTokens: req.maxNewTokens,
      stop: [...req.stop],
      deadline: deadlineOf(ctx),
      receivedAt,
    };
  }

  async function* run(req: GenerateRequest, ctx: HandlerContext): AsyncGenerator<GenerateEvent> {
    const job = await buildJob(req, ctx);
    const events = await engine.generate(job, ctx.signal);
    for await (const e of events) {
      if (e.kind === "done" && e.finishReason === "cancelled") throw cancelledError(ctx, job.deadline);
      yield e;
    }
  }

  async function residentAdapters(): Promise<ResidentAdapterInfo[]> {
    return (await engine.call({ op: "listAdapters" })).adapters;
  }

  return {
    async generate(req, ctx) {
      let text = "";
      const tokenIds: number[] = [];
      for await (const e of run(req, ctx)) {
        if (e.kind === "tokens") {
          text += e.text;
          tokenIds.push(...e.tokenIds);
        } else {
          return {
            text,
            tokenIds,
            finishReason: FINISH[e.finishReason],
            usage: usageMsg(e.usage),
            timings: timingsMsg(e.timings),
          };
        }
      }
      throw new QloraError("INTERNAL", "generation ended without a result");
    },

    async *generateStream(req, ctx) {
      try {
        for await (const e of run(req, ctx)) {
          if (e.kind === "tokens") {
            yield { text: e.text, tokenIds: e.tokenIds };
          } else {
            yield {
              text: "",
              tokenIds: [],
              finishReason: FINISH[e.finishReason],
              usage: usageMsg(e.usage),
              timings: timingsMsg(e.timings),
            };
            return;
          }
        }
      } catch (e) {
        // The client is gone (cancelled, reset the stream): the transport throws its failed
        // write in here. Nobody can receive a status any more, and it is not a server fault.
        if (ctx.signal.aborted) return;
        throw e;
      }
      throw new QloraError("INTERNAL", "generation ended without a result");
    },

    async score(req, ctx) {
      if (req.texts.length === 0) throw new InvalidArgument("texts is empty");
      const adapter = req.adapter ? await store.servableAdapter(req.adapter) : null;
      const model = await resolveModel(req.model, adapter, req.quant);
      const { result } = await engine.call({
        op: "score",
        job: {
          model,
          adapter: adapter ? { name: adapter.name, dir: adapter.dir } : null,
          texts: [...req.texts],
          deadline: deadlineOf(ctx),
        },
      });
      return { loss: result.loss, perplexity: Math.exp(result.loss), tokens: BigInt(result.tokens), losses: result.losses };
    },

    async loadAdapter(req) {
      if (!req.name) throw new InvalidArgument("name is required");
      const adapter = await store.servableAdapter(req.name);
      const ref = await resolveModel(req.model, adapter, Quantization.UNSPECIFIED);
      // The adapter goes into every loaded variant (nf4 / none) of the base; if none is loaded,
      // the default (NF4) variant is loaded.
      const loaded = (await engine.call({ op: "listModels" })).models.filter((m) => m.name === ref.name);
      const targets: ModelRef[] = loaded.length > 0 ? loaded.map((m) => ({ ...ref, quant: m.quant })) : [ref];
      let info: ResidentAdapterInfo | null = null;
      for (const model of targets) {
        const r = await engine.call({ op: "loadAdapter", model, adapter: { name: adapter.name, dir: adapter.dir } });
        info ??= r.adapter;
      }
      return { adapter: adapterMsg(adapter, info) };
    },

    async unloadAdapter(req) {
      if (!req.name) throw new InvalidArgument("name is required");
      const { found } = await engine.call({ op: "unloadAdapter", name: req.name });
      if (!found) throw new NotFound(`adapter ${req.name} is not loaded`);
      return {};
    },

    async listAdapters(_req, ctx) {
      const resident = await residentAdapters();
      const byName = new Map<string, ResidentAdapterInfo>();
      // One entry per name: the current (not unloading) copy, else the most recent one.
      for (const r of resident) {
        const prev = byName.get(r.name);
        if (!prev || (prev.unloading && !r.unloading) || (prev.unloading === r.unloading && r.lastUsedAt > prev.lastUsedAt)) {
          byName.set(r.name, r);
        }
      }
      const adapters: Adapter[] = [];
      for (const s of await store.listAdapters()) {
        const r = byName.get(s.name);
        adapters.push(adapterMsg(s, r && !r.unloading ? r : null));
        byName.delete(s.name);
      }
      // Resident but gone from the store (deleted after loading): still listed, it still serves.
      for (const r of byName.values()) if (!r.unloading) adapters.push(adapterMsg(null, r));
      // Only what the caller's token may use (LoadAdapter/Generate check the same globs).
      return { adapters: visibleOnly(callerOf(ctx), adapters, (a) => ({ adapters: [a.name] })) };
    },

    async loadModel(req) {
      if (!req.name) throw new InvalidArgument("name is required");
      const dir = await store.modelDir(req.name);
      const { model } = await engine.call({ op: "loadModel", model: { name: req.name, quant: quantMode(req.quant), dir } });
      return { model: loadedModelMsg(model) };
    },

    async listLoadedModels(_req, ctx) {
      const { models } = await engine.call({ op: "listModels" });
      return { models: visibleOnly(callerOf(ctx), models, (m) => ({ models: [m.name] })).map(loadedModelMsg) };
    },
  };
}
