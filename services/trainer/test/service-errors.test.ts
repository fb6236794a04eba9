/** Bad requests get INVALID_ARGUMENT (or the right other code) with the reason, and change nothing. */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { Code, ConnectError } from "@connectrpc/connect";
import { Device, LoraBias } from "@qlora/proto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { CreateJobRequestSchema } from "@qlora/proto";
import { addConfigOnlyModel, datasetUpload, startHarness, TEXT_LINES, type Harness } from "./helpers.js";

type Init = MessageInitShape<typeof CreateJobRequestSchema>;

describe("TrainerService rejects bad requests with the reason", () => {
  let h: Harness;
  before(async () => {
    h = await startHarness({ fake: { stepMs: 2 } });
    await addConfigOnlyModel(h.store, "tiny");
    await h.client.uploadDataset(datasetUpload("good", "good.txt", TEXT_LINES));
    await h.client.uploadDataset(datasetUpload("chat", "chat.jsonl", JSON.stringify({ messages: [{ role: "user", content: "hi" }, { role: "assistant", content: "hello" }] }) + "\n"));
    // Datasets placed into the store by hand, bypassing UploadDataset's checks.
    for (const [name, file, content] of [
      ["blank", "blank.txt", "\n  \n\n"],
      ["broken", "broken.jsonl", '{"text": "fine"}\n{"text": "oops"\n'],
      ["odd", "odd.jsonl", '{"text": "fine"}\n{"question": "?"}\n'],
    ] as const) {
      const w = await h.store.beginWrite("datasets", name);
      await w.writeFile(file, content);
      await w.commit();
    }
  });
  after(async () => {
    await h.close();
  });

  const ok: Init = { baseModel: "tiny", dataset: "good", training: { maxSteps: 2 } };

  async function rejects(req: Init, code: Code, pattern: RegExp): Promise<void> {
    const before = (await h.client.listJobs({})).jobs.length;
    await assert.rejects(h.client.createJob(req), (e: ConnectError) => {
      assert.equal(Code[e.code], Code[code], e.rawMessage);
      assert.match(e.rawMessage, pattern);
      return true;
    });
    assert.equal((await h.client.listJobs({})).jobs.length, before, "no job was created");
  }

  test("unknown base model", () => rejects({ ...ok, baseModel: "nope" }, Code.InvalidArgument, /base_model "nope" not found/));
  test("missing or malformed names", async () => {
    await rejects({ ...ok, baseModel: "" }, Code.InvalidArgument, /base_model is required/);
    await rejects({ ...ok, dataset: "" }, Code.InvalidArgument, /dataset is required/);
    await rejects({ ...ok, dataset: "../etc" }, Code.InvalidArgument, /dataset .* must not contain/);
    await rejects({ ...ok, outputAdapter: "a/b" }, Code.InvalidArgument, /output_adapter .*separators/);
  });
  test("unknown dataset", () => rejects({ ...ok, dataset: "nope" }, Code.InvalidArgument, /dataset "nope" not found/));
  test("empty dataset", () => rejects({ ...ok, dataset: "blank" }, Code.InvalidArgument, /dataset "blank" is empty/));
  test("malformed dataset: bad JSON, with the line", () => rejects({ ...ok, dataset: "broken" }, Code.InvalidArgument, /dataset "broken" line 2: malformed JSON/));
  test("malformed dataset: unknown record shape", () => rejects({ ...ok, dataset: "odd" }, Code.InvalidArgument, /line 2: unknown record shape \(keys: question\)/));
  test("malformed eval dataset", () => rejects({ ...ok, evalDataset: "broken" }, Code.InvalidArgument, /"broken" line 2/));
  test("a dataset with nothing to train on within block_size (found with the base's tokenizer)", async () => {
    await h.client.uploadDataset(datasetUpload("short", "short.txt", "Tom had a red kite.\n"));
    await rejects({ ...ok, dataset: "short" }, Code.InvalidArgument, /dataset "short" has no usable tokens: \d+ tokens, fewer than one block of 63 \(block size 64/);
    await rejects({ ...ok, dataset: "good", evalDataset: "short" }, Code.InvalidArgument, /dataset "short" has no usable tokens/);
    // The same file trains with a smaller block.
    const { job } = await h.client.createJob({ ...ok, dataset: "short", training: { maxSteps: 1, blockSize: 4 } });
    assert.ok(job?.id);
  });
  test("a base model without a tokenizer is a failed precondition", async () => {
    await addConfigOnlyModel(h.store, "no-tokenizer", {}, false);
    await rejects({ ...ok, baseModel: "no-tokenizer" }, Code.FailedPrecondition, /base_model "no-tokenizer" has no usable tokenizer: tokenizer\.json not found: model "no-tokenizer"/);
  });
  test("chat data on a base without a chat template", () => rejects({ ...ok, dataset: "chat" }, Code.InvalidArgument, /no chat template/));
  test("rank 0", () => rejects({ ...ok, lora: { rank: 0, alpha: 16 } }, Code.InvalidArgument, /lora\.rank must be at least 1/));
  test("unknown target module, with the valid ones", () =>
    rejects({ ...ok, lora: { rank: 8, targetModules: ["q_proj", "wq"] } }, Code.InvalidArgument, /unknown target module "wq" for a llama model; valid target modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear/));
  test("all-linear mixed with names", () => rejects({ ...ok, lora: { rank: 8, targetModules: ["all-linear", "q_proj"] } }, Code.InvalidArgument, /all-linear/));
  test("negative learning rate", () => rejects({ ...ok, training: { learningRate: -1e-4 } }, Code.InvalidArgument, /training\.learning_rate must be positive, got -0\.0001/));
  test("other out-of-range hyperparameters", async () => {
    await rejects({ ...ok, training: { epochs: -1 } }, Code.InvalidArgument, /training\.epochs/);
    await rejects({ ...ok, training: { weightDecay: -0.1 } }, Code.InvalidArgument, /training\.weight_decay/);
    await rejects({ ...ok, training: { learningRate: Number.NaN } }, Code.InvalidArgument, /learning_rate must be a finite number/);
    await rejects({ ...ok, training: { blockSize: 1 } }, Code.InvalidArgument, /block_size must be at least 2/);
    await rejects({ ...ok, training: { blockSize: 4096 } }, Code.InvalidArgument, /block_size 4096 exceeds the base model's max_position_embeddings \(512\)/);
    await rejects({ ...ok, lora: { rank: 8, dropout: 1 } }, Code.InvalidArgument, /lora\.dropout must be in \[0, 1\)/);
    await rejects({ ...ok, lora: { rank: 8, bias: LoraBias.ALL } }, Code.InvalidArgument, /lora\.bias LORA_BIAS_ALL is not supported/);
  });
  test("CUDA on a CPU trainer is a failed precondition", () => rejects({ ...ok, training: { device: Device.CUDA } }, Code.FailedPrecondition, /CUDA is not available/));

  test("an output adapter that exists, or that another active job writes, is ALREADY_EXISTS", async () => {
    const w = await h.store.beginWrite("adapters", "taken");
    await w.writeFile("adapter_config.json", "{}");
    await w.commit();
    await rejects({ ...ok, outputAdapter: "taken" }, Code.AlreadyExists, /adapter "taken" already exists/);
    const { job } = await h.client.createJob({ ...ok, outputAdapter: "twice", training: { maxSteps: 500 } });
    await rejects({ ...ok, outputAdapter: "twice" }, Code.AlreadyExists, new RegExp(`job ${job!.id} is already training adapter "twice"`));
    // A dataset an active job needs cannot be deleted or replaced.
    await assert.rejects(h.client.deleteDataset({ name: "good" }), (e: ConnectError) => e.code === Code.FailedPrecondition && /still need it/.test(e.rawMessage));
    await assert.rejects(
      h.client.uploadDataset(datasetUpload("good", "good.txt", "x\n", { overwrite: true })),
      (e: ConnectError) => e.code === Code.FailedPrecondition,
    );
    await h.client.cancelJob({ id: job!.id });
  });

  test("a valid request still works after all that", async () => {
    const { job } = await h.client.createJob(ok);
    assert.ok(job?.id);
  });

  test("UploadDataset: other extensions, paths, several files, empty and malformed files are INVALID_ARGUMENT", async () => {
    const bad = async (stream: AsyncIterable<never> | ReturnType<typeof datasetUpload>, pattern: RegExp) =>
      assert.rejects(h.client.uploadDataset(stream), (e: ConnectError) => {
        assert.equal(Code[e.code], "InvalidArgument", e.rawMessage);
        assert.match(e.rawMessage, pattern);
        return true;
      });
    await bad(datasetUpload("d1", "data.csv", "a,b\n"), /unsupported file type "\.csv"; use \.txt or \.jsonl/);
    await bad(datasetUpload("d1", "data", "a\n"), /unsupported file type "\(none\)"/);
    await bad(datasetUpload("d1", "sub/data.txt", "a\n"), /one file; send its file name/);
    await bad(datasetUpload("d1", "empty.txt", ""), /empty/);
    await bad(datasetUpload("d1", "blank.txt", "\n\n \n"), /is empty/);
    await bad(datasetUpload("d1", "x.jsonl", '{"text": 1}\n'), /line 1: "text" must be a string, got a number/);
    await bad(datasetUpload("d1", "x.jsonl", "[1,2]\n"), /line 1: expected a JSON object, got an array/);
    await bad(datasetUpload("d1", "x.txt", new Uint8Array([0x61, 0x0a, 0xff, 0xfe, 0x0a])), /not valid UTF-8/);
    await bad(datasetUpload("../d1", "x.txt", "a\n"), /name/);
    async function* two() {
      yield* datasetUpload("d2", "a.txt", "a\n");
      yield* datasetUpload("", "b.txt", "b\n");
    }
    await assert.rejects(h.client.uploadDataset(two()), (e: ConnectError) => e.code === Code.InvalidArgument || e.code === Code.ResourceExhausted);
    assert.deepEqual((await h.client.listDatasets({})).datasets.map((d) => d.name).filter((n) => n.startsWith("d")), []);
    assert.deepEqual(await h.store.list("datasets"), ["blank", "broken", "chat", "good", "odd", "short"]);
  });

  test("CancelJob of a finished job is FAILED_PRECONDITION; of a cancelled one it is a no-op", async () => {
    const { job } = await h.client.createJob({ ...ok, dataset: "good" });
    for (;;) {
      const j = (await h.client.getJob({ id: job!.id })).job!;
      if (j.state >= 3) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    await assert.rejects(h.client.cancelJob({ id: job!.id }), (e: ConnectError) => e.code === Code.FailedPrecondition && /already succeeded/.test(e.rawMessage));
    const cancelled = (await h.client.listJobs({})).jobs.find((j) => j.outputAdapter === "twice")!;
    assert.equal((await h.client.cancelJob({ id: cancelled.id })).job?.id, cancelled.id);
  });
});

describe("a trainer on CUDA (qlora serve --device cuda|auto on a GPU machine)", () => {
  let h: Harness;
  before(async () => {
    // The fake runner trains nothing, so this runs without a GPU: what is checked is which device the
    // service assigns and records.
    h = await startHarness({ fake: { stepMs: 2 }, device: "cuda" });
    await addConfigOnlyModel(h.store, "tiny");
    await h.client.uploadDataset(datasetUpload("good", "good.txt", TEXT_LINES));
  });
  after(async () => {
    await h.close();
  });

  test("AUTO and unspecified jobs train on CUDA, CPU jobs on the CPU; the job and its request say which", async () => {
    const cases: [Device | undefined, Device][] = [[undefined, Device.CUDA], [Device.AUTO, Device.CUDA], [Device.CUDA, Device.CUDA], [Device.CPU, Device.CPU]];
    for (const [asked, used] of cases) {
      const { job } = await h.client.createJob({ baseModel: "tiny", dataset: "good", training: { maxSteps: 1, ...(asked !== undefined ? { device: asked } : {}) } });
      assert.equal(job!.device, used, `asked ${asked === undefined ? "nothing" : Device[asked]}`);
      assert.equal((await h.client.getJob({ id: job!.id })).job!.device, used);
      assert.equal(job!.request?.training?.device, used, "the effective request names the device");
    }
  });
});
