/**
 * safetensors: a validating reader (header only at open, one tensor per read) and a streaming writer.
 *
 * Format (../../shared/docs/formats.md §7): u64 LE header length N, N bytes of UTF-8 JSON (an object,
 * optionally padded with spaces), then the byte buffer. Each tensor entry names its dtype, shape and
 * [begin, end) offsets relative to the buffer.
 */
import { open, rename, rm, type FileHandle } from "node:fs/promises";
import { dirname } from "node:path";
import { fsyncDir, InvalidArgument, NotFound, tempSibling } from "@qlora/core";
import { dtypeRank, isSafetensorsDtype, tensorByteLength, type SafetensorsDtype } from "./dtype.js";
import { JsonSyntaxError, parseJson } from "./pyjson.js";

/** The reader's limit on N, as in the reference implementation (MAX_HEADER_SIZE). */
export const MAX_HEADER_SIZE = 100_000_000;

export interface TensorInfo {
  dtype: SafetensorsDtype;
  shape: number[];
  byteLength: number;
  /** Offset of the first byte relative to the start of the data buffer (as in data_offsets). */
  offset: number;
}

export interface SafetensorsHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string> | null;
  /** 8 + N: where the data buffer starts in the file. */
  dataStart: number;
}

/**
 * Parses and validates a header against the total file length, as the safetensors spec requires:
 * a JSON object, known dtypes, integer shapes, shape × itemsize == byte length, offsets that tile the
 * buffer exactly from 0 with no gap or overlap, and 8 + N + buffer length == file length.
 * `what` names the file in error messages.
 */
export function parseSafetensorsHeader(headerBytes: Uint8Array, fileLength: number, what: string): SafetensorsHeader {
  const bad = (reason: string): never => {
    throw new InvalidArgument(`${what}: invalid safetensors file: ${reason}`);
  };
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(headerBytes);
  } catch {
    return bad("header is not valid UTF-8");
  }
  if (!text.startsWith("{")) bad("header does not start with '{'");
  let parsed: unknown;
  try {
    // Trailing spaces are the spec's padding; JSON whitespace rules already allow them.
    parsed = parseJson(text, { rejectDuplicateKeys: true });
  } catch (e) {
    if (e instanceof JsonSyntaxError) return bad(`header is not valid JSON (${e.message})`);
    throw e;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) bad("header is not a JSON object");
  const obj = parsed as Record<string, unknown>;
  let metadata: Record<string, string> | null = null;
  const tensors = new Map<string, TensorInfo>();
  for (const [name, entry] of Object.entries(obj)) {
    if (name === "__metadata__") {
      if (entry === null || typeof entry !== "object" || Array.isArray(entry)) bad("__metadata__ is not an object");
      metadata = {};
      for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof v !== "string") bad(`__metadata__[${JSON.stringify(k)}] is not a string`);
        metadata[k] = v as string;
      }
      continue;
    }
    const t = JSON.stringify(name);
    if (entry === null || typeof entry !== "object" || Array.isArray(entry)) bad(`tensor ${t}: entry is not an object`);
    const e = entry as Record<string, unknown>;
    if (!isSafetensorsDtype(e.dtype)) bad(`tensor ${t}: unknown dtype ${JSON.stringify(e.dtype)}`);
    const dtype = e.dtype as SafetensorsDtype;
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
      bad(`tensor ${t}: shape must be a list of non-negative integers`);
    }
    const shape = e.shape as number[];
    const offs = e.data_offsets;
    if (
      !Array.isArray(offs) ||
      offs.length !== 2 ||
      !offs.every((o) => Number.isSafeInteger(o) && (o as number) >= 0)
    ) {
      bad(`tensor ${t}: data_offsets must be two non-negative integers`);
    }
    const [begin, end] = offs as [number, number];
    if (end < begin) bad(`tensor ${t}: data_offsets end ${end} < begin ${begin}`);
    const expected = tensorByteLength(dtype, shape);
    if (expected === undefined) bad(`tensor ${t}: ${dtype} shape [${shape.join(", ")}] is not a whole number of bytes`);
    if (expected !== end - begin) {
      bad(
        `tensor ${t}: shape [${shape.join(", ")}] × ${dtype} is ${expected} bytes but data_offsets span ${end - begin}`,
      );
    }
    tensors.set(name, { dtype, shape: shape.slice(), byteLength: end - begin, offset: begin });
  }
  const dataStart = 8 + headerBytes.byteLength;
  const bufferLength = fileLength - dataStart;
  // Tiling check: sorted by begin, each tensor must start exactly where the previous one ended.
  const sorted = [...tensors.entries()].sort((a, b) => a[1].offset - b[1].offset || a[1].byteLength - b[1].byteLength);
  let pos = 0;
  for (const [name, info] of sorted) {
    const t = JSON.stringify(name);
    if (info.offset < pos) bad(`tensor ${t}: data_offsets [${info.offset}, ${info.offset + info.byteLength}] overlap the previous tensor (ending at ${pos})`);
    if (info.offset > pos) bad(`tensor ${t}: gap in the data buffer before offset ${info.offset} (previous tensor ends at ${pos})`);
    if (info.offset + info.byteLength > bufferLength) {
      bad(`tensor ${t}: data_offsets end ${info.offset + info.byteLength} is past the end of the data buffer (${bufferLength} bytes)`);
    }
    pos = info.offset + info.byteLength;
  }
  if (pos !== bufferLength) {
    bad(`the tensors cover ${pos} bytes of the data buffer but the file holds ${bufferLength} (file length mismatch)`);
  }
  return { tensors, metadata, dataStart };
}

function readU64LE(b: Uint8Array, what: string): number {
  const v = new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new InvalidArgument(`${what}: invalid safetensors file: header length ${v} is absurd`);
  return Number(v);
}

/** Reads exactly `length` bytes at `position` (loops over short reads). */
async function preadFully(fh: FileHandle, buf: Uint8Array, position: number, what: string): Promise<void> {
  let done = 0;
  while (done < buf.byteLength) {
    const { bytesRead } = await fh.read(buf, done, buf.byteLength - done, position + done);
    if (bytesRead === 0) {
      throw new InvalidArgument(`${what}: unexpected end of file at byte ${position + done} (truncated or modified since it was opened)`);
    }
    done += bytesRead;
  }
}

/** An open safetensors file: the validated header in memory, tensors read on demand. */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    private fh: FileHandle | null,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    readonly metadata: Record<string, string> | null,
    readonly dataStart: number,
    readonly fileLength: number,
  ) {}

  /** Opens `path` and validates its header (NotFound when missing, InvalidArgument when malformed). */
  static async open(path: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, "r");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`${path}: no such file`, { cause: e });
      throw e;
    }
    try {
      const fileLength = (await fh.stat()).size;
      if (fileLength < 8) throw new InvalidArgument(`${path}: invalid safetensors file: ${fileLength} bytes is shorter than the 8-byte header length`);
      const lenBuf = new Uint8Array(8);
      await preadFully(fh, lenBuf, 0, path);
      const n = readU64LE(lenBuf, path);
      if (n > MAX_HEADER_SIZE) throw new InvalidArgument(`${path}: invalid safetensors file: header length ${n} exceeds the maximum ${MAX_HEADER_SIZE}`);
      if (8 + n > fileLength) {
        throw new InvalidArgument(`${path}: invalid safetensors file: header length ${n} is past the end of the file (${fileLength} bytes; truncated?)`);
      }
      const header = new Uint8Array(n);
      await preadFully(fh, header, 8, path);
      const h = parseSafetensorsHeader(header, fileLength, path);
      return new SafetensorsFile(path, fh, h.tensors, h.metadata, h.dataStart, fileLength);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /** Tensor names in file (offset) order. */
  names(): string[] {
    return [...this.tensors.entries()].sort((a, b) => a[1].offset - b[1].offset).map(([k]) => k);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new InvalidArgument(`${this.path}: no tensor named ${JSON.stringify(name)}`);
    return t;
  }

  /**
   * Reads exactly one tensor's bytes with positional reads. The Buffer owns its memory (not a pool
   * slice), so Float32Array views over it are aligned.
   */
  async read(name: string): Promise<Buffer> {
    const info = this.info(name);
    return this.readRange(name, 0, info.byteLength);
  }

  /** Reads `length` bytes of a tensor starting at byte `start` within it (for chunked copies). */
  async readRange(name: string, start: number, length: number): Promise<Buffer> {
    const info = this.info(name);
    if (start < 0 || length < 0 || start + length > info.byteLength) {
      throw new InvalidArgument(`${this.path}: range [${start}, ${start + length}) outside tensor ${JSON.stringify(name)}`);
    }
    if (!this.fh) throw new InvalidArgument(`${this.path}: file is closed`);
    const buf = Buffer.allocUnsafeSlow(length);
    await preadFully(this.fh, buf, this.dataStart + info.offset + start, this.path);
    return buf;
  }

  /**
   * Reads `target.byteLength` bytes of a tensor starting at byte `start` within it into `target`
   * (a caller's reused buffer: chunked loaders then allocate nothing per chunk).
   */
  async readRangeInto(name: string, start: number, target: Uint8Array): Promise<void> {
    const info = this.info(name);
    if (start < 0 || start + target.byteLength > info.byteLength) {
      throw new InvalidArgument(`${this.path}: range [${start}, ${start + target.byteLength}) outside tensor ${JSON.stringify(name)}`);
    }
    if (!this.fh) throw new InvalidArgument(`${this.path}: file is closed`);
    await preadFully(this.fh, target, this.dataStart + info.offset + start, this.path);
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    await fh?.close();
  }
}

/** Parses a whole safetensors file held in memory (small files: adapters, tests). */
export function readSafetensorsBuffer(
  buf: Uint8Array,
  what = "safetensors buffer",
): { tensors: Map<string, TensorInfo & { data: Uint8Array }>; metadata: Record<string, string> | null } {
  if (buf.byteLength < 8) throw new InvalidArgument(`${what}: invalid safetensors file: ${buf.byteLength} bytes is shorter than the 8-byte header length`);
  const n = readU64LE(buf.subarray(0, 8), what);
  if (n > MAX_HEADER_SIZE) throw new InvalidArgument(`${what}: invalid safetensors file: header length ${n} exceeds the maximum ${MAX_HEADER_SIZE}`);
  if (8 + n > buf.byteLength) {
    throw new InvalidArgument(`${what}: invalid safetensors file: header length ${n} is past the end of the file (${buf.byteLength} bytes; truncated?)`);
  }
  const h = parseSafetensorsHeader(buf.subarray(8, 8 + n), buf.byteLength, what);
  const tensors = new Map<string, TensorInfo & { data: Uint8Array }>();
  for (const [k, t] of h.tensors) {
    tensors.set(k, { ...t, data: buf.subarray(h.dataStart + t.offset, h.dataStart + t.offset + t.byteLength) });
  }
  return { tensors, metadata: h.metadata };
}

export interface TensorPlan {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
}

export interface PlannedLayout {
  /** The header bytes including the 8-byte length prefix and space padding. */
  header: Uint8Array;
  /** name → layout, in buffer order. */
  tensors: Map<string, TensorInfo>;
  /** Total file length. */
  fileLength: number;
}

/** Byte order of names as Rust's String::cmp sees them (UTF-8 bytes). */
function compareUtf8(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8"));
}

/**
 * Lays out tensors like the reference writer (`safetensors::tensor::prepare`): sorted by dtype enum
 * descending, then by name; contiguous offsets from 0; compact JSON with `__metadata__` first; header
 * padded with spaces to a multiple of 8 so the buffer starts 8-aligned.
 */
export function planSafetensors(tensors: readonly TensorPlan[], metadata?: Record<string, string> | null): PlannedLayout {
  const seen = new Set<string>();
  for (const t of tensors) {
    if (t.name === "__metadata__") throw new InvalidArgument(`tensor name "__metadata__" is reserved`);
    if (seen.has(t.name)) throw new InvalidArgument(`duplicate tensor name ${JSON.stringify(t.name)}`);
    seen.add(t.name);
    if (!isSafetensorsDtype(t.dtype)) throw new InvalidArgument(`tensor ${JSON.stringify(t.name)}: unknown dtype ${JSON.stringify(t.dtype)}`);
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new InvalidArgument(`tensor ${JSON.stringify(t.name)}: bad shape [${t.shape.join(", ")}]`);
    }
  }
  const sorted = [...tensors].sort((a, b) => dtypeRank(b.dtype) - dtypeRank(a.dtype) || compareUtf8(a.name, b.name));
  const layout = new Map<string, TensorInfo>();
  let pos = 0;
  const parts: string[] = [];
  if (metadata) {
    const keys = Object.keys(metadata).sort(compareUtf8);
    parts.push(`"__metadata__":{${keys.map((k) => `${JSON.stringify(k)}:${JSON.stringify(metadata[k])}`).join(",")}}`);
  }
  for (const t of sorted) {
    const len = tensorByteLength(t.dtype, t.shape);
    if (len === undefined) throw new InvalidArgument(`tensor ${JSON.stringify(t.name)}: ${t.dtype} [${t.shape.join(", ")}] is not a whole number of bytes`);
    layout.set(t.name, { dtype: t.dtype, shape: t.shape.slice(), byteLength: len, offset: pos });
    parts.push(`${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(",")}],"data_offsets":[${pos},${pos + len}]}`);
    pos += len;
  }
  const json = Buffer.from(`{${parts.join(",")}}`, "utf8");
  const padded = Math.ceil(json.byteLength / 8) * 8;
  const header = Buffer.alloc(8 + padded, 0x20);
  header.writeBigUInt64LE(BigInt(padded), 0);
  json.copy(header, 8);
  return { header, tensors: layout, fileLength: 8 + padded + pos };
}

/** Serializes whole tensors held in memory into one safetensors buffer (small files). */
export function serializeSafetensors(
  tensors: readonly (TensorPlan & { data: Uint8Array })[],
  metadata?: Record<string, string> | null,
): Buffer {
  const plan = planSafetensors(tensors, metadata);
  const out = Buffer.alloc(plan.fileLength);
  Buffer.from(plan.header.buffer, plan.header.byteOffset, plan.header.byteLength).copy(out, 0);
  const dataStart = plan.header.byteLength;
  for (const t of tensors) {
    const info = plan.tensors.get(t.name)!;
    if (t.data.byteLength !== info.byteLength) {
      throw new InvalidArgument(`tensor ${JSON.stringify(t.name)}: got ${t.data.byteLength} bytes, shape needs ${info.byteLength}`);
    }
    out.set(t.data, dataStart + info.offset);
  }
  return out;
}

/**
 * Streaming writer: the whole plan is known up front, so the header is written first and tensors
 * arrive one at a time, in any order, each written at its final position. The file is built under a
 * temp name and renamed into place by finish() (after fsync); abort() removes it.
 */
export class SafetensorsWriter {
  private written = new Map<string, number>();
  private done = false;

  private constructor(
    readonly path: string,
    private readonly tmpPath: string,
    private fh: FileHandle | null,
    readonly layout: PlannedLayout,
  ) {}

  static async create(
    path: string,
    tensors: readonly TensorPlan[],
    metadata?: Record<string, string> | null,
  ): Promise<SafetensorsWriter> {
    const layout = planSafetensors(tensors, metadata);
    const tmp = tempSibling(path);
    const fh = await open(tmp, "wx");
    try {
      await writeFully(fh, layout.header, 0);
      // Reserve the full length so the positional writes fill a file of the final size.
      await fh.truncate(layout.fileLength);
    } catch (e) {
      await fh.close();
      await rm(tmp, { force: true });
      throw e;
    }
    return new SafetensorsWriter(path, tmp, fh, layout);
  }

  private get dataStart(): number {
    return this.layout.header.byteLength;
  }

  /** Writes a whole tensor; its byte length must match the plan. */
  async write(name: string, data: Uint8Array): Promise<void> {
    const info = this.expect(name);
    if ((this.written.get(name) ?? 0) !== 0) throw new InvalidArgument(`tensor ${JSON.stringify(name)} was already written`);
    if (data.byteLength !== info.byteLength) {
      throw new InvalidArgument(`tensor ${JSON.stringify(name)}: got ${data.byteLength} bytes, the plan says ${info.byteLength}`);
    }
    await writeFully(this.fh!, data, this.dataStart + info.offset);
    this.written.set(name, data.byteLength);
  }

  /**
   * Writes the next chunk of a tensor (chunks of one tensor arrive in order, starting at byte 0), for
   * tensors too large to hold at once.
   */
  async writeChunk(name: string, data: Uint8Array): Promise<void> {
    const info = this.expect(name);
    const at = this.written.get(name) ?? 0;
    if (at + data.byteLength > info.byteLength) {
      throw new InvalidArgument(`tensor ${JSON.stringify(name)}: ${at + data.byteLength} bytes written, the plan says ${info.byteLength}`);
    }
    await writeFully(this.fh!, data, this.dataStart + info.offset + at);
    this.written.set(name, at + data.byteLength);
  }

  private expect(name: string): TensorInfo {
    if (this.done || !this.fh) throw new InvalidArgument(`${this.path}: writer is closed`);
    const info = this.layout.tensors.get(name);
    if (!info) throw new InvalidArgument(`${this.path}: tensor ${JSON.stringify(name)} is not in the plan`);
    return info;
  }

  /** Names planned but not yet completely written. */
  missing(): string[] {
    return [...this.layout.tensors].filter(([k, v]) => (this.written.get(k) ?? 0) !== v.byteLength).map(([k]) => k);
  }

  /** Checks that every tensor was written, fsyncs, renames into place. */
  async finish(): Promise<{ path: string; size: number }> {
    if (this.done || !this.fh) throw new InvalidArgument(`${this.path}: writer is closed`);
    const missing = this.missing();
    if (missing.length) {
      throw new InvalidArgument(`${this.path}: ${missing.length} tensor(s) not written, e.g. ${JSON.stringify(missing[0])}`);
    }
    this.done = true;
    const fh = this.fh;
    this.fh = null;
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(this.tmpPath, this.path);
    await fsyncDir(dirname(this.path));
    return { path: this.path, size: this.layout.fileLength };
  }

  /** Discards the partial file. Safe to call more than once and after a failed finish. */
  async abort(): Promise<void> {
    this.done = true;
    const fh = this.fh;
    this.fh = null;
    await fh?.close().catch(() => undefined);
    await rm(this.tmpPath, { force: true });
  }
}

async function writeFully(fh: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.byteLength) {
    const { bytesWritten } = await fh.write(data, done, data.byteLength - done, position + done);
    done += bytesWritten;
  }
}
