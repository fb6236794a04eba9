import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { create, createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema, type FileDescriptorProto } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type * as grpc from "@grpc/grpc-js";
import { health, reflectionV1, reflectionV1alpha } from "@qlora/proto";
import { HealthRegistry, ServingStatus, startServer, type RunningServer } from "../src/index.js";
import { fixtureService, grpcJsClient, grpcUnary, tempDir } from "./fixture.js";

describe("health and reflection", () => {
  let server: RunningServer;

  before(async () => {
    const state = { models: new Map(), slowSignals: [], uploadRoot: await tempDir() };
    server = await startServer({ services: [fixtureService(state)] });
  });
  after(async () => {
    await server.close();
  });

  test("Check: the whole server, each service, and NOT_FOUND for unknown names", async () => {
    const client = createClient(health.Health, createGrpcTransport({ baseUrl: server.url }));
    assert.equal((await client.check({ service: "" })).status, ServingStatus.SERVING);
    assert.equal((await client.check({ service: "qlora.v1.QuantizerService" })).status, ServingStatus.SERVING);
    await assert.rejects(client.check({ service: "qlora.v1.Nope" }), (e: ConnectError) => e.code === Code.NotFound);
    const list = await client.list({});
    assert.deepEqual(Object.keys(list.statuses).sort(), ["", "qlora.v1.QuantizerService"]);
  });

  test("Check from a plain grpc-js client (what probes use)", async () => {
    const client = grpcJsClient(health.Health, server.address);
    try {
      const res = await grpcUnary<health.HealthCheckResponse>(
        client,
        "Check",
        create(health.HealthCheckRequestSchema, { service: "qlora.v1.QuantizerService" }),
      );
      assert.equal(res.status, ServingStatus.SERVING);
    } finally {
      client.close();
    }
  });

  test("Watch streams the current status, then each change", async () => {
    const client = createClient(health.Health, createGrpcTransport({ baseUrl: server.url }));
    const ctrl = new AbortController();
    const it = client.watch({ service: "qlora.v1.QuantizerService" }, { signal: ctrl.signal })[Symbol.asyncIterator]();
    assert.equal((await it.next()).value?.status, ServingStatus.SERVING);
    server.health.set("qlora.v1.QuantizerService", "NOT_SERVING");
    assert.equal((await it.next()).value?.status, ServingStatus.NOT_SERVING);
    server.health.set("qlora.v1.QuantizerService", "SERVING");
    assert.equal((await it.next()).value?.status, ServingStatus.SERVING);
    ctrl.abort();
    await assert.rejects(it.next());

    // An unknown service reports SERVICE_UNKNOWN, then its status once it appears.
    const ctrl2 = new AbortController();
    const it2 = client.watch({ service: "late.Service" }, { signal: ctrl2.signal })[Symbol.asyncIterator]();
    assert.equal((await it2.next()).value?.status, ServingStatus.SERVICE_UNKNOWN);
    server.health.set("late.Service", "SERVING");
    assert.equal((await it2.next()).value?.status, ServingStatus.SERVING);
    ctrl2.abort();
    await assert.rejects(it2.next());
  });

  test("reflection v1: list_services, file_containing_symbol with dependencies, file_by_filename, errors", async () => {
    const client = createClient(reflectionV1.ServerReflection, createGrpcTransport({ baseUrl: server.url }));
    const requests: reflectionV1.ServerReflectionRequest["messageRequest"][] = [
      { case: "listServices", value: "" },
      { case: "fileContainingSymbol", value: "qlora.v1.QuantizerService" },
      { case: "fileByFilename", value: "qlora/v1/common.proto" },
      { case: "fileContainingSymbol", value: "qlora.v1.QuantizerService.Quantize" },
      { case: "fileContainingSymbol", value: "qlora.v1.Nope" },
      { case: "allExtensionNumbersOfType", value: "qlora.v1.Model" },
    ];
    async function* send() {
      for (const messageRequest of requests) yield create(reflectionV1.ServerReflectionRequestSchema, { host: "h", messageRequest });
    }
    const answers: reflectionV1.ServerReflectionResponse[] = [];
    for await (const res of client.serverReflectionInfo(send())) answers.push(res);
    assert.equal(answers.length, requests.length);
    assert.equal(answers[0]!.validHost, "h");

    const list = answers[0]!.messageResponse;
    assert.equal(list.case, "listServicesResponse");
    assert.deepEqual(
      list.case === "listServicesResponse" && list.value.service.map((s) => s.name),
      [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "qlora.v1.QuantizerService",
      ],
    );

    const files = (i: number): FileDescriptorProto[] => {
      const r = answers[i]!.messageResponse;
      assert.equal(r.case, "fileDescriptorResponse", `answer ${i}`);
      return r.case === "fileDescriptorResponse"
        ? r.value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b))
        : [];
    };
    const byService = files(1);
    assert.deepEqual(byService.map((f) => f.name), [
      "qlora/v1/quantizer.proto",
      "qlora/v1/common.proto",
      "google/protobuf/timestamp.proto",
    ]);
    // The descriptors are complete enough to rebuild a registry, as grpcurl does.
    // (createFileRegistry wants imports first; the server sends the asked-for file first.)
    const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: [...byService].reverse() }));
    const svc = registry.getService("qlora.v1.QuantizerService");
    assert.deepEqual(svc?.methods.map((m) => m.name), ["Quantize", "GetModel", "ListModels", "DeleteModel", "UploadModel"]);
    assert.equal(svc?.method.quantize?.methodKind, "server_streaming");
    const req = registry.getMessage("qlora.v1.QuantizeRequest");
    assert.equal(req?.field.sourceModel?.number, 1);
    assert.equal(registry.getMessage("qlora.v1.Model")?.field.createdAt?.message?.typeName, "google.protobuf.Timestamp");

    assert.equal(files(2)[0]!.name, "qlora/v1/common.proto");
    assert.equal(files(3)[0]!.name, "qlora/v1/quantizer.proto");
    const notFound = answers[4]!.messageResponse;
    assert.equal(notFound.case, "errorResponse");
    assert.equal(notFound.case === "errorResponse" && notFound.value.errorCode, Code.NotFound);
    const ext = answers[5]!.messageResponse;
    assert.equal(ext.case, "allExtensionNumbersResponse");
    assert.deepEqual(ext.case === "allExtensionNumbersResponse" && ext.value.extensionNumber, []);
  });

  test("reflection v1alpha from a grpc-js bidi stream", async () => {
    const client = grpcJsClient(reflectionV1alpha.ServerReflection, server.address);
    try {
      const call = client.ServerReflectionInfo!() as grpc.ClientDuplexStream<unknown, reflectionV1alpha.ServerReflectionResponse>;
      call.write(create(reflectionV1alpha.ServerReflectionRequestSchema, { messageRequest: { case: "listServices", value: "*" } }));
      call.write(
        create(reflectionV1alpha.ServerReflectionRequestSchema, {
          messageRequest: { case: "fileContainingSymbol", value: "grpc.health.v1.HealthCheckResponse.ServingStatus" },
        }),
      );
      call.end();
      const answers: reflectionV1alpha.ServerReflectionResponse[] = [];
      for await (const a of call) answers.push(a as reflectionV1alpha.ServerReflectionResponse);
      assert.equal(answers.length, 2);
      const list = answers[0]!.messageResponse;
      assert.ok(list.case === "listServicesResponse" && list.value.service.some((s) => s.name === "qlora.v1.QuantizerService"));
      const file = answers[1]!.messageResponse;
      assert.ok(file.case === "fileDescriptorResponse");
      assert.equal(fromBinary(FileDescriptorProtoSchema, file.value.fileDescriptorProto[0]!).name, "grpc/health/v1/health.proto");
    } finally {
      client.close();
    }
  });
});

describe("HealthRegistry", () => {
  test("shutdown marks everything NOT_SERVING, ends watches and ignores later updates", async () => {
    const reg = new HealthRegistry();
    reg.set("a.S", "SERVING");
    const seen: ServingStatus[] = [];
    const watching = (async () => {
      for await (const s of reg.watch("a.S", new AbortController().signal)) seen.push(s);
    })();
    await new Promise((r) => setImmediate(r));
    reg.shutdown();
    await watching;
    assert.deepEqual(seen, [ServingStatus.SERVING, ServingStatus.NOT_SERVING]);
    reg.set("a.S", "SERVING");
    assert.equal(reg.get("a.S"), ServingStatus.NOT_SERVING);
    assert.equal(reg.get(""), ServingStatus.NOT_SERVING);
  });

});
