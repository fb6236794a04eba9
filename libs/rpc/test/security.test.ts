/**
 * Security of startServer: TLS and mutual TLS from certificate files (made with openssl here),
 * the loopback-only rule for plaintext, bearer tokens from a file (constant-time hashes,
 * reloading), per-token RPC/resource permissions, concurrency and tokens-per-minute quotas, and
 * the audit log.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import https from "node:https";
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { InferenceService, ModelSchema, QuantizerService, health } from "@qlora/proto";
import { FailedPrecondition, InvalidArgument } from "@qlora/core";
import {
  AuditLog,
  Authenticator,
  defineService,
  grpcServiceDefinition,
  hashToken,
  jsonLogger,
  parseAuthConfig,
  startServer,
  type RunningServer,
} from "../src/index.js";
import { fixtureService, tempDir, type FixtureState } from "./fixture.js";

const quiet = jsonLogger({ level: "error" });

/** The certificates are made with the openssl CLI (Debian: `apt-get install -y openssl`). */
const noOpenssl: string | false = (() => {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return false;
  } catch {
    return "the openssl command is not installed";
  }
})();

function openssl(dir: string, ...args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
}

/** A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and one from a foreign CA. */
async function makeCerts(dir: string): Promise<void> {
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  for (const ca of ["ca", "rogue-ca"]) {
    openssl(dir, "req", "-x509", ...ec, "-keyout", `${ca}.key`, "-out", `${ca}.crt`, "-subj", `/CN=${ca}`, "-days", "2",
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
  }
  const leaf = async (name: string, ca: string, cn: string, ext: string) => {
    await writeFile(path.join(dir, `${name}.ext`), ext);
    openssl(dir, "req", ...ec, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${cn}/O=qlora-test`);
    openssl(dir, "x509", "-req", "-in", `${name}.csr`, "-CA", `${ca}.crt`, "-CAkey", `${ca}.key`, "-CAcreateserial",
      "-out", `${name}.crt`, "-days", "2", "-extfile", `${name}.ext`);
  };
  await leaf("server", "ca", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  await leaf("client", "ca", "client-1", "extendedKeyUsage=clientAuth\n");
  await leaf("rogue", "rogue-ca", "mallory", "extendedKeyUsage=clientAuth\n");
}

async function fixture(): Promise<FixtureState> {
  const state: FixtureState = { models: new Map(), slowSignals: [], uploadRoot: await tempDir() };
  state.models.set("base", create(ModelSchema, { name: "base" }));
  state.models.set("team-a-model", create(ModelSchema, { name: "team-a-model" }));
  return state;
}

describe("TLS and mutual TLS", { skip: noOpenssl }, () => {
  let dir: string;
  let pem: (f: string) => Promise<Buffer>;
  before(async () => {
    dir = await tempDir("qlora-tls-");
    await makeCerts(dir);
    pem = (f) => readFile(path.join(dir, f));
  });

  test("TLS: gRPC over h2 (ALPN), Connect over HTTP/1.1, grpc-js with SSL credentials; plaintext is refused", async () => {
    const server = await startServer({
      services: [fixtureService(await fixture())],
      tls: { certFile: path.join(dir, "server.crt"), keyFile: path.join(dir, "server.key") },
      gracePeriodMs: 200,
      log: quiet,
    });
    try {
      assert.equal(server.tls, true);
      assert.match(server.url, /^https:\/\/127\.0\.0\.1:\d+$/);
      const ca = await pem("ca.crt");
      for (const t of [
        createGrpcTransport({ baseUrl: server.url, nodeOptions: { ca, servername: "localhost" } }),
        createConnectTransport({ baseUrl: server.url, httpVersion: "1.1", nodeOptions: { ca, servername: "localhost", agent: new https.Agent({ keepAlive: false, ca, servername: "localhost" }) } }),
        createConnectTransport({ baseUrl: server.url, httpVersion: "2", nodeOptions: { ca, servername: "localhost" } }),
      ]) {
        const c = createClient(QuantizerService, t);
        assert.equal((await c.getModel({ name: "base" })).model?.name, "base");
      }
      // grpc-js, as other gRPC stacks would connect.
      const Ctor = grpc.makeGenericClientConstructor(grpcServiceDefinition(health.Health) as grpc.ServiceDefinition, "Health");
      const gc = new Ctor(server.address, grpc.credentials.createSsl(ca), { "grpc.ssl_target_name_override": "localhost", "grpc.default_authority": "localhost" }) as unknown as Record<string, (r: unknown, cb: (e: unknown, r: { status: number }) => void) => void> & grpc.Client;
      const st = await new Promise<{ status: number }>((res, rej) => gc.Check!(create(health.HealthCheckRequestSchema, { service: "" }), (e, r) => (e ? rej(e) : res(r))));
      assert.equal(st.status, 1);
      gc.close();
      // An untrusted CA: the client refuses the server.
      await assert.rejects(createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url, nodeOptions: { ca: await pem("rogue-ca.crt"), servername: "localhost" } })).getModel({ name: "base" }));
      // Plaintext to the TLS port gets nothing.
      await assert.rejects(fetch(`http://127.0.0.1:${server.port}/qlora.v1.QuantizerService/ListModels`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" }));
    } finally {
      await server.close();
    }
  });

  test("mutual TLS: only clients with a certificate from the client CA get in; the audit log names them", async () => {
    const lines: string[] = [];
    const state = await fixture();
    const server = await startServer({
      services: [fixtureService(state)],
      tls: { certFile: path.join(dir, "server.crt"), keyFile: path.join(dir, "server.key"), clientCaFile: path.join(dir, "ca.crt") },
      audit: AuditLog.toFunction((l) => lines.push(l)),
      gracePeriodMs: 200,
      log: quiet,
    });
    try {
      const ca = await pem("ca.crt");
      const ok = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url, nodeOptions: { ca, servername: "localhost", cert: await pem("client.crt"), key: await pem("client.key") } }));
      assert.equal((await ok.getModel({ name: "base" })).model?.name, "base");
      await ok.deleteModel({ name: "team-a-model" });
      const entry = JSON.parse(lines.at(-1)!) as Record<string, unknown>;
      assert.equal(entry.rpc, "qlora.v1.QuantizerService/DeleteModel");
      assert.match(String(entry.client_cert), /CN=client-1/);
      for (const opts of [{ ca, servername: "localhost" }, { ca, servername: "localhost", cert: await pem("rogue.crt"), key: await pem("rogue.key") }]) {
        const bad = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url, nodeOptions: opts }));
        await assert.rejects(bad.getModel({ name: "base" }));
      }
      // Over HTTP/1.1 too.
      await assert.rejects(
        createClient(QuantizerService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1", nodeOptions: { ca, servername: "localhost", agent: new https.Agent({ keepAlive: false, ca, servername: "localhost" }) } })).getModel({ name: "base" }),
      );
      assert.equal((await ok.getModel({ name: "base" })).model?.name, "base", "the server still serves after refused handshakes");
    } finally {
      await server.close();
    }
  });

  test("rotated certificate files are picked up without a restart", async () => {
    const rot = await tempDir("qlora-tls-rot-");
    for (const f of ["server.crt", "server.key"]) await writeFile(path.join(rot, f), await pem(f));
    const server = await startServer({
      services: [fixtureService(await fixture())],
      tls: { certFile: path.join(rot, "server.crt"), keyFile: path.join(rot, "server.key"), reloadIntervalMs: 30 },
      gracePeriodMs: 100,
      log: quiet,
    });
    const subject = () =>
      new Promise<string>((resolve, reject) => {
        const req = https.get({ host: "127.0.0.1", port: server.port, path: "/metrics", ca: [readFileSync(path.join(dir, "ca.crt"))], servername: "localhost", agent: false }, (res) => {
          const cn = (res.socket as import("node:tls").TLSSocket).getPeerCertificate().subject.CN;
          res.resume();
          resolve(String(cn));
        });
        req.on("error", reject);
      });
    try {
      assert.equal(await subject(), "localhost");
      // A new certificate (same key pair kind, other subject) signed by the same CA.
      await writeFile(path.join(rot, "next.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
      openssl(rot, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "next.key", "-out", "next.csr", "-subj", "/CN=rotated");
      openssl(rot, "x509", "-req", "-in", "next.csr", "-CA", path.join(dir, "ca.crt"), "-CAkey", path.join(dir, "ca.key"), "-CAcreateserial", "-out", "next.crt", "-days", "2", "-extfile", "next.ext");
      await writeFile(path.join(rot, "server.key"), await readFile(path.join(rot, "next.key")));
      await writeFile(path.join(rot, "server.crt"), await readFile(path.join(rot, "next.crt")));
      const end = Date.now() + 5000;
      while ((await subject()) !== "rotated") {
        if (Date.now() > end) assert.fail("the rotated certificate was not picked up");
        await new Promise((r) => setTimeout(r, 30));
      }
    } finally {
      await server.close();
    }
  });

  test("plaintext only on loopback unless allowed; TLS anywhere", async () => {
    const services = [fixtureService(await fixture())];
    await assert.rejects(startServer({ host: "0.0.0.0", services, log: quiet }), (e: unknown) => e instanceof FailedPrecondition && /refusing to serve plaintext on 0\.0\.0\.0/.test(e.message));
    const insecure = await startServer({ host: "0.0.0.0", allowInsecure: true, services: [fixtureService(await fixture())], gracePeriodMs: 100, log: quiet });
    await insecure.close();
    const secure = await startServer({
      host: "0.0.0.0",
      services: [fixtureService(await fixture())],
      tls: { cert: await pem("server.crt"), key: await pem("server.key") },
      gracePeriodMs: 100,
      log: quiet,
    });
    await secure.close();
    for (const h of ["127.0.0.1", "::1", "localhost"]) {
      const s = await startServer({ host: h, services: [fixtureService(await fixture())], gracePeriodMs: 100, log: quiet }).catch((e: unknown) => e);
      if (s instanceof Error) assert.doesNotMatch(s.message, /refusing/, h); // ::1 may be unavailable in the sandbox
      else await (s as RunningServer).close();
    }
    await assert.rejects(startServer({ services, tls: { certFile: path.join(dir, "missing.crt"), keyFile: path.join(dir, "server.key") }, log: quiet }), InvalidArgument);
  });
});

describe("bearer tokens, permissions, quotas, audit", () => {
  const T = {
    admin: "admin-token-0123456789abcdef",
    teamA: "team-a-token-0123456789abcd",
    reader: "reader-token-0123456789abcd",
    one: "one-at-a-time-0123456789abcd",
    tpm: "tokens-per-minute-0123456789",
  };
  let dir: string;
  let tokenFile: string;
  let server: RunningServer;
  let state: FixtureState;
  const audit: string[] = [];
  const transport = (token?: string): Transport =>
    createConnectTransport({
      baseUrl: server.url,
      httpVersion: "1.1",
      interceptors: token ? [(next) => (req) => (req.header.set("authorization", `Bearer ${token}`), next(req))] : [],
    });
  const quantizer = (token?: string) => createClient(QuantizerService, transport(token));
  const isCode = (code: Code) => (e: unknown) => e instanceof ConnectError && e.code === code;

  const tokenConfig = (adminToken: string) => ({
    tokens: [
      { name: "admin", token: adminToken, rpcs: ["*"] },
      { name: "team-a", sha256: hashToken(T.teamA).toString("hex"), rpcs: ["qlora.v1.QuantizerService/*", "qlora.v1.InferenceService/Generate"], models: ["team-a-*"] },
      { name: "reader", token: T.reader, rpcs: ["qlora.v1.QuantizerService/ListModels", "qlora.v1.QuantizerService/GetModel"] },
      { name: "one", token: T.one, rpcs: ["*"], quota: { maxConcurrent: 1 } },
      { name: "tpm", token: T.tpm, rpcs: ["*"], quota: { tokensPerMinute: 30 } },
    ],
  });

  before(async () => {
    dir = await tempDir("qlora-auth-");
    tokenFile = path.join(dir, "tokens.json");
    await writeFile(tokenFile, JSON.stringify(tokenConfig(T.admin)));
    state = await fixture();
    // A stand-in InferenceService whose Generate reports usage, to exercise token accounting on RPCs.
    const fakeInference = defineService(InferenceService, {
      generate: (req) => ({ text: "ok", usage: { promptTokens: 5, completionTokens: req.maxNewTokens, totalTokens: 5 + req.maxNewTokens } }),
    });
    server = await startServer({
      services: [fixtureService(state), fakeInference],
      auth: await Authenticator.fromFile(tokenFile, { reloadIntervalMs: 20 }),
      audit: AuditLog.toFunction((l) => audit.push(l)),
      gracePeriodMs: 300,
      log: quiet,
    });
  });
  after(async () => {
    await server.close();
  });

  test("the token file is validated; secrets never appear in messages", () => {
    const bad = (json: unknown, re: RegExp) => assert.throws(() => parseAuthConfig(json, "t.json"), (e: unknown) => e instanceof InvalidArgument && re.test(e.message) && !e.message.includes("short-one"));
    bad({ tokens: [{ name: "x", token: "short-one", rpcs: ["*"] }] }, /at least 16 characters/);
    bad({ tokens: [{ name: "x", token: "long-enough-token-1234" }] }, /rpcs is required/);
    bad({ tokens: [{ name: "x", token: "long-enough-token-1234", sha256: "00", rpcs: ["*"] }] }, /exactly one of/);
    bad({ tokens: [{ name: "x", sha256: "zz", rpcs: ["*"] }] }, /64 hex digits/);
    bad({ tokens: [{ name: "x", token: "long-enough-token-1234", rpcs: ["*"] }, { name: "y", token: "long-enough-token-1234", rpcs: ["*"] }] }, /same token appears twice/);
    bad({ tokens: [{ name: "x", token: "long-enough-token-1234", rpcs: ["*"], quota: { maxConcurrent: 0 } }] }, /positive integer/);
    bad({ nope: 1 }, /"tokens" must be a list/);
  });

  test("no or unknown token → UNAUTHENTICATED; health and reflection stay open", async () => {
    await assert.rejects(quantizer().listModels({}), isCode(Code.Unauthenticated));
    await assert.rejects(quantizer("not-a-valid-token-at-all").listModels({}), isCode(Code.Unauthenticated));
    // Malformed headers too.
    const raw = await fetch(`${server.url}/qlora.v1.QuantizerService/ListModels`, { method: "POST", headers: { "content-type": "application/json", authorization: "Basic YWRtaW4=" }, body: "{}" });
    assert.equal(raw.status, 401);
    const h = createClient(health.Health, transport());
    assert.equal((await h.check({ service: "" })).status, 1);
    assert.ok((await quantizer(T.admin).listModels({})).models.length >= 1);
    // gRPC protocol: the same status.
    const g = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url }));
    await assert.rejects(g.listModels({}), isCode(Code.Unauthenticated));
  });

  test("per-token RPCs and resources → PERMISSION_DENIED, also on a client stream's first message", async () => {
    await assert.rejects(quantizer(T.reader).deleteModel({ name: "base" }), isCode(Code.PermissionDenied));
    assert.equal((await quantizer(T.reader).getModel({ name: "base" })).model?.name, "base");
    // team-a may use only its models.
    await assert.rejects(quantizer(T.teamA).getModel({ name: "base" }), isCode(Code.PermissionDenied));
    assert.equal((await quantizer(T.teamA).getModel({ name: "team-a-model" })).model?.name, "team-a-model");
    await assert.rejects(
      (async () => {
        for await (const _ of quantizer(T.teamA).quantize({ sourceModel: "base" })) void _;
      })(),
      isCode(Code.PermissionDenied),
    );
    // A model-restricted token must name the model where a default would apply.
    const inf = createClient(InferenceService, transport(T.teamA));
    await assert.rejects(inf.generate({ prompt: "x" }), isCode(Code.PermissionDenied));
    assert.equal((await inf.generate({ model: "team-a-x", prompt: "x", maxNewTokens: 1 })).text, "ok");
    // Client streaming over HTTP/2 (gRPC): refused on the first message, nothing is written.
    const up = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url, interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${T.teamA}`), next(req))] }));
    async function* upload(name: string) {
      yield { name, chunk: { path: "config.json", data: new TextEncoder().encode("{}"), last: true } };
    }
    await assert.rejects(up.uploadModel(upload("base-copy")), isCode(Code.PermissionDenied));
    assert.ok(!state.models.has("base-copy"));
    const ok = await up.uploadModel(upload("team-a-upload"));
    assert.equal(ok.model?.name, "team-a-upload");
  });

  test("maxConcurrent: the second call in flight → RESOURCE_EXHAUSTED; the slot comes back", async () => {
    const c = quantizer(T.one);
    const ac = new AbortController();
    const slow = (async () => {
      for await (const _ of c.quantize({ sourceModel: "slow" }, { signal: ac.signal })) void _;
    })().catch(() => undefined);
    const deadline = Date.now() + 5000;
    while (state.slowSignals.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(state.slowSignals.length, 1);
    await assert.rejects(c.listModels({}), (e: unknown) => isCode(Code.ResourceExhausted)(e) && /1 calls in flight \(quota 1\)/.test((e as ConnectError).rawMessage));
    ac.abort();
    await slow;
    const end = Date.now() + 5000;
    for (;;) {
      try {
        await c.listModels({});
        break;
      } catch (e) {
        if (!isCode(Code.ResourceExhausted)(e) || Date.now() > end) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  });

  test("tokens per minute are counted from responses' usage and enforced", async () => {
    const inf = createClient(InferenceService, transport(T.tpm));
    assert.equal((await inf.generate({ prompt: "x", maxNewTokens: 10 })).text, "ok"); // 15 tokens
    assert.equal((await inf.generate({ prompt: "x", maxNewTokens: 10 })).text, "ok"); // 30 tokens
    await assert.rejects(inf.generate({ prompt: "x", maxNewTokens: 1 }), (e: unknown) => {
      assert.ok(isCode(Code.ResourceExhausted)(e));
      assert.match((e as ConnectError).rawMessage, /used 30 tokens in the last minute \(quota 30\); retry in \d+ s/);
      return true;
    });
    // Other tokens are not affected.
    assert.equal((await createClient(InferenceService, transport(T.admin)).generate({ prompt: "x", maxNewTokens: 100 })).text, "ok");
  });

  test("the token file is reloaded when it changes (rotation)", async () => {
    const rotated = "rotated-admin-token-0123456789";
    await writeFile(tokenFile, JSON.stringify(tokenConfig(rotated)));
    const end = Date.now() + 5000;
    for (;;) {
      await new Promise((r) => setTimeout(r, 30));
      try {
        await quantizer(rotated).listModels({});
        break;
      } catch (e) {
        if (Date.now() > end) throw e;
      }
    }
    await assert.rejects(quantizer(T.admin).listModels({}), isCode(Code.Unauthenticated));
    // A broken file keeps the last good tokens.
    await writeFile(tokenFile, "{ broken");
    await new Promise((r) => setTimeout(r, 100));
    await quantizer(rotated).listModels({});
    await quantizer(rotated).listModels({});
    await writeFile(tokenFile, JSON.stringify(tokenConfig(T.admin)));
    const end2 = Date.now() + 5000;
    for (;;) {
      await new Promise((r) => setTimeout(r, 30));
      try {
        await quantizer(T.admin).listModels({});
        break;
      } catch (e) {
        if (Date.now() > end2) throw e;
      }
    }
  });

  test("the audit log has state-changing calls and refusals, with who and what", async () => {
    audit.length = 0;
    await quantizer(T.admin).deleteModel({ name: "team-a-upload" });
    await assert.rejects(quantizer(T.admin).deleteModel({ name: "never-there" }), isCode(Code.NotFound));
    await assert.rejects(quantizer(T.reader).deleteModel({ name: "base" }), isCode(Code.PermissionDenied));
    await quantizer(T.admin).listModels({}); // not audited
    const events = audit.map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.equal(events.length, 3, audit.join(""));
    const [del, missing, refused] = events;
    assert.deepEqual(
      { event: del!.event, rpc: del!.rpc, outcome: del!.outcome, principal: del!.principal, resources: del!.resources },
      { event: "rpc", rpc: "qlora.v1.QuantizerService/DeleteModel", outcome: "ok", principal: "admin", resources: { models: ["team-a-upload"] } },
    );
    assert.match(String(del!.request_id), /^\S+$/);
    assert.match(String(del!.trace_id), /^[0-9a-f]{32}$/);
    assert.ok(!Number.isNaN(Date.parse(String(del!.time))));
    assert.equal(missing!.outcome, "not_found");
    assert.deepEqual({ event: refused!.event, outcome: refused!.outcome, principal: refused!.principal }, { event: "refused", outcome: "permission_denied", principal: "reader" });
    assert.ok(!audit.join("").includes(T.admin) && !audit.join("").includes(T.reader), "no secrets in the audit log");
  });

  test("audit log to a file: JSON lines, mode 0600", async () => {
    const file = path.join(dir, "audit.jsonl");
    const log = AuditLog.toFile(file);
    log.record({ event: "adapter_loaded", resources: { adapters: ["a"] } });
    log.record({ event: "job_created", resources: { jobs: ["j"] } });
    await log.close();
    const lines = (await readFile(file, "utf8")).trim().split("\n").map((l) => JSON.parse(l) as { event: string });
    assert.deepEqual(lines.map((l) => l.event), ["adapter_loaded", "job_created"]);
    const { mode } = await import("node:fs/promises").then((fs) => fs.stat(file));
    assert.equal(mode & 0o777, 0o600);
  });
});

describe("input limits", () => {
  let server: RunningServer;
  before(async () => {
    const inference = defineService(InferenceService, {
      generate: (req) => ({ text: `ok ${req.prompt.length}` }),
      async *generateStream(req) {
        yield { text: `ok ${req.messages.length}` };
      },
    });
    server = await startServer({ services: [inference], limits: { maxPromptChars: 1000, maxNewTokens: 64 }, gracePeriodMs: 100, log: quiet });
  });
  after(async () => {
    await server.close();
  });

  test("prompt size, messages, new tokens and stop strings are bounded before the handler runs", async () => {
    const c = createClient(InferenceService, createGrpcTransport({ baseUrl: server.url }));
    const invalid = (re: RegExp) => (e: unknown) => e instanceof ConnectError && e.code === Code.InvalidArgument && re.test(e.rawMessage);
    assert.equal((await c.generate({ prompt: "x".repeat(1000) })).text, "ok 1000");
    await assert.rejects(c.generate({ prompt: "x".repeat(1001) }), invalid(/1001 characters; the limit is 1000/));
    await assert.rejects(c.generate({ prompt: "x", maxNewTokens: 65 }), invalid(/max_new_tokens 65/));
    await assert.rejects(c.generate({ prompt: "x", stop: Array.from({ length: 17 }, () => "s") }), invalid(/17 stop strings/));
    await assert.rejects(c.generate({ prompt: "x", stop: ["s".repeat(257)] }), invalid(/stop string has 257/));
    await assert.rejects(c.generate({ prompt: "x", model: "m".repeat(300) }), invalid(/model is 300 characters/));
    // Server streams are checked too (their one message arrives as a stream).
    const many = Array.from({ length: 513 }, () => ({ role: "user", content: "x" }));
    await assert.rejects((async () => {
      for await (const _ of c.generateStream({ messages: many })) void _;
    })(), invalid(/513 messages/));
    const seen: string[] = [];
    for await (const m of c.generateStream({ messages: [{ role: "user", content: "hi" }] })) seen.push(m.text);
    assert.deepEqual(seen, ["ok 1"]);
  });
});
