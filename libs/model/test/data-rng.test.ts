/**
 * The random streams that fix data order and dropout: xoshiro128** and the bounded draw against a
 * straightforward BigInt reference, and the seed derivation's basic properties.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { deriveSeed, epochPermutation, splitmix64, Stream, Xoshiro128 } from "../src/data/index.js";

const M32 = 0xffffffffn;
const rotl = (x: bigint, k: bigint): bigint => ((x << k) | (x >> (32n - k))) & M32;

/** xoshiro128** written directly from its definition, on BigInt. */
class RefXoshiro {
  s: bigint[];
  constructor(seed: bigint) {
    const a = splitmix64(seed);
    const b = splitmix64(a);
    this.s = [a & M32, a >> 32n, b & M32, b >> 32n];
  }
  next(): bigint {
    const s = this.s;
    const result = (rotl((s[1]! * 5n) & M32, 7n) * 9n) & M32;
    const t = (s[1]! << 9n) & M32;
    s[2]! ^= s[0]!;
    s[3]! ^= s[1]!;
    s[1]! ^= s[2]!;
    s[0]! ^= s[3]!;
    s[2]! ^= t;
    s[3] = rotl(s[3]!, 11n);
    return result;
  }
  below(n: bigint): bigint {
    const threshold = ((1n << 32n) - n) % n;
    for (;;) {
      const m = this.next() * n;
      if ((m & M32) >= threshold) return m >> 32n;
    }
  }
}

test("splitmix64 matches its published first outputs for state 0", () => {
  // SplitMix64 seeded with 0: the generator adds the gamma first, so outputs are f(gamma), f(2·gamma), …
  let state = 0n;
  const out: bigint[] = [];
  for (let i = 0; i < 3; i++) {
    out.push(splitmix64(state));
    state = (state + 0x9e3779b97f4a7c15n) & ((1n << 64n) - 1n);
  }
  assert.deepEqual(out, [0xe220a8397b1dcdafn, 0x6e789e6aa1b965f4n, 0x06c45d188009454fn]);
});

test("xoshiro128** and bounded draws equal the BigInt reference", () => {
  for (const seed of [0n, 42n, 0xdeadbeefcafebaben]) {
    const a = new Xoshiro128(seed);
    const b = new RefXoshiro(seed);
    for (let i = 0; i < 2000; i++) assert.equal(BigInt(a.nextU32()), b.next());
    for (const n of [1, 2, 3, 7, 10, 1000, 2 ** 31 + 11, 2 ** 32 - 5]) {
      for (let i = 0; i < 200; i++) assert.equal(BigInt(a.below(n)), b.below(BigInt(n)));
    }
  }
});

test("permutations: valid, reproducible, roughly uniform", () => {
  const counts = new Array(5 * 5).fill(0);
  const trials = 5000;
  for (let e = 0; e < trials; e++) {
    const p = epochPermutation(5, 7, e);
    for (let i = 0; i < 5; i++) counts[i * 5 + p[i]!]++;
  }
  // Each position takes each value with probability 1/5: 1000 ± a generous 5 sigma (≈ 141).
  for (const c of counts) assert.ok(Math.abs(c - trials / 5) < 141, `count ${c}`);
  assert.deepEqual(epochPermutation(0, 1, 0), new Uint32Array(0));
  assert.deepEqual(epochPermutation(1, 1, 0), Uint32Array.from([0]));
});

test("derived seeds differ across streams, counters and seeds", () => {
  const seen = new Set<bigint>();
  for (const stream of [Stream.dataOrder, Stream.dropout, Stream.loraInit]) {
    for (const seed of [0, 1, 42]) for (let c = 0; c < 50; c++) seen.add(deriveSeed(seed, stream, c));
  }
  assert.equal(seen.size, 3 * 3 * 50);
  assert.equal(deriveSeed(42, Stream.dropout, 7), deriveSeed(42n, Stream.dropout, 7n));
});
