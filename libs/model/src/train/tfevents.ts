/**
 * TensorBoard event files, written directly (no TensorFlow): a TFRecord stream of `Event` protos.
 *
 * TFRecord framing per record: uint64 LE length, uint32 LE masked CRC-32C of those 8 bytes, the data,
 * uint32 LE masked CRC-32C of the data. The first event carries file_version "brain.Event:2"; scalars
 * are Summary.Value{tag, simple_value} (what torch's SummaryWriter.add_scalar writes, and so what the
 * Hugging Face TensorBoardCallback produces). A resumed run writes a SessionLog START at the step it
 * continues from, which makes TensorBoard drop the old run's points at and after that step.
 *
 * Proto field numbers (tensorflow/core/util/event.proto, framework/summary.proto):
 *   Event { double wall_time = 1; int64 step = 2; oneof { string file_version = 3; Summary summary = 5;
 *           SessionLog session_log = 7; … } }
 *   Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; … }
 *   SessionLog { SessionStatus status = 1 (START = 1); string checkpoint_path = 2; string msg = 3; }
 */
import { closeSync, fsyncSync, openSync, readFileSync, writeSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { maskedCrc32c } from "./crc.js";

// ---- minimal protobuf encoding -------------------------------------------------------------

class ProtoWriter {
  private parts: number[] = [];

  private varint(v: bigint): void {
    let x = BigInt.asUintN(64, v);
    while (x >= 0x80n) {
      this.parts.push(Number(x & 0x7fn) | 0x80);
      x >>= 7n;
    }
    this.parts.push(Number(x));
  }
  private key(field: number, wire: number): void {
    this.varint(BigInt((field << 3) | wire));
  }
  double(field: number, v: number): this {
    this.key(field, 1);
    const b = new Uint8Array(8);
    new DataView(b.buffer).setFloat64(0, v, true);
    this.parts.push(...b);
    return this;
  }
  float(field: number, v: number): this {
    this.key(field, 5);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, v, true);
    this.parts.push(...b);
    return this;
  }
  int64(field: number, v: number | bigint): this {
    this.key(field, 0);
    this.varint(BigInt(v));
    return this;
  }
  bytes(field: number, b: Uint8Array): this {
    this.key(field, 2);
    this.varint(BigInt(b.length));
    for (const x of b) this.parts.push(x);
    return this;
  }
  string(field: number, s: string): this {
    return this.bytes(field, new TextEncoder().encode(s));
  }
  finish(): Uint8Array {
    return Uint8Array.from(this.parts);
  }
}

export interface ScalarValue {
  tag: string;
  value: number;
}

/** What an event holds; exactly one of fileVersion / scalars / sessionStart is set. */
export interface TfEvent {
  wallTime: number;
  step: number;
  fileVersion?: string;
  scalars?: ScalarValue[];
  sessionStart?: boolean;
}

export function encodeEvent(e: TfEvent): Uint8Array {
  const w = new ProtoWriter().double(1, e.wallTime);
  if (e.step !== 0) w.int64(2, e.step);
  if (e.fileVersion !== undefined) w.string(3, e.fileVersion);
  if (e.scalars !== undefined) {
    const summary = new ProtoWriter();
    for (const s of e.scalars) summary.bytes(1, new ProtoWriter().string(1, s.tag).float(2, s.value).finish());
    w.bytes(5, summary.finish());
  }
  if (e.sessionStart) w.bytes(7, new ProtoWriter().int64(1, 1).finish());
  return w.finish();
}

/** One TFRecord: length, masked CRC of the length, data, masked CRC of the data. */
export function frameRecord(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(8 + 4 + data.length + 4);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, BigInt(data.length), true);
  dv.setUint32(8, maskedCrc32c(out.subarray(0, 8)), true);
  out.set(data, 12);
  dv.setUint32(12 + data.length, maskedCrc32c(data), true);
  return out;
}

/** Distinguishes writers opened by one process within the same second (like torch's global uid). */
let writersOpened = 0;

/** Appends events to one file; each record is written as it comes, so a crash leaves a valid file. */
export class EventFileWriter {
  readonly path: string;
  private fd: number | null;

  constructor(logDir: string, opts: { wallTime?: number; suffix?: string } = {}) {
    const now = opts.wallTime ?? Date.now() / 1000;
    const name = `events.out.tfevents.${Math.floor(now)}.${hostname()}.${process.pid}.${writersOpened++}${opts.suffix ?? ""}`;
    this.path = join(logDir, name);
    this.fd = openSync(this.path, "a");
    this.write({ wallTime: now, step: 0, fileVersion: "brain.Event:2" });
  }

  write(e: TfEvent): void {
    if (this.fd === null) throw new Error("event file is closed");
    writeSync(this.fd, frameRecord(encodeEvent(e)));
  }

  scalars(step: number, values: ScalarValue[], wallTime = Date.now() / 1000): void {
    this.write({ wallTime, step, scalars: values });
  }

  /** Marks a restart at `step`: TensorBoard discards this run's earlier points with step ≥ `step`. */
  sessionStart(step: number, wallTime = Date.now() / 1000): void {
    this.write({ wallTime, step, sessionStart: true });
  }

  close(): void {
    if (this.fd === null) return;
    fsyncSync(this.fd);
    closeSync(this.fd);
    this.fd = null;
  }
}

// ---- reading back (tests, tools) ----------------------------------------------------------

class ProtoReader {
  pos = 0;
  constructor(private readonly b: Uint8Array) {}
  get done(): boolean {
    return this.pos >= this.b.length;
  }
  varint(): bigint {
    let r = 0n;
    let shift = 0n;
    for (;;) {
      if (this.pos >= this.b.length) throw new Error("truncated varint");
      const x = this.b[this.pos++]!;
      r |= BigInt(x & 0x7f) << shift;
      if (!(x & 0x80)) return r;
      shift += 7n;
    }
  }
  fixed(n: number): DataView {
    if (this.pos + n > this.b.length) throw new Error("truncated fixed field");
    const dv = new DataView(this.b.buffer, this.b.byteOffset + this.pos, n);
    this.pos += n;
    return dv;
  }
  bytes(): Uint8Array {
    const n = Number(this.varint());
    if (this.pos + n > this.b.length) throw new Error("truncated bytes field");
    const out = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  /** Iterates fields as (number, wire type); the caller reads or skips the value. */
  *fields(): Generator<[number, number]> {
    while (!this.done) {
      const key = Number(this.varint());
      yield [key >>> 3, key & 7];
    }
  }
  skip(wire: number): void {
    if (wire === 0) this.varint();
    else if (wire === 1) this.fixed(8);
    else if (wire === 2) this.bytes();
    else if (wire === 5) this.fixed(4);
    else throw new Error(`unsupported wire type ${wire}`);
  }
}

export function decodeEvent(data: Uint8Array): TfEvent {
  const r = new ProtoReader(data);
  const e: TfEvent = { wallTime: 0, step: 0 };
  for (const [f, w] of r.fields()) {
    if (f === 1 && w === 1) e.wallTime = r.fixed(8).getFloat64(0, true);
    else if (f === 2 && w === 0) e.step = Number(BigInt.asIntN(64, r.varint()));
    else if (f === 3 && w === 2) e.fileVersion = new TextDecoder().decode(r.bytes());
    else if (f === 5 && w === 2) {
      const s = new ProtoReader(r.bytes());
      e.scalars = [];
      for (const [sf, sw] of s.fields()) {
        if (sf !== 1 || sw !== 2) {
          s.skip(sw);
          continue;
        }
        const v = new ProtoReader(s.bytes());
        const val: ScalarValue = { tag: "", value: NaN };
        for (const [vf, vw] of v.fields()) {
          if (vf === 1 && vw === 2) val.tag = new TextDecoder().decode(v.bytes());
          else if (vf === 2 && vw === 5) val.value = v.fixed(4).getFloat32(0, true);
          else v.skip(vw);
        }
        e.scalars.push(val);
      }
    } else if (f === 7 && w === 2) {
      const s = new ProtoReader(r.bytes());
      for (const [sf, sw] of s.fields()) {
        if (sf === 1 && sw === 0) e.sessionStart = s.varint() === 1n;
        else s.skip(sw);
      }
    } else r.skip(w);
  }
  return e;
}

/** Splits a TFRecord stream, checking both CRCs of every record; throws on any corruption. */
export function readRecords(bytes: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let p = 0;
  while (p < bytes.length) {
    if (p + 12 > bytes.length) throw new Error(`truncated record header at byte ${p}`);
    const len = Number(dv.getBigUint64(p, true));
    if (dv.getUint32(p + 8, true) !== maskedCrc32c(bytes.subarray(p, p + 8))) {
      throw new Error(`bad length CRC at byte ${p}`);
    }
    if (p + 12 + len + 4 > bytes.length) throw new Error(`truncated record at byte ${p}`);
    const data = bytes.subarray(p + 12, p + 12 + len);
    if (dv.getUint32(p + 12 + len, true) !== maskedCrc32c(data)) throw new Error(`bad data CRC at byte ${p}`);
    out.push(data);
    p += 12 + len + 4;
  }
  return out;
}

export function readEventFile(path: string): TfEvent[] {
  return readRecords(readFileSync(path)).map(decodeEvent);
}
