/**
 * Thread entry of CreateJob's token-level dataset check (validate.ts): loads the base's tokenizer
 * and reads each dataset with the training loop's own reader, so what the loop would reject (no
 * usable tokens within block_size, chat records the template cannot render, …) is rejected before
 * the job exists. A thread, because tokenizing a dataset is synchronous work the server's event
 * loop must not wait on.
 *
 *   workerData { modelDir, files: [{ path, label }], blockSize, packing }
 *   → { ok: true, rows: number[] } | { ok: false, error: { code?, message, stage } }
 */
import { parentPort, workerData } from "node:worker_threads";
import { isQloraError } from "@qlora/core";
import * as model from "@qlora/model";

export interface ValidateInput {
  modelDir: string;
  files: { path: string; label: string }[];
  blockSize: number;
  packing: boolean;
}

export type ValidateOutput =
  | { ok: true; rows: number[]; skipped?: string }
  | { ok: false; error: { code?: string; message: string; stage: "tokenizer" | "dataset"; label?: string } };

type Fn = (...args: never[]) => unknown;
const api = model as unknown as Record<string, Fn | undefined>;

async function main(input: ValidateInput): Promise<ValidateOutput> {
  const loadTokenizer = api["loadTokenizer"] as ((dir: string) => Promise<unknown>) | undefined;
  const dataTokenizer = api["dataTokenizer"] as ((tok: unknown) => unknown) | undefined;
  const loadDataset = api["loadDataset"] as
    | ((path: string, tok: unknown, o: { blockSize: number; packing: boolean }) => Promise<{ rows: unknown[] }>)
    | undefined;
  if (!loadTokenizer || !dataTokenizer || !loadDataset) return { ok: true, rows: [], skipped: "@qlora/model does not export its data readers" };
  let tok: unknown;
  try {
    tok = dataTokenizer(await loadTokenizer(input.modelDir));
  } catch (e) {
    return { ok: false, error: { ...(isQloraError(e) ? { code: e.code } : {}), message: e instanceof Error ? e.message : String(e), stage: "tokenizer" } };
  }
  const rows: number[] = [];
  for (const f of input.files) {
    try {
      rows.push((await loadDataset(f.path, tok, { blockSize: input.blockSize, packing: input.packing })).rows.length);
    } catch (e) {
      return {
        ok: false,
        error: { ...(isQloraError(e) ? { code: e.code } : {}), message: e instanceof Error ? e.message : String(e), stage: "dataset", label: f.label },
      };
    }
  }
  return { ok: true, rows };
}

const port = parentPort;
if (port) {
  main(workerData as ValidateInput).then(
    (out) => port.postMessage(out),
    (e: unknown) => port.postMessage({ ok: false, error: { message: String(e), stage: "dataset" } } satisfies ValidateOutput),
  );
}
