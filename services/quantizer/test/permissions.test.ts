/**
 * QuantizerService under tokens: ListModels shows each token the models it may use (GetModel of
 * another is PERMISSION_DENIED by the request check); without auth everything is listed.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { QuantizerService } from "@qlora/proto";
import { Authenticator, jsonLogger, parseAuthConfig, startServer, type RunningServer } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { quantizerService } from "../src/index.js";
import { STORIES } from "./service-helpers.js";

const T = { admin: "admin-token-0123456789abcdef", teamA: "team-a-token-0123456789abcd", teamB: "team-b-token-0123456789abcd" };
let dir: string;
let server: RunningServer;
let open: RunningServer;

before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "qlora-quantizer-perm-"));
  const store = new LocalStore(dir);
  for (const name of ["a-one", "a-two", "b-one", "shared"]) {
    const w = await store.beginWrite("models", name);
    await w.writeFile("config.json", await readFile(path.join(STORIES, "config.json")));
    await w.commit();
  }
  const auth = Authenticator.fromConfig(
    parseAuthConfig({
      tokens: [
        { name: "admin", token: T.admin, rpcs: ["*"] },
        { name: "team-a", token: T.teamA, rpcs: ["*"], models: ["a-*", "shared"] },
        { name: "team-b", token: T.teamB, rpcs: ["*"], models: ["b-*"] },
      ],
    }),
  );
  server = await startServer({ services: [quantizerService(store)], auth, log: jsonLogger({ level: "error" }), gracePeriodMs: 500 });
  open = await startServer({ services: [quantizerService(store)], log: jsonLogger({ level: "error" }), gracePeriodMs: 500 });
});

after(async () => {
  await server.close();
  await open.close();
  await rm(dir, { recursive: true, force: true });
});

const client = (s: RunningServer, token?: string) =>
  createClient(
    QuantizerService,
    createConnectTransport({
      baseUrl: s.url,
      httpVersion: "1.1",
      interceptors: token ? [(next) => (req) => (req.header.set("authorization", `Bearer ${token}`), next(req))] : [],
    }),
  );

test("ListModels shows each token its models; GetModel of another's is PERMISSION_DENIED; no auth lists all", async () => {
  const names = async (s: RunningServer, token?: string) => (await client(s, token).listModels({})).models.map((m) => m.name).sort();
  assert.deepEqual(await names(server, T.admin), ["a-one", "a-two", "b-one", "shared"]);
  assert.deepEqual(await names(server, T.teamA), ["a-one", "a-two", "shared"]);
  assert.deepEqual(await names(server, T.teamB), ["b-one"]);
  assert.deepEqual(await names(open), ["a-one", "a-two", "b-one", "shared"]);
  await assert.rejects(client(server, T.teamB).getModel({ name: "shared" }), (e: unknown) => e instanceof ConnectError && e.code === Code.PermissionDenied);
});
