/**
 * The OpenAI HTTP API on the inference port: `POST /v1/completions`, `POST /v1/chat/completions`
 * (with `stream: true`: server-sent events `data: {chunk}\n\n` … `data: [DONE]\n\n`), and
 * `GET /v1/models` (`GET /v1/models/{id}`). The model is "BASE" or "BASE:ADAPTER".
 *
 * Requests become qlora.v1.InferenceService GenerateRequests and run through the same handler
 * as the RPCs (validation, name resolution, batching, errors); errors come back as OpenAI
 * error objects `{"error":{"message","type","param","code"}}` with the matching HTTP status.
 */
import { randomBytes } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { Code, createContextValues, createHandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { InvalidArgument, NotFound } from "@qlora/core";
import { FinishReason, GenerateRequestSchema, GenerateStreamResponseSchema, InferenceService } from "@qlora/proto";
import {
  httpStatusOf,
  codeName,
  maySee,
  requestInfoKey,
  sendJson,
  toConnectError,
  type HttpContext,
  type HttpErrorBody,
  type HttpRequest,
  type HttpResponse,
  type HttpRoute,
} from "@qlora/rpc";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { parseModelName, type Catalog } from "./catalog.js";

export interface OpenAiLimits {
  /** Largest prompt (or all messages' content together), in characters (default 1 Mi). */
  maxPromptChars: number;
  /** Most messages in a chat request (default 512). */
  maxMessages: number;
  /** Largest max_tokens accepted (default 8192; the model's context limits it further). */
  maxNewTokens: number;
  /** Largest request body (default 4 MiB). */
  maxBodyBytes: number;
}

export const DEFAULT_OPENAI_LIMITS: OpenAiLimits = {
  maxPromptChars: 1 << 20,
  maxMessages: 512,
  maxNewTokens: 8192,
  maxBodyBytes: 4 << 20,
};

const ERROR_TYPE: Record<number, string> = {
  400: "invalid_request_error",
  401: "authentication_error",
  403: "permission_error",
  404: "not_found_error",
  409: "conflict_error",
  413: "invalid_request_error",
  415: "invalid_request_error",
  429: "rate_limit_error",
  499: "cancelled",
  501: "not_implemented_error",
  503: "server_overloaded",
  504: "timeout_error",
};

/** An RPC status as an OpenAI error object. */
export function openAiError(code: Code, message: string, exactStatus?: number): HttpErrorBody {
  const status = exactStatus ?? httpStatusOf(code);
  return {
    status,
    body: { error: { message, type: ERROR_TYPE[status] ?? "server_error", param: null, code: codeName(code) } },
  };
}

type Json = Record<string, unknown>;
type StreamMessage = MessageInitShape<typeof GenerateStreamResponseSchema>;

function obj(v: unknown, what: string): Json {
  if (!v || typeof v !== "object" || Array.isArray(v)) throw new InvalidArgument(`${what} must be a JSON object`);
  return v as Json;
}

function optNumber(body: Json, key: string, min: number, max: number): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || v < min || v > max) {
    throw new InvalidArgument(`${key} must be a number in [${min}, ${max}]`);
  }
  return v;
}

function optInt(body: Json, key: string, min: number, max: number): number | undefined {
  const v = optNumber(body, key, min, max);
  if (v !== undefined && !Number.isInteger(v)) throw new InvalidArgument(`${key} must be an integer`);
  return v;
}

/** Parameters OpenAI defines that this server does not implement: refused unless at their no-op value. */
function refuseUnsupported(body: Json): void {
  const zeroOk = ["presence_penalty", "frequency_penalty"];
  for (const k of zeroOk) {
    if (body[k] !== undefined && body[k] !== null && body[k] !== 0) throw new InvalidArgument(`${k} is not supported (use repetition_penalty)`);
  }
  if (body.n !== undefined && body.n !== null && body.n !== 1) throw new InvalidArgument("n must be 1");
  if (body.best_of !== undefined && body.best_of !== null && body.best_of !== 1) throw new InvalidArgument("best_of must be 1");
  if (body.echo === true) throw new InvalidArgument("echo is not supported");
  if (body.suffix !== undefined && body.suffix !== null) throw new InvalidArgument("suffix is not supported");
  if (body.logprobs !== undefined && body.logprobs !== null && body.logprobs !== false) throw new InvalidArgument("logprobs are not supported");
  if (body.top_logprobs !== undefined && body.top_logprobs !== null) throw new InvalidArgument("top_logprobs are not supported");
  for (const k of ["tools", "functions", "tool_choice", "function_call", "logit_bias"]) {
    const v = body[k];
    if (v === undefined || v === null || v === "none" || (Array.isArray(v) && v.length === 0) || (typeof v === "object" && !Array.isArray(v) && Object.keys(v).length === 0)) continue;
    throw new InvalidArgument(`${k} is not supported`);
  }
  const rf = body.response_format as Json | undefined | null;
  if (rf && rf.type !== "text") throw new InvalidArgument("response_format other than text is not supported");
}

function stops(body: Json): string[] {
  const v = body.stop;
  if (v === undefined || v === null) return [];
  const list = typeof v === "string" ? [v] : v;
  if (!Array.isArray(list) || !list.every((s) => typeof s === "string")) throw new InvalidArgument("stop must be a string or a list of strings");
  return list as string[];
}

function contentText(content: unknown, i: number): string {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content
      .map((p, j) => {
        const part = obj(p, `messages[${i}].content[${j}]`);
        if (part.type !== "text" || typeof part.text !== "string") throw new InvalidArgument(`messages[${i}].content[${j}]: only text parts are supported`);
        return part.text;
      })
      .join("");
  }
  throw new InvalidArgument(`messages[${i}].content must be a string or a list of text parts`);
}

interface Parsed {
  id: string;
  stream: boolean;
  includeUsage: boolean;
  request: ReturnType<typeof create<typeof GenerateRequestSchema>>;
  promptChars: number;
}

async function parseCommon(body: Json, catalog: Catalog, limits: OpenAiLimits, ctx: HttpContext): Promise<Omit<Parsed, "promptChars" | "request"> & { model: string; adapter: string; sampling: Json; maxNewTokens: number; stop: string[] }> {
  refuseUnsupported(body);
  if (typeof body.model !== "string" || !body.model) throw new InvalidArgument("model is required (BASE or BASE:ADAPTER; GET /v1/models lists them)");
  const id = body.model;
  // BASE:ADAPTER is checked before the store is asked, so a token learns nothing about names it may not use.
  const parsed = parseModelName(id);
  if (parsed.adapter) {
    ctx.auth.checkResource("model", parsed.model);
    ctx.auth.checkResource("adapter", parsed.adapter);
  }
  const name = await catalog.resolve(id);
  if (name.model) ctx.auth.checkResource("model", name.model);
  else ctx.auth.checkResource("model", "");
  if (name.adapter) ctx.auth.checkResource("adapter", name.adapter);
  const stream = body.stream === true;
  const so = body.stream_options as Json | undefined | null;
  const includeUsage = stream && !!so && so.include_usage === true;
  const maxNew =
    optInt(body, "max_completion_tokens", 1, limits.maxNewTokens) ?? optInt(body, "max_tokens", 1, limits.maxNewTokens) ?? 0;
  const temperature = optNumber(body, "temperature", 0, 2) ?? 1;
  const topP = optNumber(body, "top_p", 0, 1) ?? 1;
  const topK = optInt(body, "top_k", -1, 1 << 20);
  const rep = optNumber(body, "repetition_penalty", 0, 10);
  const seed = optInt(body, "seed", -Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
  const sampling: Json = {
    temperature,
    topP: topP >= 1 ? 0 : topP,
    topK: topK !== undefined && topK > 0 ? topK : 0,
    repetitionPenalty: rep ?? 0,
    ...(seed !== undefined ? { seed: BigInt.asUintN(64, BigInt(seed)) } : {}),
  };
  return { id, stream, includeUsage, model: name.model, adapter: name.adapter, sampling, maxNewTokens: maxNew, stop: stops(body) };
}

async function parseChat(raw: unknown, catalog: Catalog, limits: OpenAiLimits, ctx: HttpContext): Promise<Parsed> {
  const body = obj(raw, "the request body");
  const c = await parseCommon(body, catalog, limits, ctx);
  if (!Array.isArray(body.messages) || body.messages.length === 0) throw new InvalidArgument("messages must be a non-empty list");
  if (body.messages.length > limits.maxMessages) throw new InvalidArgument(`at most ${limits.maxMessages} messages`);
  let chars = 0;
  const messages = body.messages.map((m, i) => {
    const msg = obj(m, `messages[${i}]`);
    if (typeof msg.role !== "string" || !msg.role) throw new InvalidArgument(`messages[${i}].role is required`);
    if (msg.tool_calls !== undefined && msg.tool_calls !== null) throw new InvalidArgument(`messages[${i}]: tool calls are not supported`);
    const content = contentText(msg.content, i);
    chars += content.length;
    // OpenAI's newer "developer" role is the system prompt for templates that predate it.
    return { role: msg.role === "developer" ? "system" : msg.role, content };
  });
  if (chars > limits.maxPromptChars) throw new InvalidArgument(`the messages have ${chars} characters; the limit is ${limits.maxPromptChars}`);
  return {
    id: c.id,
    stream: c.stream,
    includeUsage: c.includeUsage,
    promptChars: chars,
    request: create(GenerateRequestSchema, {
      model: c.model,
      adapter: c.adapter,
      messages,
      sampling: c.sampling,
      maxNewTokens: c.maxNewTokens,
      stop: c.stop,
    }),
  };
}

async function parseCompletion(raw: unknown, catalog: Catalog, limits: OpenAiLimits, ctx: HttpContext): Promise<Parsed> {
  const body = obj(raw, "the request body");
  const c = await parseCommon(body, catalog, limits, ctx);
  let prompt = body.prompt;
  if (Array.isArray(prompt)) {
    if (prompt.length !== 1 || typeof prompt[0] !== "string") throw new InvalidArgument("prompt must be a string (or a list of one string)");
    prompt = prompt[0];
  }
  if (typeof prompt !== "string" || prompt.length === 0) throw new InvalidArgument("prompt must be a non-empty string");
  if (prompt.length > limits.maxPromptChars) throw new InvalidArgument(`the prompt has ${prompt.length} characters; the limit is ${limits.maxPromptChars}`);
  return {
    id: c.id,
    stream: c.stream,
    includeUsage: c.includeUsage,
    promptChars: prompt.length,
    request: create(GenerateRequestSchema, {
      model: c.model,
      adapter: c.adapter,
      prompt,
      sampling: c.sampling,
      maxNewTokens: c.maxNewTokens,
      stop: c.stop,
    }),
  };
}

function finishName(f: FinishReason | undefined): string | null {
  if (f === FinishReason.LENGTH) return "length";
  if (f === FinishReason.STOP) return "stop";
  return null;
}

function usageJson(u: StreamMessage["usage"]): Json {
  const p = u?.promptTokens ?? 0;
  const c = u?.completionTokens ?? 0;
  return { prompt_tokens: p, completion_tokens: c, total_tokens: p + c };
}

/** Writes SSE frames with backpressure; resolves false once the client is gone. */
class SseWriter {
  constructor(
    private readonly res: HttpResponse,
    private readonly signal: AbortSignal,
  ) {}

  start(): void {
    this.res.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      "x-accel-buffering": "no",
    });
    this.res.flushHeaders();
  }

  async send(data: unknown): Promise<boolean> {
    if (this.signal.aborted || this.res.writableEnded) return false;
    const ok = this.res.write(`data: ${typeof data === "string" ? data : JSON.stringify(data)}\n\n`);
    if (ok) return true;
    await new Promise<void>((resolve) => {
      const done = () => {
        this.res.off("drain", done);
        this.res.off("close", done);
        this.signal.removeEventListener("abort", done);
        resolve();
      };
      this.res.once("drain", done);
      this.res.once("close", done);
      this.signal.addEventListener("abort", done, { once: true });
    });
    return !this.signal.aborted && !this.res.writableEnded;
  }
}

export interface OpenAiDeps {
  handlers: ServiceImpl<typeof InferenceService>;
  catalog: Catalog;
  limits?: Partial<OpenAiLimits>;
}

export function openAiRoutes(deps: OpenAiDeps): HttpRoute[] {
  const limits: OpenAiLimits = { ...DEFAULT_OPENAI_LIMITS, ...deps.limits };
  const { handlers, catalog } = deps;

  function run(req: Parsed["request"], ctx: HttpContext): AsyncIterable<StreamMessage> {
    const hctx = createHandlerContext({
      service: InferenceService,
      method: InferenceService.method.generateStream,
      protocolName: "openai",
      requestMethod: "POST",
      url: ctx.url.href,
      requestSignal: ctx.signal,
      contextValues: createContextValues().set(requestInfoKey, ctx.request),
    });
    return handlers.generateStream!(req, hctx) as AsyncIterable<StreamMessage>;
  }

  async function serve(kind: "chat" | "completion", res: HttpResponse, ctx: HttpContext): Promise<void> {
    const raw = await ctx.readJson(limits.maxBodyBytes);
    const p = kind === "chat" ? await parseChat(raw, catalog, limits, ctx) : await parseCompletion(raw, catalog, limits, ctx);
    const id = `${kind === "chat" ? "chatcmpl" : "cmpl"}-${randomBytes(12).toString("hex")}`;
    const created = Math.floor(Date.now() / 1000);
    const object = kind === "chat" ? "chat.completion" : "text_completion";
    const chunkObject = kind === "chat" ? "chat.completion.chunk" : "text_completion";
    const choice = (text: string | null, finish: string | null, first: boolean): Json =>
      kind === "chat"
        ? { index: 0, delta: text === null ? {} : first ? { role: "assistant", content: text } : { content: text }, finish_reason: finish, logprobs: null }
        : { index: 0, text: text ?? "", finish_reason: finish, logprobs: null };

    if (!p.stream) {
      let text = "";
      let last: StreamMessage | undefined;
      for await (const m of run(p.request, ctx)) {
        text += m.text ?? "";
        if (m.finishReason) last = m;
      }
      if (!last) {
        // The client went away (the handler ends quietly then): nothing to answer.
        return;
      }
      ctx.auth.recordTokens((last.usage?.promptTokens ?? 0) + (last.usage?.completionTokens ?? 0));
      const finish = finishName(last.finishReason);
      sendJson(res, 200, {
        id,
        object,
        created,
        model: p.id,
        choices: [
          kind === "chat"
            ? { index: 0, message: { role: "assistant", content: text }, finish_reason: finish, logprobs: null }
            : { index: 0, text, finish_reason: finish, logprobs: null },
        ],
        usage: usageJson(last.usage),
        system_fingerprint: null,
      });
      return;
    }

    // Streaming: the first message arrives only after validation and admission, so errors
    // found there still get a proper HTTP status; later ones go into the stream.
    const it = run(p.request, ctx)[Symbol.asyncIterator]();
    let next = await it.next();
    const sse = new SseWriter(res, ctx.signal);
    sse.start();
    const base = { id, object: chunkObject, created, model: p.id, system_fingerprint: null };
    let first = true;
    try {
      if (kind === "chat" && !next.done) {
        if (!(await sse.send({ ...base, choices: [choice("", null, true)] }))) return;
        first = false;
      }
      while (!next.done) {
        const m = next.value;
        if (m.text) {
          if (!(await sse.send({ ...base, choices: [choice(m.text, null, first)] }))) return;
          first = false;
        }
        if (m.finishReason) {
          ctx.auth.recordTokens((m.usage?.promptTokens ?? 0) + (m.usage?.completionTokens ?? 0));
          if (!(await sse.send({ ...base, choices: [choice(kind === "chat" ? null : "", finishName(m.finishReason), false)] }))) return;
          if (p.includeUsage) await sse.send({ ...base, choices: [], usage: usageJson(m.usage) });
        }
        next = await it.next();
      }
      await sse.send("[DONE]");
    } catch (e) {
      // Headers are out: report in the stream, as OpenAI-compatible servers do (the client raises it).
      const ce = toConnectError(e);
      await sse.send(openAiError(ce.code, ce.rawMessage).body);
    } finally {
      await it.return?.();
      if (!res.writableEnded) res.end();
    }
  }

  const common = { errorResponse: openAiError, maxBodyBytes: limits.maxBodyBytes };
  return [
    {
      ...common,
      method: "POST",
      path: "/v1/chat/completions",
      rpc: "qlora.v1.InferenceService/Generate",
      handler: (_req: HttpRequest, res: HttpResponse, ctx: HttpContext) => serve("chat", res, ctx),
    },
    {
      ...common,
      method: "POST",
      path: "/v1/completions",
      rpc: "qlora.v1.InferenceService/Generate",
      handler: (_req: HttpRequest, res: HttpResponse, ctx: HttpContext) => serve("completion", res, ctx),
    },
    {
      ...common,
      method: "GET",
      path: "/v1/models",
      rpc: "qlora.v1.InferenceService/ListAdapters",
      async handler(_req: HttpRequest, res: HttpResponse, ctx: HttpContext) {
        const entries = await catalog.list();
        const data = entries
          .filter((e) => maySee(ctx.auth.principal, { models: [e.model], adapters: [e.adapter] }))
          .map((e) => ({
            id: e.id,
            object: "model",
            created: e.created,
            owned_by: "qlora",
            root: e.model,
            parent: e.adapter ? e.model : null,
            // qlora extensions: what is resident now.
            loaded: e.loaded,
            ...(e.adapter ? { adapter: e.adapter, adapter_resident: e.adapterResident, lora_rank: e.adapterInfo?.lora.rank ?? null } : {}),
          }));
        const wanted = ctx.subpath ? decodeURIComponent(ctx.subpath.slice(1)) : "";
        if (wanted) {
          const one = data.find((d) => d.id === wanted);
          if (!one) throw new NotFound(`model ${wanted} does not exist`);
          sendJson(res, 200, one);
          return;
        }
        sendJson(res, 200, { object: "list", data });
      },
    },
  ];
}

