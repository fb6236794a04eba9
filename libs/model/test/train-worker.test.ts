/** trainInWorker: the loop in a worker thread, events streamed back, cancellation and errors. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Cancelled, InvalidArgument } from "@qlora/core";
import { train, trainInWorker, type TrainEvent } from "../src/train/index.js";
import { referenceModel, setup } from "./train-reference-engine.js";
import { skipNoStories, storiesDir } from "./fixtures.js";

const loaderModule = new URL("./train-reference-engine.js", import.meta.url).href;

test("a worker run streams events and writes the same adapter as a run on this thread", { skip: skipNoStories }, async () => {
  const opts = setup({ maxSteps: 6, loggingSteps: 2, saveSteps: 3 });
  const events: TrainEvent[] = [];
  const result = await trainInWorker(opts, { loaderModule, onEvent: (e) => events.push(e) });
  assert.equal(result.globalStep, 6);
  assert.deepEqual(
    events.map((e) => e.type),
    ["start", "step", "step", "log", "step", "checkpoint", "step", "log", "step", "step", "log", "checkpoint", "end"],
  );

  const here = { ...opts, out: opts.out + "-here" };
  await train(here, { model: await referenceModel(storiesDir) });
  assert.ok(readFileSync(join(opts.out, "adapter_model.safetensors")).equals(readFileSync(join(here.out, "adapter_model.safetensors"))));
});

test("cancelling a worker run stops it with Cancelled; bad options come back as InvalidArgument", { skip: skipNoStories }, async () => {
  const ac = new AbortController();
  await assert.rejects(
    trainInWorker(setup({ loggingSteps: 1, saveSteps: 0 }), {
      loaderModule,
      signal: ac.signal,
      onEvent: (e) => {
        if (e.type === "log" && e.step === 2) ac.abort();
      },
    }),
    (e: unknown) => e instanceof Cancelled && /cancelled at step/.test((e as Error).message),
  );
  await assert.rejects(
    trainInWorker(setup({ rank: -1 }), { loaderModule }),
    (e: unknown) => e instanceof InvalidArgument && /rank must be an integer/.test((e as Error).message),
  );
  await assert.rejects(
    trainInWorker(setup({ target: "wq" }), { loaderModule }),
    (e: unknown) => e instanceof InvalidArgument && /unknown target module "wq"/.test((e as Error).message),
  );
});
