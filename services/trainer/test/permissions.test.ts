/**
 * TrainerService under tokens: ListJobs and ListDatasets show each token what it may use, a
 * GetJob / CancelJob / WatchJob / ListCheckpoints of a job it may not see is PERMISSION_DENIED
 * (a job is visible to the tokens that could have created it), and the LoRA rank limit of CreateJob.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { TrainerService } from "@qlora/proto";
import { AuditLog, Authenticator, jsonLogger, parseAuthConfig, startServer, type RunningServer } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { trainerService } from "../src/index.js";
import { FAKE_RUNNER, TEXT_LINES, addConfigOnlyModel, collect, datasetUpload, quiet, startHarness, terminal, waitForJob } from "./helpers.js";

const T = { admin: "admin-token-0123456789abcdef", teamA: "team-a-token-0123456789abcd", teamB: "team-b-token-0123456789abcd" };
const isCode = (code: Code, re?: RegExp) => (e: unknown) => e instanceof ConnectError && e.code === code && (!re || re.test(e.rawMessage));

describe("TrainerService: per-token lists and gets", () => {
  let server: RunningServer;
  const audit: Record<string, unknown>[] = [];
  let jobA = "";
  let jobB = "";
  const client = (token: string): Client<typeof TrainerService> =>
    createClient(
      TrainerService,
      createConnectTransport({
        baseUrl: server.url,
        httpVersion: "1.1",
        interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${token}`), next(req))],
      }),
    );

  before(async () => {
    const dir = await mkdtemp(path.join(tmpdir(), "qlora-trainer-perm-"));
    const store = new LocalStore(dir);
    await addConfigOnlyModel(store, "a-base");
    await addConfigOnlyModel(store, "b-base");
    const service = trainerService({ store, dataDir: dir, runner: { module: FAKE_RUNNER, config: { stepMs: 1 } }, pollMs: 100, log: quiet });
    server = await startServer({
      services: [service],
      auth: Authenticator.fromConfig(
        parseAuthConfig({
          tokens: [
            { name: "admin", token: T.admin, rpcs: ["*"] },
            { name: "team-a", token: T.teamA, rpcs: ["*"], models: ["a-*"], datasets: ["a-*"], adapters: ["a-*"] },
            { name: "team-b", token: T.teamB, rpcs: ["*"], models: ["b-*"], datasets: ["b-*"], adapters: ["b-*"] },
          ],
        }),
      ),
      audit: AuditLog.toFunction((l) => audit.push(JSON.parse(l) as Record<string, unknown>)),
      log: jsonLogger({ level: "error" }),
      gracePeriodMs: 1000,
    });
    const admin = client(T.admin);
    for (const d of ["a-data", "b-data"]) await admin.uploadDataset(datasetUpload(d, "lines.txt", TEXT_LINES));
    const spec = { lora: { rank: 4 }, training: { maxSteps: 2, blockSize: 16 } };
    jobA = (await client(T.teamA).createJob({ baseModel: "a-base", dataset: "a-data", outputAdapter: "a-out", ...spec })).job!.id;
    jobB = (await client(T.teamB).createJob({ baseModel: "b-base", dataset: "b-data", outputAdapter: "b-out", ...spec })).job!.id;
    for (const id of [jobA, jobB]) await waitForJob(admin, id, terminal);
  });
  after(async () => {
    await server.close();
  });

  test("ListJobs and ListDatasets: each token sees its own subset, the unrestricted token all", async () => {
    const jobs = async (token: string) => (await client(token).listJobs({})).jobs.map((j) => j.id).sort();
    assert.deepEqual(await jobs(T.admin), [jobA, jobB].sort());
    assert.deepEqual(await jobs(T.teamA), [jobA]);
    assert.deepEqual(await jobs(T.teamB), [jobB]);
    const datasets = async (token: string) => (await client(token).listDatasets({})).datasets.map((d) => d.name).sort();
    assert.deepEqual(await datasets(T.admin), ["a-data", "b-data"]);
    assert.deepEqual(await datasets(T.teamA), ["a-data"]);
    assert.deepEqual(await datasets(T.teamB), ["b-data"]);
  });

  test("GetJob, CancelJob, WatchJob, ListCheckpoints of another token's job → PERMISSION_DENIED (audited); unknown ids stay NOT_FOUND", async () => {
    const a = client(T.teamA);
    assert.equal((await a.getJob({ id: jobA })).job?.outputAdapter, "a-out");
    assert.ok((await collect(a.watchJob({ id: jobA }))).length > 0);
    assert.ok((await a.listCheckpoints({ jobId: jobA })).checkpoints.length >= 0);
    audit.length = 0;
    const denied = isCode(Code.PermissionDenied, new RegExp(`token "team-a" may not see job "${jobB}"`));
    await assert.rejects(a.getJob({ id: jobB }), denied);
    await assert.rejects(a.cancelJob({ id: jobB }), denied);
    await assert.rejects(collect(a.watchJob({ id: jobB })), denied);
    await assert.rejects(a.listCheckpoints({ jobId: jobB }), denied);
    await assert.rejects(a.getJob({ id: "job-does-not-exist" }), isCode(Code.NotFound));
    const refused = audit.filter((r) => r.event === "refused").map((r) => `${r.rpc} ${r.outcome} ${r.principal}`);
    assert.deepEqual(refused, [
      "qlora.v1.TrainerService/GetJob permission_denied team-a",
      "qlora.v1.TrainerService/CancelJob permission_denied team-a",
      "qlora.v1.TrainerService/WatchJob permission_denied team-a",
      "qlora.v1.TrainerService/ListCheckpoints permission_denied team-a",
    ]);
    // The other token, and the unrestricted one, see it.
    assert.equal((await client(T.teamB).getJob({ id: jobB })).job?.id, jobB);
    assert.equal((await client(T.admin).getJob({ id: jobB })).job?.id, jobB);
  });

  test("CreateJob above the trainer's LoRA rank limit (default 256) → INVALID_ARGUMENT", async () => {
    await assert.rejects(
      client(T.teamA).createJob({ baseModel: "a-base", dataset: "a-data", outputAdapter: "a-big", lora: { rank: 300 } }),
      isCode(Code.InvalidArgument, /lora\.rank 300 is above this trainer's limit of 256/),
    );
  });
});

test("TrainerService: maxLoraRank sets CreateJob's rank limit", async () => {
  const h = await startHarness({ maxLoraRank: 16, fake: { stepMs: 1 } });
  try {
    await addConfigOnlyModel(h.store, "tiny");
    await h.client.uploadDataset(datasetUpload("lines", "lines.txt", TEXT_LINES));
    await assert.rejects(
      h.client.createJob({ baseModel: "tiny", dataset: "lines", lora: { rank: 32 } }),
      isCode(Code.InvalidArgument, /lora\.rank 32 is above this trainer's limit of 16/),
    );
    const ok = (await h.client.createJob({ baseModel: "tiny", dataset: "lines", lora: { rank: 16 }, training: { maxSteps: 1, blockSize: 16 } })).job!;
    assert.equal(ok.request?.lora?.rank, 16);
    await waitForJob(h.client, ok.id, terminal);
  } finally {
    await h.close();
  }
  assert.throws(() => trainerService({ store: new LocalStore(tmpdir()), dataDir: path.join(tmpdir(), "never-used"), maxLoraRank: 0 }), /maxLoraRank must be a positive integer/);
});
