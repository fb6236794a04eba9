/**
 * qlora.v1.QuantizerService over an artifact store: handlers are plain functions over the
 * generated messages; they throw typed errors (libs/core) and libs/rpc maps them to statuses.
 *
 * Quantize runs in a worker thread (worker-client.ts) writing into a store staging directory that
 * is committed only when the whole checkpoint is written; a client cancel (or server shutdown)
 * aborts the worker and discards the staging directory, so no half-written model ever appears.
 */
import { create } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, isQloraError, NotFound, QloraError } from "@qlora/core";
import { isValidBlocksize } from "@qlora/formats";
import {
  ComputeDtype,
  ModelSchema,
  QuantizeProgressSchema,
  QuantizerService,
  type Model,
  type QuantizeProgress as QuantizeProgressMsg,
  type QuantizeRequest,
} from "@qlora/proto";
import { callerOf, defineService, receiveUpload, visibleOnly, type ServiceRegistration } from "@qlora/rpc";
import { MANIFEST_FILE, validateName, validateRelativePath, type ArtifactStore } from "@qlora/store";
import { describeModel, type ModelDescription, type QuantizeProgress } from "./quantize.js";
import { runQuantizeWorker, type WorkerSettings } from "./worker-client.js";

export interface QuantizerServiceOptions {
  /** Quantizations running at once; more wait their turn (default 1: each one is memory-bound). */
  maxConcurrent?: number;
  /** Largest accepted UploadModel (sum of files), default 64 GiB. */
  maxUploadBytes?: number;
  /** After a cancel, how long a worker may take to stop on its own before it is terminated. */
  terminateAfterMs?: number;
}

const COMPUTE_DTYPES: Record<number, WorkerSettings["computeDtype"]> = {
  [ComputeDtype.UNSPECIFIED]: "bfloat16",
  [ComputeDtype.BFLOAT16]: "bfloat16",
  [ComputeDtype.FLOAT16]: "float16",
  [ComputeDtype.FLOAT32]: "float32",
};
const TO_PROTO_DTYPE: Record<string, ComputeDtype> = {
  bfloat16: ComputeDtype.BFLOAT16,
  float16: ComputeDtype.FLOAT16,
  float32: ComputeDtype.FLOAT32,
};

export interface ValidatedQuantizeRequest {
  source: string;
  output: string;
  overwrite: boolean;
  settings: WorkerSettings;
}

/** Request → quantizer settings; every problem is an InvalidArgument naming the field. */
export function validateQuantizeRequest(req: QuantizeRequest): ValidatedQuantizeRequest {
  if (!req.sourceModel) throw new InvalidArgument("source_model is required");
  const source = validateName(req.sourceModel, "source_model");
  const output = validateName(req.outputModel || `${source}-nf4`, "output_model");
  if (output === source) throw new InvalidArgument("output_model must differ from source_model");
  const blocksize = req.blocksize === 0 ? 64 : req.blocksize;
  if (!isValidBlocksize(blocksize)) {
    throw new InvalidArgument(`blocksize must be a power of two in 32..4096, got ${req.blocksize}`);
  }
  const computeDtype = COMPUTE_DTYPES[req.computeDtype];
  if (!computeDtype) throw new InvalidArgument(`unknown compute_dtype ${req.computeDtype}`);
  for (const m of req.skipModules) {
    if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*$/.test(m) || m.endsWith(".")) {
      throw new InvalidArgument(`skip_modules: ${JSON.stringify(m)} is not a module name (e.g. "lm_head", "q_proj")`);
    }
  }
  return {
    source,
    output,
    overwrite: req.overwrite,
    settings: {
      modelDir: "", // filled in once the store resolved the source
      blocksize,
      doubleQuant: !req.noDoubleQuant,
      computeDtype,
      skipModules: [...req.skipModules],
      sourceModel: source,
    },
  };
}

/** A description from quantize.ts → the wire Model. */
export function toModelMessage(d: ModelDescription): Model {
  return create(ModelSchema, {
    name: d.name,
    architecture: d.architecture,
    modelType: d.modelType,
    quantized: d.quantized,
    ...(d.quantization
      ? {
          quantization: {
            quantType: d.quantization.quantType,
            blocksize: d.quantization.blocksize,
            doubleQuant: d.quantization.doubleQuant,
            computeDtype: TO_PROTO_DTYPE[d.quantization.computeDtype] ?? ComputeDtype.UNSPECIFIED,
            skipModules: d.quantization.skipModules,
          },
        }
      : {}),
    sizeBytes: BigInt(d.sizeBytes),
    parameters: BigInt(d.parameters),
    files: d.files.map((f) => ({ path: f.path, sizeBytes: BigInt(f.size), sha256: f.sha256 })),
    ...(d.createdAt ? { createdAt: timestampFromDate(new Date(d.createdAt)) } : {}),
    sourceModel: d.sourceModel ?? "",
  });
}

function toProgressMessage(p: QuantizeProgress): QuantizeProgressMsg {
  return create(QuantizeProgressSchema, {
    tensorsDone: p.tensorsDone,
    tensorsTotal: p.tensorsTotal,
    bytesDone: BigInt(p.bytesDone),
    bytesTotal: BigInt(p.bytesTotal),
    tensor: p.tensor,
    quantized: p.quantized,
  });
}

/**
 * Clients name models, never host paths: replace the store directories that library messages
 * mention with the model's name, and keep the error's code.
 */
function withoutPaths(e: unknown, replacements: [string, string][]): unknown {
  if (!isQloraError(e)) return e;
  let msg = e.message;
  for (const [from, to] of replacements) if (from) msg = msg.split(from).join(to);
  return msg === e.message ? e : new QloraError(e.code, msg, { cause: e });
}

/**
 * Errors about the *contents* of a stored model (missing config.json, malformed safetensors) are
 * not the caller's invalid argument nor a missing model: FAILED_PRECONDITION, with the reason.
 */
function storedModelError(e: unknown, name: string): unknown {
  if (isQloraError(e) && (e.code === "NOT_FOUND" || e.code === "INVALID_ARGUMENT")) {
    return new FailedPrecondition(`model "${name}" is not a readable checkpoint: ${e.message}`, { cause: e });
  }
  return e;
}

/** A FIFO semaphore: at most `n` holders; waiters give up when their signal aborts. */
class Semaphore {
  private active = 0;
  private readonly waiters: (() => void)[] = [];
  constructor(private readonly n: number) {}

  async acquire(signal: AbortSignal): Promise<() => void> {
    if (this.active >= this.n) {
      await new Promise<void>((resolve, reject) => {
        const wake = () => {
          signal.removeEventListener("abort", onAbort);
          resolve();
        };
        const onAbort = () => {
          const i = this.waiters.indexOf(wake);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(new Cancelled("quantization cancelled while waiting for a free slot"));
        };
        this.waiters.push(wake);
        signal.addEventListener("abort", onAbort, { once: true });
      });
    } else {
      this.active++;
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.waiters.shift();
      if (next) next(); // the slot passes to the next waiter as is
      else this.active--;
    };
  }
}

/** Minimal async channel between the worker's callbacks and the streaming handler. */
class Channel<T> {
  private readonly items: T[] = [];
  private wake: (() => void) | undefined;
  private closed = false;

  push(item: T): void {
    this.items.push(item);
    this.wake?.();
  }
  close(): void {
    this.closed = true;
    this.wake?.();
  }
  async *drain(): AsyncGenerator<T> {
    for (;;) {
      while (this.items.length) yield this.items.shift()!;
      if (this.closed) return;
      await new Promise<void>((r) => (this.wake = r));
      this.wake = undefined;
    }
  }
}

export function quantizerService(store: ArtifactStore, options: QuantizerServiceOptions = {}): ServiceRegistration {
  const slots = new Semaphore(Math.max(1, options.maxConcurrent ?? 1));
  const writing = new Set<string>();
  const running = new Set<AbortController>();

  async function describe(name: string): Promise<Model> {
    const dir = await store.localPath("models", name);
    try {
      return toModelMessage(await describeModel(dir, name));
    } catch (e) {
      // The request named an existing model; what is wrong is the stored checkpoint.
      throw withoutPaths(storedModelError(e, name), [[dir, `model "${name}"`]]);
    }
  }

  return defineService(
    QuantizerService,
    {
      async *quantize(req, ctx) {
        const v = validateQuantizeRequest(req);
        if (!(await store.exists("models", v.source))) throw new NotFound(`model "${v.source}" not found`);
        const srcDir = await store.localPath("models", v.source);
        if (!v.overwrite && (await store.exists("models", v.output))) {
          throw new AlreadyExists(`model "${v.output}" already exists (set overwrite to replace it)`);
        }
        if (writing.has(v.output)) throw new AlreadyExists(`model "${v.output}" is being written by another request`);
        writing.add(v.output);
        const ctrl = new AbortController();
        const onClientAbort = () => ctrl.abort(ctx.signal.reason);
        ctx.signal.addEventListener("abort", onClientAbort, { once: true });
        running.add(ctrl);
        let release: (() => void) | undefined;
        let writer: Awaited<ReturnType<ArtifactStore["beginWrite"]>> | undefined;
        let run: Promise<unknown> | undefined;
        let committed = false;
        try {
          release = await slots.acquire(ctrl.signal);
          writer = await store.beginWrite("models", v.output, { overwrite: v.overwrite });
          const channel = new Channel<QuantizeProgress>();
          const job = runQuantizeWorker(
            { mode: "staging", stagingDir: writer.dir, settings: { ...v.settings, modelDir: srcDir } },
            {
              signal: ctrl.signal,
              onProgress: (p) => channel.push(p),
              ...(options.terminateAfterMs !== undefined ? { terminateAfterMs: options.terminateAfterMs } : {}),
            },
          );
          run = job.then(
            () => channel.close(),
            () => channel.close(),
          );
          for await (const p of channel.drain()) yield { event: { case: "progress", value: toProgressMessage(p) } };
          await job;
          ctrl.signal.throwIfAborted();
          await writer.commit({ meta: { source_model: v.source } });
          committed = true;
        } catch (e) {
          // Stopped by the server's shutdown (or the client): report that status, not "cancelled".
          if (ctrl.signal.aborted && ctx.signal.reason instanceof ConnectError) throw ctx.signal.reason;
          // NOT_FOUND from the worker is about files inside the source (config.json missing…).
          const err = isQloraError(e) && e.code === "NOT_FOUND" ? storedModelError(e, v.source) : e;
          throw withoutPaths(err, [
            [srcDir, `model "${v.source}"`],
            [writer?.dir ?? "", `model "${v.output}" (staging)`],
          ]);
        } finally {
          // Also reached when the client goes away mid-stream (the generator is closed early):
          // stop the worker, wait until it is gone, then discard its files.
          if (!committed) {
            ctrl.abort();
            await run;
            await writer?.abort();
          }
          release?.();
          writing.delete(v.output);
          running.delete(ctrl);
          ctx.signal.removeEventListener("abort", onClientAbort);
        }
        yield { event: { case: "result", value: await describe(v.output) } };
      },

      async getModel(req) {
        if (!req.name) throw new InvalidArgument("name is required");
        validateName(req.name);
        if (!(await store.exists("models", req.name))) throw new NotFound(`model "${req.name}" not found`);
        return { model: await describe(req.name) };
      },

      async listModels(_req, ctx) {
        const models: Model[] = [];
        // Only the models the caller's token may use (GetModel of another is PERMISSION_DENIED).
        for (const name of visibleOnly(callerOf(ctx), await store.list("models"), (n) => ({ models: [n] }))) {
          try {
            models.push(await describe(name));
          } catch (e) {
            if (e instanceof NotFound) continue; // deleted meanwhile
            // A directory that is not a readable checkpoint (placed by hand, damaged) is still
            // listed, by name and size, so that it can be inspected or deleted.
            const st = await store.stat("models", name).catch(() => undefined);
            models.push(
              create(ModelSchema, {
                name,
                sizeBytes: BigInt(st?.sizeBytes ?? 0),
                files: (st?.files ?? []).map((f) => ({ path: f.path, sizeBytes: BigInt(f.size), sha256: f.sha256 })),
              }),
            );
          }
        }
        return { models };
      },

      async deleteModel(req) {
        if (!req.name) throw new InvalidArgument("name is required");
        validateName(req.name);
        if (writing.has(req.name)) throw new FailedPrecondition(`model "${req.name}" is being written; cancel that request first`);
        await store.delete("models", req.name);
        return {};
      },

      async uploadModel(requests, ctx) {
        let stagingDir = "";
        let name = "";
        try {
          const res = await receiveUpload(requests, {
            begin: async (n, overwrite) => {
              name = validateName(n);
              if (writing.has(name)) throw new AlreadyExists(`model "${name}" is being written by another request`);
              const w = await store.beginWrite("models", name, { overwrite });
              stagingDir = w.dir;
              return w;
            },
            checkPath: (p) => {
              validateRelativePath(p, "chunk.path");
              if (p === MANIFEST_FILE) throw new InvalidArgument(`${MANIFEST_FILE} is written by the store, do not upload it`);
            },
            // Only checkpoints the quantizer can read are accepted into "models".
            validate: async (dir) => {
              try {
                await describeModel(dir, name);
              } catch (e) {
                if (isQloraError(e) && (e.code === "NOT_FOUND" || e.code === "INVALID_ARGUMENT")) {
                  throw new InvalidArgument(`not a usable Hugging Face checkpoint: ${e.message}`, { cause: e });
                }
                throw e;
              }
            },
            signal: ctx.signal,
            ...(options.maxUploadBytes !== undefined ? { maxTotalBytes: options.maxUploadBytes } : {}),
          });
          return { model: await describe(res.name) };
        } catch (e) {
          throw withoutPaths(e, [[stagingDir, `upload "${name}"`]]);
        }
      },
    },
    {
      async onClose() {
        // The server aborted the handlers' signals already; this catches any straggler.
        for (const c of running) c.abort();
      },
    },
  );
}
