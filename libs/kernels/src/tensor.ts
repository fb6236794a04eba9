/** Weight tensors as the kernels and the native engine take them (docs/architecture.md). */
export type WeightDType = "f32" | "f16" | "bf16" | "nf4";

export interface WeightTensor {
  dtype: WeightDType;
  /** Logical shape, e.g. [out, in]; a linear layer's weight is [N (out), K (in)], row-major. */
  shape: number[];
  /** Raw little-endian bytes; nf4: packed codes of the flat index, even element in the high nibble. */
  data: Uint8Array;
  /** nf4 only: one float32 scale per `blocksize` elements of the flat index (double quant resolved). */
  absmax?: Float32Array;
  /** nf4 only. */
  blocksize?: number;
}

/** Bytes per element of the dense dtypes. */
export function dtypeBytes(dtype: "f32" | "f16" | "bf16"): number {
  return dtype === "f32" ? 4 : 2;
}
