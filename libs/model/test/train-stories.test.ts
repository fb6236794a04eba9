/**
 * End to end on the native engine: fine-tuning stories260K (NF4) on a few dozen lines of new text
 * drives the loss down and changes greedy generation; a run stopped after a checkpoint and resumed in
 * a fresh process state ends with the same adapter bytes as an uninterrupted run.
 * Skips until the engine has its LoRA training API (and when stories260K is absent).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Cancelled } from "@qlora/core";
import { NativeModel } from "@qlora/kernels";
import { loadModel, type LoadedModel } from "../src/loader.js";
import { generate } from "../src/generate.js";
import { installAdapter, loadAdapter } from "../src/adapter.js";
import { dataTokenizer, loadDataset } from "../src/data/index.js";
import { evalLossOf, train, type TrainEvent, type TrainModel, type TrainOptions } from "../src/train/index.js";
import { setup } from "./train-reference-engine.js";
import { skipNoStories, storiesDir } from "./fixtures.js";

const hasTrainingApi = typeof (NativeModel.prototype as unknown as Record<string, unknown>)["trainForwardBackward"] === "function";
const skip = skipNoStories || (hasTrainingApi ? false : "the native engine has no LoRA training API yet");

function asTrainModel(m: LoadedModel): TrainModel {
  return { engine: m.native, tokenizer: m.tokenizer, config: m.config };
}

async function greedy(m: LoadedModel, slot: number): Promise<string> {
  const r = await generate(m, { prompt: "Tom had a red", adapterSlot: slot, maxNewTokens: 32, temperature: 0 });
  return r.text;
}

test("fine-tuning stories260K lowers the loss and changes greedy generation", { skip }, async () => {
  const opts: TrainOptions = setup({ maxSteps: 60, lr: 2e-3, loggingSteps: 10, saveSteps: 0, target: "all-linear" });
  const m = await loadModel(storiesDir, { quant: "nf4", maxSequences: 2 });
  try {
    const before = await greedy(m, -1);
    const ds = await loadDataset(opts.data, dataTokenizer(m.tokenizer, m.config.padTokenId), { blockSize: 32 });
    const events: TrainEvent[] = [];
    const result = await train(opts, { model: asTrainModel(m), onEvent: (e) => events.push(e) });
    const logs = events.flatMap((e) => (e.type === "log" ? [e] : []));
    assert.equal(logs.length, 6);
    assert.ok(logs[logs.length - 1]!.loss < logs[0]!.loss * 0.8, `loss ${logs[0]!.loss} → ${logs[logs.length - 1]!.loss}`);
    // On the training text itself, the adapter (slot 0, still installed) beats the base model.
    const engine = m.native as unknown as Parameters<typeof evalLossOf>[0];
    const base = evalLossOf(engine, -1, ds, 2);
    const tuned = evalLossOf(engine, 0, ds, 2);
    assert.ok(tuned < base * 0.8, `eval loss base ${base} → tuned ${tuned}`);
    assert.equal(result.globalStep, 60);

    // The written adapter, loaded the way `qlora generate --adapter` does, changes the continuation.
    installAdapter(m, 1, await loadAdapter(opts.out, m));
    const after = await greedy(m, 1);
    assert.notEqual(after, before);
  } finally {
    m.dispose();
  }
});

test("stop after a checkpoint + resume = the uninterrupted adapter, byte for byte", { skip }, async () => {
  const base = setup({ maxSteps: 12, saveSteps: 4, saveTotalLimit: 2, loggingSteps: 2, lr: 1e-3 });
  const run = async (opts: TrainOptions, signal?: AbortSignal, onEvent?: (e: TrainEvent) => void) => {
    // A fresh model each time: nothing survives between runs but the files.
    const m = await loadModel(storiesDir, { quant: "nf4", maxSequences: 1 });
    try {
      return await train(opts, { model: asTrainModel(m), ...(signal ? { signal } : {}), ...(onEvent ? { onEvent } : {}) });
    } finally {
      m.dispose();
    }
  };
  await run(base);
  const resumedOut = base.out + "-resumed";
  const ac = new AbortController();
  await assert.rejects(
    run({ ...base, out: resumedOut }, ac.signal, (e) => {
      if (e.type === "checkpoint" && e.step === 8) ac.abort();
    }),
    Cancelled,
  );
  const r = await run({ ...base, out: resumedOut, resume: true });
  assert.equal(r.resumedFromStep, 8);
  const a = readFileSync(join(base.out, "adapter_model.safetensors"));
  const b = readFileSync(join(resumedOut, "adapter_model.safetensors"));
  assert.ok(a.equals(b), "adapter bytes differ after resume");
});
