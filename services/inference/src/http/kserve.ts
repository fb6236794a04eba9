/**
 * KServe Open Inference Protocol (V2) on the inference port, so KServe tooling and probes work:
 *
 * - gRPC `inference.GRPCInferenceService`: ServerLive, ServerReady, ModelReady, ServerMetadata,
 *   ModelMetadata, and ModelInfer for text (a BYTES input "text_input" → a BYTES output
 *   "text_output"; parameters max_tokens, temperature, top_p, top_k, seed, stop).
 * - REST: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2/models/{name}/ready`
 *   (also `/versions/{v}/ready`), `GET /v2` (server metadata), `GET /v2/models/{name}` (model
 *   metadata). Readiness is 200 `{"ready":true}` or 503 `{"ready":false}`.
 *
 * Model names: "BASE" for each base model in the store, "BASE:ADAPTER" for each adapter on it.
 * A base is ready once resident (preloaded or loaded by a first request); an adapter is ready
 * when its base is (adapters load on first use in milliseconds).
 */
import { readFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { InvalidArgument } from "@qlora/core";
import { GenerateRequestSchema, InferenceService, kserve } from "@qlora/proto";
import { defineService, httpStatusOf, sendJson, type HealthRegistry, type HttpContext, type HttpErrorBody, type HttpRoute, type ServiceRegistration } from "@qlora/rpc";
import type { Catalog } from "./catalog.js";

const SERVER_NAME = "qlora";
const VERSION: string = (() => {
  try {
    return (JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version?: string }).version ?? "0.0.0";
  } catch {
    return "0.0.0";
  }
})();

export interface KserveDeps {
  catalog: Catalog;
  handlers: ServiceImpl<typeof InferenceService>;
  /** The server's health registry, known once the server starts. */
  health: () => HealthRegistry | null;
  /** Largest text_input in bytes (default 1 MiB). */
  maxInputBytes?: number;
}

function serverLive(h: HealthRegistry | null): boolean {
  return h !== null && !h.isShutDown;
}

/** Ready: running, and every hosted service SERVING (the inference service is NOT_SERVING while preloading). */
function serverReady(h: HealthRegistry | null): boolean {
  if (!h || h.isShutDown) return false;
  for (const status of h.list().values()) if (status !== 1 /* SERVING */) return false;
  return true;
}

function modelMetadata(name: string) {
  return {
    name,
    versions: [] as string[],
    platform: "qlora",
    inputs: [{ name: "text_input", datatype: "BYTES", shape: [1n] }],
    outputs: [{ name: "text_output", datatype: "BYTES", shape: [1n] }],
  };
}

function paramValue(p: kserve.InferParameter | undefined): number | string | boolean | bigint | undefined {
  return p?.parameterChoice.value;
}

function numParam(params: { [k: string]: kserve.InferParameter }, key: string): number | undefined {
  const v = paramValue(params[key]);
  if (v === undefined) return undefined;
  const n = typeof v === "bigint" ? Number(v) : v;
  if (typeof n !== "number" || !Number.isFinite(n)) throw new InvalidArgument(`parameter ${key} must be a number`);
  return n;
}

/** The text of a BYTES tensor: `contents.bytes_contents[0]`, or Triton's raw form (4-byte little-endian length + bytes). */
function textInput(req: kserve.ModelInferRequest, max: number): string {
  const i = req.inputs.findIndex((t) => t.name === "text_input");
  if (i < 0) throw new InvalidArgument('ModelInfer needs a BYTES input named "text_input"');
  const t = req.inputs[i]!;
  if (t.datatype !== "BYTES") throw new InvalidArgument(`text_input must be BYTES, not ${t.datatype}`);
  let bytes: Uint8Array | undefined = t.contents?.bytesContents[0];
  if (!bytes && req.rawInputContents[i]) {
    const raw = req.rawInputContents[i]!;
    if (raw.length < 4) throw new InvalidArgument("raw text_input is shorter than its length prefix");
    const n = new DataView(raw.buffer, raw.byteOffset, raw.byteLength).getUint32(0, true);
    if (n > raw.length - 4) throw new InvalidArgument("raw text_input: the length prefix exceeds the data");
    bytes = raw.subarray(4, 4 + n);
  }
  if (!bytes || bytes.length === 0) throw new InvalidArgument("text_input is empty");
  if (bytes.length > max) throw new InvalidArgument(`text_input has ${bytes.length} bytes; the limit is ${max}`);
  return new TextDecoder("utf-8", { fatal: false }).decode(bytes);
}

export function kserveService(deps: KserveDeps): ServiceRegistration {
  const { catalog, handlers } = deps;
  const maxInput = deps.maxInputBytes ?? 1 << 20;
  const impl: ServiceImpl<typeof kserve.GRPCInferenceService> = {
    serverLive: () => ({ live: serverLive(deps.health()) }),
    serverReady: () => ({ ready: serverReady(deps.health()) }),
    async modelReady(req) {
      return { ready: serverLive(deps.health()) && (await catalog.ready(req.name)) };
    },
    serverMetadata: () => ({ name: SERVER_NAME, version: VERSION, extensions: [] }),
    async modelMetadata(req) {
      await catalog.resolve(req.name);
      return modelMetadata(req.name);
    },
    async modelInfer(req, ctx: HandlerContext) {
      const name = await catalog.resolve(req.modelName);
      const text = textInput(req, maxInput);
      const p = req.parameters;
      const stop = paramValue(p.stop);
      const seed = paramValue(p.seed);
      const g = await handlers.generate!(
        create(GenerateRequestSchema, {
          model: name.model,
          adapter: name.adapter,
          prompt: text,
          maxNewTokens: numParam(p, "max_tokens") ?? 0,
          sampling: {
            temperature: numParam(p, "temperature") ?? 0,
            topP: numParam(p, "top_p") ?? 0,
            topK: numParam(p, "top_k") ?? 0,
            ...(seed !== undefined ? { seed: BigInt(seed as number | bigint) } : {}),
          },
          stop: typeof stop === "string" && stop ? [stop] : [],
        }),
        ctx,
      );
      const out = new TextEncoder().encode(g.text ?? "");
      return {
        modelName: req.modelName,
        modelVersion: req.modelVersion,
        id: req.id,
        parameters: {
          completion_tokens: { parameterChoice: { case: "int64Param", value: BigInt(g.usage?.completionTokens ?? 0) } },
          prompt_tokens: { parameterChoice: { case: "int64Param", value: BigInt(g.usage?.promptTokens ?? 0) } },
        },
        outputs: [{ name: "text_output", datatype: "BYTES", shape: [1n], contents: { bytesContents: [out] } }],
      };
    },
  };
  return defineService(kserve.GRPCInferenceService, impl);
}

function restError(code: Code, message: string, exact?: number): HttpErrorBody {
  const status = exact ?? httpStatusOf(code);
  return { status, body: { error: message } };
}

const GRPC = "inference.GRPCInferenceService";

/** `/v2/models/{name}[/versions/{v}][/ready]` → name and whether it asks readiness. */
function parseModelPath(subpath: string): { name: string; ready: boolean } {
  const parts = subpath.split("/").filter((x) => x !== "").map((x) => decodeURIComponent(x));
  if (parts.length === 0) throw new ConnectError("model name missing: GET /v2/models/{name}[/ready]", Code.NotFound);
  const name = parts[0]!;
  let rest = parts.slice(1);
  if (rest[0] === "versions" && rest.length >= 2) rest = rest.slice(2);
  if (rest.length === 0) return { name, ready: false };
  if (rest.length === 1 && rest[0] === "ready") return { name, ready: true };
  throw new ConnectError(`no such endpoint: /v2/models${subpath}`, Code.NotFound);
}

export function kserveRoutes(deps: KserveDeps): HttpRoute[] {
  const { catalog } = deps;
  const common = { method: "GET", errorResponse: restError } as const;
  return [
    {
      ...common,
      path: "/v2/health/live",
      rpc: `${GRPC}/ServerLive`,
      handler(_q, res) {
        const live = serverLive(deps.health());
        sendJson(res, live ? 200 : 503, { live });
      },
    },
    {
      ...common,
      path: "/v2/health/ready",
      rpc: `${GRPC}/ServerReady`,
      handler(_q, res) {
        const ready = serverReady(deps.health());
        sendJson(res, ready ? 200 : 503, { ready });
      },
    },
    {
      ...common,
      path: "/v2/models",
      rpc: ({ subpath }) => (/\/ready\/?$/.test(subpath) ? `${GRPC}/ModelReady` : `${GRPC}/ModelMetadata`),
      async handler(_q, res, ctx: HttpContext) {
        const { name, ready } = parseModelPath(ctx.subpath);
        const n = await catalog.resolve(name);
        if (n.model) ctx.auth.checkResource("model", n.model);
        if (n.adapter) ctx.auth.checkResource("adapter", n.adapter);
        if (ready) {
          const ok = serverLive(deps.health()) && (await catalog.ready(name));
          sendJson(res, ok ? 200 : 503, { name, ready: ok });
        } else {
          sendJson(res, 200, { ...modelMetadata(name), inputs: [{ name: "text_input", datatype: "BYTES", shape: [1] }], outputs: [{ name: "text_output", datatype: "BYTES", shape: [1] }] });
        }
      },
    },
    {
      ...common,
      path: "/v2",
      rpc: `${GRPC}/ServerMetadata`,
      handler(_q, res, ctx: HttpContext) {
        if (ctx.subpath !== "" && ctx.subpath !== "/") throw new ConnectError(`no such endpoint: /v2${ctx.subpath}`, Code.NotFound);
        sendJson(res, 200, { name: SERVER_NAME, version: VERSION, extensions: [] });
      },
    },
  ];
}
