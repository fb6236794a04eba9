/**
 * Per-request context: a request id (`x-request-id`, taken from the client when it sends a sane
 * one, else generated) and W3C trace context (`traceparent`: the caller's trace id is kept, this
 * server's span gets a new span id). Every RPC and HTTP route gets one; handlers read it from
 * `ctx.values.get(requestInfoKey)` (RPCs), from the route context (HTTP routes) or, inside the
 * async call chain of a request, from `currentRequest()`.
 *
 * Outgoing calls made while serving a request carry it on: `propagationInterceptor()` (a
 * connect client interceptor) sets `traceparent` (same trace, this span as the parent) and
 * `x-request-id` on them.
 */
import { AsyncLocalStorage } from "node:async_hooks";
import { randomBytes } from "node:crypto";
import { createContextKey, type Interceptor } from "@connectrpc/connect";

export interface TraceContext {
  /** 32 lowercase hex digits, never all zero. */
  traceId: string;
  /** This server's span for the request: 16 hex digits. */
  spanId: string;
  /** The caller's span (the parent), when a valid traceparent came in. */
  parentSpanId?: string;
  /** trace-flags byte (bit 0: sampled), as two hex digits. */
  flags: string;
}

/** The authenticated caller, when the server checks tokens (see auth.ts). */
export interface PrincipalLike {
  readonly name: string;
}

export interface RequestInfo {
  readonly requestId: string;
  readonly trace: TraceContext;
  /** Date.now() when the request arrived. */
  readonly startedAt: number;
  /** Remote address of the connection. */
  readonly peer: string;
  /** Subject of the verified client certificate (mutual TLS), if any. */
  readonly clientCertSubject?: string;
  /** Set by the auth interceptor once the caller is known. */
  principal?: PrincipalLike;
  /**
   * The RPC being served ("package.Service/Method"; HTTP routes: the RPC they stand for), set
   * when the server dispatches the request: work done on its behalf later (an adapter loaded for
   * it) is recorded under it.
   */
  rpc?: string;
}

export const requestInfoKey = createContextKey<RequestInfo | undefined>(undefined, { description: "qlora request info" });

const storage = new AsyncLocalStorage<RequestInfo>();

/** The request being served in this async context (undefined outside a request). */
export function currentRequest(): RequestInfo | undefined {
  return storage.getStore();
}

/** Runs `f` with `info` as the current request (for currentRequest() and propagation). */
export function runWithRequest<T>(info: RequestInfo, f: () => T): T {
  return storage.run(info, f);
}

/** Wraps an async iterable so that each step runs with `info` as the current request. */
export function iterateWithRequest<T>(info: RequestInfo, source: AsyncIterable<T>): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      const it = source[Symbol.asyncIterator]();
      return {
        next: () => storage.run(info, () => it.next()),
        return: (v?: unknown) => storage.run(info, () => (it.return ? it.return(v as T) : Promise.resolve({ done: true as const, value: v as T }))),
        throw: (e?: unknown) => storage.run(info, () => (it.throw ? it.throw(e) : Promise.reject(e))),
      };
    },
  };
}

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;
const REQUEST_ID = /^[A-Za-z0-9._:@\/+=-]{1,128}$/;

function hex(bytes: number): string {
  for (;;) {
    const h = randomBytes(bytes).toString("hex");
    if (!/^0+$/.test(h)) return h;
  }
}

/** Parses a W3C traceparent header; undefined when absent or invalid (then a new trace starts). */
export function parseTraceparent(header: string | undefined | null): { traceId: string; spanId: string; flags: string } | undefined {
  if (!header) return undefined;
  const m = TRACEPARENT.exec(header.trim().toLowerCase());
  if (!m) return undefined;
  const [, version, traceId, spanId, flags, rest] = m;
  // Version ff is invalid; version 00 has exactly four fields. Future versions may append fields.
  if (version === "ff" || (version === "00" && rest !== undefined)) return undefined;
  if (/^0+$/.test(traceId!) || /^0+$/.test(spanId!)) return undefined;
  return { traceId: traceId!, spanId: spanId!, flags: flags! };
}

export function formatTraceparent(t: { traceId: string; spanId: string; flags: string }): string {
  return `00-${t.traceId}-${t.spanId}-${t.flags}`;
}

/** A fresh span in the caller's trace (or a new trace). */
export function newTraceContext(incoming: string | undefined | null): TraceContext {
  const parent = parseTraceparent(incoming);
  if (parent) return { traceId: parent.traceId, spanId: hex(8), parentSpanId: parent.spanId, flags: parent.flags };
  return { traceId: hex(16), spanId: hex(8), flags: "01" };
}

/** The client's x-request-id when it is a sane token, else a new one. */
export function requestIdFrom(header: string | undefined | null): string {
  if (header && REQUEST_ID.test(header)) return header;
  return randomBytes(12).toString("base64url");
}

type HeaderGetter = (name: string) => string | undefined | null;

export function newRequestInfo(get: HeaderGetter, peer: string, clientCertSubject?: string): RequestInfo {
  return {
    requestId: requestIdFrom(get("x-request-id")),
    trace: newTraceContext(get("traceparent")),
    startedAt: Date.now(),
    peer,
    ...(clientCertSubject ? { clientCertSubject } : {}),
  };
}

/** Headers a server sends back: the request id and the trace (with this server's span). */
export function responseHeadersOf(info: RequestInfo): Record<string, string> {
  return { "x-request-id": info.requestId, traceparent: formatTraceparent(info.trace) };
}

/**
 * Client interceptor: outgoing calls made while serving a request continue its trace (this
 * server's span becomes their parent) and carry its request id. Headers the caller set win.
 */
export function propagationInterceptor(): Interceptor {
  return (next) => async (req) => {
    const info = currentRequest() ?? req.contextValues.get(requestInfoKey);
    if (info) {
      if (!req.header.has("traceparent")) req.header.set("traceparent", formatTraceparent(info.trace));
      if (!req.header.has("x-request-id")) req.header.set("x-request-id", info.requestId);
    }
    return next(req);
  };
}
