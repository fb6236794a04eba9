// Seeded test data shared by the engine / ops / backward / training / CUDA tests. (The NF4 and
// matmul tests draw from matmul_fixtures.ts's generator, so their fixtures stay as they are.)

/** xorshift32 in [0, 1): the same sequence for the same seed on every run. */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 4294967296;
  };
}

/** n values uniform in [-scale, scale) drawn from r. */
export function uniformSigned(n: number, r: () => number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * scale;
  return a;
}
