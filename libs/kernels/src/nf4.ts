/**
 * NF4 4-bit blockwise quantization in the exact bitsandbytes format (docs/formats.md §1-2,
 * docs/kernels.md). Inputs are the raw little-endian bytes of a safetensors tensor: no conversion
 * in JS. All calls are synchronous and multi-threaded in native code.
 */
import { InvalidArgument } from "@qlora/core";
import { native } from "./native.js";

export type FloatDType = "f32" | "f16" | "bf16";

/**
 * The 16 NF4 values (code -> value), float32, ascending; code 7 is 0 — bitsandbytes'
 * `get_4bit_type("nf4")`, as literals so that importing this module never needs the addon
 * (a test checks them against the native table, csrc/cpu/nf4.cpp kNf4Code).
 */
export const NF4_CODE: Float32Array = Float32Array.from([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
]);

let dynamicMap: Float32Array | undefined;

/**
 * bitsandbytes `create_dynamic_map(signed=True)`: the 256 sorted float32 codes of the 8-bit
 * quantization used for double quantization (torch's scalar CPU linspace). A fresh copy.
 */
export function dynamicMap8bit(): Float32Array {
  if (!dynamicMap) {
    dynamicMap = new Float32Array(256);
    native.dynamicMap8bit(dynamicMap);
  }
  return dynamicMap.slice();
}

function checkCount(n: number, what = "n"): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgument(`${what} must be a non-negative integer, got ${n}`);
}

/** Throws unless `blocksize` is one bitsandbytes accepts for 4-bit: a power of two in 32..4096. */
export function checkNf4Blocksize(blocksize: number): void {
  if (!Number.isInteger(blocksize) || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) !== 0) {
    throw new InvalidArgument(`NF4 blocksize must be a power of two in 32..4096, got ${blocksize}`);
  }
}

export interface Nf4Quantized {
  /** ceil(n/2) bytes: element 2j in the high nibble of byte j, 2j+1 in the low nibble. */
  packed: Uint8Array;
  /** ceil(n/blocksize) float32 block scales (max |x| of each block of the flat index). */
  absmax: Float32Array;
}

/**
 * Quantizes n elements of `dtype` (raw little-endian bytes, any byte offset) to NF4.
 * Exact bitsandbytes semantics: per block absmax, scale by the float32 reciprocal, nearest code by
 * strict `>` against float32 midpoints (ties to the lower code); odd n pads the last low nibble
 * with code 7; an all-zero block gets absmax 0 and bytes 0x77. NaN elements are ignored by absmax
 * and get code 0; an infinite element makes the block's absmax inf (its finite elements -> code 7).
 * `out`: caller-owned destinations (≥ ceil(n/2) bytes, ≥ ceil(n/blocksize) scales; views into a
 * larger tensor's arrays let a loader quantize it chunk by chunk, blocks being independent).
 */
export function quantizeNf4(
  data: Uint8Array | Float32Array,
  dtype: FloatDType,
  n: number,
  blocksize = 64,
  out?: Nf4Quantized,
): Nf4Quantized {
  if (dtype !== "f32" && dtype !== "f16" && dtype !== "bf16") {
    throw new InvalidArgument(`dtype must be "f32", "f16" or "bf16", got ${String(dtype)}`);
  }
  if (data instanceof Float32Array && dtype !== "f32") {
    throw new InvalidArgument(`a Float32Array holds f32 data, not ${dtype}`);
  }
  checkCount(n);
  checkNf4Blocksize(blocksize);
  const es = dtype === "f32" ? 4 : 2;
  if (data.byteLength < n * es) {
    throw new InvalidArgument(`data has ${data.byteLength} bytes, ${n} ${dtype} elements need ${n * es}`);
  }
  const packed = out?.packed ?? new Uint8Array(Math.ceil(n / 2));
  const absmax = out?.absmax ?? new Float32Array(Math.ceil(n / blocksize));
  if (!(packed instanceof Uint8Array) || packed.length < Math.ceil(n / 2)) throw new InvalidArgument(`out.packed must be a Uint8Array of >= ${Math.ceil(n / 2)}`);
  if (!(absmax instanceof Float32Array) || absmax.length < Math.ceil(n / blocksize)) {
    throw new InvalidArgument(`out.absmax must be a Float32Array of >= ${Math.ceil(n / blocksize)}`);
  }
  native.nf4Quantize(data, dtype, n, blocksize, packed, absmax);
  return { packed, absmax };
}

function checkPacked(packed: Uint8Array, absmax: Float32Array, n: number, blocksize: number): void {
  checkCount(n);
  checkNf4Blocksize(blocksize);
  if (!(packed instanceof Uint8Array)) throw new InvalidArgument("packed must be a Uint8Array");
  if (!(absmax instanceof Float32Array)) throw new InvalidArgument("absmax must be a Float32Array");
  if (packed.length < Math.ceil(n / 2)) {
    throw new InvalidArgument(`packed has ${packed.length} bytes, ${n} elements need ${Math.ceil(n / 2)}`);
  }
  if (absmax.length < Math.ceil(n / blocksize)) {
    throw new InvalidArgument(`absmax has ${absmax.length} values, ${n} elements need ${Math.ceil(n / blocksize)}`);
  }
}

/** x[i] = NF4[code_i] * absmax[i / blocksize] (float32) for i < n. */
export function dequantizeNf4(
  packed: Uint8Array,
  absmax: Float32Array,
  n: number,
  blocksize = 64,
  out?: Float32Array,
): Float32Array {
  checkPacked(packed, absmax, n, blocksize);
  const o = out ?? new Float32Array(n);
  if (!(o instanceof Float32Array) || o.length < n) throw new InvalidArgument(`out must be a Float32Array of >= ${n}`);
  native.nf4Dequantize(packed, absmax, n, blocksize, o);
  return o;
}

/** The dequantized values rounded to bfloat16 (nearest even; NaN stays NaN), as raw uint16 bits. */
export function dequantizeNf4Bf16(
  packed: Uint8Array,
  absmax: Float32Array,
  n: number,
  blocksize = 64,
  out?: Uint16Array,
): Uint16Array {
  checkPacked(packed, absmax, n, blocksize);
  const o = out ?? new Uint16Array(n);
  if (!(o instanceof Uint16Array) || o.length < n) throw new InvalidArgument(`out must be a Uint16Array of >= ${n}`);
  native.nf4DequantizeBf16(packed, absmax, n, blocksize, o);
  return o;
}

export interface DoubleQuantized {
  /** One 8-bit code (index into quantMap) per absmax value. */
  qabsmax: Uint8Array;
  /** ceil(absmax.length / nestedBlocksize) float32 scales. */
  nestedAbsmax: Float32Array;
  /** float32 mean of absmax, subtracted before quantizing. */
  offset: number;
  /** The 256-entry code the indices refer to (dynamicMap8bit()). */
  quantMap: Float32Array;
}

function checkNested(nestedBlocksize: number): void {
  if (!Number.isInteger(nestedBlocksize) || nestedBlocksize < 1) {
    throw new InvalidArgument(`nestedBlocksize must be a positive integer (bitsandbytes uses 256), got ${nestedBlocksize}`);
  }
}

/**
 * bitsandbytes double quantization (`compress_statistics=True`) of 4-bit absmax: offset = mean,
 * then 8-bit blockwise quantization of absmax - offset with the signed dynamic map (bucketize on
 * float32 midpoints, ties to the lower index, scaled by 1/nested_absmax, clamped to [-1, 1]).
 */
export function doubleQuantizeAbsmax(absmax: Float32Array, nestedBlocksize = 256): DoubleQuantized {
  if (!(absmax instanceof Float32Array)) throw new InvalidArgument("absmax must be a Float32Array");
  checkNested(nestedBlocksize);
  const quantMap = dynamicMap8bit();
  const qabsmax = new Uint8Array(absmax.length);
  const nestedAbsmax = new Float32Array(Math.ceil(absmax.length / nestedBlocksize));
  const offset: number = native.nf4DoubleQuantize(absmax, nestedBlocksize, quantMap, qabsmax, nestedAbsmax);
  return { qabsmax, nestedAbsmax, offset, quantMap };
}

/** absmax[i] = quantMap[q[i]] * nestedAbsmax[i / nestedBlocksize] + offset, in float32 (no FMA). */
export function dequantizeAbsmax(
  qabsmax: Uint8Array,
  nestedAbsmax: Float32Array,
  offset: number,
  quantMap: Float32Array,
  nestedBlocksize = 256,
  out?: Float32Array,
): Float32Array {
  if (!(qabsmax instanceof Uint8Array)) throw new InvalidArgument("qabsmax must be a Uint8Array");
  if (!(nestedAbsmax instanceof Float32Array)) throw new InvalidArgument("nestedAbsmax must be a Float32Array");
  if (!(quantMap instanceof Float32Array) || quantMap.length !== 256) {
    throw new InvalidArgument("quantMap must be a Float32Array of 256 values");
  }
  if (typeof offset !== "number") throw new InvalidArgument("offset must be a number");
  checkNested(nestedBlocksize);
  const need = Math.ceil(qabsmax.length / nestedBlocksize);
  if (nestedAbsmax.length < need) {
    throw new InvalidArgument(`nestedAbsmax has ${nestedAbsmax.length} values, ${qabsmax.length} codes need ${need}`);
  }
  const o = out ?? new Float32Array(qabsmax.length);
  if (!(o instanceof Float32Array) || o.length < qabsmax.length) {
    throw new InvalidArgument(`out must be a Float32Array of >= ${qabsmax.length}`);
  }
  native.nf4DequantizeAbsmax(qabsmax, nestedAbsmax, offset, quantMap, nestedBlocksize, o);
  return o;
}

/** Threaded memcpy of min(src, dst) bytes: the copy-bandwidth reference of the benchmarks. */
export function streamCopy(src: ArrayBufferView, dst: ArrayBufferView): void {
  native.streamCopy(src, dst);
}
