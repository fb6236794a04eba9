// Test helpers shared by the engine / backward / training tests: weight tensors from float arrays,
// float64 math the references need, gradient comparison, the real stories260K checkpoint, and the
// forwardSample check both engines run.
// (Seeded random data is in random.ts; the matmul tests' fixtures in matmul_fixtures.ts.)
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { quantizeNf4, sampleToken, seedRng, type NativeModel, type SamplingParams, type WeightTensor } from "../src/index.js";

/** n values uniform in [lo, hi) drawn from r. */
export function rand(n: number, r: () => number, lo = -1, hi = 1): Float32Array {
  return Float32Array.from({ length: n }, () => lo + (hi - lo) * r());
}

/** An f32 weight viewing `a`'s bytes (no copy). */
export function f32Tensor(a: Float32Array, shape: number[]): WeightTensor {
  return { dtype: "f32", shape, data: new Uint8Array(a.buffer, a.byteOffset, a.byteLength) };
}

/** A bf16 weight from `a` by truncation (the tests compare against the decoded values, so any bf16 value will do). */
export function bf16Tensor(a: Float32Array, shape: number[]): WeightTensor {
  const u = new Uint16Array(a.length);
  const bits = new Uint32Array(a.buffer, a.byteOffset, a.length);
  for (let i = 0; i < a.length; i++) u[i] = bits[i]! >>> 16;
  return { dtype: "bf16", shape, data: new Uint8Array(u.buffer) };
}

/** An NF4 weight quantized from `a` (fp32 absmax per block). */
export function nf4Tensor(a: Float32Array, shape: number[], blocksize = 32): WeightTensor {
  const q = quantizeNf4(a, "f32", a.length, blocksize);
  return { dtype: "nf4", shape, data: q.packed, absmax: q.absmax, blocksize };
}

/** erf in float64 (Taylor series, converged to 1e-17 relative; ±1 beyond |x| > 5), for the GELU references. */
export function erf(x: number): number {
  if (Math.abs(x) > 5) return Math.sign(x);
  let term = x, sum = x;
  for (let n = 1; n < 200; n++) {
    term *= (-x * x) / n;
    const t = term / (2 * n + 1);
    sum += t;
    if (Math.abs(t) < 1e-17 * Math.abs(sum)) break;
  }
  return (2 / Math.sqrt(Math.PI)) * sum;
}

/**
 * max |a - b| <= rtol · max |b| + atol: a gradient `a` against a reference `b`, scaled by the
 * reference's largest entry (a finite difference is only accurate relative to the whole gradient).
 * `nonZeroReference`: also fail when the reference is all zeros (a test that could not fail).
 */
export function assertGradClose(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  what: string,
  rtol: number,
  atol: number,
  opts: { nonZeroReference?: boolean } = {},
): void {
  assert.equal(a.length, b.length, `${what}: lengths differ`);
  let scale = 0, err = 0, at = 0;
  for (let i = 0; i < b.length; i++) scale = Math.max(scale, Math.abs(b[i]!));
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= err)) {
      err = d;
      at = i;
    }
  }
  if (opts.nonZeroReference) assert.ok(scale > 0 || err <= atol, `${what}: reference gradient is all zero`);
  assert.ok(err <= rtol * scale + atol, `${what}: max |diff| ${err} at ${at} (${a[at]} vs ${b[at]}) > ${rtol} · ${scale} + ${atol}`);
}

/** ../shared/models/stories260K relative to the repository root (this file runs from libs/kernels/dist/test/). */
export const storiesDir: string =
  process.env.QLORA_STORIES_DIR ?? resolve(dirname(fileURLToPath(import.meta.url)), "../../../../../shared/models/stories260K");

/** Minimal safetensors reader: u64 header size, JSON header, raw little-endian data. */
export function readSafetensors(path: string): Map<string, { dtype: string; shape: number[]; data: Uint8Array }> {
  const buf = readFileSync(path);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8")) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const out = new Map<string, { dtype: string; shape: number[]; data: Uint8Array }>();
  for (const [name, e] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    // copy: a fresh ArrayBuffer keeps f32 data 4-byte aligned whatever the header length
    out.set(name, { dtype: e.dtype, shape: e.shape, data: new Uint8Array(buf.subarray(8 + n + e.data_offsets[0], 8 + n + e.data_offsets[1])) });
  }
  return out;
}

/**
 * NativeModel.forwardSample against forward + sampleToken on the same model: each step runs the
 * same rows twice, on twin sequences (so the logits are the same), and every sampled token must be
 * sampleToken's over forward's logits with a twin RNG; null rows give -1; the RNGs end equal. Row 0
 * greedy, row 1 temperature + top-k + top-p + repetition penalty over its context, row 2 never
 * sampled (its first step a prompt chunk), row 3 the full distribution with a penalty (two
 * penalised rows: each its own context). Seven steps: a prefill, then decode steps fed with the
 * sampled tokens; step 2 samples no row at all. The model needs 8 free sequences.
 */
export function checkForwardSample(m: NativeModel, vocab: number, adapters: readonly number[]): void {
  const specs: (SamplingParams | null)[] = [
    { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 },
    { temperature: 0.8, topK: 5, topP: 0.9, repetitionPenalty: 1.3 },
    null,
    { temperature: 4, topK: 0, topP: 1, repetitionPenalty: 1.2 },  // hot: tiny random models' logits can be peaked
  ];
  const seqsA = specs.map(() => m.createSequence()), seqsB = specs.map(() => m.createSequence());
  const rngA = specs.map((_, i) => seedRng(BigInt(40 + i))), rngB = specs.map((_, i) => seedRng(BigInt(40 + i)));
  const context = specs.map((_, i) => Array.from({ length: 2 + 2 * i }, (_, j) => (j * 31 + i * 17 + 3) % vocab));
  let tokens = context.map((c) => Int32Array.from(c));
  let nonGreedy = 0;
  for (let step = 0; step < 7; step++) {
    const rows = (seqs: number[]) => tokens.map((t, i) => ({ seq: seqs[i]!, tokens: t, adapter: adapters[i % adapters.length]! }));
    const recent = (i: number) => (specs[i]!.repetitionPenalty !== 1 ? Int32Array.from(context[i]!) : null);
    const stepSpecs = step === 2 ? specs.map(() => null) : specs;
    const logits = m.forward(rows(seqsA));
    const want = stepSpecs.map((p, i) => (p ? sampleToken(logits, i * vocab, vocab, p, recent(i), rngA[i]!) : -1));
    const got = m.forwardSample(rows(seqsB), stepSpecs.map((p, i) => (p ? { params: p, recent: recent(i), rng: rngB[i]! } : null)));
    assert.deepEqual(Array.from(got), want, `step ${step}`);
    stepSpecs.forEach((p, i) => {
      let best = 0;
      for (let v = 1; v < vocab; v++) if (logits[i * vocab + v]! > logits[i * vocab + best]!) best = v;
      if (p && p.temperature > 0 && want[i] !== best) nonGreedy++;
    });
    tokens = want.map((t, i) => Int32Array.of(t >= 0 ? t : (step * 7 + i) % vocab));
    tokens.forEach((t, i) => context[i]!.push(t[0]!));
  }
  rngA.forEach((r, i) => assert.deepEqual(rngB[i], r, `rng ${i} advanced as sampleToken's`));
  assert.ok(nonGreedy > 0, "the temperature rows drew tokens other than the argmax");
  for (const s of [...seqsA, ...seqsB]) m.dropSequence(s);
}
