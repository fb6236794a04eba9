/** Shared setup of the QuantizerService tests: a store, a server, clients, upload streams. */
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { create, type DescService } from "@bufbuild/protobuf";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { QuantizerService, UploadModelRequestSchema, type UploadModelRequest } from "@qlora/proto";
import { grpcServiceDefinition, startServer, type RunningServer } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { quantizerService, type QuantizerServiceOptions } from "../src/index.js";

export { CANCELLABLE_LLAMA_CONFIG, writeFastCheckpoint } from "./test-support.js";

/** ../shared/models/stories260K relative to the repository root (this file is dist/test/…). */
export const STORIES = path.resolve(fileURLToPath(new URL("../../../../../shared/models/stories260K", import.meta.url)));

export interface Harness {
  dataDir: string;
  store: LocalStore;
  server: RunningServer;
  client: Client<typeof QuantizerService>;
  close(): Promise<void>;
}

export async function startHarness(options: QuantizerServiceOptions = {}): Promise<Harness> {
  const dataDir = await mkdtemp(path.join(tmpdir(), "qlora-quantizer-svc-"));
  const store = new LocalStore(dataDir);
  const server = await startServer({ services: [quantizerService(store, options)], gracePeriodMs: 2000 });
  const client = createClient(QuantizerService, createGrpcTransport({ baseUrl: server.url }));
  return { dataDir, store, server, client, close: () => server.close() };
}

/** UploadModel messages for every file of `dir`, in chunks, each file with its sha256. */
export async function* uploadStream(
  name: string,
  dir: string,
  opts: { chunkSize?: number; overwrite?: boolean; only?: string[] } = {},
): AsyncGenerator<UploadModelRequest> {
  const chunkSize = opts.chunkSize ?? 256 * 1024;
  const files = (await readdir(dir)).filter((f) => !opts.only || opts.only.includes(f)).sort();
  let first = true;
  for (const f of files) {
    const data = await readFile(path.join(dir, f));
    const sha256 = createHash("sha256").update(data).digest("hex");
    for (let off = 0; off === 0 || off < data.length; off += chunkSize) {
      const last = off + chunkSize >= data.length;
      yield create(UploadModelRequestSchema, {
        name: first ? name : "",
        overwrite: opts.overwrite ?? false,
        chunk: { path: f, data: data.subarray(off, off + chunkSize), last, sha256: last ? sha256 : "" },
      });
      first = false;
    }
  }
}

export async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
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

export async function grpcServerStream<T>(client: GenericClient, method: string, req: unknown): Promise<T[]> {
  const call = client[method]!(req) as grpc.ClientReadableStream<T>;
  return collect(call as AsyncIterable<T>);
}

export async function stagingEntries(dataDir: string): Promise<string[]> {
  return readdir(path.join(dataDir, ".staging")).catch(() => []);
}
