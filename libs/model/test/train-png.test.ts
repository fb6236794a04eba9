/** loss.png: a valid PNG (signature, chunk CRCs, IHDR, inflatable IDAT) that shows the curves. */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as zlib from "node:zlib";
import { encodePng, lossChartPng, niceTicks } from "../src/train/index.js";

interface Decoded {
  width: number;
  height: number;
  bitDepth: number;
  colorType: number;
  pixels: Uint8Array;
  chunkTypes: string[];
}

/** A minimal PNG reader for 8-bit RGB, filter-0 images (what the encoder writes), checking every CRC. */
function decodePng(png: Uint8Array): Decoded {
  assert.deepEqual(Array.from(png.subarray(0, 8)), [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  const dv = new DataView(png.buffer, png.byteOffset, png.byteLength);
  let p = 8;
  const idat: Uint8Array[] = [];
  const chunkTypes: string[] = [];
  let width = 0;
  let height = 0;
  let bitDepth = 0;
  let colorType = 0;
  while (p < png.length) {
    const len = dv.getUint32(p);
    const type = new TextDecoder().decode(png.subarray(p + 4, p + 8));
    const data = png.subarray(p + 8, p + 8 + len);
    const crc = dv.getUint32(p + 8 + len);
    // node:zlib's crc32 is an independent implementation of the PNG CRC.
    assert.equal(crc, zlib.crc32(png.subarray(p + 4, p + 8 + len)), `CRC of ${type}`);
    chunkTypes.push(type);
    if (type === "IHDR") {
      const h = new DataView(data.buffer, data.byteOffset, data.byteLength);
      width = h.getUint32(0);
      height = h.getUint32(4);
      bitDepth = data[8]!;
      colorType = data[9]!;
      assert.deepEqual(Array.from(data.subarray(10, 13)), [0, 0, 0]);
    } else if (type === "IDAT") idat.push(data);
    p += 12 + len;
  }
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * 3;
  assert.equal(raw.length, height * (stride + 1));
  const pixels = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    assert.equal(raw[y * (stride + 1)], 0, "filter type 0");
    pixels.set(raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1)), y * stride);
  }
  return { width, height, bitDepth, colorType, pixels, chunkTypes };
}

test("encodePng round-trips a small image exactly", () => {
  const w = 3;
  const h = 2;
  const rgb = Uint8Array.from({ length: w * h * 3 }, (_, i) => (i * 37) % 256);
  const d = decodePng(encodePng(w, h, rgb));
  assert.deepEqual([d.width, d.height, d.bitDepth, d.colorType], [3, 2, 8, 2]);
  assert.deepEqual(d.chunkTypes, ["IHDR", "IDAT", "IEND"]);
  assert.deepEqual(Array.from(d.pixels), Array.from(rgb));
  assert.throws(() => encodePng(2, 2, new Uint8Array(5)), RangeError);
});

test("the loss chart has a white background, axes, and both curves in their colours", () => {
  const train = Array.from({ length: 20 }, (_, i) => ({ step: (i + 1) * 5, loss: 3 * Math.exp(-i / 6) + 0.5 }));
  const evals = [{ step: 50, loss: 1.6 }, { step: 100, loss: 1.1 }];
  const d = decodePng(lossChartPng(train, evals));
  assert.equal(d.width, 800);
  assert.equal(d.height, 480);
  const count = (r: number, g: number, b: number) => {
    let n = 0;
    for (let i = 0; i < d.pixels.length; i += 3) if (d.pixels[i] === r && d.pixels[i + 1] === g && d.pixels[i + 2] === b) n++;
    return n;
  };
  assert.deepEqual(Array.from(d.pixels.subarray(0, 3)), [255, 255, 255]);
  assert.ok(count(31, 119, 180) > 500, "train line drawn");
  assert.ok(count(230, 110, 20) > 50, "eval points drawn");
  assert.ok(count(40, 40, 40) > 1000, "axes and labels drawn");
  // Without eval points there is no eval colour at all.
  const t = decodePng(lossChartPng(train, []));
  let evalPixels = 0;
  for (let i = 0; i < t.pixels.length; i += 3) if (t.pixels[i] === 230 && t.pixels[i + 1] === 110) evalPixels++;
  assert.equal(evalPixels, 0);
  // Degenerate input still gives an image (one point, constant values, nothing at all).
  decodePng(lossChartPng([{ step: 1, loss: 2 }], []));
  decodePng(lossChartPng([{ step: 1, loss: 2 }, { step: 2, loss: 2 }], []));
  decodePng(lossChartPng([], []));
});

test("tick positions follow 1-2-5 steps", () => {
  assert.deepEqual(niceTicks(0, 10, 5), [0, 2, 4, 6, 8, 10]);
  // (3.1 - 0.43) / 5 = 0.53 → step 1; / 8 = 0.33 → step 0.5.
  assert.deepEqual(niceTicks(0.43, 3.1, 5), [1, 2, 3]);
  assert.deepEqual(niceTicks(0.43, 3.1, 8), [0.5, 1, 1.5, 2, 2.5, 3]);
  assert.deepEqual(niceTicks(0.0012, 0.0031, 4), [0.0015, 0.002, 0.0025, 0.003]);
  assert.deepEqual(niceTicks(1, 1), [1]);
});
