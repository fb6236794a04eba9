/**
 * Plain HTTP routes on the RPC port (HTTP/1.1 and HTTP/2), their limits and errors; request ids
 * and W3C trace context (echoed, propagated to downstream calls, in the JSON logs); the metrics
 * interceptor, /metrics and the training hooks; route permissions; the in-process transport.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import http2 from "node:http2";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { InferenceService, ModelSchema, QuantizerService, health } from "@qlora/proto";
import { NotFound } from "@qlora/core";
import {
  Authenticator,
  defineService,
  hashToken,
  jsonLogger,
  matchRoute,
  parsePrometheusText,
  propagationInterceptor,
  sampleValue,
  sendJson,
  startServer,
  type HttpRoute,
  type RunningServer,
  type ServerContext,
} from "../src/index.js";
import { fixtureService, tempDir, type FixtureState } from "./fixture.js";

type Line = Record<string, unknown>;

function h2Get(url: string, path: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: http2.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(url);
    session.on("error", reject);
    const req = session.request({ ":path": path, ...headers });
    let body = "";
    let head: http2.IncomingHttpHeaders = {};
    req.on("response", (h) => (head = h));
    req.setEncoding("utf8");
    req.on("data", (d: string) => (body += d));
    req.on("end", () => {
      session.close();
      resolve({ status: Number(head[":status"]), headers: head, body });
    });
    req.on("error", reject);
    req.end();
  });
}

test("matchRoute: method, prefix on segment boundaries, subpath", () => {
  const h = () => {};
  const routes: HttpRoute[] = [
    { method: "GET", path: "/v1/models", handler: h, name: "models" },
    { method: ["POST"], path: "/v1/", handler: h, name: "v1" },
    { method: "*", path: "/any", handler: h, name: "any" },
  ];
  const m = (method: string, p: string) => {
    const r = matchRoute(routes, method, p);
    return r ? `${r.route.name}|${r.subpath}` : null;
  };
  assert.equal(m("GET", "/v1/models"), "models|");
  assert.equal(m("GET", "/v1/models/a:b"), "models|/a:b");
  assert.equal(m("HEAD", "/v1/models"), "models|");
  assert.equal(m("GET", "/v1/modelsx"), null);
  assert.equal(m("POST", "/v1/chat/completions"), "v1|/chat/completions");
  assert.equal(m("POST", "/v10"), null);
  assert.equal(m("DELETE", "/any/x"), "any|/x");
});

describe("routes, request context, logs, metrics", () => {
  let server: RunningServer;
  let state: FixtureState;
  const lines: Line[] = [];
  const internal: string[] = [];
  let started: ServerContext | undefined;
  let onCollectRuns = 0;

  before(async () => {
    state = { models: new Map(), slowSignals: [], uploadRoot: await tempDir() };
    state.models.set("base", create(ModelSchema, { name: "base" }));
    const routes: HttpRoute[] = [
      {
        method: "GET",
        path: "/hello",
        handler(_req, res, ctx) {
          sendJson(res, 200, { subpath: ctx.subpath, q: ctx.url.searchParams.get("q"), trace: ctx.request.trace, requestId: ctx.request.requestId });
        },
      },
      {
        method: "POST",
        path: "/echo",
        maxBodyBytes: 1024,
        async handler(_req, res, ctx) {
          sendJson(res, 200, { got: await ctx.readJson() });
        },
      },
      {
        method: "GET",
        path: "/fail",
        handler(_req, _res, ctx) {
          if (ctx.subpath === "/typed") throw new NotFound("no such thing");
          throw new Error("secret detail /etc/shadow");
        },
      },
      {
        method: "GET",
        path: "/custom-error",
        errorResponse: (code, message, status) => ({ status: status ?? 418, body: { oops: message, code } }),
        handler() {
          throw new NotFound("gone");
        },
      },
    ];
    // A service whose handler calls another RPC of this server over the network, propagating context.
    const relay = defineService(InferenceService, {
      async generate(_req, ctx) {
        const downstream = createClient(health.Health, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1", interceptors: [propagationInterceptor()] }));
        await downstream.check({ service: "" });
        return { text: ctx.requestHeader.get("traceparent") ?? "" };
      },
    }, {
      onStart(ctx) {
        started = ctx;
        ctx.metrics.onCollect(() => {
          onCollectRuns++;
          ctx.metrics.training.setJobCounts({ running: 1, queued: 2 });
        });
      },
    });
    server = await startServer({
      services: [fixtureService(state), relay],
      http: routes,
      log: jsonLogger({ level: "info", write: (l) => lines.push(JSON.parse(l) as Line) }),
      onInternalError: (e, ref) => internal.push(`${ref} ${String(e)}`),
      gracePeriodMs: 300,
    });
  });
  after(async () => {
    await server.close();
  });

  test("a route answers on HTTP/1.1 and HTTP/2, before the RPC router; other paths still reach RPCs", async () => {
    const r1 = await fetch(`${server.url}/hello/a/b?q=1`);
    assert.equal(r1.status, 200);
    assert.deepEqual(((await r1.json()) as { subpath: string; q: string }).subpath, "/a/b");
    const r2 = await h2Get(server.url, "/hello?q=2");
    assert.equal(r2.status, 200);
    assert.equal((JSON.parse(r2.body) as { q: string }).q, "2");
    // Not a route: the RPC router answers (404 for unknown paths, RPCs as usual).
    assert.equal((await fetch(`${server.url}/hellox`)).status, 404);
    const c = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url }));
    assert.equal((await c.getModel({ name: "base" })).model?.name, "base");
  });

  test("body limits, JSON errors, typed errors, masked internal errors, custom error shapes", async () => {
    const post = (body: string, type = "application/json") => fetch(`${server.url}/echo`, { method: "POST", headers: { "content-type": type }, body });
    assert.deepEqual(await (await post('{"a":1}')).json(), { got: { a: 1 } });
    const big = await post(JSON.stringify({ a: "x".repeat(2000) }));
    assert.equal(big.status, 413);
    assert.equal(((await big.json()) as { code: string }).code, "resource_exhausted");
    assert.equal((await post("{oops")).status, 400);
    assert.equal((await post("<a/>", "application/xml")).status, 415);
    const typed = await fetch(`${server.url}/fail/typed`);
    assert.equal(typed.status, 404);
    assert.deepEqual(await typed.json(), { code: "not_found", message: "no such thing" });
    const masked = await fetch(`${server.url}/fail`);
    assert.equal(masked.status, 500);
    const body = (await masked.json()) as { message: string };
    assert.match(body.message, /^internal error \(ref [0-9a-f]{8}\)$/);
    assert.ok(internal.some((r) => r.includes("/etc/shadow")) && !body.message.includes("shadow"));
    const custom = await fetch(`${server.url}/custom-error`);
    assert.equal(custom.status, 418, "the route decides its error shape and status");
    assert.deepEqual(await custom.json(), { oops: "gone", code: Code.NotFound });
  });

  test("x-request-id and traceparent: kept from the caller, echoed, in the logs, propagated downstream", async () => {
    const trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    const parent = "00f067aa0ba902b7";
    lines.length = 0;
    const r = await fetch(`${server.url}/hello`, { headers: { "x-request-id": "req-42", traceparent: `00-${trace}-${parent}-01` } });
    assert.equal(r.headers.get("x-request-id"), "req-42");
    const echoed = r.headers.get("traceparent")!;
    assert.match(echoed, new RegExp(`^00-${trace}-[0-9a-f]{16}-01$`));
    assert.notEqual(echoed.split("-")[2], parent, "this server's span is a new one");
    const seen = (await r.json()) as { trace: { traceId: string; parentSpanId: string; spanId: string }; requestId: string };
    assert.deepEqual([seen.trace.traceId, seen.trace.parentSpanId, seen.requestId], [trace, parent, "req-42"]);
    const log = lines.find((l) => l.msg === "http" && l.path === "/hello")!;
    assert.deepEqual([log.request_id, log.trace_id, log.span_id, log.parent_span_id, log.status], ["req-42", trace, seen.trace.spanId, parent, 200]);

    // Invalid values are replaced, not trusted.
    const bad = await fetch(`${server.url}/hello`, { headers: { "x-request-id": "bad id with spaces", traceparent: "00-00000000000000000000000000000000-00f067aa0ba902b7-01" } });
    assert.notEqual(bad.headers.get("x-request-id"), "bad id with spaces");
    assert.doesNotMatch(bad.headers.get("traceparent")!, /^00-0{32}/);

    // RPCs: gRPC metadata in, response headers out, and the downstream call continues the trace.
    lines.length = 0;
    let responseHeaders: Headers | undefined;
    const inf = createClient(InferenceService, createGrpcTransport({ baseUrl: server.url }));
    const res = await inf.generate({}, { headers: { traceparent: `00-${trace}-${parent}-01`, "x-request-id": "rpc-7" }, onHeader: (h) => (responseHeaders = h) });
    assert.equal(res.text, `00-${trace}-${parent}-01`, "the handler sees the caller's header");
    assert.equal(responseHeaders?.get("x-request-id"), "rpc-7");
    const up = lines.find((l) => l.msg === "rpc" && l.rpc === "qlora.v1.InferenceService/Generate")!;
    const down = lines.find((l) => l.msg === "rpc" && l.rpc === "grpc.health.v1.Health/Check")!;
    assert.deepEqual([up.trace_id, up.parent_span_id, up.request_id, up.code], [trace, parent, "rpc-7", "ok"]);
    assert.deepEqual([down.trace_id, down.parent_span_id, down.request_id], [trace, up.span_id, "rpc-7"], "downstream: same trace, parent = upstream span");
    assert.equal(typeof up.duration_ms, "number");
  });

  test("metrics: RPCs by code (streams at their end), routes, training hooks, onCollect", async () => {
    const c = createClient(QuantizerService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }));
    await c.getModel({ name: "base" });
    await assert.rejects(c.getModel({ name: "nope" }));
    await assert.rejects((async () => {
      for await (const _ of c.quantize({ sourceModel: "fail-midway" })) void _;
    })());
    started!.metrics.training.observeStep({ jobId: "job-1", step: 10, loss: 2.5, tokensPerSecond: 1234, learningRate: 1e-4 });
    started!.metrics.training.observeStep({ jobId: "job-2", step: 3, loss: 3.5, tokensPerSecond: 99 });
    started!.metrics.training.jobEnded("job-2");
    const before = onCollectRuns;
    const text = await (await fetch(`${server.url}/metrics`)).text();
    const f = parsePrometheusText(text);
    assert.equal(onCollectRuns, before + 1);
    const svc = { service: "qlora.v1.QuantizerService" };
    assert.ok(sampleValue(f, "qlora_rpc_requests_total", { ...svc, method: "GetModel", code: "ok" }) >= 1);
    assert.equal(sampleValue(f, "qlora_rpc_requests_total", { ...svc, method: "GetModel", code: "not_found" }), 1);
    assert.equal(sampleValue(f, "qlora_rpc_requests_total", { ...svc, method: "Quantize", code: "failed_precondition" }), 1);
    assert.ok(sampleValue(f, "qlora_http_requests_total", { route: "/echo", status: "413" }) >= 1);
    assert.equal(sampleValue(f, "qlora_training_jobs", { state: "running" }), 1);
    assert.equal(sampleValue(f, "qlora_training_jobs", { state: "queued" }), 2);
    assert.equal(sampleValue(f, "qlora_training_jobs", { state: "failed" }), 0);
    assert.equal(sampleValue(f, "qlora_training_loss", { job: "job-1" }), 2.5);
    assert.equal(sampleValue(f, "qlora_training_tokens_per_second", { job: "job-1" }), 1234);
    assert.ok(!text.includes('job="job-2"'), "an ended job's series are removed");
    assert.ok(sampleValue(f, "process_resident_memory_bytes") > 0);
  });

  test("the in-process transport reaches every service of the server", async () => {
    const q = createClient(QuantizerService, started!.transport);
    assert.equal((await q.getModel({ name: "base" })).model?.name, "base");
    await assert.rejects(q.getModel({ name: "nope" }), (e: unknown) => e instanceof ConnectError && e.code === Code.NotFound);
    assert.ok(started!.services.includes("qlora.v1.QuantizerService"));
    assert.equal(started!.url, server.url);
  });
});

describe("routes behind tokens", () => {
  let server: RunningServer;
  const token = "route-token-0123456789abcdef";
  before(async () => {
    const auth = Authenticator.fromConfig({
      tokens: [{ name: "viewer", hash: hashToken(token), rpcs: ["qlora.http.Test/*"], adapters: ["*"], models: ["ok-*"], datasets: [], quota: { maxConcurrent: 1 } }],
      public: ["qlora.http.Public/*"],
    });
    const view: HttpRoute = {
      method: "GET",
      path: "/view",
      rpc: ({ subpath }) => (subpath === "/public" ? "qlora.http.Public/Get" : "qlora.http.Test/View"),
      handler(_req, res, ctx) {
        ctx.auth.checkResource("model", ctx.url.searchParams.get("model") ?? "");
        sendJson(res, 200, { principal: ctx.auth.principal?.name ?? null });
      },
    };
    const page: HttpRoute = { method: "GET", path: "/page", public: true, handler: (_q, res) => sendJson(res, 200, { page: true }) };
    server = await startServer({ services: [], http: [view, page], auth, metricsPath: false, log: jsonLogger({ level: "error" }) });
  });
  after(async () => {
    await server.close();
  });

  test("401 without a token, 403 for a resource not granted, open routes stay open, metrics can be off", async () => {
    const get = (p: string, t?: string) => fetch(`${server.url}${p}`, { headers: t ? { authorization: `Bearer ${t}` } : {} });
    assert.equal((await get("/view?model=ok-1")).status, 401);
    assert.deepEqual(await (await get("/view?model=ok-1", token)).json(), { principal: "viewer" });
    const denied = await get("/view?model=other", token);
    assert.equal(denied.status, 403);
    assert.match(((await denied.json()) as { message: string }).message, /may not use model "other"/);
    assert.deepEqual(await (await get("/view/public")).json(), { principal: null });
    assert.deepEqual(await (await get("/page")).json(), { page: true });
    assert.equal((await get("/metrics", token)).status, 404);
  });
});
