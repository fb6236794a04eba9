/**
 * Per-token visibility (auth.ts): the predicate list RPCs filter with, the Get check
 * (PERMISSION_DENIED, recorded as a refusal in the audit log like the request checks), the
 * caller lookup from a handler context, and the RPC name a request carries for later audit records.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { ModelSchema, QuantizerService, TrainerService, JobSchema } from "@qlora/proto";
import {
  AuditLog,
  Authenticator,
  NotVisibleError,
  callerOf,
  checkVisible,
  defineService,
  jobResources,
  jsonLogger,
  maySee,
  parseAuthConfig,
  requestInfoKey,
  sendJson,
  startServer,
  visibleOnly,
  type Principal,
  type RunningServer,
} from "../src/index.js";

const T = { admin: "admin-token-0123456789abcdef", teamA: "team-a-token-0123456789abcd", teamB: "team-b-token-0123456789abcd" };
const CONFIG = {
  tokens: [
    { name: "admin", token: T.admin, rpcs: ["*"] },
    { name: "team-a", token: T.teamA, rpcs: ["*"], models: ["base", "a-*"], adapters: ["a-*"], datasets: ["a-*"] },
    { name: "team-b", token: T.teamB, rpcs: ["*"], models: ["b-*"], adapters: ["b-*"], datasets: ["b-*"] },
  ],
};

function principal(auth: Authenticator, token: string): Principal {
  const p = auth.authenticate(`Bearer ${token}`);
  assert.ok(p);
  return p;
}

describe("visibility predicate", () => {
  const auth = Authenticator.fromConfig(parseAuthConfig(CONFIG));
  const a = principal(auth, T.teamA);
  const b = principal(auth, T.teamB);
  const admin = principal(auth, T.admin);

  test("an item is visible when every name it carries is allowed; empty names restrict nothing", () => {
    assert.equal(maySee(a, { models: ["a-1"], adapters: ["a-x"] }), true);
    assert.equal(maySee(a, { models: ["a-1"], adapters: ["b-x"] }), false);
    assert.equal(maySee(a, { models: ["b-1"], adapters: [""] }), false);
    assert.equal(maySee(a, { models: ["base"], adapters: [""] }), true);
    assert.equal(maySee(a, { datasets: ["a-d", "b-d"] }), false);
    assert.equal(maySee(a, { datasets: ["a-d", ""] }), true);
    // Job ids are not a permission kind: they never hide anything by themselves.
    assert.equal(maySee(b, { jobs: ["job-1"] }), true);
    assert.equal(maySee(admin, { models: ["anything"], adapters: ["at-all"] }), true);
    assert.equal(maySee(undefined, { models: ["anything"] }), true, "auth off: everything is visible");
  });

  test("visibleOnly filters per token, keeps order, and returns everything without auth", () => {
    const names = ["a-1", "b-1", "base", "a-2", "c"];
    const r = (n: string) => ({ models: [n] });
    assert.deepEqual(visibleOnly(a, names, r), ["a-1", "base", "a-2"]);
    assert.deepEqual(visibleOnly(b, names, r), ["b-1"]);
    const all = visibleOnly(undefined, names, r);
    assert.deepEqual(all, names);
    assert.notEqual(all, names, "a copy, not the caller's array");
  });

  test("a job is visible to the tokens that could have created it (CreateJob's rule over its request)", () => {
    const job = create(JobSchema, { id: "job-1", request: { baseModel: "a-m", dataset: "a-d", evalDataset: "", outputAdapter: "a-out" }, outputAdapter: "a-out" });
    assert.deepEqual(jobResources(job), { models: ["a-m"], datasets: ["a-d", ""], adapters: ["a-out"] });
    assert.equal(maySee(a, jobResources(job)), true);
    assert.equal(maySee(b, jobResources(job)), false);
    const mixed = create(JobSchema, { id: "job-2", request: { baseModel: "a-m", dataset: "b-d" } });
    assert.equal(maySee(a, jobResources(mixed)), false);
    assert.equal(maySee(b, jobResources(mixed)), false);
    assert.deepEqual(jobResources(create(JobSchema, { id: "job-3" })), {}, "a job without its request names nothing");
  });

  test("checkVisible: PERMISSION_DENIED naming what is outside the token, nothing without auth", () => {
    // Only these errors count as hidden items (ConnectError's own instanceof accepts any ConnectError).
    assert.equal(new ConnectError("job x not found", Code.NotFound) instanceof NotVisibleError, false);
    assert.equal(new ConnectError("denied", Code.PermissionDenied) instanceof NotVisibleError, false);
    assert.equal(new NotVisibleError(a, "x", { models: ["b-1"] }) instanceof ConnectError, true);
    checkVisible(a, "model x", { models: ["a-1"] });
    checkVisible(undefined, "model x", { models: ["b-1"] });
    assert.throws(
      () => checkVisible(a, `job "job-9"`, { models: ["b-m"], datasets: ["a-d"], adapters: ["b-out"] }),
      (e: unknown) =>
        e instanceof NotVisibleError &&
        e.code === Code.PermissionDenied &&
        e.rawMessage === `token "team-a" may not see job "job-9": it uses adapter "b-out", model "b-m"`,
    );
  });
});

describe("visibility in a server", () => {
  let server: RunningServer;
  const audit: string[] = [];
  const seenRpc: string[] = [];
  const models = ["a-1", "b-1", "base"];
  const transport = (token: string): Transport =>
    createConnectTransport({
      baseUrl: server.url,
      httpVersion: "1.1",
      interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${token}`), next(req))],
    });

  before(async () => {
    const quantizer = defineService(QuantizerService, {
      listModels(_req, ctx) {
        seenRpc.push(ctx.values.get(requestInfoKey)?.rpc ?? "");
        return { models: visibleOnly(callerOf(ctx), models, (n) => ({ models: [n] })).map((name) => create(ModelSchema, { name })) };
      },
    });
    // GetJob looks the job up, then checks what it names (the trainer does the same).
    const trainer = defineService(TrainerService, {
      getJob(req, ctx) {
        const job = create(JobSchema, { id: req.id, request: { baseModel: req.id === "job-a" ? "a-m" : "b-m", dataset: "" } });
        checkVisible(callerOf(ctx), `job "${req.id}"`, jobResources(job));
        return { job };
      },
      async *watchJob(req, ctx) {
        checkVisible(callerOf(ctx), `job "${req.id}"`, { models: [req.id === "job-a" ? "a-m" : "b-m"] });
        yield {};
      },
    });
    server = await startServer({
      services: [quantizer, trainer],
      auth: Authenticator.fromConfig(parseAuthConfig(CONFIG)),
      audit: AuditLog.toFunction((l) => audit.push(l)),
      log: jsonLogger({ level: "error" }),
      gracePeriodMs: 300,
      http: [
        {
          method: "GET",
          path: "/whoami",
          rpc: "qlora.test.Who/Am",
          handler(_req, res, ctx) {
            sendJson(res, 200, { rpc: ctx.request.rpc ?? null, principal: callerOf(ctx.request)?.name ?? null });
          },
        },
      ],
    });
  });
  after(async () => {
    await server.close();
  });

  test("a list RPC shows each token its own subset", async () => {
    const list = async (token: string) => (await createClient(QuantizerService, transport(token)).listModels({})).models.map((m) => m.name);
    assert.deepEqual(await list(T.teamA), ["a-1", "base"]);
    assert.deepEqual(await list(T.teamB), ["b-1"]);
    assert.deepEqual(await list(T.admin), models);
    assert.deepEqual(seenRpc, Array(3).fill("qlora.v1.QuantizerService/ListModels"), "the request carries its RPC name");
  });

  test("a Get of an item the token may not see → PERMISSION_DENIED, audited as a refusal (unary and stream)", async () => {
    const a = createClient(TrainerService, transport(T.teamA));
    assert.equal((await a.getJob({ id: "job-a" })).job?.id, "job-a");
    audit.length = 0;
    await assert.rejects(a.getJob({ id: "job-b" }), (e: unknown) => e instanceof ConnectError && e.code === Code.PermissionDenied && /may not see job "job-b": it uses model "b-m"/.test(e.rawMessage));
    await assert.rejects(
      (async () => {
        for await (const _ of a.watchJob({ id: "job-b" })) void _;
      })(),
      (e: unknown) => e instanceof ConnectError && e.code === Code.PermissionDenied,
    );
    const refused = audit.map((l) => JSON.parse(l) as Record<string, unknown>).filter((r) => r.event === "refused");
    assert.deepEqual(
      refused.map((r) => [r.rpc, r.outcome, r.principal]),
      [
        ["qlora.v1.TrainerService/GetJob", "permission_denied", "team-a"],
        ["qlora.v1.TrainerService/WatchJob", "permission_denied", "team-a"],
      ],
    );
    const b = createClient(TrainerService, transport(T.teamB));
    assert.equal((await b.getJob({ id: "job-b" })).job?.id, "job-b");
  });

  test("HTTP routes carry the RPC they stand for and the caller", async () => {
    const res = await fetch(`${server.url}/whoami`, { headers: { authorization: `Bearer ${T.teamB}` } });
    assert.deepEqual(await res.json(), { rpc: "qlora.test.Who/Am", principal: "team-b" });
  });
});
