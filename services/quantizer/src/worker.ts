/**
 * Thread entry of a quantization (see worker-client.ts). Runs the job from workerData, posts
 * progress, then exactly one "result" or "error" message. An "abort" message from the parent
 * aborts the job's signal, so the quantizer stops between tensors (the parent then discards the
 * staging directory); the parent falls back to terminate() only when that takes too long.
 */
import { parentPort, workerData } from "node:worker_threads";
import { isQloraError } from "@qlora/core";
import { writeQuantizedCheckpoint, type QuantizeProgress } from "./quantize.js";
import type { WorkerJob, WorkerMessage, SerializedError } from "./worker-client.js";

function serializeError(e: unknown): SerializedError {
  if (isQloraError(e)) return { code: e.code, message: e.message, name: e.name };
  if (e instanceof Error) return { message: e.message, name: e.name, stack: e.stack };
  return { message: String(e), name: "Error" };
}

const port = parentPort;
if (!port) throw new Error("worker.js must run in a worker thread");
const job = workerData as WorkerJob;
const ctrl = new AbortController();
port.on("message", (m: { type: string }) => {
  if (m.type === "abort") ctrl.abort(new Error("cancelled by the caller"));
});
const post = (m: WorkerMessage) => port.postMessage(m);

try {
  const onProgress = (progress: QuantizeProgress) => post({ type: "progress", progress });
  const result = await writeQuantizedCheckpoint({ ...job.settings, stagingDir: job.stagingDir, onProgress, signal: ctrl.signal });
  post({ type: "result", result });
} catch (e) {
  post({ type: "error", error: serializeError(e) });
} finally {
  // Let the 'message' listener go so the thread can exit on its own.
  port.close();
}
