/**
 * Evaluation data files: `.jsonl` with one `{"text": …}` object per line, or `.txt` with one
 * example per non-empty line. Malformed input is reported with line numbers (up to a few lines,
 * so a wholly wrong file gives a short message).
 */
import { readFile } from "node:fs/promises";
import { extname } from "node:path";
import { InvalidArgument, NotFound, errorMessage } from "@qlora/core";

const MAX_REPORTED = 5;

/** Parse eval examples from text; `format` is the file kind. */
export function parseEvalExamples(content: string, format: "jsonl" | "txt", name = "data"): string[] {
  const lines = content.split(/\r?\n/);
  const out: string[] = [];
  const problems: string[] = [];
  lines.forEach((line, i) => {
    if (line.trim().length === 0) return;
    if (format === "txt") {
      out.push(line);
      return;
    }
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (e) {
      problems.push(`line ${i + 1}: not valid JSON (${errorMessage(e)})`);
      return;
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      problems.push(`line ${i + 1}: expected an object like {"text": "..."}`);
      return;
    }
    const text = (value as { text?: unknown }).text;
    if (typeof text !== "string") {
      problems.push(`line ${i + 1}: "text" must be a string`);
      return;
    }
    if (text.length === 0) {
      problems.push(`line ${i + 1}: "text" is empty`);
      return;
    }
    out.push(text);
  });
  if (problems.length > 0) {
    const more = problems.length > MAX_REPORTED ? `; and ${problems.length - MAX_REPORTED} more` : "";
    throw new InvalidArgument(`${name}: ${problems.slice(0, MAX_REPORTED).join("; ")}${more}`);
  }
  if (out.length === 0) throw new InvalidArgument(`${name}: no examples (the file has no non-empty lines)`);
  return out;
}

/** Read `.jsonl` / `.txt` evaluation examples. */
export async function readEvalExamples(file: string): Promise<string[]> {
  const ext = extname(file).toLowerCase();
  const format = ext === ".jsonl" ? "jsonl" : ext === ".txt" ? "txt" : null;
  if (format === null) {
    throw new InvalidArgument(`${file}: eval data must be a .jsonl (one {"text": ...} per line) or .txt (one example per line) file`);
  }
  let content: string;
  try {
    content = await readFile(file, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new NotFound(`eval data file not found: ${file}`, { cause: e });
    if (code === "EISDIR") throw new InvalidArgument(`${file} is a directory, not a data file`, { cause: e });
    throw e;
  }
  return parseEvalExamples(content, format, file);
}
