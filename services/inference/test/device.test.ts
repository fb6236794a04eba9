/**
 * The inference service with its models on CUDA (`qlora serve --device cuda`): the engine worker loads
 * stories260K on the device, ListLoadedModels says so, and greedy / seeded Generate — base, adapters,
 * a concurrent mixed batch — gives the tokens of libs/model on the CPU. On a GPU machine, or here on
 * the CUDA emulator (`npm run test:cuda-emu`); elsewhere it skips with the reason.
 *
 * Equality of tokens holds because decode steps and prompts of <= 8 tokens run the fp32 GEMV path
 * (docs/cuda.md §6); stories260K's greedy margins were measured in libs/model's device test.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { Device } from "@qlora/proto";
import { generate, installAdapter, loadAdapter, loadModel, type LoadedModel } from "@qlora/model";
import { cudaInfo, setThreads } from "@qlora/kernels";
import { MODEL, TestStore, skipNoStories, startInference, type Running } from "./fixture.js";

const PROMPT = "Once upon a time";
const cuda = cudaInfo();
const skip: string | false = skipNoStories || (cuda.available ? false : `no CUDA device: ${cuda.reason}`);

let ts: TestStore;
let svc: Running;
let ref: LoadedModel;

before(async () => {
  if (skip) return;
  setThreads(1);
  ts = await TestStore.create();
  await ts.addAdapter("ad1", { seed: 11 });
  await ts.addAdapter("ad2", { seed: 12 });
  svc = await startInference(ts, { device: "cuda" });
  ref = await loadModel(await ts.modelDir(), { quant: "nf4", maxSequences: 2 });
  installAdapter(ref, 0, await loadAdapter(await ts.adapterDir("ad1"), ref));
  installAdapter(ref, 1, await loadAdapter(await ts.adapterDir("ad2"), ref));
});

after(async () => {
  if (skip) return;
  ref.dispose();
  await svc.close();
  await ts.dispose();
});

test("a service on CUDA: greedy Generate (base, adapters) = libs/model on the CPU; the model is reported on CUDA", { skip }, async () => {
  for (const [adapter, slot] of [["", -1], ["ad1", 0], ["ad2", 1]] as const) {
    const want = await generate(ref, { prompt: PROMPT, adapterSlot: slot, maxNewTokens: 24, temperature: 0 });
    const got = await svc.client.generate({ model: MODEL, adapter, prompt: PROMPT, maxNewTokens: 24 });
    assert.deepEqual(got.tokenIds, want.tokenIds, `adapter ${adapter || "(base)"}`);
  }
  const models = await svc.client.listLoadedModels({});
  assert.ok(models.models.length > 0 && models.models.every((m) => m.device === Device.CUDA), "every loaded base is on CUDA");
});

test("a service on CUDA: concurrent requests with two adapters and the base in one batch; seeded sampling", { skip }, async () => {
  // a 2-token prompt: three prefills packed together stay <= 8 tokens, the fp32 path (more would take
  // the bf16 GEMM, whose ~7e-2 logit error could flip a close greedy choice)
  const short = "Once";
  const reqs = [["ad1", 0], ["", -1], ["ad2", 1]] as const;
  const got = await Promise.all(reqs.map(([adapter]) => svc.client.generate({ model: MODEL, adapter, prompt: short, maxNewTokens: 16 })));
  for (let i = 0; i < reqs.length; i++) {
    const want = await generate(ref, { prompt: short, adapterSlot: reqs[i]![1], maxNewTokens: 16, temperature: 0 });
    assert.deepEqual(got[i]!.tokenIds, want.tokenIds, `request ${i} (${reqs[i]![0] || "base"})`);
  }
  const sampling = { temperature: 0.9, topK: 40, topP: 0.95, repetitionPenalty: 1.1, seed: 77n };
  const s = await svc.client.generate({ model: MODEL, adapter: "ad1", prompt: PROMPT, maxNewTokens: 16, sampling });
  const want = await generate(ref, { prompt: PROMPT, adapterSlot: 0, maxNewTokens: 16, temperature: 0.9, topK: 40, topP: 0.95, repetitionPenalty: 1.1, seed: 77n });
  assert.deepEqual(s.tokenIds, want.tokenIds, "seeded sampling on CUDA = on the CPU");
});
