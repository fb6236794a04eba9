/**
 * The weight-tensor contract of docs/architecture.md, as `@qlora/kernels` defines it in its
 * src/tensor.ts. Kept here structurally identical (and not re-exported) because the kernels package
 * index does not export tensor.ts yet; values of this type are assignable to the kernels' type.
 */
export interface WeightTensor {
  dtype: "f32" | "f16" | "bf16" | "nf4";
  shape: number[];
  data: Uint8Array;
  absmax?: Float32Array;
  /** nf4 double-quantized scales instead of `absmax` (see @qlora/kernels tensor.ts). */
  absmaxDq?: { qabsmax: Uint8Array; nestedAbsmax: Float32Array; offset: number; quantMap: Float32Array; nestedBlocksize?: number };
  blocksize?: number;
}
