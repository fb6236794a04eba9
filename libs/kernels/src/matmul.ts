/**
 * Linear layers over frozen weights (f32 / f16 / bf16 / NF4, see tensor.ts) and a dense f32 GEMM.
 * NF4 weights stay packed: they are decoded tile by tile inside the native kernels.
 * Shapes (row-major): x [M,K], W [N,K] (`shape: [N, K]`), y [M,N].
 */
import { InvalidArgument } from "@qlora/core";
import { native } from "./native.js";
import { checkNf4Blocksize } from "./nf4.js";
import type { WeightTensor } from "./tensor.js";

export type { WeightDType, WeightTensor } from "./tensor.js";

function checkDim(v: number, what: string): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new InvalidArgument(`${what} must be a non-negative integer, got ${v}`);
}

/** Validates a weight and returns its [N, K]. */
function weightDims(w: WeightTensor): [number, number] {
  if (!w || !Array.isArray(w.shape) || w.shape.length !== 2) {
    throw new InvalidArgument(`a linear weight must have a 2-D shape [out, in], got ${JSON.stringify(w?.shape)}`);
  }
  const [N, K] = w.shape as [number, number];
  checkDim(N, "weight rows");
  checkDim(K, "weight cols");
  if (!(w.data instanceof Uint8Array)) throw new InvalidArgument("weight data must be a Uint8Array (raw bytes)");
  const n = N * K;
  let need: number;
  switch (w.dtype) {
    case "f32":
      need = 4 * n;
      break;
    case "f16":
    case "bf16":
      need = 2 * n;
      break;
    case "nf4": {
      const bs = w.blocksize ?? 64;
      checkNf4Blocksize(bs);
      if (!(w.absmax instanceof Float32Array)) throw new InvalidArgument("an nf4 weight needs absmax (Float32Array)");
      if (w.absmax.length < Math.ceil(n / bs)) {
        throw new InvalidArgument(`nf4 absmax has ${w.absmax.length} values, [${N}, ${K}] needs ${Math.ceil(n / bs)}`);
      }
      need = Math.ceil(n / 2);
      break;
    }
    default:
      throw new InvalidArgument(`weight dtype must be f32, f16, bf16 or nf4, got ${String(w.dtype)}`);
  }
  if (w.data.byteLength < need) {
    throw new InvalidArgument(`${w.dtype} weight [${N}, ${K}] needs ${need} bytes, data has ${w.data.byteLength}`);
  }
  return [N, K];
}

function f32Buffer(a: Float32Array | undefined, len: number, what: string): Float32Array {
  if (a === undefined) return new Float32Array(len);
  if (!(a instanceof Float32Array) || a.length < len) throw new InvalidArgument(`${what} must be a Float32Array of >= ${len}`);
  return a;
}

function weightArgs(w: WeightTensor, N: number, K: number): unknown[] {
  return [w.dtype, w.data, w.absmax ?? null, w.dtype === "nf4" ? (w.blocksize ?? 64) : 0, N, K];
}

/** Validates the arguments of a forward linear; returns [N, K, the output buffer]. */
function forwardArgs(
  x: Float32Array,
  M: number,
  w: WeightTensor,
  bias: Float32Array | undefined,
  out: Float32Array | undefined,
  accumulate: boolean,
): [number, number, Float32Array] {
  const [N, K] = weightDims(w);
  checkDim(M, "M");
  if (!(x instanceof Float32Array) || x.length < M * K) throw new InvalidArgument(`x must be a Float32Array of >= ${M}*${K}`);
  if (bias !== undefined && (!(bias instanceof Float32Array) || bias.length < N)) {
    throw new InvalidArgument(`bias must be a Float32Array of >= ${N}`);
  }
  if (accumulate && out === undefined) throw new InvalidArgument("accumulate needs `out`");
  const y = f32Buffer(out, M * N, "out");
  return [N, K, y];
}

/**
 * y[M,N] = x[M,K]·Wᵀ (+ bias[N]). With `accumulate`, y += x·Wᵀ (+ bias) into `out`.
 * nf4 weights default to blocksize 64 when `blocksize` is absent.
 */
export function linear(
  x: Float32Array,
  M: number,
  w: WeightTensor,
  bias?: Float32Array,
  out?: Float32Array,
  accumulate = false,
): Float32Array {
  const [N, K, y] = forwardArgs(x, M, w, bias, out, accumulate);
  native.linear(x, M, ...weightArgs(w, N, K), bias ?? null, y, accumulate);
  return y;
}

/**
 * Decode-time linear with int8 activations (docs/kernels.md §3, "int8 decode path"): y (+)= x·Wᵀ
 * (+ bias) like `linear`, but each row of x is quantized per weight block to int8 (scale max|x|/127)
 * and the NF4 codes to int8 round(code·127); block dot products are exact integers scaled once per
 * block. Approximate: per element |Δy| <= Σ_k (0.5·xscale_b·|w_k| + 0.5/127·absmax_b·|x̂_k|).
 * Only nf4 weights with K % blocksize == 0 and 1 <= M <= 8 take this path (`int8`: true in the
 * result); any other call computes exactly what `linear` does.
 */
export function linearInt8(
  x: Float32Array,
  M: number,
  w: WeightTensor,
  bias?: Float32Array,
  out?: Float32Array,
  accumulate = false,
): { y: Float32Array; int8: boolean } {
  const [N, K, y] = forwardArgs(x, M, w, bias, out, accumulate);
  const int8: boolean = native.linearInt8(x, M, ...weightArgs(w, N, K), bias ?? null, y, accumulate);
  return { y, int8 };
}

/** dx[M,K] = dy[M,N]·W (input gradient through a frozen weight); `accumulate`: dx += dy·W into `out`. */
export function linearBackwardInput(
  dy: Float32Array,
  M: number,
  w: WeightTensor,
  out?: Float32Array,
  accumulate = false,
): Float32Array {
  const [N, K] = weightDims(w);
  checkDim(M, "M");
  if (!(dy instanceof Float32Array) || dy.length < M * N) throw new InvalidArgument(`dy must be a Float32Array of >= ${M}*${N}`);
  if (accumulate && out === undefined) throw new InvalidArgument("accumulate needs `out`");
  const dx = f32Buffer(out, M * K, "out");
  native.linearBackwardInput(dy, M, ...weightArgs(w, N, K), dx, accumulate);
  return dx;
}

/** The flat elements [start, start+len) of a weight as float32 (e.g. embedding rows of an nf4/bf16 table). */
export function decodeWeight(w: WeightTensor, start: number, len: number, out?: Float32Array): Float32Array {
  const [N, K] = weightDims(w);
  checkDim(start, "start");
  checkDim(len, "len");
  if (start + len > N * K) throw new InvalidArgument(`range [${start}, ${start + len}) is outside the ${N * K} elements`);
  const o = f32Buffer(out, len, "out");
  native.weightDecode(...weightArgs(w, N, K), start, len, o);
  return o;
}

export interface GemmOptions {
  transA?: boolean;
  transB?: boolean;
  alpha?: number;
  beta?: number;
  lda?: number;
  ldb?: number;
  ldc?: number;
}

/**
 * Dense f32 GEMM, row-major: C[M,N] = alpha·op(A)·op(B) + beta·C, op(A) [M,K], op(B) [K,N].
 * transA: A is stored [K,M]; transB: B is stored [N,K]. beta = 0 ignores C's contents. Returns C.
 */
export function gemm(
  M: number,
  N: number,
  K: number,
  A: Float32Array,
  B: Float32Array,
  C?: Float32Array,
  opts: GemmOptions = {},
): Float32Array {
  checkDim(M, "M");
  checkDim(N, "N");
  checkDim(K, "K");
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const lda = opts.lda ?? (transA ? M : K);
  const ldb = opts.ldb ?? (transB ? K : N);
  const ldc = opts.ldc ?? N;
  for (const [v, n] of [[lda, "lda"], [ldb, "ldb"], [ldc, "ldc"]] as const) checkDim(v, n);
  const c = C ?? new Float32Array(M * ldc);
  native.gemm(transA, transB, M, N, K, opts.alpha ?? 1, A, lda, B, ldb, C ? (opts.beta ?? 0) : 0, c, ldc);
  return c;
}
