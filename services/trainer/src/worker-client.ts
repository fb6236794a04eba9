/**
 * Runs one job in a worker_thread: the training loop makes long synchronous native calls, which
 * must never block the server's event loop. Events come back in order through `onEvent`;
 * `stop()` asks the runner to checkpoint and stop at the next step boundary; `terminate()` kills
 * the thread outright (a lost lease, or a shutdown that ran out of time).
 */
import { Worker } from "node:worker_threads";
import { QloraError, type ErrorCode } from "@qlora/core";
import type { JobRunSpec, RunnerEvent, RunResult } from "./runner-api.js";

export interface WorkerError {
  code?: ErrorCode;
  name: string;
  message: string;
  stack?: string | undefined;
}

export type WorkerMessage =
  | { type: "event"; event: RunnerEvent }
  | { type: "result"; result: RunResult }
  | { type: "error"; error: WorkerError };

export interface JobWorker {
  /** Settles once the thread has exited: the runner's result, or its error (QloraError codes kept). */
  readonly done: Promise<RunResult>;
  /** Checkpoint and stop at the next step boundary (the run then rejects with CANCELLED). */
  stop(): void;
  /** Kill the thread now; `done` rejects. */
  terminate(): Promise<void>;
}

const WORKER_URL = new URL("./job-worker.js", import.meta.url);

function rebuildError(e: WorkerError): Error {
  if (e.code) return new QloraError(e.code, e.message);
  const err = new Error(e.message);
  err.name = e.name;
  if (e.stack) err.stack = e.stack;
  return err;
}

export function startJobWorker(runnerModule: string, spec: JobRunSpec, onEvent: (e: RunnerEvent) => void): JobWorker {
  const worker = new Worker(WORKER_URL, { workerData: { runnerModule, spec } });
  let outcome: { ok: true; result: RunResult } | { ok: false; error: Error } | undefined;
  let terminated = false;
  const done = new Promise<RunResult>((resolve, reject) => {
    worker.on("message", (m: WorkerMessage) => {
      if (m.type === "event") {
        if (!terminated) onEvent(m.event);
      } else if (m.type === "result") outcome ??= { ok: true, result: m.result };
      else outcome ??= { ok: false, error: rebuildError(m.error) };
    });
    worker.on("error", (e) => {
      outcome ??= { ok: false, error: e };
    });
    worker.on("exit", (code) => {
      if (terminated) outcome = { ok: false, error: new QloraError("CANCELLED", "the job's worker was terminated") };
      outcome ??= { ok: false, error: new Error(`the job's worker exited (code ${code}) without a result`) };
      if (outcome.ok) resolve(outcome.result);
      else reject(outcome.error);
    });
  });
  return {
    done,
    stop: () => worker.postMessage({ type: "stop" }),
    terminate: async () => {
      terminated = true;
      await worker.terminate();
    },
  };
}
