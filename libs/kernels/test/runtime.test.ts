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
