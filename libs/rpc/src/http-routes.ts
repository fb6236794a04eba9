/**
 * Plain HTTP routes on the RPC port (the OpenAI API, KServe REST, /metrics, /ui, …).
 *
 * `startServer({ http: [...] })` (and `ServiceRegistration.http`) take routes that are tried, in
 * order, before connect's router: a route matches when the method is one of its methods and the
 * path is its `path` or below it (`/v1` matches `/v1` and `/v1/models`, not `/v10`). They run on
 * HTTP/1.1 and HTTP/2 alike (the compat request/response objects of node:http and node:http2),
 * behind the same request ids, trace context, authentication, quotas, metrics and access log
 * as the RPCs.
 */
import type http from "node:http";
import type http2 from "node:http2";
import { Code, ConnectError } from "@connectrpc/connect";
import type { RequestInfo } from "./context.js";
import type { Logger } from "./log.js";
import type { ServerMetrics } from "./metrics.js";
import type { RequestAuth } from "./auth.js";

export type HttpRequest = http.IncomingMessage | http2.Http2ServerRequest;

/** What both node:http's ServerResponse and node:http2's compat response offer. */
export interface HttpResponse {
  statusCode: number;
  readonly headersSent: boolean;
  readonly writableEnded: boolean;
  setHeader(name: string, value: string | number | readonly string[]): unknown;
  getHeader(name: string): unknown;
  removeHeader(name: string): void;
  writeHead(statusCode: number, headers?: Record<string, string | number | string[]>): unknown;
  write(chunk: string | Uint8Array): boolean;
  end(chunk?: string | Uint8Array): unknown;
  flushHeaders(): void;
  on(event: "close" | "drain" | "finish", listener: () => void): unknown;
  once(event: "close" | "drain" | "finish", listener: () => void): unknown;
  off(event: "close" | "drain" | "finish", listener: () => void): unknown;
}

export interface HttpContext {
  /** Request id, trace context, peer, principal. */
  readonly request: RequestInfo;
  /** The parsed request URL (path and query). */
  readonly url: URL;
  /** The part of the path below the route's prefix ("" or starting with "/"). */
  readonly subpath: string;
  /** Aborted when the client goes away or the server's grace period ends. */
  readonly signal: AbortSignal;
  readonly log: Logger;
  readonly metrics: ServerMetrics;
  /** The caller's permissions and quotas (everything allowed when the server checks no tokens). */
  readonly auth: RequestAuth;
  /** Reads the request body (at most `maxBytes`, default the route's maxBodyBytes) as JSON. */
  readJson(maxBytes?: number): Promise<unknown>;
  /** Reads the raw request body (same limit). */
  readBody(maxBytes?: number): Promise<Buffer>;
}

export interface HttpErrorBody {
  status: number;
  body: unknown;
  headers?: Record<string, string>;
}

export interface HttpRoute {
  /** "GET", ["GET", "HEAD"] or "*". */
  method: string | readonly string[];
  /** Path prefix, starting with "/" (no trailing slash, except "/" itself). */
  path: string;
  /**
   * The permission this route needs when tokens are checked, written like an RPC name
   * (e.g. "qlora.v1.InferenceService/Generate") so that token globs cover RPCs and routes alike;
   * a function when it depends on the path below the prefix. Default "qlora.http/<path>".
   */
  rpc?: string | ((r: { method: string; subpath: string }) => string);
  /** Always open, whatever the token configuration (static files that hold no data). */
  public?: boolean;
  /** Largest request body read by ctx.readJson/readBody (default 8 MiB). */
  maxBodyBytes?: number;
  /** Label for metrics and logs (default: the path). */
  name?: string;
  handler(req: HttpRequest, res: HttpResponse, ctx: HttpContext): void | Promise<void>;
  /**
   * How errors (thrown by the handler, or auth/quota refusals) look (default: Connect's JSON
   * error). `status` is set when the error carries an exact HTTP status (an HttpError: 413, 415, …).
   */
  errorResponse?(code: Code, message: string, status?: number): HttpErrorBody;
}

/** An error with an HTTP status of its own (e.g. 413, 405); `code` is its RPC equivalent. */
export class HttpError extends ConnectError {
  constructor(
    readonly status: number,
    message: string,
    code: Code = Code.InvalidArgument,
  ) {
    // Keeps name "ConnectError": connect recognises its errors (also subclasses) by name and shape.
    super(message, code);
  }

  /** ConnectError's own hasInstance accepts every ConnectError; this class checks the prototype chain. */
  static override [Symbol.hasInstance](v: unknown): boolean {
    return Function.prototype[Symbol.hasInstance].call(this, v);
  }
}

/** The status Connect (and thus grpc-gateway-style APIs) use for each code. */
export function httpStatusOf(code: Code): number {
  switch (code) {
    case Code.Canceled:
      return 499;
    case Code.Unknown:
    case Code.Internal:
    case Code.DataLoss:
      return 500;
    case Code.InvalidArgument:
    case Code.FailedPrecondition:
    case Code.OutOfRange:
      return 400;
    case Code.DeadlineExceeded:
      return 504;
    case Code.NotFound:
      return 404;
    case Code.AlreadyExists:
    case Code.Aborted:
      return 409;
    case Code.PermissionDenied:
      return 403;
    case Code.ResourceExhausted:
      return 429;
    case Code.Unimplemented:
      return 501;
    case Code.Unavailable:
      return 503;
    case Code.Unauthenticated:
      return 401;
    default:
      return 500;
  }
}

/** Connect's code names ("not_found", …). */
export function codeName(code: Code): string {
  return (Code[code] ?? "Unknown").replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

export function connectErrorBody(code: Code, message: string, status?: number): HttpErrorBody {
  return { status: status ?? httpStatusOf(code), body: { code: codeName(code), message } };
}

export function normalizeRoutePath(p: string): string {
  if (!p.startsWith("/")) throw new Error(`route path must start with "/": ${p}`);
  return p.length > 1 && p.endsWith("/") ? p.slice(0, -1) : p;
}

/** The route for a request, and the path below its prefix; undefined when none matches. */
export function matchRoute(
  routes: readonly HttpRoute[],
  method: string,
  pathname: string,
): { route: HttpRoute; subpath: string } | undefined {
  for (const route of routes) {
    const methods = typeof route.method === "string" ? [route.method] : route.method;
    if (!methods.includes("*") && !methods.includes(method) && !(method === "HEAD" && methods.includes("GET"))) continue;
    const prefix = normalizeRoutePath(route.path);
    if (prefix === "/") return { route, subpath: pathname };
    if (pathname === prefix) return { route, subpath: "" };
    if (pathname.startsWith(prefix + "/")) return { route, subpath: pathname.slice(prefix.length) };
  }
  return undefined;
}

/** Reads a body up to `maxBytes` (413 beyond it, without buffering the rest). */
export async function readBody(req: HttpRequest, maxBytes: number): Promise<Buffer> {
  const declared = Number(req.headers["content-length"] ?? NaN);
  if (Number.isFinite(declared) && declared > maxBytes) {
    throw new HttpError(413, `request body of ${declared} bytes exceeds the limit of ${maxBytes} bytes`, Code.ResourceExhausted);
  }
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    n += chunk.length;
    if (n > maxBytes) {
      throw new HttpError(413, `request body exceeds the limit of ${maxBytes} bytes`, Code.ResourceExhausted);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, n);
}

export async function readJsonBody(req: HttpRequest, maxBytes: number): Promise<unknown> {
  const type = String(req.headers["content-type"] ?? "");
  if (type && !/^application\/(.+\+)?json\b/i.test(type) && !/^text\/plain\b/i.test(type)) {
    throw new HttpError(415, `expected a JSON body (content-type application/json), got ${type}`);
  }
  const body = await readBody(req, maxBytes);
  if (body.length === 0) throw new HttpError(400, "the request body is empty; expected JSON");
  try {
    return JSON.parse(body.toString("utf8")) as unknown;
  } catch (e) {
    throw new HttpError(400, `the request body is not valid JSON: ${(e as Error).message}`);
  }
}

/** Sends a JSON answer (unless the response already started). */
export function sendJson(res: HttpResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent) {
    if (!res.writableEnded) res.end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json; charset=utf-8",
    "cache-control": "no-store",
    "content-length": Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}
