import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InvalidArgument, NotFound } from "@qlora/core";
import {
  MAX_HEADER_SIZE,
  readSafetensorsBuffer,
  SAFETENSORS_DTYPES,
  SafetensorsFile,
  SafetensorsWriter,
  serializeSafetensors,
  tensorByteLength,
  type SafetensorsDtype,
} from "../src/index.js";

async function tmp(): Promise<string> {
  return mkdtemp(join(tmpdir(), "qlora-st-"));
}

/** Builds a raw safetensors file from a header object and a buffer, with no validation at all. */
function rawFile(header: unknown, data: Uint8Array, opts: { headerText?: string; declaredLength?: bigint } = {}): Buffer {
  const json = Buffer.from(opts.headerText ?? JSON.stringify(header), "utf8");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(opts.declaredLength ?? BigInt(json.byteLength));
  return Buffer.concat([len, json, data]);
}

function rand(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s >>> 24;
  }
  return out;
}

test("known bytes: the layout of the reference writer", () => {
  const a = new Float32Array([1, 2]);
  const buf = serializeSafetensors(
    [
      { name: "b", dtype: "U8", shape: [3], data: new Uint8Array([7, 8, 9]) },
      { name: "a", dtype: "F32", shape: [2], data: new Uint8Array(a.buffer) },
    ],
    { format: "pt" },
  );
  const header = '{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}';
  const padded = Math.ceil(header.length / 8) * 8;
  assert.equal(buf.readBigUInt64LE(0), BigInt(padded));
  assert.equal(buf.subarray(8, 8 + padded).toString(), header.padEnd(padded, " "));
  assert.deepEqual([...buf.subarray(8 + padded + 8)], [7, 8, 9]);
  assert.equal(buf.byteLength, 8 + padded + 11);
});

test("round trip: every dtype, odd shapes, scalars, empty tensors, metadata; sorted by dtype then name", async () => {
  const dir = await tmp();
  try {
    const tensors: { name: string; dtype: SafetensorsDtype; shape: number[]; data: Uint8Array }[] = [];
    let seed = 1;
    for (const dtype of SAFETENSORS_DTYPES) {
      // F4 needs an even count, F6 a multiple of 4 elements to fill whole bytes.
      const shape = dtype === "F4" ? [3, 2] : dtype.startsWith("F6") ? [4, 3] : [3, 5];
      const n = tensorByteLength(dtype, shape)!;
      tensors.push({ name: `t_${dtype.toLowerCase()}`, dtype, shape, data: rand(n, seed++) });
    }
    tensors.push({ name: "scalar", dtype: "F32", shape: [], data: new Uint8Array(new Float32Array([3.5]).buffer) });
    tensors.push({ name: "empty", dtype: "BF16", shape: [0, 7], data: new Uint8Array(0) });
    tensors.push({ name: "odd", dtype: "F16", shape: [1, 3, 1, 7], data: rand(42, 99) });
    const path = join(dir, "x.safetensors");
    // Written through the streaming writer, in reverse order, to exercise positional writes.
    const w = await SafetensorsWriter.create(path, tensors, { format: "pt", "ünïcode": "✓" });
    for (const t of [...tensors].reverse()) await w.write(t.name, t.data);
    await w.finish();
    assert.deepEqual(await readdir(dir), ["x.safetensors"]);
    const bytes = await readFile(path);
    assert.deepEqual(bytes, serializeSafetensors(tensors, { "ünïcode": "✓", format: "pt" }));
    const f = await SafetensorsFile.open(path);
    assert.deepEqual(f.metadata, { format: "pt", "ünïcode": "✓" });
    assert.equal(f.tensors.size, tensors.length);
    for (const t of tensors) {
      const info = f.info(t.name);
      assert.equal(info.dtype, t.dtype);
      assert.deepEqual(info.shape, t.shape);
      assert.deepEqual(new Uint8Array(await f.read(t.name)), t.data);
    }
    // Offset order: dtype enum descending, then name.
    const order = f.names();
    const rank = (n: string) => SAFETENSORS_DTYPES.indexOf(f.info(n).dtype);
    for (let i = 1; i < order.length; i++) {
      const a = order[i - 1]!;
      const b = order[i]!;
      assert.ok(rank(a) > rank(b) || (rank(a) === rank(b) && a < b), `${a} before ${b}`);
    }
    assert.equal((8 + Number(bytes.readBigUInt64LE(0))) % 8, 0);
    await f.close();
    const mem = readSafetensorsBuffer(bytes);
    assert.deepEqual(new Uint8Array(mem.tensors.get("odd")!.data), tensors.find((t) => t.name === "odd")!.data);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("writer: size checks, unknown names, missing tensors, abort leaves nothing", async () => {
  const dir = await tmp();
  try {
    const path = join(dir, "w.safetensors");
    const plan = [
      { name: "a", dtype: "F32" as const, shape: [2, 2] },
      { name: "b", dtype: "U8" as const, shape: [5] },
    ];
    const w = await SafetensorsWriter.create(path, plan);
    await assert.rejects(w.write("a", new Uint8Array(15)), InvalidArgument);
    await assert.rejects(w.write("zzz", new Uint8Array(1)), InvalidArgument);
    await w.write("a", new Uint8Array(16));
    await assert.rejects(w.write("a", new Uint8Array(16)), InvalidArgument);
    await w.writeChunk("b", new Uint8Array(2));
    await assert.rejects(w.finish(), /not written/);
    await assert.rejects(w.writeChunk("b", new Uint8Array(4)), InvalidArgument);
    await w.abort();
    assert.deepEqual(await readdir(dir), []);
    await assert.rejects(SafetensorsWriter.create(path, [{ name: "x", dtype: "F32", shape: [1] }, { name: "x", dtype: "F32", shape: [1] }]), InvalidArgument);
    await assert.rejects(SafetensorsWriter.create(path, [{ name: "x", dtype: "F99" as SafetensorsDtype, shape: [1] }]), InvalidArgument);
    assert.deepEqual(await readdir(dir), []);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("reader rejects every malformed file with InvalidArgument naming the file", async () => {
  const dir = await tmp();
  try {
    const ok = { a: { dtype: "F32", shape: [2], data_offsets: [0, 8] }, b: { dtype: "U8", shape: [4], data_offsets: [8, 12] } };
    const d12 = new Uint8Array(12);
    const cases: [string, Buffer, RegExp][] = [
      ["empty file", Buffer.alloc(0), /shorter than the 8-byte/],
      ["short file", Buffer.alloc(5), /shorter than the 8-byte/],
      ["header length past end", rawFile(ok, d12, { declaredLength: 10_000n }), /past the end of the file/],
      ["header length absurd", rawFile(ok, d12, { declaredLength: 1n << 60n }), /absurd|exceeds/],
      ["header length over max", rawFile(ok, d12, { declaredLength: BigInt(MAX_HEADER_SIZE + 1) }), /exceeds the maximum/],
      ["bad json", rawFile(null, d12, { headerText: '{"a": {"dtype": "F32",' }), /not valid JSON/],
      ["not an object", rawFile(null, d12, { headerText: "[1, 2, 3]    " }), /does not start with|not a JSON object/],
      ["json null", rawFile(null, d12, { headerText: "null" }), /does not start with/],
      ["invalid utf-8", Buffer.concat([Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]), Buffer.from([0x7b, 0xff, 0xfe, 0x7d])]), /UTF-8/],
      ["duplicate key", rawFile(null, d12, { headerText: '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}' }), /duplicate key/],
      ["unknown dtype", rawFile({ ...ok, b: { dtype: "Q4", shape: [4], data_offsets: [8, 12] } }, d12), /unknown dtype "Q4"/],
      ["shape/size mismatch", rawFile({ ...ok, a: { dtype: "F32", shape: [3], data_offsets: [0, 8] } }, d12), /12 bytes but data_offsets span 8/],
      ["negative dim", rawFile({ ...ok, a: { dtype: "F32", shape: [-2], data_offsets: [0, 8] } }, d12), /non-negative integers/],
      ["fractional dim", rawFile({ ...ok, a: { dtype: "F32", shape: [1.5], data_offsets: [0, 8] } }, d12), /non-negative integers/],
      ["odd F4 count", rawFile({ x: { dtype: "F4", shape: [3], data_offsets: [0, 1] } }, new Uint8Array(1)), /whole number of bytes/],
      ["overlapping offsets", rawFile({ a: { dtype: "F32", shape: [2], data_offsets: [0, 8] }, b: { dtype: "U8", shape: [4], data_offsets: [4, 8] } }, new Uint8Array(8)), /overlap/],
      ["gap", rawFile({ a: { dtype: "F32", shape: [2], data_offsets: [0, 8] }, b: { dtype: "U8", shape: [4], data_offsets: [10, 14] } }, new Uint8Array(14)), /gap/],
      ["offset out of range", rawFile(ok, new Uint8Array(10)), /past the end of the data buffer/],
      ["truncated data", rawFile(ok, new Uint8Array(11)), /past the end of the data buffer/],
      ["trailing bytes", rawFile(ok, new Uint8Array(20)), /file length mismatch/],
      ["end before begin", rawFile({ a: { dtype: "U8", shape: [0], data_offsets: [4, 0] } }, new Uint8Array(4)), /end 0 < begin 4/],
      ["bad offsets", rawFile({ a: { dtype: "U8", shape: [4], data_offsets: [0] } }, new Uint8Array(4)), /data_offsets must be/],
      ["entry not object", rawFile({ a: 5 }, new Uint8Array(0)), /entry is not an object/],
      ["metadata not strings", rawFile({ __metadata__: { format: 1 } }, new Uint8Array(0)), /is not a string/],
    ];
    for (const [what, bytes, re] of cases) {
      const p = join(dir, `${what.replace(/\W+/g, "_")}.safetensors`);
      await writeFile(p, bytes);
      await assert.rejects(SafetensorsFile.open(p), (e: unknown) => {
        assert.ok(e instanceof InvalidArgument, `${what}: ${String(e)}`);
        assert.match(e.message, re, what);
        assert.ok(e.message.includes(p), `${what}: message names the file`);
        return true;
      });
      assert.throws(() => readSafetensorsBuffer(bytes), InvalidArgument, what);
    }
    await assert.rejects(SafetensorsFile.open(join(dir, "missing.safetensors")), NotFound);
    // Header padding with spaces and an empty file of tensors are valid.
    const p = join(dir, "pad.safetensors");
    await writeFile(p, rawFile(null, new Uint8Array(0), { headerText: "{}      " }));
    const f = await SafetensorsFile.open(p);
    assert.equal(f.tensors.size, 0);
    await f.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("read detects a file truncated after open", async () => {
  const dir = await tmp();
  try {
    const p = join(dir, "t.safetensors");
    await writeFile(p, serializeSafetensors([{ name: "w", dtype: "F32", shape: [1000], data: new Uint8Array(4000) }]));
    const f = await SafetensorsFile.open(p);
    const { truncate } = await import("node:fs/promises");
    await truncate(p, 500);
    await assert.rejects(f.read("w"), /unexpected end of file/);
    await assert.rejects(f.read("nope"), InvalidArgument);
    await f.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
