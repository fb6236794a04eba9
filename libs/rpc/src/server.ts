/**
 * Server bootstrap: gRPC, gRPC-Web and Connect on ONE TCP port, both as plaintext HTTP/2 with
 * prior knowledge (h2c — what gRPC clients speak) and as HTTP/1.1 (Connect and gRPC-Web from
 * browsers and curl).
 *
 * Node has no h2c+HTTP/1.1 server (http2's allowHTTP1 needs TLS/ALPN), so a plain net.Server
 * reads the first bytes of each connection: the HTTP/2 client preface ("PRI * HTTP/2.0…") sends it
 * to an http2 server, anything else to an http server. The bytes read are put back with unshift();
 * the http2 session picks up a socket's buffered bytes before consuming its native handle.
 */
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type ServiceImpl } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { FailedPrecondition } from "@qlora/core";
import { health, reflectionV1, reflectionV1alpha } from "@qlora/proto";
import { errorMappingInterceptor, defaultInternalErrorReporter, type InternalErrorReporter } from "./errors.js";
import { HealthRegistry, healthImpl } from "./health.js";
import { DescriptorIndex, reflectionV1Impl, reflectionV1alphaImpl } from "./reflection.js";

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
}

export interface ServerContext {
  readonly health: HealthRegistry;
  /** Aborted when the server starts to shut down. */
  readonly shutdownSignal: AbortSignal;
}

export interface ServiceHooks {
  onStart?: ServiceRegistration["onStart"];
  onClose?: ServiceRegistration["onClose"];
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
  /** Where unexpected errors go before the client gets a generic INTERNAL. Default: stderr. */
  onInternalError?: InternalErrorReporter;
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
  /** Stops accepting, drains in-flight calls (aborting them after the grace period), then resolves. */
  close(): Promise<void>;
}

const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");
/** A connection that sends nothing for this long before we can tell the protocol is dropped. */
const SNIFF_TIMEOUT_MS = 10_000;
/** How long after our response ended a stream whose client side is still open gets reset. */
const HALF_OPEN_RESET_MS = 200;

export async function startServer(options: StartServerOptions): Promise<RunningServer> {
  const host = options.host ?? "127.0.0.1";
  const healthRegistry = options.health ?? new HealthRegistry();
  const gracePeriodMs = options.gracePeriodMs ?? 10_000;
  const report = options.onInternalError ?? defaultInternalErrorReporter;
  const shutdown = new AbortController();

  const all: ServiceRegistration[] = [
    ...options.services,
    defineService(health.Health, healthImpl(healthRegistry)),
  ];
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

  for (const r of options.services) {
    if (!healthRegistry.has(r.service.typeName)) healthRegistry.set(r.service.typeName, "SERVING");
  }

  const handler = connectNodeAdapter({
    routes: (router) => {
      for (const r of all) r.register(router);
    },
    interceptors: [errorMappingInterceptor(report)],
    shutdownSignal: shutdown.signal,
    readMaxBytes: options.readMaxBytes ?? 64 * 1024 * 1024,
  });

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
        // Stays paused: the session reads the unshifted bytes, then the native handle.
        h2.emit("connection", socket);
      } else {
        h1Sockets.add(socket);
        socket.once("close", () => {
          h1Sockets.delete(socket);
          h1Busy.delete(socket);
        });
        h1.emit("connection", socket);
        socket.resume();
      }
    };
    socket.on("data", onData);
    socket.on("error", () => {}); // reset by peer before/while sniffing; the servers add their own
    socket.once("close", () => pending.delete(socket));
    socket.setTimeout(SNIFF_TIMEOUT_MS, () => {
      if (pending.has(socket)) socket.destroy();
    });
  };

  const tcp = net.createServer(dispatch);
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

  const ctx: ServerContext = { health: healthRegistry, shutdownSignal: shutdown.signal };
  try {
    for (const r of options.services) await r.onStart?.(ctx);
  } catch (e) {
    tcp.close();
    throw e;
  }

  let closing: Promise<void> | undefined;
  const close = () => (closing ??= doClose());

  async function doClose(): Promise<void> {
    closingDown = true;
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
    } else {
      shutdown.abort(new ConnectError("server is shutting down", Code.Unavailable));
    }
    await stopped;
    for (const r of options.services) await r.onClose?.();
  }

  return {
    host,
    port,
    url: `http://${hostForUrl}:${port}`,
    address: `${hostForUrl}:${port}`,
    health: healthRegistry,
    services: names,
    close,
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
