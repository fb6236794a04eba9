/**
 * Durability: a trainer killed mid-job (SIGKILL, no chance to checkpoint or re-queue) and started
 * again on the same data directory resumes the job from its last checkpoint and finishes with the
 * adapter an uninterrupted run writes; another replica takes over a job whose lease expired, even
 * from a machine without the local work directory (checkpoints come from the store).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFile, rm } from "node:fs/promises";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { JobState, TrainerService } from "@qlora/proto";
import { LocalStore } from "@qlora/store";
import { addConfigOnlyModel, collect, sleep, startHarness, terminal, TEXT_LINES, waitForJob, type Harness } from "./helpers.js";

const training = { maxSteps: 80, saveSteps: 5, loggingSteps: 1, learningRate: 0.02 };

async function prepareStore(dir: string): Promise<void> {
  const store = new LocalStore(dir);
  await addConfigOnlyModel(store, "tiny");
  const w = await store.beginWrite("datasets", "good");
  await w.writeFile("good.txt", TEXT_LINES);
  await w.commit({ meta: { format: "txt", examples: "24" } });
}

async function adapterBytes(h: Harness, name: string): Promise<Buffer> {
  return readFile(path.join(await h.store.localPath("adapters", name), "adapter_model.safetensors"));
}

async function stateMessages(h: Harness, id: string): Promise<string[]> {
  const evs = await collect(h.client.watchJob({ id }));
  return evs.flatMap((e) => (e.event.case === "state" ? [`${JobState[e.event.value.state]}: ${e.event.value.message}`] : []));
}

test("SIGKILL mid-job, restart on the same data directory: the job resumes from its checkpoint and ends with the uninterrupted adapter", async () => {
  const dataDir = await mkdtemp(path.join(tmpdir(), "qlora-trainer-kill-"));
  await prepareStore(dataDir);
  const child = spawn(process.execPath, [fileURLToPath(new URL("./fixtures/serve-child.js", import.meta.url)), dataDir, "25"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  let killedAt = 0;
  let lastCheckpoint = 0;
  let jobId = "";
  let childReplica = "";
  try {
    const [line] = (await once(createInterface({ input: child.stdout! }), "line")) as [string];
    const info = JSON.parse(line) as { url: string; replicaId: string };
    childReplica = info.replicaId;
    const client = createClient(TrainerService, createGrpcTransport({ baseUrl: info.url }));
    const { job } = await client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "survivor", training });
    jobId = job!.id;
    // Past a published checkpoint, and mid-way to the next one.
    const j = await waitForJob(client, jobId, (x) => (x.lastMetrics?.step ?? 0) >= 13);
    lastCheckpoint = (await client.listCheckpoints({ jobId })).checkpoints.at(-1)?.step ?? 0;
    killedAt = j.lastMetrics!.step;
    assert.ok(lastCheckpoint >= 10, `checkpoint ${lastCheckpoint}`);
  } finally {
    child.kill("SIGKILL");
    await once(child, "exit");
  }

  const h = await startHarness({ fake: { stepMs: 2 } }, dataDir);
  try {
    assert.equal(h.service.replicaId, childReplica, "the killed process's identity is taken over: its jobs resume at once");
    const states = await stateMessages(h, jobId);
    assert.deepEqual(states.map((s) => s.split(":")[0]), ["QUEUED", "RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"]);
    assert.match(states[2]!, new RegExp(`^RUNNING: running again on ${childReplica} after it restarted \\(attempt 2\\)$`));
    const resumedFrom = Number(/at step (\d+) of 80/.exec(states[3]!)?.[1]);
    // The newest checkpoint on disk: the last published one, or one written after it (the child keeps
    // training between the step read at ~${killedAt} and the SIGKILL landing), never the end of the run.
    assert.ok(resumedFrom >= lastCheckpoint && resumedFrom < 80, `resumed from ${resumedFrom} (published ${lastCheckpoint}, step ~${killedAt} when killed)`);
    assert.equal(resumedFrom % 5, 0);
    const done = (await h.client.getJob({ id: jobId })).job!;
    assert.equal(done.state, JobState.SUCCEEDED);
    assert.equal(done.attempts, 2);
    assert.equal(done.resumedFromStep, resumedFrom);

    const { job: ref } = await h.client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "uninterrupted", training });
    await waitForJob(h.client, ref!.id, terminal);
    assert.ok((await adapterBytes(h, "survivor")).equals(await adapterBytes(h, "uninterrupted")));
  } finally {
    await h.close();
  }
});

test("another replica takes over a job whose lease expired, restoring the checkpoint from the store", async () => {
  const dataDir = await mkdtemp(path.join(tmpdir(), "qlora-trainer-takeover-"));
  await prepareStore(dataDir);
  const a = await startHarness({ fake: { stepMs: 20 }, replicaId: "replica-a", leaseMs: 600 }, dataDir);
  const { job } = await a.client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "moved", training });
  const id = job!.id;
  await waitForJob(a.client, id, (x) => (x.lastMetrics?.step ?? 0) >= 12);
  // A crash as far as the job table knows: the worker dies, nothing is written, the lease stays.
  await a.service.close({ abrupt: true });
  await a.server.close();
  // A different machine: no local work directory.
  await rm(path.join(dataDir, "trainer", "jobs"), { recursive: true, force: true });

  const t0 = Date.now();
  const b = await startHarness({ fake: { stepMs: 2 }, replicaId: "replica-b", leaseMs: 600 }, dataDir);
  try {
    const states = await stateMessages(b, id);
    assert.ok(Date.now() - t0 >= 200, "waited for the lease to expire");
    assert.match(states[2]!, /^RUNNING: taken over by replica-b \(attempt 2\)/);
    const resumedFrom = Number(/at step (\d+) of 80/.exec(states[3]!)?.[1]);
    assert.ok(resumedFrom >= 10 && resumedFrom % 5 === 0, states.join(" | "));
    assert.equal(states.at(-1)!.split(":")[0], "SUCCEEDED");
    const { job: ref } = await b.client.createJob({ baseModel: "tiny", dataset: "good", outputAdapter: "uninterrupted", training });
    await waitForJob(b.client, ref!.id, terminal);
    assert.ok((await adapterBytes(b, "moved")).equals(await adapterBytes(b, "uninterrupted")));
    await sleep(0);
  } finally {
    await b.close();
  }
});
