export * from "./quantize.js";
export {
  quantizerService,
  validateQuantizeRequest,
  toModelMessage,
  type QuantizerServiceOptions,
  type ValidatedQuantizeRequest,
} from "./service.js";
export { runQuantizeWorker, type WorkerJob, type WorkerSettings, type RunOptions } from "./worker-client.js";
