/**
 * Thread entry of one job run (see worker-client.ts). Imports the runner module named in
 * workerData, runs it, posts its events, then exactly one "result" or "error" message.
 *
 *   parent → worker  workerData { runnerModule, spec }, later { type: "stop" }
 *   worker → parent  { type: "event", event } …, then { type: "result", result } | { type: "error", error }
 */
import { parentPort, workerData } from "node:worker_threads";
import { isQloraError } from "@qlora/core";
import type { JobRunner, JobRunSpec } from "./runner-api.js";
import type { WorkerError, WorkerMessage } from "./worker-client.js";

interface WorkerInput {
  runnerModule: string;
  spec: JobRunSpec;
}

const port = parentPort;
if (!port) throw new Error("job-worker.js must run in a worker thread");
const input = workerData as WorkerInput;
const ctrl = new AbortController();
port.on("message", (m: { type?: string }) => {
  if (m?.type === "stop") ctrl.abort(new Error("stop requested"));
});
const post = (m: WorkerMessage): void => port.postMessage(m);

function serializeError(e: unknown): WorkerError {
  if (isQloraError(e)) return { code: e.code, name: e.name, message: e.message };
  if (e instanceof Error) return { name: e.name, message: e.message, stack: e.stack };
  return { name: "Error", message: String(e) };
}

async function main(): Promise<void> {
  const mod = (await import(input.runnerModule)) as { runJob?: JobRunner };
  if (typeof mod.runJob !== "function") throw new Error(`runner module ${input.runnerModule} does not export runJob`);
  const result = await mod.runJob(input.spec, { onEvent: (event) => post({ type: "event", event }), signal: ctrl.signal });
  post({ type: "result", result });
}

main().then(
  () => port.close(),
  (e: unknown) => {
    post({ type: "error", error: serializeError(e) });
    // Let the 'message' listener go so the thread can exit on its own.
    port.close();
  },
);
