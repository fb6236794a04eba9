/** Request → effective request → runner options; target checks; the dataset scanner. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FailedPrecondition, InvalidArgument } from "@qlora/core";
import { CreateJobRequestSchema, Device, Quantization, Scheduler } from "@qlora/proto";
import { checkTargets, fromFloat32, runnerOptions, scanDataset, withDefaults } from "../src/index.js";

/** What the server receives: the request after a trip through the wire (floats become float32). */
function wire(init: Parameters<typeof create<typeof CreateJobRequestSchema>>[1]) {
  return fromBinary(CreateJobRequestSchema, toBinary(CreateJobRequestSchema, create(CreateJobRequestSchema, init)));
}

test("a bare request gets the classic example's defaults, and the runner the CLI's option values", () => {
  const eff = withDefaults(wire({ baseModel: "m", dataset: "d" }));
  const o = runnerOptions(eff);
  assert.deepEqual(o, {
    rank: 8,
    alpha: 16,
    dropout: 0.05,
    target: ["q_proj", "v_proj"],
    useRslora: false,
    epochs: 3,
    maxSteps: 0,
    batchSize: 2,
    gradAccum: 1,
    blockSize: 64,
    lr: 2e-4,
    scheduler: "linear",
    warmupSteps: 0,
    weightDecay: 0,
    maxGradNorm: 1,
    seed: 42,
    saveSteps: 10,
    loggingSteps: 5,
    packing: false,
    quant: "nf4",
    device: "cpu",
    gradientCheckpointing: true,
  });
  assert.equal(eff.outputAdapter, "", "filled with the job id by CreateJob");
});

test("training.device: AUTO / unspecified take the trainer's device, CPU stays, CUDA needs a CUDA trainer", () => {
  const dev = (d: Device | undefined, service: "cpu" | "cuda") =>
    runnerOptions(withDefaults(wire({ baseModel: "m", dataset: "d", training: d === undefined ? {} : { device: d } }), service)).device;
  assert.equal(dev(undefined, "cpu"), "cpu");
  assert.equal(dev(undefined, "cuda"), "cuda");
  assert.equal(dev(Device.AUTO, "cpu"), "cpu");
  assert.equal(dev(Device.AUTO, "cuda"), "cuda");
  assert.equal(dev(Device.CPU, "cuda"), "cpu");
  assert.equal(dev(Device.CUDA, "cuda"), "cuda");
  assert.equal(withDefaults(wire({ baseModel: "m", dataset: "d", training: { device: Device.AUTO } }), "cuda").training?.device, Device.CUDA,
    "the effective request names the device used");
  assert.throws(() => dev(Device.CUDA, "cpu"), (e: unknown) => e instanceof FailedPrecondition && /CUDA is not available/.test(e.message));
  assert.throws(() => dev(7 as Device, "cpu"), InvalidArgument);
});

test("given values pass through exactly, float32 noise removed", () => {
  const eff = withDefaults(
    wire({
      baseModel: "m",
      dataset: "d",
      lora: { rank: 16, alpha: 32, dropout: 0.1, targetModules: [" q_proj ", "v_proj", "q_proj"], useRslora: true },
      training: {
        epochs: 1.5,
        maxSteps: 7,
        batchSize: 4,
        gradAccum: 2,
        blockSize: 128,
        learningRate: 3e-5,
        scheduler: Scheduler.COSINE,
        warmupSteps: 3,
        weightDecay: 0.01,
        maxGradNorm: 0.3,
        seed: 7n,
        saveSteps: 2,
        saveTotalLimit: 3,
        loggingSteps: 1,
        evalSteps: 4,
        packing: true,
        quant: Quantization.NONE,
        gradientCheckpointingOff: true,
      },
    }),
  );
  const o = runnerOptions(eff);
  assert.equal(Math.fround(3e-5) === 3e-5, false, "the wire does lose precision");
  assert.deepEqual(
    [o.rank, o.alpha, o.dropout, o.target, o.useRslora, o.epochs, o.maxSteps, o.batchSize, o.gradAccum, o.blockSize, o.lr, o.scheduler],
    [16, 32, 0.1, ["q_proj", "v_proj"], true, 1.5, 7, 4, 2, 128, 3e-5, "cosine"],
  );
  assert.deepEqual(
    [o.warmupSteps, o.weightDecay, o.maxGradNorm, o.seed, o.saveSteps, o.loggingSteps, o.evalSteps, o.packing, o.quant, o.gradientCheckpointing],
    [3, 0.01, 0.3, 7, 2, 1, 4, true, "none", false],
  );
  assert.equal(eff.training?.saveTotalLimit, 3);
  // Seed 0 is a seed, not "unset" (the field is optional on the wire).
  assert.equal(runnerOptions(withDefaults(wire({ baseModel: "m", dataset: "d", training: { seed: 0n } }))).seed, 0);
});

test("fromFloat32 recovers typed decimals and leaves others alone", () => {
  for (const x of [2e-4, 1e-3, 0.05, 0.1, 0.3, 1.5, 3e-5, 16, 1e-8]) assert.equal(fromFloat32(Math.fround(x)), x);
  assert.equal(fromFloat32(0), 0);
  assert.equal(fromFloat32(-0.5), -0.5);
});

test("checkTargets follows PEFT's suffix rule per architecture", () => {
  const llama = { family: "llama" as const, numLayers: 2 };
  checkTargets(llama, ["q_proj", "self_attn.v_proj", "mlp.down_proj", "model.layers.1.self_attn.o_proj"]);
  checkTargets(llama, ["all-linear"]);
  assert.throws(() => checkTargets(llama, ["fc1"]), /unknown target module "fc1" for a llama model/);
  assert.throws(() => checkTargets(llama, ["model.layers.2.self_attn.q_proj"]), /unknown target module/);
  const opt = { family: "opt" as const, numLayers: 2 };
  checkTargets(opt, ["fc1", "fc2", "out_proj", "model.decoder.layers.0.self_attn.q_proj"]);
  assert.throws(() => checkTargets(opt, ["o_proj"]), /valid target modules: q_proj, k_proj, v_proj, out_proj, fc1, fc2 or all-linear/);
});

test("scanDataset counts lines and records, names the line at fault, streams across chunk boundaries", async () => {
  const dir = await mkdtemp(path.join(tmpdir(), "qlora-scan-"));
  const f = async (name: string, content: string | Buffer) => {
    const p = path.join(dir, name);
    await writeFile(p, content);
    return p;
  };
  assert.deepEqual(await scanDataset(await f("a.txt", "one\n\ntwo\r\nthree"), "txt", "a"), { format: "txt", examples: 3, kinds: [] });
  const chat = JSON.stringify({ messages: [{ role: "user", content: "x" }] });
  const big = Array.from({ length: 5000 }, (_, i) => JSON.stringify({ text: `example ${i} ${"é".repeat(i % 7)}` })).join("\n") + "\n" + chat + "\n";
  assert.deepEqual(await scanDataset(await f("b.jsonl", big), "jsonl", "b"), { format: "jsonl", examples: 5001, kinds: ["chat", "text"] });
  await assert.rejects(scanDataset(await f("c.jsonl", '{"text":"a"}\n\n{"prompt": "p"}\n'), "jsonl", '"c"'), /dataset "c" line 3: unknown record shape \(keys: prompt\)/);
  await assert.rejects(scanDataset(await f("d.jsonl", '{"messages": []}\n'), "jsonl", "d"), /"messages" must be a non-empty array/);
  await assert.rejects(scanDataset(await f("e.jsonl", '{"instruction": "i", "output": 3}\n'), "jsonl", "e"), /"output" must be a string, got a number/);
  await assert.rejects(scanDataset(await f("g.txt", " \n\t\n"), "txt", "g"), /is empty/);
  await assert.rejects(scanDataset(await f("h.txt", Buffer.from([0x68, 0x69, 0x0a, 0xc3, 0x28])), "txt", "h"), /not valid UTF-8/);
});
