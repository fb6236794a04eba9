import { test } from "node:test";
import assert from "node:assert/strict";
import { cpuInfo, setSimd, setThreads } from "../src/index.js";

test("cpuInfo reports the dispatch level and threads", () => {
  const info = cpuInfo();
  assert.ok(["scalar", "avx2", "avx512"].includes(info.simd));
  assert.ok(info.threads >= 1);
  if (!info.avx2) assert.equal(info.simd, "scalar");
});

test("setSimd caps the level and never exceeds the CPU's", () => {
  const best = cpuInfo().simd;
  assert.equal(setSimd("scalar"), "scalar");
  const back = setSimd("avx512");
  assert.equal(back, best === "scalar" ? "scalar" : cpuInfo().avx512 ? "avx512" : "avx2");
  assert.throws(() => setSimd("sse9" as never), /simd level/);
});

test("setThreads resizes the pool", () => {
  assert.equal(setThreads(1), 1);
  assert.equal(setThreads(3), 3);
  assert.ok(setThreads(0) >= 1);
});

test("the thread pool visits every item exactly once per region, for any thread count", async () => {
  const { native } = await import("../src/native.js");
  for (const threads of [2, 3, 4, 7, 1, 2]) {
    setThreads(threads);
    // Back-to-back regions of different sizes: parts a region lacks must never be run by a
    // worker that woke late for the previous region.
    for (const [n, grain] of [[1, 1], [5, 1], [97, 8], [4096, 64], [3, 1]] as const) {
      assert.equal(native.poolSelfTest(n, grain, 300), 0, `threads ${threads}, n ${n}`);
    }
  }
  setThreads(0);
});
