/** Weight tensors as the kernels and the native engine take them (docs/architecture.md). */
import type { DoubleQuantized } from "./nf4.js";

export type WeightDType = "f32" | "f16" | "bf16" | "nf4";

export interface WeightTensor {
  dtype: WeightDType;
  /** Logical shape, e.g. [out, in]; a linear layer's weight is [N (out), K (in)], row-major. */
  shape: number[];
  /** Raw little-endian bytes; nf4: packed codes of the flat index, even element in the high nibble. */
  data: Uint8Array;
  /**
   * nf4 only: one float32 scale per `blocksize` elements of the flat index. An nf4 weight has
   * either this or `absmaxDq`.
   */
  absmax?: Float32Array;
  /**
   * nf4 only, instead of `absmax`: the scales kept double-quantized as bitsandbytes stores them
   * (`doubleQuantizeAbsmax`'s result; 1 byte per block + 4 per 256 blocks instead of 4 per block):
   * absmax[b] = quantMap[qabsmax[b]] · nestedAbsmax[⌊b / nestedBlocksize⌋] + offset, in float32
   * (mul, then add). The native kernels resolve the few scales a row / panel needs as they decode
   * it: results are bit-identical to passing the resolved `absmax` (`dequantizeAbsmax`).
   * CUDA entry points resolve it on the host before upload.
   */
  absmaxDq?: DoubleQuantized;
  /** nf4 only. */
  blocksize?: number;
}

/** Bytes per element of the dense dtypes. */
export function dtypeBytes(dtype: "f32" | "f16" | "bf16"): number {
  return dtype === "f32" ? 4 : 2;
}
