import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import type * as grpc from "@grpc/grpc-js";
import { ModelSchema, QuantizerService, type QuantizeResponse, type Model } from "@qlora/proto";
import { startServer, type RunningServer } from "../src/index.js";
import { fixtureService, grpcJsClient, grpcServerStream, grpcUnary, tempDir, type FixtureState } from "./fixture.js";

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

describe("startServer: one port, three protocols, two HTTP versions", () => {
  let server: RunningServer;
  let state: FixtureState;
  const internalReports: string[] = [];

  before(async () => {
    state = { models: new Map(), slowSignals: [], uploadRoot: await tempDir() };
    state.models.set("base", create(ModelSchema, { name: "base", architecture: "LlamaForCausalLM" }));
    server = await startServer({
      services: [fixtureService(state)],
      onInternalError: (e, ref) => internalReports.push(`${ref} ${String(e)}`),
      gracePeriodMs: 500,
    });
  });
  after(async () => {
    await server.close();
  });

  test("reports an ephemeral port and URLs", () => {
    assert.ok(server.port > 0);
    assert.equal(server.url, `http://127.0.0.1:${server.port}`);
    assert.equal(server.address, `127.0.0.1:${server.port}`);
    assert.ok(server.services.includes("qlora.v1.QuantizerService"));
  });

  test("connect-node gRPC transport (HTTP/2 prior knowledge): unary and server streaming", async () => {
    const client = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url }));
    const list = await client.listModels({});
    assert.deepEqual(list.models.map((m) => m.name), ["base"]);
    const events = await collect(client.quantize({ sourceModel: "base", outputModel: "via-grpc" }));
    assert.equal(events.length, 4);
    assert.deepEqual(events.slice(0, 3).map((e) => e.event.case), ["progress", "progress", "progress"]);
    const last = events[3]!.event;
    assert.equal(last.case, "result");
    assert.equal((last.value as Model).name, "via-grpc");
  });

  test("connect protocol over HTTP/1.1 and HTTP/2, gRPC-Web over HTTP/1.1", async () => {
    for (const transport of [
      createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }),
      createConnectTransport({ baseUrl: server.url, httpVersion: "2" }),
      createGrpcWebTransport({ baseUrl: server.url, httpVersion: "1.1" }),
    ]) {
      const client = createClient(QuantizerService, transport);
      const got = await client.getModel({ name: "base" });
      assert.equal(got.model?.architecture, "LlamaForCausalLM");
      const events = await collect(client.quantize({ sourceModel: "base", outputModel: "x" }));
      assert.equal(events.at(-1)?.event.case, "result");
    }
  });

  test("plain HTTP/1.1 JSON request (what curl sends) gets a Connect JSON answer", async () => {
    const res = await fetch(`${server.url}/qlora.v1.QuantizerService/GetModel`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "base" }),
    });
    assert.equal(res.status, 200);
    const body = (await res.json()) as { model: { name: string; architecture: string } };
    assert.equal(body.model.name, "base");
    const missing = await fetch(`${server.url}/qlora.v1.QuantizerService/GetModel`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "nope" }),
    });
    assert.equal(missing.status, 404);
    assert.deepEqual(await missing.json(), { code: "not_found", message: 'model "nope" not found' });
  });

  test("errors map to status codes on every protocol; unexpected ones are masked", async () => {
    for (const transport of [
      createGrpcTransport({ baseUrl: server.url }),
      createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }),
    ]) {
      const client = createClient(QuantizerService, transport);
      await assert.rejects(client.getModel({ name: "nope" }), (e: ConnectError) => e.code === Code.NotFound);
      await assert.rejects(client.getModel({ name: "" }), (e: ConnectError) => e.code === Code.InvalidArgument);
      await assert.rejects(client.getModel({ name: "boom" }), (e: ConnectError) => {
        assert.equal(e.code, Code.Internal);
        assert.match(e.rawMessage, /^internal error \(ref [0-9a-f]{8}\)$/);
        assert.doesNotMatch(e.rawMessage, /hunter2|secret/);
        return true;
      });
      // Thrown after the first streamed message: still the right code.
      const seen: QuantizeResponse[] = [];
      await assert.rejects(
        (async () => {
          for await (const ev of client.quantize({ sourceModel: "fail-midway" })) seen.push(ev);
        })(),
        (e: ConnectError) => e.code === Code.FailedPrecondition && e.rawMessage === "source is not a checkpoint",
      );
      assert.equal(seen.length, 1);
      await assert.rejects(collect(client.quantize({ sourceModel: "crash" })), (e: ConnectError) => e.code === Code.Internal);
    }
    assert.ok(internalReports.some((r) => r.includes("hunter2")), "the real error reaches the server log");
  });

  test("@grpc/grpc-js generic client: unary, server streaming, client streaming, status codes", async () => {
    const client = grpcJsClient(QuantizerService, server.address);
    try {
      const list = await grpcUnary<{ models: Model[] }>(client, "ListModels", create(QuantizerService.method.listModels.input, {}));
      assert.ok(list.models.some((m) => m.name === "base"));

      const events = await grpcServerStream<QuantizeResponse>(
        client,
        "Quantize",
        create(QuantizerService.method.quantize.input, { sourceModel: "base", outputModel: "via-grpc-js" }),
      );
      assert.deepEqual(events.map((e) => e.event.case), ["progress", "progress", "progress", "result"]);
      const first = events[0]!.event;
      assert.equal(first.case === "progress" && first.value.tensorsTotal, 3);

      await assert.rejects(
        grpcUnary(client, "GetModel", create(QuantizerService.method.getModel.input, { name: "nope" })),
        (e: grpc.ServiceError) => e.code === 5 /* NOT_FOUND */ && e.details === 'model "nope" not found',
      );
      await assert.rejects(
        grpcServerStream(client, "Quantize", create(QuantizerService.method.quantize.input, { sourceModel: "fail-midway" })),
        (e: grpc.ServiceError) => e.code === 9 /* FAILED_PRECONDITION */,
      );

      // Client streaming: two files, the second in two chunks with a sha256 check.
      const data = Buffer.from("hello world, in two chunks");
      const sha = createHash("sha256").update(data).digest("hex");
      const uploaded = await new Promise<{ model: Model }>((resolve, reject) => {
        const call = client.UploadModel!((err: grpc.ServiceError | null, res: { model: Model }) =>
          err ? reject(err) : resolve(res),
        ) as grpc.ClientWritableStream<unknown>;
        const input = QuantizerService.method.uploadModel.input;
        call.write(create(input, { name: "up1", chunk: { path: "config.json", data: Buffer.from("{}"), last: true } }));
        call.write(create(input, { chunk: { path: "sub/a.bin", data: data.subarray(0, 5) } }));
        call.write(create(input, { chunk: { path: "sub/a.bin", data: data.subarray(5), last: true, sha256: sha } }));
        call.end();
      });
      assert.equal(uploaded.model.name, "up1");
      assert.deepEqual(uploaded.model.files.map((f) => f.path), ["config.json", "sub/a.bin"]);
      assert.equal(await readFile(path.join(state.uploadRoot, "up1", "sub", "a.bin"), "utf8"), data.toString());
    } finally {
      client.close();
    }
  });

  test("a client cancel aborts the handler's signal (grpc-js and connect)", async () => {
    const client = grpcJsClient(QuantizerService, server.address);
    try {
      const call = client.Quantize!(create(QuantizerService.method.quantize.input, { sourceModel: "slow" })) as grpc.ClientReadableStream<QuantizeResponse>;
      const cancelled = new Promise<grpc.ServiceError>((resolve) => call.on("error", resolve));
      await new Promise<void>((resolve) => call.once("data", () => resolve()));
      const before = state.slowSignals.length;
      assert.ok(before >= 1);
      call.cancel();
      assert.equal((await cancelled).code, 1 /* CANCELLED */);
      const sig = state.slowSignals.at(-1)!;
      await waitFor(() => sig.aborted);
    } finally {
      client.close();
    }
    const ctrl = new AbortController();
    const cclient = createClient(QuantizerService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }));
    const it = cclient.quantize({ sourceModel: "slow" }, { signal: ctrl.signal })[Symbol.asyncIterator]();
    await it.next();
    ctrl.abort();
    await assert.rejects(it.next());
    const sig = state.slowSignals.at(-1)!;
    await waitFor(() => sig.aborted);
  });

  test("a connection that sends the HTTP/2 preface in small pieces is still detected", async () => {
    const socket = net.connect(server.port, "127.0.0.1");
    await new Promise((r) => socket.once("connect", r));
    const received: Buffer[] = [];
    socket.on("data", (d: Buffer) => received.push(d));
    const preface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");
    for (const [a, b] of [[0, 1], [1, 9], [9, 24]] as const) {
      socket.write(preface.subarray(a, b));
      await new Promise((r) => setTimeout(r, 20));
    }
    // An empty SETTINGS frame: 3-byte length 0, type 4, flags 0, stream 0.
    socket.write(Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0]));
    await waitFor(() => Buffer.concat(received).length >= 9);
    const reply = Buffer.concat(received);
    assert.equal(reply[3], 4, "the server answers with its own SETTINGS frame");
    socket.destroy();
  });

  test("an HTTP/1.1 request split at an early byte is still served as HTTP/1.1", async () => {
    const socket = net.connect(server.port, "127.0.0.1");
    await new Promise((r) => socket.once("connect", r));
    let text = "";
    socket.setEncoding("latin1");
    socket.on("data", (d: string) => (text += d));
    const body = JSON.stringify({ name: "base" });
    const req = `POST /qlora.v1.QuantizerService/GetModel HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`;
    socket.write(req.slice(0, 1)); // "P", also the first byte of the HTTP/2 preface
    await new Promise((r) => setTimeout(r, 20));
    socket.write(req.slice(1));
    await new Promise((r) => socket.once("close", r));
    assert.match(text, /^HTTP\/1\.1 200/);
    assert.match(text, /"architecture":"LlamaForCausalLM"/);
  });
});

describe("startServer lifecycle", () => {
  test("close() drains in-flight calls, then refuses connections", async () => {
    const state: FixtureState = { models: new Map(), slowSignals: [], uploadRoot: await tempDir() };
    const server = await startServer({ services: [fixtureService(state)], gracePeriodMs: 300 });
    const client = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url }));
    assert.equal((await client.listModels({})).models.length, 0);
    // A stream that only ends when aborted: close() must abort it after the grace period.
    const it = client.quantize({ sourceModel: "slow" })[Symbol.asyncIterator]();
    await it.next();
    const t0 = Date.now();
    await server.close();
    const took = Date.now() - t0;
    assert.ok(took >= 250 && took < 3000, `close took ${took} ms`);
    await assert.rejects(it.next());
    assert.ok(state.slowSignals[0]!.aborted);
    await assert.rejects(
      new Promise((resolve, reject) => {
        const s = net.connect(server.port, "127.0.0.1", () => resolve(s));
        s.on("error", reject);
      }),
    );
  });

  test("close() ends within the grace period even when a client stops reading", async () => {
    const state: FixtureState = { models: new Map(), slowSignals: [], uploadRoot: await tempDir() };
    const server = await startServer({ services: [fixtureService(state)], gracePeriodMs: 300 });
    // A frozen HTTP/2 peer: it opens a session with a stream whose response it never reads,
    // and never answers the GOAWAY.
    const frozen = net.connect(server.port, "127.0.0.1");
    await new Promise<void>((resolve) => frozen.once("connect", () => resolve()));
    frozen.on("error", () => {});
    const preface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    const settings = Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    frozen.write(Buffer.concat([preface, settings]));
    await new Promise((r) => setTimeout(r, 100));
    frozen.pause();
    const closedBySever = new Promise<void>((resolve) => frozen.once("close", () => resolve()));
    const t0 = Date.now();
    const outcome = await Promise.race([
      server.close().then(() => "closed"),
      new Promise((r) => setTimeout(() => r("still open after 5 s"), 5000).unref()),
    ]);
    assert.equal(outcome, "closed");
    const took = Date.now() - t0;
    assert.ok(took < 3000, `close took ${took} ms`);
    frozen.resume();
    await closedBySever;
  });

  test("a busy port is a clear FAILED_PRECONDITION", async () => {
    const first = await startServer({ services: [] });
    try {
      await assert.rejects(startServer({ services: [], port: first.port }), (e: Error & { code?: string }) => {
        assert.equal(e.code, "FAILED_PRECONDITION");
        assert.match(e.message, /address already in use/);
        return true;
      });
    } finally {
      await first.close();
    }
  });
});

async function waitFor(cond: () => boolean, timeoutMs = 3000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 10));
  }
}
