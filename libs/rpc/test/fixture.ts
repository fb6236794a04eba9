/**
 * Test fixtures for the RPC layer: a small in-memory implementation of QuantizerService (the
 * real one lives in services/quantizer) that exercises every method kind and error path, a
 * directory-backed staged write, and client helpers for @grpc/grpc-js.
 */
import { mkdir, mkdtemp, rename, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import type { DescService } from "@bufbuild/protobuf";
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import { QuantizerService, type Model } from "@qlora/proto";
import { create } from "@bufbuild/protobuf";
import { ModelSchema } from "@qlora/proto";
import { defineService, grpcServiceDefinition, receiveUpload, type ServiceRegistration, type StagedWrite } from "../src/index.js";

export async function tempDir(prefix = "qlora-rpc-test-"): Promise<string> {
  return mkdtemp(path.join(tmpdir(), prefix));
}

/** A staged write into root/.staging-N, renamed to root/name on commit. */
export function dirStaging(root: string, log: string[] = []) {
  let n = 0;
  return async (name: string, overwrite: boolean): Promise<StagedWrite> => {
    if (!/^[a-z0-9][a-z0-9._-]*$/i.test(name) || name.includes("..")) throw new InvalidArgument(`bad name ${name}`);
    const final = path.join(root, name);
    const exists = await stat(final).then(() => true, () => false);
    if (exists && !overwrite) throw new AlreadyExists(`${name} exists`);
    const dir = path.join(root, `.staging-${n++}`);
    await mkdir(dir, { recursive: true });
    return {
      dir,
      async commit() {
        await rm(final, { recursive: true, force: true });
        await rename(dir, final);
        log.push(`commit ${name}`);
      },
      async abort() {
        await rm(dir, { recursive: true, force: true });
        log.push(`abort ${name}`);
      },
    };
  };
}

export interface FixtureState {
  models: Map<string, Model>;
  /** Signals of "slow" Quantize calls, to observe cancellation. */
  slowSignals: AbortSignal[];
  uploadRoot: string;
}

/**
 * QuantizerService over an in-memory map. Special sources in Quantize: "fail-midway" throws
 * FailedPrecondition after one progress event, "crash" throws a plain Error (→ INTERNAL),
 * "slow" streams one event and then waits for its context signal to abort.
 */
export function fixtureService(state: FixtureState): ServiceRegistration {
  return defineService(QuantizerService, {
    listModels() {
      return { models: [...state.models.values()] };
    },
    getModel(req) {
      if (!req.name) throw new InvalidArgument("name is required");
      if (req.name === "boom") throw new Error("database password is hunter2 at /etc/secret");
      const model = state.models.get(req.name);
      if (!model) throw new NotFound(`model "${req.name}" not found`);
      return { model };
    },
    deleteModel(req) {
      if (!state.models.delete(req.name)) throw new NotFound(`model "${req.name}" not found`);
      return {};
    },
    async *quantize(req, ctx) {
      const total = 3;
      for (let i = 1; i <= total; i++) {
        yield { event: { case: "progress", value: { tensorsDone: i, tensorsTotal: total, tensor: `t${i}`, quantized: i % 2 === 1 } } };
        if (req.sourceModel === "fail-midway") throw new FailedPrecondition("source is not a checkpoint");
        if (req.sourceModel === "crash") throw new Error("segfault-ish detail /home/secret");
        if (req.sourceModel === "slow") {
          state.slowSignals.push(ctx.signal);
          await new Promise<void>((resolve) => {
            if (ctx.signal.aborted) resolve();
            ctx.signal.addEventListener("abort", () => resolve());
          });
          ctx.signal.throwIfAborted();
        }
      }
      const name = req.outputModel || `${req.sourceModel}-nf4`;
      const model = create(ModelSchema, { name, quantized: true, sourceModel: req.sourceModel });
      state.models.set(name, model);
      yield { event: { case: "result", value: model } };
    },
    async uploadModel(requests, ctx) {
      const res = await receiveUpload(requests, { begin: dirStaging(state.uploadRoot), signal: ctx.signal });
      const model = create(ModelSchema, {
        name: res.name,
        sizeBytes: BigInt(res.totalBytes),
        files: res.files.map((f) => ({ path: f.path, sizeBytes: BigInt(f.sizeBytes), sha256: f.sha256 })),
      });
      state.models.set(res.name, model);
      return { model };
    },
  });
}

// ---- @grpc/grpc-js generic clients (no generated stubs) -------------------------------------

export type GenericClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

export function grpcJsClient(service: DescService, address: string): GenericClient {
  const Ctor = grpc.makeGenericClientConstructor(
    grpcServiceDefinition(service) as unknown as grpc.ServiceDefinition,
    service.name,
  );
  return new Ctor(address, grpc.credentials.createInsecure()) as unknown as GenericClient;
}

export function grpcUnary<T>(client: GenericClient, method: string, req: unknown): Promise<T> {
  return new Promise((resolve, reject) => {
    client[method]!(req, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

export async function grpcServerStream<T>(client: GenericClient, method: string, req: unknown): Promise<T[]> {
  const call = client[method]!(req) as grpc.ClientReadableStream<T>;
  const out: T[] = [];
  for await (const m of call) out.push(m as T);
  return out;
}
