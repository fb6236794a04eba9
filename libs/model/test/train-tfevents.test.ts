/** TensorBoard event files: CRC-32C, TFRecord framing, Event protos, read back and verified. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { crc32, crc32c, decodeEvent, encodeEvent, EventFileWriter, maskedCrc32c, readEventFile, readRecords } from "../src/train/index.js";

const ascii = (s: string) => new TextEncoder().encode(s);

test("CRC-32C and CRC-32 check values", () => {
  // The standard check value: CRC of the nine bytes "123456789".
  assert.equal(crc32c(ascii("123456789")), 0xe3069283);
  assert.equal(crc32(ascii("123456789")), 0xcbf43926);
  assert.equal(crc32c(new Uint8Array(32)), 0x8a9136aa); // RFC 3720 B.4: 32 bytes of zeros
  assert.equal(crc32c(new Uint8Array(32).fill(0xff)), 0x62a8ab43); // RFC 3720 B.4: 32 bytes of 0xff
  // The mask: rotate right 15, add 0xa282ead8 (mod 2^32).
  const c = crc32c(ascii("abc"));
  assert.equal(maskedCrc32c(ascii("abc")), (((c >>> 15) | (c << 17)) + 0xa282ead8) >>> 0);
});

test("an Event encodes to the expected protobuf bytes", () => {
  const bytes = encodeEvent({ wallTime: 1.5, step: 3, scalars: [{ tag: "a", value: 2 }] });
  // wall_time: key 0x09 (field 1, 64-bit) + double; step: 0x10 varint 3; summary: 0x2a, 10 bytes =
  // Value (0x0a, 8 bytes) = tag (0x0a 0x01 "a") + simple_value (0x15 + float 2.0).
  const expected = [0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f, 0x10, 0x03, 0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, 0x61, 0x15, 0, 0, 0, 0x40];
  assert.deepEqual(Array.from(bytes), expected);
  assert.deepEqual(decodeEvent(bytes), { wallTime: 1.5, step: 3, scalars: [{ tag: "a", value: 2 }] });
});

test("writer → file → reader round trip with CRCs checked; corruption is detected", () => {
  const dir = mkdtempSync(join(tmpdir(), "qlora-tb-"));
  const w = new EventFileWriter(dir, { wallTime: 1700000000.25 });
  w.scalars(5, [{ tag: "train/loss", value: 2.5 }, { tag: "train/learning_rate", value: 2e-4 }], 1700000001);
  w.scalars(10, [{ tag: "eval/loss", value: 1.75 }], 1700000002);
  w.sessionStart(6, 1700000003);
  w.scalars(2 ** 40, [{ tag: "train/loss", value: -0.5 }], 1700000004);
  w.close();
  const files = readdirSync(dir);
  assert.equal(files.length, 1);
  assert.match(files[0]!, /^events\.out\.tfevents\.1700000000\./);
  const events = readEventFile(join(dir, files[0]!));
  assert.equal(events.length, 5);
  assert.deepEqual(events[0], { wallTime: 1700000000.25, step: 0, fileVersion: "brain.Event:2" });
  assert.equal(events[1]!.step, 5);
  assert.equal(events[1]!.scalars![0]!.tag, "train/loss");
  assert.equal(events[1]!.scalars![0]!.value, 2.5);
  assert.equal(events[1]!.scalars![1]!.value, Math.fround(2e-4));
  assert.deepEqual(events[2]!.scalars, [{ tag: "eval/loss", value: 1.75 }]);
  assert.equal(events[3]!.sessionStart, true);
  assert.equal(events[3]!.step, 6);
  assert.equal(events[4]!.step, 2 ** 40);

  // Flip one byte of the data of record 2: its data CRC no longer matches.
  const path = join(dir, files[0]!);
  const bytes = new Uint8Array(readFileSync(path));
  const recs = readRecords(bytes);
  const off = recs[0]!.length + 16 + 12 + 3;
  bytes[off]! ^= 0x40;
  assert.throws(() => readRecords(bytes), /bad data CRC/);
  // Damage a length field instead.
  const bytes2 = new Uint8Array(readFileSync(path));
  bytes2[recs[0]!.length + 16]! ^= 1;
  assert.throws(() => readRecords(bytes2), /bad length CRC/);
  writeFileSync(join(dir, "trunc"), readFileSync(path).subarray(0, bytes.length - 3));
  assert.throws(() => readEventFile(join(dir, "trunc")), /truncated/);
});
