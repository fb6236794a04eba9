/**
 * Runs a training job in a worker thread (the native calls are synchronous, so the loop must not
 * share the event loop with a server). Events arrive through `onEvent` as they happen; aborting
 * `signal` asks the worker to stop at the next step boundary; errors come back as the same
 * @qlora/core error classes the loop threw.
 */
import { Worker } from "node:worker_threads";
import {
  AlreadyExists,
  Cancelled,
  FailedPrecondition,
  InvalidArgument,
  NotFound,
  QloraError,
  ResourceExhausted,
  type ErrorCode,
} from "@qlora/core";
import type { TrainEvent } from "./events.js";
import type { TrainOptions } from "./options.js";
import type { TrainResult } from "./trainer.js";

export interface WorkerHooks {
  onEvent?: (e: TrainEvent) => void;
  signal?: AbortSignal;
  /** File URL of a module exporting `loadTrainModel(dir, quant, device)`; default: the runtime's loader. */
  loaderModule?: string;
}

function rebuildError(code: ErrorCode, message: string): Error {
  switch (code) {
    case "INVALID_ARGUMENT":
      return new InvalidArgument(message);
    case "FAILED_PRECONDITION":
      return new FailedPrecondition(message);
    case "NOT_FOUND":
      return new NotFound(message);
    case "ALREADY_EXISTS":
      return new AlreadyExists(message);
    case "RESOURCE_EXHAUSTED":
      return new ResourceExhausted(message);
    case "CANCELLED":
      return new Cancelled(message);
    default:
      return new QloraError(code, message);
  }
}

export function trainInWorker(options: TrainOptions, hooks: WorkerHooks = {}): Promise<TrainResult> {
  return new Promise<TrainResult>((resolve, reject) => {
    const worker = new Worker(new URL("./worker.js", import.meta.url), {
      workerData: { options, ...(hooks.loaderModule ? { loaderModule: hooks.loaderModule } : {}) },
    });
    let settled = false;
    const onAbort = (): void => worker.postMessage({ type: "cancel" });
    if (hooks.signal) {
      if (hooks.signal.aborted) onAbort();
      else hooks.signal.addEventListener("abort", onAbort, { once: true });
    }
    const finish = (f: () => void): void => {
      if (settled) return;
      settled = true;
      hooks.signal?.removeEventListener("abort", onAbort);
      f();
    };
    worker.on("message", (m: { type: string; event?: TrainEvent; result?: TrainResult; error?: { code: ErrorCode; message: string } }) => {
      if (m.type === "event" && m.event) hooks.onEvent?.(m.event);
      else if (m.type === "result") finish(() => resolve(m.result!));
      else if (m.type === "error") finish(() => reject(rebuildError(m.error!.code, m.error!.message)));
    });
    worker.on("error", (e) => finish(() => reject(new QloraError("INTERNAL", `training worker failed: ${e.message}`, { cause: e }))));
    worker.on("exit", (code) =>
      finish(() => reject(new QloraError("INTERNAL", `training worker exited (code ${code}) without a result`))),
    );
  });
}
