/**
 * Counter-based seeding for everything random in training.
 *
 * Every random stream is a pure function of (run seed, stream id, counter): the data order of epoch e,
 * the dropout mask of global micro-step k, the LoRA initialisation. Nothing carries hidden state from
 * one step to the next, so a run resumed from a checkpoint draws exactly the numbers an uninterrupted
 * run would have drawn, and a checkpoint only has to record counters, not generator internals.
 *
 * Seeds are derived with SplitMix64 (BigInt, only a few calls per epoch); bulk draws (the Fisher–Yates
 * shuffle) use xoshiro128** on 32-bit integers, which is fast in JavaScript.
 */

const MASK64 = (1n << 64n) - 1n;

/** One SplitMix64 output for input state `x` (the finaliser applied to x + golden gamma). */
export function splitmix64(x: bigint): bigint {
  let z = (x + 0x9e3779b97f4a7c15n) & MASK64;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return (z ^ (z >> 31n)) & MASK64;
}

/** Stream ids: distinct constants so streams never collide for the same (seed, counter). */
export const Stream = {
  dataOrder: 0x0d47a0dd3ee5n,
  dropout: 0x0d50d50d50d5n,
  loraInit: 0x0117b1777e5en,
} as const;

/**
 * A 64-bit seed for (seed, stream, counter). Chained SplitMix64 so that neighbouring counters and
 * neighbouring user seeds give unrelated outputs.
 */
export function deriveSeed(seed: number | bigint, stream: bigint, counter: number | bigint): bigint {
  const s = BigInt.asUintN(64, BigInt(seed));
  let h = splitmix64(s ^ stream);
  h = splitmix64(h ^ BigInt.asUintN(64, BigInt(counter)));
  return h;
}

/** xoshiro128** (Blackman & Vigna), seeded from a 64-bit value through SplitMix64. */
export class Xoshiro128 {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(seed: bigint) {
    const a = splitmix64(seed);
    const b = splitmix64(a);
    this.s0 = Number(a & 0xffffffffn) | 0;
    this.s1 = Number(a >> 32n) | 0;
    this.s2 = Number(b & 0xffffffffn) | 0;
    this.s3 = Number(b >> 32n) | 0;
    // The all-zero state is a fixed point; SplitMix64 makes it practically impossible, but be exact.
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** Next uniform uint32. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /**
   * Uniform integer in [0, n), n ≤ 2^32, without modulo bias: Lemire's multiply-shift with rejection,
   * done with a 64-bit product split into two 32-bit halves.
   */
  below(n: number): number {
    if (!(n >= 1 && n <= 0x100000000)) throw new RangeError(`below(${n})`);
    if (n === 0x100000000) return this.nextU32();
    const threshold = (0x100000000 - n) % n;
    for (;;) {
      const x = this.nextU32();
      const lo = mulLo(x, n);
      if (lo >= threshold) return mulHi(x, n);
    }
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

// x, n < 2^32: the 64-bit product split exactly (doubles hold 53 bits, so split x into 16-bit halves).
function mulHi(x: number, n: number): number {
  const xh = x >>> 16;
  const xl = x & 0xffff;
  const hi = xh * n; // < 2^48
  const lo = xl * n; // < 2^48
  return Math.floor((hi + Math.floor(lo / 0x10000)) / 0x10000);
}
function mulLo(x: number, n: number): number {
  return Math.imul(x, n) >>> 0;
}

/**
 * The permutation of `n` items for epoch `epoch` of a run with seed `seed`: Fisher–Yates driven by
 * xoshiro128** seeded with deriveSeed(seed, dataOrder, epoch). Same inputs, same permutation, on any
 * machine; it does not (and cannot) reproduce torch's RandomSampler.
 */
export function epochPermutation(n: number, seed: number | bigint, epoch: number): Uint32Array {
  const perm = new Uint32Array(n);
  for (let i = 0; i < n; i++) perm[i] = i;
  const rng = new Xoshiro128(deriveSeed(seed, Stream.dataOrder, epoch));
  for (let i = n - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    const t = perm[i]!;
    perm[i] = perm[j]!;
    perm[j] = t;
  }
  return perm;
}
