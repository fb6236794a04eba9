/** Shared setup of the TrainerService tests: a store with a base model, a server, clients, uploads. */
import { mkdtemp, readdir, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { create, type DescService } from "@bufbuild/protobuf";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { JobState, TrainerService, UploadDatasetRequestSchema, type Job, type UploadDatasetRequest, type WatchJobResponse } from "@qlora/proto";
import { grpcServiceDefinition, startServer, type RunningServer } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { trainerService, type TrainerServiceHandle, type TrainerServiceOptions } from "../src/index.js";
import type { FakeRunnerConfig } from "./fixtures/fake-runner.js";

/** ../shared/models/stories260K relative to the repository root (this file is dist/test/…). */
export const STORIES = path.resolve(fileURLToPath(new URL("../../../../../shared/models/stories260K", import.meta.url)));
export const FAKE_RUNNER = new URL("./fixtures/fake-runner.js", import.meta.url);

export type Options = Partial<Omit<TrainerServiceOptions, "store" | "dataDir">> & { fake?: FakeRunnerConfig };

export interface Harness {
  dataDir: string;
  store: LocalStore;
  service: TrainerServiceHandle;
  server: RunningServer;
  client: Client<typeof TrainerService>;
  close(): Promise<void>;
}

export const quiet = (): void => {};

/** A server on `dataDir` (a new temp dir by default) running the fake runner unless told otherwise. */
export async function startHarness(opts: Options = {}, dataDir?: string): Promise<Harness> {
  const dir = dataDir ?? (await mkdtemp(path.join(tmpdir(), "qlora-trainer-")));
  const store = new LocalStore(dir);
  const { fake, ...rest } = opts;
  const service = trainerService({
    store,
    dataDir: dir,
    runner: { module: FAKE_RUNNER, config: fake ?? {} },
    pollMs: 200,
    log: quiet,
    ...rest,
  });
  const server = await startServer({ services: [service], gracePeriodMs: 1000 });
  const client = createClient(TrainerService, createGrpcTransport({ baseUrl: server.url }));
  return { dataDir: dir, store, service, server, client, close: () => server.close() };
}

/**
 * A base model in the store without weights: stories260K's config and tokenizer — enough for
 * CreateJob's checks and the deterministic runner. `tokenizer: false` leaves the tokenizer out.
 */
export async function addConfigOnlyModel(store: LocalStore, name = "tiny", extra: Record<string, string> = {}, tokenizer = true): Promise<void> {
  const w = await store.beginWrite("models", name);
  const files = ["config.json", ...(tokenizer ? ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] : [])];
  for (const f of files) await w.writeFile(f, await readFile(path.join(STORIES, f)));
  for (const [f, content] of Object.entries(extra)) await w.writeFile(f, content);
  await w.commit();
}

/** The whole checkpoint directory, as an upload would leave it. */
export async function addFullModel(store: LocalStore, name: string, dir = STORIES): Promise<void> {
  const w = await store.beginWrite("models", name);
  for (const f of await readdir(dir)) await w.writeFile(f, await readFile(path.join(dir, f)));
  await w.commit();
}

/** UploadDataset messages for one file's content, in chunks. */
export async function* datasetUpload(
  name: string,
  fileName: string,
  content: string | Uint8Array,
  opts: { chunkSize?: number; overwrite?: boolean } = {},
): AsyncGenerator<UploadDatasetRequest> {
  const data = typeof content === "string" ? Buffer.from(content) : content;
  const chunkSize = opts.chunkSize ?? 64 * 1024;
  for (let off = 0; off === 0 || off < data.length; off += chunkSize) {
    yield create(UploadDatasetRequestSchema, {
      name: off === 0 ? name : "",
      overwrite: opts.overwrite ?? false,
      chunk: { path: fileName, data: data.subarray(off, off + chunkSize), last: off + chunkSize >= data.length },
    });
  }
}

export const TEXT_LINES = Array.from({ length: 24 }, (_, i) => `Line ${i}: the cat sat on the mat and looked at the ${i % 3 === 0 ? "moon" : "sun"}.`).join("\n") + "\n";
export const JSONL = [
  { text: "Once upon a time there was a cat." },
  { prompt: "Q: what is red? A:", completion: " an apple" },
  { instruction: "Say hi", input: "", output: "hi" },
].map((r) => JSON.stringify(r)).join("\n") + "\n";

export async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls GetJob until `pred` holds (or throws after `timeoutMs`). */
export async function waitForJob(client: Client<typeof TrainerService>, id: string, pred: (j: Job) => boolean, timeoutMs = 10_000): Promise<Job> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { job } = await client.getJob({ id });
    if (job && pred(job)) return job;
    if (Date.now() > deadline) throw new Error(`job ${id} did not reach the expected state in time (now ${JobState[job?.state ?? 0]}, step ${job?.lastMetrics?.step})`);
    await sleep(25);
  }
}

export const terminal = (j: Job) => j.state === JobState.SUCCEEDED || j.state === JobState.FAILED || j.state === JobState.CANCELLED;

/** A short description of a watch stream, for assertions: "state:QUEUED", "metrics:5", "checkpoint:10". */
export function describeEvents(events: WatchJobResponse[]): string[] {
  return events.map((e) => {
    switch (e.event.case) {
      case "state":
        return `state:${JobState[e.event.value.state]}`;
      case "metrics":
        return `metrics:${e.event.value.step}`;
      case "checkpoint":
        return `checkpoint:${e.event.value.step}`;
      default:
        return "?";
    }
  });
}

// ---- plain @grpc/grpc-js (no generated stubs) -------------------------------------------------

export type GenericClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export function grpcJsClient(service: DescService, address: string): GenericClient {
  const Ctor = grpc.makeGenericClientConstructor(grpcServiceDefinition(service) as unknown as grpc.ServiceDefinition, service.name);
  return new Ctor(address, grpc.credentials.createInsecure()) as unknown as GenericClient;
}

export function grpcUnary<T>(client: GenericClient, method: string, req: unknown): Promise<T> {
  return new Promise((resolve, reject) => {
    client[method]!(req, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}
