/**
 * Training datasets in the artifact store's "datasets" kind: one artifact = one `.txt` or `.jsonl`
 * file (its original name kept), with `format` and `examples` in the manifest's meta.
 *
 * The structural check here (UTF-8, non-empty, every jsonl line a JSON object of a shape the
 * training data reader understands) runs without a model, so uploads and CreateJob can reject a
 * malformed file at once with the line at fault. What depends on the tokenizer (a record with
 * nothing to train on within block_size) is found by the training loop, and fails the job with
 * that reason.
 */
import { createReadStream } from "node:fs";
import { extname, join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { FailedPrecondition, InvalidArgument } from "@qlora/core";
import { DatasetSchema, type Dataset } from "@qlora/proto";
import { MANIFEST_FILE, type ArtifactStore } from "@qlora/store";

export type DatasetFormat = "txt" | "jsonl";
export type RecordKind = "text" | "prompt-completion" | "alpaca" | "chat";

export interface DatasetScan {
  format: DatasetFormat;
  /** Non-empty lines (.txt) or records (.jsonl). */
  examples: number;
  /** jsonl record shapes present. */
  kinds: RecordKind[];
}

/** The format a file name stands for, or an InvalidArgument naming the accepted ones. */
export function datasetFormatOf(fileName: string): DatasetFormat {
  const ext = extname(fileName).toLowerCase();
  if (ext === ".txt") return "txt";
  if (ext === ".jsonl") return "jsonl";
  throw new InvalidArgument(`dataset file ${JSON.stringify(fileName)}: unsupported file type "${ext || "(none)"}"; use .txt or .jsonl`);
}

const SHAPES = '{"text"}, {"prompt","completion"}, {"instruction","input","output"} or {"messages":[{"role","content"},…]}';

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return typeof v === "object" ? "an object" : `a ${typeof v}`;
}

function requireString(rec: Record<string, unknown>, key: string, where: string, optional = false): void {
  const v = rec[key];
  if ((v === undefined || v === null) && optional) return;
  if (v === undefined || v === null) throw new InvalidArgument(`${where}: "${key}" is missing`);
  if (typeof v !== "string") throw new InvalidArgument(`${where}: "${key}" must be a string, got ${typeName(v)}`);
}

/** The shape of one jsonl record, in the training reader's order of precedence (libs/model data). */
export function recordKind(value: unknown, where: string): RecordKind {
  if (!isObject(value)) throw new InvalidArgument(`${where}: expected a JSON object, got ${typeName(value)}; records are ${SHAPES}`);
  if ("messages" in value) {
    const msgs = value["messages"];
    if (!Array.isArray(msgs) || msgs.length === 0) throw new InvalidArgument(`${where}: "messages" must be a non-empty array of {"role","content"}`);
    msgs.forEach((m, j) => {
      if (!isObject(m)) throw new InvalidArgument(`${where}: messages[${j}] must be an object with "role" and "content"`);
      requireString(m, "role", `${where}: messages[${j}]`);
      requireString(m, "content", `${where}: messages[${j}]`);
    });
    return "chat";
  }
  if ("instruction" in value && "output" in value) {
    requireString(value, "instruction", where);
    requireString(value, "input", where, true);
    requireString(value, "output", where);
    return "alpaca";
  }
  if ("prompt" in value && "completion" in value) {
    requireString(value, "prompt", where);
    requireString(value, "completion", where);
    return "prompt-completion";
  }
  if ("text" in value) {
    requireString(value, "text", where);
    return "text";
  }
  const keys = Object.keys(value);
  throw new InvalidArgument(`${where}: unknown record shape (keys: ${keys.length ? keys.join(", ") : "none"}); expected ${SHAPES}`);
}

/**
 * Streams a dataset file and checks it (see the module comment); `label` names it in messages
 * (a dataset name, never a host path). Memory stays at one chunk plus one line.
 */
export async function scanDataset(path: string, format: DatasetFormat, label: string): Promise<DatasetScan> {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const kinds = new Set<RecordKind>();
  let examples = 0;
  let lineNo = 0;
  let pending = "";
  const line = (text: string): void => {
    lineNo++;
    const l = text.endsWith("\r") ? text.slice(0, -1) : text;
    if (l.trim() === "") return;
    examples++;
    if (format === "txt") return;
    const where = `dataset ${label} line ${lineNo}`;
    let value: unknown;
    try {
      value = JSON.parse(l);
    } catch (e) {
      throw new InvalidArgument(`${where}: malformed JSON (${(e as Error).message})`);
    }
    kinds.add(recordKind(value, where));
  };
  const feed = (text: string): void => {
    pending += text;
    let nl: number;
    while ((nl = pending.indexOf("\n")) >= 0) {
      line(pending.slice(0, nl));
      pending = pending.slice(nl + 1);
    }
  };
  try {
    for await (const chunk of createReadStream(path)) feed(decoder.decode(chunk as Buffer, { stream: true }));
    feed(decoder.decode());
  } catch (e) {
    if (e instanceof TypeError) throw new InvalidArgument(`dataset ${label} is not valid UTF-8 text (near line ${lineNo + 1})`);
    throw e;
  }
  if (pending.length > 0) line(pending);
  if (examples === 0) throw new InvalidArgument(`dataset ${label} is empty (no non-blank lines)`);
  return { format, examples, kinds: [...kinds].sort() };
}

export interface StoredDatasetFile {
  /** Local path of the file (through the store's localPath cache contract). */
  path: string;
  /** Its name inside the artifact. */
  file: string;
  format: DatasetFormat;
  sizeBytes: number;
  sha256: string;
}

/** The one data file of a stored dataset. */
export async function datasetFile(store: ArtifactStore, name: string): Promise<StoredDatasetFile> {
  const st = await store.stat("datasets", name);
  const files = st.files.filter((f) => f.path !== MANIFEST_FILE);
  const data = files.filter((f) => /\.(txt|jsonl)$/i.test(f.path));
  if (data.length !== 1) {
    throw new FailedPrecondition(
      `dataset ${JSON.stringify(name)} must hold exactly one .txt or .jsonl file, it has ${data.length === 0 ? "none" : data.map((f) => f.path).join(", ")}`,
    );
  }
  const f = data[0]!;
  const dir = await store.localPath("datasets", name);
  return { path: join(dir, ...f.path.split("/")), file: f.path, format: datasetFormatOf(f.path), sizeBytes: f.size, sha256: f.sha256 };
}

/** The wire Dataset for a stored one (examples from the manifest, or counted when it has none). */
export async function describeDataset(store: ArtifactStore, name: string): Promise<Dataset> {
  const st = await store.stat("datasets", name);
  const f = await datasetFile(store, name);
  let examples = Number(st.meta["examples"]);
  if (!Number.isSafeInteger(examples) || examples < 0) examples = (await scanDataset(f.path, f.format, JSON.stringify(name))).examples;
  return create(DatasetSchema, {
    name,
    format: f.format,
    sizeBytes: BigInt(f.sizeBytes),
    sha256: f.sha256,
    examples: BigInt(examples),
    createdAt: timestampFromDate(new Date(st.createdAt)),
  });
}
