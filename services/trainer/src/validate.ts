/**
 * CreateJob's token-level dataset check, in a worker thread (validate-worker.ts). Files larger
 * than `maxBytes` are left to the training loop (they still had the structural check), so a huge
 * dataset does not make CreateJob take as long as tokenizing it.
 */
import { basename } from "node:path";
import { Worker } from "node:worker_threads";
import { FailedPrecondition, InvalidArgument, QloraError } from "@qlora/core";
import type { ValidateInput, ValidateOutput } from "./validate-worker.js";

const WORKER_URL = new URL("./validate-worker.js", import.meta.url);

export interface TokenCheckFile {
  /** Local path. */
  path: string;
  /** How messages name it: `dataset "kite"`. */
  label: string;
  sizeBytes: number;
}

/**
 * Reads the datasets with the base's tokenizer as training will. InvalidArgument (with the dataset's
 * name) when the loop would reject one; FailedPrecondition when the base has no usable tokenizer.
 */
export async function checkTokens(
  base: { name: string; dir: string },
  files: TokenCheckFile[],
  opts: { blockSize: number; packing: boolean; maxBytes: number },
): Promise<void> {
  const small = files.filter((f) => f.sizeBytes <= opts.maxBytes);
  const input: ValidateInput = { modelDir: base.dir, files: small.map(({ path, label }) => ({ path, label })), blockSize: opts.blockSize, packing: opts.packing };
  const out = await new Promise<ValidateOutput>((resolve, reject) => {
    const w = new Worker(WORKER_URL, { workerData: input });
    let got: ValidateOutput | undefined;
    w.once("message", (m: ValidateOutput) => (got = m));
    w.once("error", reject);
    w.once("exit", (code) => (got ? resolve(got) : reject(new QloraError("INTERNAL", `dataset check exited (code ${code}) without an answer`))));
  });
  if (out.ok) return;
  const e = out.error;
  // Library messages may carry host paths: name artifacts instead.
  let msg = e.message.split(base.dir).join(`model "${base.name}"`);
  for (const f of small) msg = msg.split(f.path).join(f.label).split(basename(f.path)).join(f.label);
  if (e.stage === "tokenizer") throw new FailedPrecondition(`base_model "${base.name}" has no usable tokenizer: ${msg}`);
  if (e.code === "INVALID_ARGUMENT" || e.code === "NOT_FOUND") throw new InvalidArgument(msg);
  throw new QloraError("INTERNAL", `checking ${e.label ?? "the dataset"} failed: ${msg}`);
}
