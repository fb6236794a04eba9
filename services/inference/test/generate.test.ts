/**
 * Generate / GenerateStream / Score against libs/model run in-process on the same checkpoint:
 * the service must give exactly what single-sequence generate() and evaluate() give, through a
 * Connect client and a @grpc/grpc-js generic client.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type * as grpc from "@grpc/grpc-js";
import { create } from "@bufbuild/protobuf";
import { FinishReason, GenerateRequestSchema, Quantization, type GenerateResponse, type GenerateStreamResponse } from "@qlora/proto";
import { evaluate, generate, installAdapter, loadAdapter, loadModel, type LoadedModel } from "@qlora/model";
import { setThreads } from "@qlora/kernels";
import { MODEL, TestStore, grpcClient, skipNoStories, startInference, storiesDir, type Running } from "./fixture.js";

const PROMPT = "Once upon a time";
let ts: TestStore;
let svc: Running;
/** libs/model's own view of the same files: the reference the service must match. */
let ref: LoadedModel;

before(async () => {
  if (skipNoStories) return;
  // One kernel thread, like the service's worker here: on a shared 2-core machine a 2-thread
  // pool's barriers wait on descheduled threads and a tiny model runs 100x slower.
  setThreads(1);
  ts = await TestStore.create();
  await ts.addAdapter("ad1", { seed: 11 });
  await ts.addAdapter("ad2", { seed: 12 });
  svc = await startInference(ts);
  ref = await loadModel(await ts.modelDir(), { quant: "nf4", maxSequences: 2 });
  installAdapter(ref, 0, await loadAdapter(await ts.adapterDir("ad1"), ref));
  installAdapter(ref, 1, await loadAdapter(await ts.adapterDir("ad2"), ref));
});

after(async () => {
  if (skipNoStories) return;
  ref.dispose();
  await svc.close();
  await ts.dispose();
});

test("greedy Generate equals libs/model generate(), for the base and for adapters", { skip: skipNoStories }, async () => {
  const outputs = new Set<string>();
  for (const [adapter, slot] of [["", -1], ["ad1", 0], ["ad2", 1]] as const) {
    const want = await generate(ref, { prompt: PROMPT, adapterSlot: slot, maxNewTokens: 40, temperature: 0 });
    const got = await svc.client.generate({ model: MODEL, adapter, prompt: PROMPT, maxNewTokens: 40 });
    assert.deepEqual(got.tokenIds, want.tokenIds, `adapter ${adapter || "(base)"}`);
    assert.equal(got.text, want.text);
    assert.equal(got.finishReason, FinishReason.LENGTH);
    assert.deepEqual(
      { p: got.usage!.promptTokens, c: got.usage!.completionTokens, t: got.usage!.totalTokens },
      { p: want.usage.promptTokens, c: 40, t: want.usage.promptTokens + 40 },
    );
    const tm = got.timings!;
    assert.ok(tm.timeToFirstTokenMs > 0 && tm.totalMs >= tm.timeToFirstTokenMs && tm.tokensPerSecond > 0);
    assert.ok(tm.queueMs >= 0 && tm.queueMs <= tm.timeToFirstTokenMs);
    outputs.add(got.text);
  }
  assert.equal(outputs.size, 3, "each adapter changes the output (otherwise this test proves little)");
});

test("quant NONE reproduces the reference greedy continuation token for token", { skip: skipNoStories }, async () => {
  const reference = JSON.parse(readFileSync(join(storiesDir, "reference.json"), "utf8")) as {
    greedy: { prompt: string; new_ids: number[]; new_tokens: number };
  };
  const got = await svc.client.generate({
    model: MODEL,
    prompt: reference.greedy.prompt,
    maxNewTokens: reference.greedy.new_tokens,
    quant: Quantization.NONE,
  });
  assert.deepEqual(got.tokenIds, reference.greedy.new_ids);
  const models = await svc.client.listLoadedModels({});
  const quants = models.models.filter((m) => m.name === MODEL).map((m) => m.quant).sort();
  assert.deepEqual(quants, [Quantization.NF4, Quantization.NONE]);
  assert.ok(models.models.every((m) => m.residentBytes > 0n && m.modelType === "llama"));
});

test("the model may be left out: the adapter's base, or the only loaded model", { skip: skipNoStories }, async () => {
  const want = await generate(ref, { prompt: PROMPT, adapterSlot: 0, maxNewTokens: 10, temperature: 0 });
  const viaAdapter = await svc.client.generate({ adapter: "ad1", prompt: PROMPT, maxNewTokens: 10 });
  assert.deepEqual(viaAdapter.tokenIds, want.tokenIds);
  const base = await generate(ref, { prompt: PROMPT, maxNewTokens: 10, temperature: 0 });
  const onlyLoaded = await svc.client.generate({ prompt: PROMPT, maxNewTokens: 10 });
  assert.deepEqual(onlyLoaded.tokenIds, base.tokenIds);
});

test("seeded sampling: same seed, same output, equal to generate() with that seed", { skip: skipNoStories }, async () => {
  const sampling = { temperature: 0.9, topK: 40, topP: 0.95, repetitionPenalty: 1.1, seed: 1234n };
  const a = await svc.client.generate({ model: MODEL, adapter: "ad1", prompt: PROMPT, maxNewTokens: 30, sampling });
  const b = await svc.client.generate({ model: MODEL, adapter: "ad1", prompt: PROMPT, maxNewTokens: 30, sampling });
  assert.deepEqual(a.tokenIds, b.tokenIds);
  const want = await generate(ref, {
    prompt: PROMPT,
    adapterSlot: 0,
    maxNewTokens: 30,
    temperature: 0.9,
    topK: 40,
    topP: 0.95,
    repetitionPenalty: 1.1,
    seed: 1234n,
  });
  assert.deepEqual(a.tokenIds, want.tokenIds);
  const c = await svc.client.generate({ model: MODEL, adapter: "ad1", prompt: PROMPT, maxNewTokens: 30, sampling: { ...sampling, seed: 99n } });
  assert.notDeepEqual(c.tokenIds, a.tokenIds, "another seed, another sample");
});

test("GenerateStream: deltas concatenate to the Generate text; the last message finishes", { skip: skipNoStories }, async () => {
  const req = { model: MODEL, adapter: "ad2", prompt: PROMPT, maxNewTokens: 48 };
  const full = await svc.client.generate(req);
  const msgs: GenerateStreamResponse[] = [];
  for await (const m of svc.client.generateStream(req)) msgs.push(m);
  assert.ok(msgs.length >= 48, "one message per token (+ the final one)");
  assert.equal(msgs.map((m) => m.text).join(""), full.text);
  assert.deepEqual(msgs.flatMap((m) => m.tokenIds), full.tokenIds);
  const last = msgs.at(-1)!;
  assert.equal(last.finishReason, FinishReason.LENGTH);
  assert.equal(last.usage!.completionTokens, 48);
  assert.ok(last.timings!.timeToFirstTokenMs > 0);
  assert.ok(msgs.slice(0, -1).every((m) => m.finishReason === FinishReason.UNSPECIFIED && m.usage === undefined));
});

test("stop strings cut the text and finish with STOP, like generate()", { skip: skipNoStories }, async () => {
  const want = await generate(ref, { prompt: PROMPT, maxNewTokens: 60, temperature: 0, stop: ["Lily"] });
  assert.equal(want.finishReason, "stop");
  const got = await svc.client.generate({ model: MODEL, prompt: PROMPT, maxNewTokens: 60, stop: ["Lily"] });
  assert.equal(got.finishReason, FinishReason.STOP);
  assert.equal(got.text, want.text);
  assert.ok(!got.text.includes("Lily"));
  assert.deepEqual(got.tokenIds, want.tokenIds);
});

test("Score equals evaluate() (token-weighted mean CE), base and adapter; reference CE with NONE", { skip: skipNoStories }, async () => {
  const texts = ["Once upon a time, there was a little girl named Lily.", "The cat sat on the mat. It was happy.", "Tom had a red ball."];
  for (const [adapter, slot] of [["", -1], ["ad1", 0]] as const) {
    const want = await evaluate(ref, texts, slot);
    const got = await svc.client.score({ model: MODEL, adapter, texts });
    assert.ok(Math.abs(got.loss - want.loss) < 1e-9, `${adapter}: ${got.loss} vs ${want.loss}`);
    assert.equal(Number(got.tokens), want.tokens);
    assert.ok(Math.abs(got.perplexity - Math.exp(want.loss)) < 1e-6);
    assert.equal(got.losses.length, 3);
    for (const [i, t] of texts.entries()) {
      const one = await evaluate(ref, [t], slot);
      assert.ok(Math.abs(got.losses[i]! - one.loss) < 1e-9);
    }
  }
  // A text longer than the 512-token context is scored in windows, exactly like evaluate().
  const long = "Once upon a time, there was a little girl named Lily. She loved to play outside. ".repeat(40);
  const longWant = await evaluate(ref, [long]);
  assert.ok(longWant.tokens > 512);
  const longGot = await svc.client.score({ model: MODEL, texts: [long] });
  assert.ok(Math.abs(longGot.loss - longWant.loss) < 1e-9);
  assert.equal(Number(longGot.tokens), longWant.tokens);
  const reference = JSON.parse(readFileSync(join(storiesDir, "reference.json"), "utf8")) as {
    cross_entropy: { text: string; mean_next_token_ce: number };
  };
  const none = await svc.client.score({ model: MODEL, texts: [reference.cross_entropy.text], quant: Quantization.NONE });
  assert.ok(Math.abs(none.loss - reference.cross_entropy.mean_next_token_ce) < 1e-4, `${none.loss}`);
});

test("a @grpc/grpc-js generic client: unary Generate and server-streaming GenerateStream", { skip: skipNoStories }, async () => {
  const client = grpcClient(svc.server.address);
  try {
    const req = create(GenerateRequestSchema, { model: MODEL, adapter: "ad1", prompt: PROMPT, maxNewTokens: 20 });
    const unary = await new Promise<GenerateResponse>((resolve, reject) =>
      client.Generate!(req, (err: grpc.ServiceError | null, res: GenerateResponse) => (err ? reject(err) : resolve(res))),
    );
    const want = await generate(ref, { prompt: PROMPT, adapterSlot: 0, maxNewTokens: 20, temperature: 0 });
    assert.deepEqual(unary.tokenIds, want.tokenIds);
    const stream = client.GenerateStream!(req) as grpc.ClientReadableStream<GenerateStreamResponse>;
    const msgs: GenerateStreamResponse[] = [];
    await new Promise<void>((resolve, reject) => {
      stream.on("data", (m: GenerateStreamResponse) => msgs.push(m));
      stream.on("error", reject);
      stream.on("end", () => resolve());
    });
    assert.equal(msgs.map((m) => m.text).join(""), want.text);
    assert.equal(msgs.at(-1)!.finishReason, FinishReason.LENGTH);
    assert.equal(msgs.at(-1)!.usage!.completionTokens, 20);
  } finally {
    client.close();
  }
});
