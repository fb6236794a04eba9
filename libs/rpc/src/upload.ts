/**
 * Client-streaming uploads of an artifact (a model or dataset directory) into the store.
 *
 * The stream is `{name, overwrite, chunk}` messages (UploadModelRequest, UploadDatasetRequest):
 * the first names the artifact, every message may carry a chunk of one file, and a chunk with
 * `last` completes its file (optionally checked against `sha256`). Files are written into the
 * store's staging directory and committed atomically at the end; any failure (bad path, size
 * limit, hash mismatch, client cancel) aborts the staging directory, so the store never holds a
 * half-uploaded artifact.
 */
import { createHash, type Hash } from "node:crypto";
import { mkdir, open, type FileHandle } from "node:fs/promises";
import path from "node:path";
import { InvalidArgument, ResourceExhausted } from "@qlora/core";

/** The staged write a store hands out (ArtifactStore.beginWrite's result). */
export interface StagedWrite {
  /** Directory to fill; becomes the artifact on commit(). */
  readonly dir: string;
  commit(): Promise<unknown>;
  abort(): Promise<unknown>;
}

/** One message of an upload stream: structurally UploadModelRequest / UploadDatasetRequest. */
export interface UploadMessage {
  name: string;
  overwrite: boolean;
  chunk?: { path: string; data: Uint8Array; last: boolean; sha256: string } | undefined;
}

export interface UploadedFile {
  path: string;
  sizeBytes: number;
  sha256: string;
}

export interface UploadResult {
  name: string;
  files: UploadedFile[];
  totalBytes: number;
}

export interface ReceiveUploadOptions {
  /** Starts the staged write once the name is known (e.g. store.beginWrite("models", name, {overwrite})). Validates the name. */
  begin: (name: string, overwrite: boolean) => Promise<StagedWrite>;
  /** Limit on the sum of all file sizes (default 64 GiB) → RESOURCE_EXHAUSTED. */
  maxTotalBytes?: number;
  /** Limit on the number of files (default 10 000) → RESOURCE_EXHAUSTED. */
  maxFiles?: number;
  /** Restricts file names, e.g. a dataset's extension; throw InvalidArgument to reject. */
  checkPath?: (relPath: string) => void;
  /** Runs on the complete staging directory before commit (e.g. "is this a checkpoint?"). */
  validate?: (dir: string, files: UploadedFile[]) => Promise<void>;
  /** Aborting stops the upload and discards the staging directory. */
  signal?: AbortSignal;
}

/**
 * Validates a relative file path from a client: POSIX separators, no absolute paths, no drive
 * letters or backslashes, no "." / ".." / empty segments, no control characters. Returns it
 * unchanged when valid.
 */
export function validateUploadPath(p: string): string {
  const bad = (why: string) => new InvalidArgument(`invalid file path ${JSON.stringify(p)}: ${why}`);
  if (p.length === 0) throw bad("empty");
  if (p.length > 1024) throw bad("longer than 1024 characters");
  if (/[\u0000-\u001f\u007f]/.test(p)) throw bad("control characters");
  if (p.includes("\\")) throw bad("backslash (use '/')");
  if (p.startsWith("/") || /^[A-Za-z]:/.test(p)) throw bad("absolute path");
  for (const seg of p.split("/")) {
    if (seg === "") throw bad("empty path segment");
    if (seg === "." || seg === "..") throw bad(`'${seg}' segment`);
    if (seg.length > 255) throw bad("segment longer than 255 characters");
  }
  return p;
}

interface OpenFile {
  handle: FileHandle;
  hash: Hash;
  size: number;
  expected: string;
}

/** Receives one upload stream; returns what was committed. See the module comment. */
export async function receiveUpload(
  requests: AsyncIterable<UploadMessage>,
  options: ReceiveUploadOptions,
): Promise<UploadResult> {
  const maxTotal = options.maxTotalBytes ?? 64 * 1024 ** 3;
  const maxFiles = options.maxFiles ?? 10_000;
  let staged: StagedWrite | undefined;
  let name = "";
  const open_ = new Map<string, OpenFile>();
  const done = new Map<string, UploadedFile>();
  let total = 0;

  try {
    for await (const msg of requests) {
      options.signal?.throwIfAborted();
      if (!staged) {
        if (!msg.name) throw new InvalidArgument("the first upload message must set name");
        name = msg.name;
        staged = await options.begin(name, msg.overwrite);
      }
      const chunk = msg.chunk;
      if (!chunk) continue;
      const rel = validateUploadPath(chunk.path);
      options.checkPath?.(rel);
      if (done.has(rel)) throw new InvalidArgument(`file "${rel}" sent twice`);

      let f = open_.get(rel);
      if (!f) {
        if (open_.size + done.size >= maxFiles) {
          throw new ResourceExhausted(`upload has more than ${maxFiles} files`);
        }
        const abs = path.join(staged.dir, ...rel.split("/"));
        // A file "a" and a file "a/b" cannot both exist: mkdir (ENOTDIR/EEXIST) or the exclusive
        // open ("wx" on an existing directory: EISDIR/EEXIST) fails, and that is the client's doing.
        const conflict = (e: NodeJS.ErrnoException) => {
          throw new InvalidArgument(`file "${rel}" conflicts with another uploaded path (${e.code})`);
        };
        await mkdir(path.dirname(abs), { recursive: true }).catch(conflict);
        const handle = await open(abs, "wx").catch(conflict);
        f = { handle, hash: createHash("sha256"), size: 0, expected: "" };
        open_.set(rel, f);
      }
      if (chunk.sha256) f.expected = chunk.sha256.toLowerCase();
      if (chunk.data.length) {
        total += chunk.data.length;
        if (total > maxTotal) throw new ResourceExhausted(`upload is larger than the limit of ${maxTotal} bytes`);
        f.hash.update(chunk.data);
        f.size += chunk.data.length;
        // write() may report fewer bytes than asked; keep going until the chunk is on disk.
        for (let off = 0; off < chunk.data.length; ) {
          off += (await f.handle.write(chunk.data, off, chunk.data.length - off)).bytesWritten;
        }
      }
      if (chunk.last) {
        open_.delete(rel);
        await f.handle.close();
        const sha256 = f.hash.digest("hex");
        if (f.expected && f.expected !== sha256) {
          throw new InvalidArgument(`file "${rel}": sha256 mismatch (expected ${f.expected}, received ${sha256})`);
        }
        done.set(rel, { path: rel, sizeBytes: f.size, sha256 });
      }
    }
    options.signal?.throwIfAborted();
    if (!staged) throw new InvalidArgument("empty upload: no messages");
    if (open_.size) {
      throw new InvalidArgument(`upload ended before these files were complete (no 'last' chunk): ${[...open_.keys()].join(", ")}`);
    }
    if (done.size === 0) throw new InvalidArgument(`upload of "${name}" contained no files`);
    const files = [...done.values()].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
    await options.validate?.(staged.dir, files);
    await staged.commit();
    return { name, files, totalBytes: total };
  } catch (e) {
    await Promise.allSettled([...open_.values()].map((f) => f.handle.close()));
    if (staged) await staged.abort().catch(() => {});
    throw e;
  }
}
