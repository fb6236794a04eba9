/**
 * Dataset files → training rows, with validation that names the problem (and the line) so the job
 * service can return INVALID_ARGUMENT with a useful reason.
 *
 * `.txt`   Hugging Face TextDataset (blocks of the whole tokenized file).
 * `.jsonl` one record per line, each one of:
 *          {"text"}                               loss on every token (BOS … EOS)
 *          {"prompt","completion"}                loss on the completion (+ EOS)
 *          {"instruction","input"?,"output"}      alpaca prompt format (prompts.ts); loss on output (+ EOS)
 *          {"messages":[{"role","content"},…]}    model's chat template; loss on assistant turns
 *          Other keys are ignored; blank lines are skipped.
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { basename, extname } from "node:path";
import { InvalidArgument } from "@qlora/core";
import { chatExample, promptCompletionExample, textBlocks, textExample } from "./examples.js";
import { alpacaPrompt } from "./prompts.js";
import { packRows, rowTargetCount, unpackedRows } from "./rows.js";
import type {
  ChatMessage,
  DataTokenizer,
  DatasetOptions,
  Example,
  RecordKind,
  Row,
  TrainDataset,
} from "./types.js";

/** The file format by extension; anything else is rejected. */
export function datasetFormat(path: string): "txt" | "jsonl" {
  const ext = extname(path).toLowerCase();
  if (ext === ".txt") return "txt";
  if (ext === ".jsonl") return "jsonl";
  throw new InvalidArgument(`dataset ${basename(path)}: unsupported file type "${ext || "(none)"}"; use .txt or .jsonl`);
}

/** Reads and tokenizes a dataset file. */
export async function loadDataset(path: string, tok: DataTokenizer, opts: DatasetOptions): Promise<TrainDataset> {
  const format = datasetFormat(path);
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new InvalidArgument(`dataset ${path} does not exist`);
    if (code === "EISDIR") throw new InvalidArgument(`dataset ${path} is a directory, not a file`);
    throw e;
  }
  return buildDataset(bytes, { source: path, format }, tok, opts);
}

/** Tokenizes dataset content already in memory (the job service's uploads, tests). */
export function buildDataset(
  content: Uint8Array | string,
  meta: { source: string; format: "txt" | "jsonl" },
  tok: DataTokenizer,
  opts: DatasetOptions,
): TrainDataset {
  const name = basename(meta.source);
  const blockSize = opts.blockSize;
  if (!Number.isInteger(blockSize) || blockSize < 2) {
    throw new InvalidArgument(`block size must be an integer ≥ 2, got ${blockSize}`);
  }
  const bytes = typeof content === "string" ? Buffer.from(content, "utf8") : content;
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(bytes);
  } catch {
    throw new InvalidArgument(`dataset ${name} is not valid UTF-8 text`);
  }
  if (text.trim() === "") throw new InvalidArgument(`dataset ${name} is empty`);

  const padId = tok.padId ?? tok.eosId ?? 0;
  const packing = meta.format === "jsonl" && (opts.packing ?? false);

  if (meta.format === "txt") {
    const blocks = textBlocks(text, tok, blockSize);
    if (blocks.examples.length === 0) {
      throw new InvalidArgument(
        `dataset ${name} has no usable tokens: ${blocks.fileTokens} tokens, fewer than one block of ` +
          `${blocks.contentPerBlock} (block size ${blockSize} minus special tokens)`,
      );
    }
    const rows = unpackedRows(blocks.examples);
    return finish(meta, ["text-blocks"], blockSize, false, padId, rows, sha256, {
      examples: blocks.examples.length,
      truncated: 0,
      dropped: 0,
      remainderTokens: blocks.remainder,
    });
  }

  const examples: Example[] = [];
  const kinds = new Set<RecordKind>();
  let records = 0;
  let truncated = 0;
  let dropped = 0;
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, "");
    if (line.trim() === "") continue;
    const where = `${name}:${i + 1}`;
    records++;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (e) {
      throw new InvalidArgument(`${where}: malformed JSON: ${(e as Error).message}`);
    }
    const { kind, example } = recordToExample(value, tok, where);
    kinds.add(kind);
    let ex = example;
    if (ex.tokens.length > blockSize) {
      ex = { tokens: ex.tokens.slice(0, blockSize), targets: ex.targets.slice(0, blockSize) };
      truncated++;
    }
    let anyTarget = false;
    for (let t = 1; t < ex.targets.length; t++) {
      if (ex.targets[t]) {
        anyTarget = true;
        break;
      }
    }
    if (!anyTarget) {
      dropped++;
      continue;
    }
    examples.push(ex);
  }
  if (examples.length === 0) {
    throw new InvalidArgument(
      `dataset ${name} has no usable tokens: none of its ${records} records has a token to train on ` +
        `within the block size ${blockSize}`,
    );
  }
  const rows = packing ? packRows(examples, blockSize) : unpackedRows(examples);
  return finish(meta, [...kinds], blockSize, packing, padId, rows, sha256, {
    examples: records,
    truncated,
    dropped,
  });
}

function finish(
  meta: { source: string; format: "txt" | "jsonl" },
  kinds: RecordKind[],
  blockSize: number,
  packing: boolean,
  padId: number,
  rows: Row[],
  sha256: string,
  counts: { examples: number; truncated: number; dropped: number; remainderTokens?: number },
): TrainDataset {
  let tokens = 0;
  let targetTokens = 0;
  for (const r of rows) {
    tokens += r.tokens.length;
    targetTokens += rowTargetCount(r);
  }
  return {
    source: meta.source,
    format: meta.format,
    kinds,
    blockSize,
    packing,
    padId,
    rows,
    sha256,
    stats: { ...counts, rows: rows.length, tokens, targetTokens },
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function str(rec: Record<string, unknown>, key: string, where: string, optional = false): string | undefined {
  const v = rec[key];
  if (v === undefined || v === null) {
    if (optional) return undefined;
    throw new InvalidArgument(`${where}: "${key}" is missing`);
  }
  if (typeof v !== "string") throw new InvalidArgument(`${where}: "${key}" must be a string, got ${typeName(v)}`);
  return v;
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return typeof v === "object" ? "an object" : `a ${typeof v}`;
}

const SHAPES = '{"text"}, {"prompt","completion"}, {"instruction","input","output"} or {"messages":[…]}';

/** Recognises a record's shape and tokenizes it. */
function recordToExample(value: unknown, tok: DataTokenizer, where: string): { kind: RecordKind; example: Example } {
  if (!isObject(value)) {
    throw new InvalidArgument(`${where}: unknown record shape: ${typeName(value)}; expected ${SHAPES}`);
  }
  if ("messages" in value) {
    const msgs = value["messages"];
    if (!Array.isArray(msgs) || msgs.length === 0) {
      throw new InvalidArgument(`${where}: "messages" must be a non-empty array of {"role","content"}`);
    }
    const messages: ChatMessage[] = msgs.map((m, j) => {
      if (!isObject(m)) throw new InvalidArgument(`${where}: messages[${j}] must be an object with "role" and "content"`);
      const role = str(m, "role", `${where}: messages[${j}]`)!;
      const content = str(m, "content", `${where}: messages[${j}]`)!;
      // Keep other message fields (tool calls etc.) for the template.
      return { ...m, role, content } as ChatMessage;
    });
    return { kind: "chat", example: chatExample(tok, messages, where) };
  }
  if ("instruction" in value && "output" in value) {
    const instruction = str(value, "instruction", where)!;
    const input = str(value, "input", where, true);
    const output = str(value, "output", where)!;
    return { kind: "alpaca", example: promptCompletionExample(tok, alpacaPrompt(instruction, input), output) };
  }
  if ("prompt" in value && "completion" in value) {
    const prompt = str(value, "prompt", where)!;
    const completion = str(value, "completion", where)!;
    return { kind: "prompt-completion", example: promptCompletionExample(tok, prompt, completion) };
  }
  if ("text" in value) {
    return { kind: "text", example: textExample(tok, str(value, "text", where)!) };
  }
  const keys = Object.keys(value);
  throw new InvalidArgument(
    `${where}: unknown record shape (keys: ${keys.length ? keys.join(", ") : "none"}); expected ${SHAPES}`,
  );
}
