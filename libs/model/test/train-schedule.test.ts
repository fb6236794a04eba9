/** LR schedules against values computed by hand from the HF formulas. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { InvalidArgument } from "@qlora/core";
import { learningRateAt, lrLambda, parseScheduler } from "../src/train/index.js";

const close = (a: number, b: number) => assert.ok(Math.abs(a - b) < 1e-12, `${a} != ${b}`);

test("linear with warmup: ramps from 0, then decays to 0 at total", () => {
  const s = { scheduler: "linear" as const, warmupSteps: 2, totalSteps: 10 };
  // Optimizer step k uses lambda(k - 1).
  const expected = [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8];
  expected.forEach((v, i) => close(learningRateAt(1e-3, s, i + 1), 1e-3 * v));
  close(lrLambda(s, 10), 0);
  close(lrLambda(s, 12), 0); // never negative
});

test("linear without warmup (the default): full lr at step 1", () => {
  const s = { scheduler: "linear" as const, warmupSteps: 0, totalSteps: 4 };
  [2e-4, 1.5e-4, 1e-4, 0.5e-4].forEach((v, i) => close(learningRateAt(2e-4, s, i + 1), v));
});

test("cosine with and without warmup", () => {
  const s = { scheduler: "cosine" as const, warmupSteps: 0, totalSteps: 10 };
  close(lrLambda(s, 0), 1);
  close(lrLambda(s, 5), 0.5);
  close(lrLambda(s, 10), 0);
  close(lrLambda(s, 2), 0.5 * (1 + Math.cos(Math.PI * 0.2)));
  const w = { scheduler: "cosine" as const, warmupSteps: 4, totalSteps: 12 };
  close(lrLambda(w, 1), 0.25);
  close(lrLambda(w, 4), 1);
  close(lrLambda(w, 8), 0.5); // halfway through the 8 decay steps
});

test("constant (with warmup = constant_with_warmup)", () => {
  const s = { scheduler: "constant" as const, warmupSteps: 4, totalSteps: 100 };
  assert.deepEqual([0, 1, 2, 3, 4, 50, 100].map((k) => lrLambda(s, k)), [0, 0.25, 0.5, 0.75, 1, 1, 1]);
  close(lrLambda({ scheduler: "constant", warmupSteps: 0, totalSteps: 3 }, 0), 1);
});

test("scheduler names", () => {
  assert.equal(parseScheduler("cosine"), "cosine");
  assert.throws(() => parseScheduler("polynomial"), (e: unknown) => e instanceof InvalidArgument && /unknown scheduler "polynomial"/.test((e as Error).message));
});
