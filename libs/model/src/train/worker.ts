/**
 * worker_threads entry that runs `train` off the main thread. Protocol (structured-clone messages):
 *   parent → worker  workerData { options: TrainOptions, loaderModule?: string }, then { type: "cancel" }
 *   worker → parent  { type: "event", event } …, finally { type: "result", result } or { type: "error", error }
 * `loaderModule` (a file URL) may export `loadTrainModel(dir, quant, device)` to supply the model; by default
 * the runtime's loader is used. Use `trainInWorker` (worker-client.ts) rather than this file directly.
 */
import { parentPort, workerData } from "node:worker_threads";
import { isQloraError } from "@qlora/core";
import { train, type ModelLoader } from "./trainer.js";
import type { TrainOptions } from "./options.js";

interface WorkerInput {
  options: TrainOptions;
  loaderModule?: string;
}

const port = parentPort;
if (!port) throw new Error("train/worker.js must run in a worker thread");
const input = workerData as WorkerInput;
const ac = new AbortController();
port.on("message", (m: { type?: string }) => {
  if (m?.type === "cancel") ac.abort();
});

async function main(): Promise<void> {
  let loadModel: ModelLoader | undefined;
  if (input.loaderModule) {
    const mod = (await import(input.loaderModule)) as { loadTrainModel?: ModelLoader };
    if (typeof mod.loadTrainModel !== "function") throw new Error(`${input.loaderModule} does not export loadTrainModel`);
    loadModel = mod.loadTrainModel;
  }
  const result = await train(input.options, {
    signal: ac.signal,
    onEvent: (event) => port!.postMessage({ type: "event", event }),
    ...(loadModel ? { loadModel } : {}),
  });
  port!.postMessage({ type: "result", result });
}

main().then(
  () => port.close(),
  (e: unknown) => {
    const error = isQloraError(e)
      ? { code: e.code, message: e.message }
      : { code: "INTERNAL", message: e instanceof Error ? (e.stack ?? e.message) : String(e) };
    port.postMessage({ type: "error", error });
    port.close();
  },
);
