/**
 * safetensors dtypes and the small numeric conversions the formats need (F16/BF16 → F32).
 */

/**
 * Every dtype string the safetensors spec knows, in the order of its Rust `Dtype` enum. The order
 * matters: the reference writer sorts tensors by this enum, descending, then by name.
 */
export const SAFETENSORS_DTYPES = [
  "BOOL",
  "F4",
  "F6_E2M3",
  "F6_E3M2",
  "U8",
  "I8",
  "F8_E5M2",
  "F8_E4M3",
  "F8_E8M0",
  "F8_E4M3FNUZ",
  "F8_E5M2FNUZ",
  "I16",
  "U16",
  "F16",
  "BF16",
  "I32",
  "U32",
  "F32",
  "C64",
  "F64",
  "I64",
  "U64",
] as const;

export type SafetensorsDtype = (typeof SAFETENSORS_DTYPES)[number];

const BITS: Record<SafetensorsDtype, number> = {
  BOOL: 8,
  F4: 4,
  F6_E2M3: 6,
  F6_E3M2: 6,
  U8: 8,
  I8: 8,
  F8_E5M2: 8,
  F8_E4M3: 8,
  F8_E8M0: 8,
  F8_E4M3FNUZ: 8,
  F8_E5M2FNUZ: 8,
  I16: 16,
  U16: 16,
  F16: 16,
  BF16: 16,
  I32: 32,
  U32: 32,
  F32: 32,
  C64: 64,
  F64: 64,
  I64: 64,
  U64: 64,
};

export function isSafetensorsDtype(s: unknown): s is SafetensorsDtype {
  return typeof s === "string" && Object.prototype.hasOwnProperty.call(BITS, s);
}

/** Bits per element. */
export function dtypeBits(d: SafetensorsDtype): number {
  return BITS[d];
}

/** Position in the Rust enum (the reference writer's primary sort key, descending). */
export function dtypeRank(d: SafetensorsDtype): number {
  return SAFETENSORS_DTYPES.indexOf(d);
}

/** Product of a shape's dimensions (1 for a scalar, shape []). */
export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * Byte length of a tensor, or undefined when numel×bits is not a whole number of bytes (which the
 * spec rejects, e.g. an odd number of F4 elements).
 */
export function tensorByteLength(d: SafetensorsDtype, shape: readonly number[]): number | undefined {
  const bits = numel(shape) * dtypeBits(d);
  if (!Number.isSafeInteger(bits) || bits % 8 !== 0) return undefined;
  return bits / 8;
}

/** Float dtypes of model weights, in safetensors and in torch spelling. */
export type FloatDtype = "F32" | "F16" | "BF16";
export type TorchFloatDtype = "float32" | "float16" | "bfloat16";
/** The kernels' spelling (WeightTensor.dtype). */
export type KernelFloatDtype = "f32" | "f16" | "bf16";

export function isFloatDtype(d: string): d is FloatDtype {
  return d === "F32" || d === "F16" || d === "BF16";
}

export const TORCH_DTYPE: Record<FloatDtype, TorchFloatDtype> = { F32: "float32", F16: "float16", BF16: "bfloat16" };
export const KERNEL_DTYPE: Record<FloatDtype, KernelFloatDtype> = { F32: "f32", F16: "f16", BF16: "bf16" };

/** IEEE half → float (exact: every half is a float). */
export function f16BitsToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/**
 * Raw little-endian bytes of an F32/F16/BF16 tensor → Float32Array (a copy, so the result never
 * aliases an unaligned Buffer slice).
 */
export function toFloat32(bytes: Uint8Array, dtype: FloatDtype): Float32Array {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (dtype === "F32") {
    const out = new Float32Array(bytes.byteLength / 4);
    for (let i = 0; i < out.length; i++) out[i] = dv.getFloat32(i * 4, true);
    return out;
  }
  const out = new Float32Array(bytes.byteLength / 2);
  if (dtype === "BF16") {
    // bf16 is the top half of a float32.
    const u = new Uint32Array(out.buffer);
    for (let i = 0; i < out.length; i++) u[i] = dv.getUint16(i * 2, true) << 16;
    return out;
  }
  for (let i = 0; i < out.length; i++) out[i] = f16BitsToF32(dv.getUint16(i * 2, true));
  return out;
}

/** A Float32Array view of little-endian F32 bytes when aligned, else a copy. */
export function f32View(bytes: Uint8Array): Float32Array {
  if (bytes.byteOffset % 4 === 0 && bytes.byteLength % 4 === 0) {
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  }
  return toFloat32(bytes, "F32");
}

/** Bytes of a Float32Array (little-endian host, like every platform Node supports for this addon). */
export function f32Bytes(a: Float32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
