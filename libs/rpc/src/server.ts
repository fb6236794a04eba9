/**
 * Server bootstrap: gRPC, gRPC-Web and Connect on ONE TCP port, both as plaintext HTTP/2 with
 * prior knowledge (h2c — what gRPC clients speak) and as HTTP/1.1 (Connect and gRPC-Web from
 * browsers and curl).
 *
 * Node has no h2c+HTTP/1.1 server (http2's allowHTTP1 needs TLS/ALPN), so a plain net.Server
 * reads the first bytes of each connection: the HTTP/2 client preface ("PRI * HTTP/2.0…") sends it
 * to an http2 server, anything else to an http server. The bytes read are put back with unshift();
 * the http2 session picks up a socket's buffered bytes before consuming its native handle.
 *
 * With `tls`, the listener is a TLS server instead: ALPN picks HTTP/2 ("h2") or HTTP/1.1, and
 * with a client CA it is mutual TLS. Without TLS only loopback addresses are allowed unless
 * `allowInsecure` says otherwise.
 *
 * Every request (RPC or plain HTTP route) gets a request id and trace context (context.ts),
 * echoed in `x-request-id` / `traceparent` response headers; then, for RPCs, interceptors in this
 * order: access log → metrics → tokens/permissions/quotas → audit → error mapping → input limits → handler.
 * Plain HTTP routes (`http`) are tried before connect's router and get the same treatment.
 */
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import type { DescService } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createContextValues,
  createRouterTransport,
  type ConnectRouter,
  type Interceptor,
  type ServiceImpl,
  type Transport,
} from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { FailedPrecondition } from "@qlora/core";
import { health, reflectionV1, reflectionV1alpha } from "@qlora/proto";
import { errorMappingInterceptor, toConnectError, type InternalErrorReporter } from "./errors.js";
import { HealthRegistry, healthImpl } from "./health.js";
import { DescriptorIndex, reflectionV1Impl, reflectionV1alphaImpl } from "./reflection.js";
import { AuditLog, auditInterceptor, type AuditEvent } from "./audit.js";
import { authInterceptor, requestAuthOf, type Authenticator, type Principal } from "./auth.js";
import { currentRequest, newRequestInfo, requestInfoKey, responseHeadersOf, runWithRequest, type RequestInfo } from "./context.js";
import {
  HttpError,
  codeName,
  connectErrorBody,
  matchRoute,
  normalizeRoutePath,
  readBody,
  readJsonBody,
  sendJson,
  type HttpContext,
  type HttpRequest,
  type HttpResponse,
  type HttpRoute,
} from "./http-routes.js";
import { jsonLogger, requestLogFields, type Logger } from "./log.js";
import { ServerMetrics } from "./metrics.js";
import { nextWithOutcome } from "./outcome.js";
import { limitsInterceptor, type InputLimits } from "./limits.js";
import { isLoopbackHost, isTlsFiles, loadTlsPem, peerCertSubject, secureOptions, tlsFilesStamp, type TlsConfig } from "./tls.js";

/** What a server needs to know about a service it hosts. Build one with defineService(). */
export interface ServiceRegistration {
  /** The service descriptor: its name goes to health and reflection, its file to reflection. */
  readonly service: DescService;
  /** Adds the handlers to a router. */
  readonly register: (router: ConnectRouter) => void;
  /** Called once the server listens, e.g. to flip health while something loads. */
  readonly onStart?: (ctx: ServerContext) => void | Promise<void>;
  /** Called on close after in-flight calls drained (or were aborted): free workers, models, … */
  readonly onClose?: () => void | Promise<void>;
  /** Plain HTTP routes this service serves on the same port (tried before the RPC router). */
  readonly http?: readonly HttpRoute[];
  /** More services hosted with this one (e.g. a standard protocol next to the service's own). */
  readonly companions?: readonly ServiceRegistration[];
}

/** Records audit events of a service (a no-op when the server has no audit log). */
export interface AuditSink {
  record(event: AuditEvent, info?: RequestInfo): void;
}

export interface ServerContext {
  readonly health: HealthRegistry;
  /** Aborted when the server starts to shut down. */
  readonly shutdownSignal: AbortSignal;
  /** The server's Prometheus registry and the hooks services feed (inference, training). */
  readonly metrics: ServerMetrics;
  /** Structured JSON logger (request fields are added inside requests). */
  readonly log: Logger;
  readonly audit: AuditSink;
  /** The services hosted by this server (fully-qualified names). */
  readonly services: readonly string[];
  /**
   * An in-process transport to every service of this server (no network, no TLS, no token
   * checks: calls made by the server itself), e.g. `createClient(TrainerService, ctx.transport)`.
   */
  readonly transport: Transport;
  /** The server's base URL (http:// or https://). */
  readonly url: string;
}

export interface ServiceHooks {
  onStart?: ServiceRegistration["onStart"];
  onClose?: ServiceRegistration["onClose"];
  http?: ServiceRegistration["http"];
  companions?: ServiceRegistration["companions"];
}

/**
 * Typed registration of a service implementation: handlers are plain functions over the
 * generated message types; missing methods answer UNIMPLEMENTED.
 */
export function defineService<S extends DescService>(
  service: S,
  implementation: Partial<ServiceImpl<S>>,
  hooks: ServiceHooks = {},
): ServiceRegistration {
  return {
    service,
    register: (router) => {
      router.service(service, implementation);
    },
    ...hooks,
  };
}

export interface StartServerOptions {
  /** Interface to bind. Default 127.0.0.1 (use 0.0.0.0 or :: to expose the server). */
  host?: string;
  /** TCP port; 0 (default) picks a free one, reported in the result. */
  port?: number;
  services: ServiceRegistration[];
  /** Share a registry created beforehand; by default the server makes its own. */
  health?: HealthRegistry;
  /** Serve grpc.reflection.v1 and v1alpha (default true). */
  reflection?: boolean;
  /** Largest single request message accepted (default 64 MiB); uploads stream in chunks below it. */
  readMaxBytes?: number;
  /**
   * On close(), how long in-flight calls may run before their handlers are aborted (default 10 s).
   * Long streams (Watch, Quantize) see their context signal abort then.
   */
  gracePeriodMs?: number;
  /** Where unexpected errors go before the client gets a generic INTERNAL. Default: the logger. */
  onInternalError?: InternalErrorReporter;
  /** Plain HTTP routes served on the same port, tried before the RPC router (see http-routes.ts). */
  http?: readonly HttpRoute[];
  /** TLS (and mutual TLS with a client CA) from PEM files or PEM contents. */
  tls?: TlsConfig;
  /** Allow plaintext on a non-loopback address (behind a mesh or a TLS-terminating proxy). */
  allowInsecure?: boolean;
  /** Bearer tokens, permissions and quotas; without it every call is allowed. */
  auth?: Authenticator;
  /** Audit log of state-changing calls and refusals. */
  audit?: AuditLog;
  /** Structured logger (default: JSON lines on stderr at $QLORA_LOG_LEVEL or "warn"); access lines are "info". */
  log?: Logger;
  /** Share a metrics registry; by default the server makes its own. */
  metrics?: ServerMetrics;
  /** Where Prometheus scrapes (default "/metrics"; false: not served). */
  metricsPath?: string | false;
  /** Most TCP connections at once (default 4096). */
  maxConnections?: number;
  /** Limits on request fields (prompt size, new tokens, LoRA rank, …; see limits.ts); false: none. */
  limits?: Partial<InputLimits> | false;
}

export interface RunningServer {
  readonly host: string;
  readonly port: number;
  /** http://host:port — a base URL for connect-node transports. */
  readonly url: string;
  /** grpc-js style target: host:port. */
  readonly address: string;
  readonly health: HealthRegistry;
  readonly services: string[];
  readonly metrics: ServerMetrics;
  /** Whether the port speaks TLS (then url is https://…). */
  readonly tls: boolean;
  /** Stops accepting, drains in-flight calls (aborting them after the grace period), then resolves. */
  close(): Promise<void>;
}

const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");
/** A connection that sends nothing for this long before we can tell the protocol is dropped. */
const SNIFF_TIMEOUT_MS = 10_000;
/** How long after our response ended a stream whose client side is still open gets reset. */
const HALF_OPEN_RESET_MS = 200;

function flatten(services: readonly ServiceRegistration[]): ServiceRegistration[] {
  const out: ServiceRegistration[] = [];
  for (const r of services) {
    out.push(r);
    if (r.companions) out.push(...flatten(r.companions));
  }
  return out;
}

function headerOf(req: HttpRequest, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

/** The connection under a request (HTTP/2: its session; HTTP/1.1: its socket) and that socket. */
function connectionOf(req: HttpRequest): { key: object; socket: net.Socket } | undefined {
  const stream = (req as http2.Http2ServerRequest).stream as http2.ServerHttp2Stream | undefined;
  if (stream) {
    const session = stream.session;
    // session.socket is a proxy of the TLS/TCP socket (reads of state and getPeerCertificate pass through).
    return session ? { key: session, socket: session.socket as net.Socket } : undefined;
  }
  const socket = (req as http.IncomingMessage).socket;
  return socket ? { key: socket, socket } : undefined;
}

export async function startServer(options: StartServerOptions): Promise<RunningServer> {
  const host = options.host ?? "127.0.0.1";
  const healthRegistry = options.health ?? new HealthRegistry();
  const gracePeriodMs = options.gracePeriodMs ?? 10_000;
  const log = options.log ?? jsonLogger();
  const report: InternalErrorReporter =
    options.onInternalError ??
    ((error, ref) => log.error("internal error", { ref, error: error instanceof Error ? error : String(error) }));
  const metrics = options.metrics ?? new ServerMetrics();
  const audit = options.audit;
  const auth = options.auth;
  const shutdown = new AbortController();

  if (!options.tls && !options.allowInsecure && !isLoopbackHost(host)) {
    throw new FailedPrecondition(
      `refusing to serve plaintext on ${host}: configure TLS (--tls-cert/--tls-key) or allow plaintext explicitly (--allow-insecure) when a proxy or mesh encrypts the traffic`,
    );
  }
  const tlsPem = options.tls ? await loadTlsPem(options.tls) : undefined;

  const hosted = flatten(options.services);
  const all: ServiceRegistration[] = [...hosted, defineService(health.Health, healthImpl(healthRegistry))];
  if (options.reflection !== false) {
    // The index must know the reflection services themselves, so build it over the final list.
    const index = new DescriptorIndex([
      ...all.map((r) => r.service),
      reflectionV1.ServerReflection,
      reflectionV1alpha.ServerReflection,
    ]);
    all.push(
      defineService(reflectionV1.ServerReflection, reflectionV1Impl(index)),
      defineService(reflectionV1alpha.ServerReflection, reflectionV1alphaImpl(index)),
    );
  }
  const names = all.map((r) => r.service.typeName);
  const dup = names.find((n, i) => names.indexOf(n) !== i);
  if (dup) throw new Error(`service ${dup} registered twice`);

  for (const r of hosted) {
    if (!healthRegistry.has(r.service.typeName)) healthRegistry.set(r.service.typeName, "SERVING");
  }

  const auditSink: AuditSink = audit ?? { record() {} };

  // ---- plain HTTP routes --------------------------------------------------------------------
  const routes: HttpRoute[] = [...(options.http ?? [])];
  for (const r of hosted) routes.push(...(r.http ?? []));
  const metricsPath = options.metricsPath === undefined ? "/metrics" : options.metricsPath;
  if (metricsPath !== false) {
    routes.push({
      method: "GET",
      path: metricsPath,
      rpc: "qlora.http.Metrics/Scrape",
      name: metricsPath,
      async handler(_req, res) {
        const { contentType, body } = await metrics.scrape();
        res.writeHead(200, { "content-type": contentType, "cache-control": "no-store" });
        res.end(body);
      },
    });
  }
  for (const r of routes) normalizeRoutePath(r.path); // fail at start on a malformed path

  const onRefused = (i: { rpc: string; reason: "unauthenticated" | "permission_denied" | "resource_exhausted"; principal?: string; message: string }, info?: RequestInfo) => {
    metrics.authFailures.inc({ reason: i.reason });
    auditSink.record({ event: "refused", rpc: i.rpc, outcome: i.reason, message: i.message, ...(i.principal ? { principal: i.principal } : {}) }, info);
    log.warn("refused", { rpc: i.rpc, reason: i.reason, message: i.message });
  };

  const accessLog: Interceptor = (next) => async (req) => {
    const info = req.contextValues.get(requestInfoKey);
    const rpc = `${req.service.typeName}/${req.method.name}`;
    if (info) info.rpc = rpc;
    const fields = () => ({ rpc, ...requestLogFields(info), duration_ms: info ? Date.now() - info.startedAt : undefined });
    return nextWithOutcome(next, req, (e) => {
      if (e === null) log.info("rpc", { ...fields(), code: "ok" });
      else {
        const ce = ConnectError.from(e);
        log.log(ce.code === Code.Internal || ce.code === Code.Unknown ? "warn" : "info", "rpc", { ...fields(), code: codeName(ce.code), message: ce.rawMessage });
      }
    });
  };

  const interceptors: Interceptor[] = [accessLog, metrics.interceptor()];
  if (auth) {
    interceptors.push(
      authInterceptor(auth, {
        // The current request is the one whose interceptor runs (set around each request below).
        onRefused: (i) => onRefused(i, currentRequest()),
      }),
    );
  }
  if (audit) interceptors.push(auditInterceptor(audit));
  interceptors.push(errorMappingInterceptor(report));
  if (options.limits !== false) interceptors.push(limitsInterceptor(options.limits ?? {}));

  /** Request infos by node request; the connect handler picks them up as context values. */
  const infos = new WeakMap<object, RequestInfo>();

  const rpcHandler = connectNodeAdapter({
    routes: (router) => {
      for (const r of all) r.register(router);
    },
    interceptors,
    shutdownSignal: shutdown.signal,
    readMaxBytes: options.readMaxBytes ?? 64 * 1024 * 1024,
    contextValues: (req) => createContextValues().set(requestInfoKey, infos.get(req)),
  });

  /** Verified client certificate subjects per connection ("" for none). */
  const certSubjects = new WeakMap<object, string>();

  const handler = (req: HttpRequest, resRaw: http.ServerResponse | http2.Http2ServerResponse) => {
    const res = resRaw as unknown as HttpResponse;
    const conn = connectionOf(req);
    let subject: string | undefined;
    if (conn && tlsPem) {
      subject = certSubjects.get(conn.key);
      if (subject === undefined && typeof (conn.socket as tls.TLSSocket).getPeerCertificate === "function") {
        subject = peerCertSubject(conn.socket as tls.TLSSocket) ?? "";
        certSubjects.set(conn.key, subject);
      }
    }
    const info = newRequestInfo((n) => headerOf(req, n), conn?.socket.remoteAddress ?? "", subject || undefined);
    infos.set(req, info);
    for (const [k, v] of Object.entries(responseHeadersOf(info))) res.setHeader(k, v);
    let pathname = "/";
    let url: URL;
    try {
      url = new URL(req.url ?? "/", "http://localhost");
      pathname = url.pathname;
    } catch {
      url = new URL("http://localhost/");
    }
    const m = routes.length ? matchRoute(routes, req.method ?? "GET", pathname) : undefined;
    runWithRequest(info, () => {
      if (!m) {
        rpcHandler(req, resRaw);
        return;
      }
      void runRoute(m.route, m.subpath, req, res, info, url);
    });
  };

  async function runRoute(route: HttpRoute, subpath: string, req: HttpRequest, res: HttpResponse, info: RequestInfo, url: URL): Promise<void> {
    const start = process.hrtime.bigint();
    const routeName = route.name ?? route.path;
    const method = req.method ?? "GET";
    const ac = new AbortController();
    const onClose = () => {
      if (!res.writableEnded) ac.abort(new ConnectError("the client went away", Code.Canceled));
    };
    res.once("close", onClose);
    const onShutdown = () => ac.abort(shutdown.signal.reason);
    shutdown.signal.addEventListener("abort", onShutdown, { once: true });
    const maxBody = Math.min(route.maxBodyBytes ?? 8 * 1024 * 1024, options.readMaxBytes ?? 64 * 1024 * 1024);
    let release: () => void = () => {};
    let principal: Principal | undefined;
    const rpcName = typeof route.rpc === "function" ? route.rpc({ method, subpath }) : (route.rpc ?? `qlora.http/${route.path}`);
    info.rpc = rpcName;
    try {
      if (auth && !route.public && !auth.isPublic(rpcName)) {
        const refuse = (e: ConnectError, reason: "unauthenticated" | "permission_denied" | "resource_exhausted"): never => {
          onRefused({ rpc: rpcName, reason, principal: principal?.name, message: e.rawMessage }, info);
          throw e;
        };
        principal = auth.authenticate(headerOf(req, "authorization"));
        if (!principal) refuse(new ConnectError("missing or invalid bearer token (send authorization: Bearer <token>)", Code.Unauthenticated), "unauthenticated");
        info.principal = principal;
        if (!principal!.canCall(rpcName)) refuse(new ConnectError(`token "${principal!.name}" may not call ${rpcName}`, Code.PermissionDenied), "permission_denied");
        try {
          principal!.checkTokenQuota();
          release = principal!.acquire();
        } catch (e) {
          refuse(e as ConnectError, "resource_exhausted");
        }
      }
      const baseAuth = requestAuthOf(principal);
      const httpCtx: HttpContext = {
        request: info,
        url,
        subpath,
        signal: ac.signal,
        log,
        metrics,
        auth: {
          ...baseAuth,
          checkResource: (kind, name) => {
            try {
              baseAuth.checkResource(kind, name);
            } catch (e) {
              onRefused({ rpc: rpcName, reason: "permission_denied", principal: principal?.name, message: (e as ConnectError).rawMessage }, info);
              throw e;
            }
          },
        },
        readJson: (max = maxBody) => readJsonBody(req, max),
        readBody: (max = maxBody) => readBody(req, max),
      };
      await route.handler(req, res, httpCtx);
    } catch (e) {
      const ce = toConnectError(e, report);
      if (!res.headersSent) {
        // An HttpError knows its exact status (413, 415, …).
        const exact = e instanceof HttpError ? e.status : undefined;
        const out = route.errorResponse?.(ce.code, ce.rawMessage, exact) ?? connectErrorBody(ce.code, ce.rawMessage, exact);
        const headers: Record<string, string> = { ...(out.headers ?? {}) };
        const retry = ce.metadata.get("retry-after");
        if (retry) headers["retry-after"] = retry;
        sendJson(res, out.status, out.body, headers);
      } else if (!res.writableEnded) {
        res.end();
      }
      log.log(ce.code === Code.Internal ? "warn" : "info", "http", {
        method,
        path: url.pathname,
        route: routeName,
        status: res.statusCode,
        code: codeName(ce.code),
        message: ce.rawMessage,
        duration_ms: Date.now() - info.startedAt,
      });
      metrics.observeHttp(routeName, method, res.statusCode, Number(process.hrtime.bigint() - start) / 1e9);
      return;
    } finally {
      release();
      shutdown.signal.removeEventListener("abort", onShutdown);
      res.off("close", onClose);
    }
    if (!res.writableEnded) res.end();
    log.info("http", { method, path: url.pathname, route: routeName, status: res.statusCode, duration_ms: Date.now() - info.startedAt });
    metrics.observeHttp(routeName, method, res.statusCode, Number(process.hrtime.bigint() - start) / 1e9);
  }

  const h2 = http2.createServer({}, handler);
  const h1 = http.createServer(handler);
  // Connect server-streams over HTTP/1.1 can last as long as a quantization: no request timeout.
  h1.requestTimeout = 0;

  const sessions = new Set<http2.ServerHttp2Session>();
  const h1Sockets = new Set<net.Socket>();
  const pending = new Set<net.Socket>();
  h2.on("session", (s) => {
    sessions.add(s);
    s.once("close", () => sessions.delete(s));
    // A closing session whose peer errs must not crash the process.
    s.on("error", () => {});
  });
  h2.on("sessionError", () => {});
  // A client that keeps its request side open after our response ended (e.g. a client-streaming
  // call the server rejected early) would keep the stream, and on close() the whole session,
  // alive. gRPC servers reset such streams with NO_ERROR after the trailers; do the same once the
  // trailers have surely left (resetting at once could overtake them in nghttp2's queue).
  h2.on("stream", (stream: http2.ServerHttp2Stream) => {
    stream.once("finish", () => {
      const timer = setTimeout(() => {
        // The handler no longer reads the request (what the client sent meanwhile sits in a full
        // flow-control window), so end the stream outright; RST_STREAM carries NO_ERROR.
        if (stream.destroyed) return;
        if (!stream.closed) stream.close(http2.constants.NGHTTP2_NO_ERROR);
        stream.destroy();
      }, HALF_OPEN_RESET_MS);
      timer.unref();
      stream.once("close", () => clearTimeout(timer));
    });
  });
  h1.on("clientError", (_err, socket) => socket.destroy());
  // Requests in flight per HTTP/1.1 socket, so that close() can end idle keep-alive sockets at
  // once and busy ones right after their response. (http.Server's own closeIdleConnections()
  // only tracks connections of a server that listens itself, which this one never does.)
  const h1Busy = new Map<net.Socket, number>();
  let closingDown = false;
  h1.on("request", (req: http.IncomingMessage, res: http.ServerResponse) => {
    const socket = req.socket;
    h1Busy.set(socket, (h1Busy.get(socket) ?? 0) + 1);
    if (closingDown) res.shouldKeepAlive = false;
    res.once("close", () => {
      const n = (h1Busy.get(socket) ?? 1) - 1;
      h1Busy.set(socket, n);
      if (closingDown && n === 0) socket.end();
    });
  });
  const closeIdleH1 = () => {
    for (const s of h1Sockets) if (!h1Busy.get(s)) s.end();
  };

  const toH2 = (socket: net.Socket) => {
    // Stays paused: the session reads any unshifted bytes, then the native handle.
    h2.emit("connection", socket);
  };
  const toH1 = (socket: net.Socket) => {
    h1Sockets.add(socket);
    socket.once("close", () => {
      h1Sockets.delete(socket);
      h1Busy.delete(socket);
    });
    h1.emit("connection", socket);
    socket.resume();
  };

  const dispatch = (socket: net.Socket) => {
    pending.add(socket);
    let buf: Buffer = Buffer.alloc(0);
    const done = () => {
      pending.delete(socket);
      socket.off("data", onData);
      socket.setTimeout(0);
    };
    const onData = (chunk: Buffer) => {
      buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
      const n = Math.min(buf.length, PREFACE.length);
      const isH2 = buf.subarray(0, n).equals(PREFACE.subarray(0, n));
      if (isH2 && buf.length < PREFACE.length) return; // a prefix of the preface: need more
      done();
      socket.pause();
      socket.unshift(buf);
      if (isH2) {
        // http2 hands TLS sockets without ALPN to HTTP/1.1; this one sent the h2 preface.
        if (socket instanceof tls.TLSSocket && !socket.alpnProtocol) (socket as { alpnProtocol: string | false | null }).alpnProtocol = "h2";
        toH2(socket);
      } else {
        toH1(socket);
      }
    };
    socket.on("data", onData);
    socket.on("error", () => {}); // reset by peer before/while sniffing; the servers add their own
    socket.once("close", () => pending.delete(socket));
    socket.setTimeout(SNIFF_TIMEOUT_MS, () => {
      if (pending.has(socket)) socket.destroy();
    });
  };

  let tcp: net.Server;
  let tlsReload: NodeJS.Timeout | undefined;
  if (tlsPem) {
    const tlsServer = tls.createServer(secureOptions(tlsPem), (socket: tls.TLSSocket) => {
      socket.on("error", () => {});
      // ALPN decided the protocol; without ALPN (some HTTP/1.1 clients) sniff as in plaintext.
      if (socket.alpnProtocol === "h2") toH2(socket);
      else if (socket.alpnProtocol === "http/1.1") toH1(socket);
      else dispatch(socket);
    });
    tlsServer.on("tlsClientError", (e) => log.debug("tls handshake failed", { error: e.message }));
    const files = options.tls && isTlsFiles(options.tls) ? options.tls : undefined;
    const every = files?.reloadIntervalMs ?? 30_000;
    if (files && every > 0) {
      let stamp = await tlsFilesStamp(files);
      tlsReload = setInterval(() => {
        void (async () => {
          const now = await tlsFilesStamp(files);
          if (now === stamp) return;
          try {
            const pem = await loadTlsPem(files);
            const { ALPNProtocols: _a, requestCert: _r, rejectUnauthorized: _u, ...ctxOpts } = secureOptions(pem);
            tlsServer.setSecureContext(ctxOpts);
            stamp = now;
            log.info("tls certificates reloaded", { cert: files.certFile });
          } catch (e) {
            log.warn("tls certificate reload failed; keeping the previous ones", { error: (e as Error).message });
          }
        })();
      }, every);
      tlsReload.unref();
    }
    tcp = tlsServer;
  } else {
    tcp = net.createServer(dispatch);
  }
  tcp.maxConnections = options.maxConnections ?? 4096;
  // Every accepted TCP socket (TLS: the raw one underneath), so that close() can cut what an
  // unresponsive client keeps open after the grace period: destroying an HTTP/2 session that was
  // handed a socket through emit("connection") does not always close that socket.
  const rawSockets = new Set<net.Socket>();
  tcp.on("connection", (socket: net.Socket) => {
    rawSockets.add(socket);
    socket.once("close", () => rawSockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException) => {
      tcp.off("listening", onListening);
      const why = e.code === "EADDRINUSE" ? "address already in use" : e.code === "EACCES" ? "permission denied" : e.message;
      reject(new FailedPrecondition(`cannot listen on ${host}:${options.port ?? 0}: ${why}`, { cause: e }));
    };
    const onListening = () => {
      tcp.off("error", onError);
      resolve();
    };
    tcp.once("error", onError);
    tcp.once("listening", onListening);
    tcp.listen(options.port ?? 0, host);
  });
  const port = (tcp.address() as net.AddressInfo).port;
  const hostForUrl = host.includes(":") ? `[${host}]` : host;
  const url = `${tlsPem ? "https" : "http"}://${hostForUrl}:${port}`;

  let internal: Transport | undefined;
  const ctx: ServerContext = {
    health: healthRegistry,
    shutdownSignal: shutdown.signal,
    metrics,
    log,
    audit: auditSink,
    services: names,
    url,
    get transport(): Transport {
      internal ??= createRouterTransport(
        (router) => {
          for (const r of all) r.register(router);
        },
        { router: { interceptors: [errorMappingInterceptor(report)], readMaxBytes: options.readMaxBytes ?? 64 * 1024 * 1024 } },
      );
      return internal;
    },
  };

  try {
    for (const r of hosted) await r.onStart?.(ctx);
  } catch (e) {
    clearInterval(tlsReload);
    tcp.close();
    throw e;
  }

  let closing: Promise<void> | undefined;
  const close = () => (closing ??= doClose());

  async function doClose(): Promise<void> {
    closingDown = true;
    clearInterval(tlsReload);
    healthRegistry.shutdown(); // NOT_SERVING; Watch streams report it and end
    const stopped = new Promise<void>((resolve) => tcp.close(() => resolve()));
    for (const s of pending) s.destroy();
    for (const s of sessions) s.close(); // GOAWAY: no new streams, in-flight ones finish
    const drained = () => sessions.size === 0 && h1Sockets.size === 0;
    const deadline = Date.now() + gracePeriodMs;
    while (!drained() && Date.now() < deadline) {
      closeIdleH1(); // keep-alive sockets between requests
      await sleep(25);
    }
    if (!drained()) {
      // Grace period over: abort the handlers' signals so they stop, give them a moment to send
      // their status, then cut what is left.
      shutdown.abort(new ConnectError("server is shutting down", Code.Unavailable));
      const hardDeadline = Date.now() + 1000;
      while (!drained() && Date.now() < hardDeadline) {
        closeIdleH1();
        await sleep(25);
      }
      for (const s of sessions) s.destroy();
      for (const s of h1Sockets) s.destroy();
      for (const s of rawSockets) s.destroy();
    } else {
      shutdown.abort(new ConnectError("server is shutting down", Code.Unavailable));
    }
    await stopped;
    for (const r of hosted) await r.onClose?.();
  }

  return {
    host,
    port,
    url,
    address: `${hostForUrl}:${port}`,
    health: healthRegistry,
    services: names,
    metrics,
    tls: tlsPem !== undefined,
    close,
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
