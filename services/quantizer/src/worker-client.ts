/**
 * Runs a quantization in a worker_thread so that an RPC server's event loop stays free (the NF4
 * kernels are synchronous native calls, a tensor at a time). Progress comes back as messages;
 * aborting the signal asks the worker to stop (it cleans up between tensors) and terminates it
 * if it has not finished within `terminateAfterMs`.
 */
import { Worker } from "node:worker_threads";
import { Cancelled, QloraError, type ErrorCode } from "@qlora/core";
import type { QuantizeProgress, QuantizeResult, QuantizeSettings } from "./quantize.js";

/** The cloneable part of the settings (callbacks and signals stay in this thread). */
export type WorkerSettings = Omit<QuantizeSettings, "onProgress" | "signal">;

/**
 * writeQuantizedCheckpoint into an existing empty directory (a store staging directory): the
 * caller owns atomicity, and after a cancel it discards the directory once the thread is gone.
 * (There is deliberately no mode writing a final directory in place: a cancel racing the end of
 * the job could not then promise "nothing written".)
 */
export interface WorkerJob {
  mode: "staging";
  stagingDir: string;
  settings: WorkerSettings;
}

export interface SerializedError {
  code?: ErrorCode;
  name: string;
  message: string;
  stack?: string | undefined;
}

export type WorkerMessage =
  | { type: "progress"; progress: QuantizeProgress }
  | { type: "result"; result: QuantizeResult }
  | { type: "error"; error: SerializedError };

export interface RunOptions {
  onProgress?: (p: QuantizeProgress) => void;
  signal?: AbortSignal;
  /** After an abort, how long the worker may take to stop on its own (default 5 s). */
  terminateAfterMs?: number;
}

function deserializeError(e: SerializedError): Error {
  if (e.code) return new QloraError(e.code, e.message);
  const err = new Error(e.message);
  err.name = e.name;
  if (e.stack) err.stack = e.stack;
  return err;
}

const WORKER_URL = new URL("./worker.js", import.meta.url);

/**
 * Resolves with the result once the worker has exited; rejects with the job's error (QloraError
 * codes preserved), or Cancelled after an abort — in every case only after the thread is gone, so
 * the caller may delete the output directory safely.
 */
export function runQuantizeWorker(job: WorkerJob, opts: RunOptions = {}): Promise<QuantizeResult> {
  const { signal, onProgress } = opts;
  if (signal?.aborted) return Promise.reject(new Cancelled("quantization cancelled"));
  return new Promise<QuantizeResult>((resolve, reject) => {
    const worker = new Worker(WORKER_URL, { workerData: job });
    let outcome: { ok: true; result: QuantizeResult } | { ok: false; error: Error } | undefined;
    let killTimer: NodeJS.Timeout | undefined;

    const onAbort = () => {
      outcome ??= { ok: false, error: new Cancelled("quantization cancelled") };
      worker.postMessage({ type: "abort" });
      killTimer = setTimeout(() => void worker.terminate(), opts.terminateAfterMs ?? 5000);
    };
    signal?.addEventListener("abort", onAbort, { once: true });

    worker.on("message", (m: WorkerMessage) => {
      if (m.type === "progress") {
        if (!signal?.aborted) onProgress?.(m.progress);
      } else if (m.type === "result") {
        outcome ??= { ok: true, result: m.result };
      } else {
        outcome ??= { ok: false, error: deserializeError(m.error) };
      }
    });
    worker.on("error", (e) => {
      outcome ??= { ok: false, error: e };
    });
    worker.on("exit", (code) => {
      signal?.removeEventListener("abort", onAbort);
      if (killTimer) clearTimeout(killTimer);
      if (!outcome) outcome = { ok: false, error: new Error(`quantization worker exited with code ${code} without a result`) };
      if (outcome.ok) resolve(outcome.result);
      else reject(outcome.error);
    });
  });
}
