/** Checkpoint files: round trip, atomic staging, rotation by step number. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  listCheckpoints,
  readCheckpoint,
  removeStaleStaging,
  rotateCheckpoints,
  writeCheckpoint,
  type LoraState,
  type TrainerState,
} from "../src/train/index.js";

function lora(seed: number): LoraState {
  const f = (n: number, k: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(seed * 100 + k * 10 + i) * 0.1);
  return {
    rank: 2,
    scaling: 8,
    modules: {
      "layers.0.self_attn.q_proj": { a: f(8, 1), b: f(6, 2), ma: f(8, 3), va: f(8, 4).map(Math.abs), mb: f(6, 5), vb: f(6, 6).map(Math.abs) },
      "layers.1.self_attn.v_proj": { a: f(8, 7), b: f(4, 8), ma: f(8, 9), va: f(8, 10).map(Math.abs), mb: f(4, 11), vb: f(4, 12).map(Math.abs) },
    },
  };
}

function state(step: number): TrainerState {
  return {
    format: "qlora-trainer-state",
    version: 1,
    global_step: step,
    max_steps: 100,
    epoch: step / 10,
    epoch_index: Math.floor(step / 10),
    micro_step_in_epoch: step % 10,
    micro_batches_per_epoch: 10,
    global_micro_step: step,
    seed: 42,
    rng: { algorithm: "x", data_order_epoch: Math.floor(step / 10), dropout_next_micro_step: step, lora_init_seed: "1" },
    totals: { loss_sum: 1.25 * step, window_loss_sum: 0.5, window_steps: 1, tokens_seen: 64 * step, target_tokens_seen: 63 * step },
    log_history: [{ step: 5, epoch: 0.5, loss: 2.5, learning_rate: 1e-4, grad_norm: 0.3, tokens_per_second: 1000 }],
    args: { rank: 2 },
    data: { train_sha256: "ab", train_rows: 20, eval_sha256: null },
  };
}

const loraConfig = { r: 2, loraAlpha: 16, loraDropout: 0.05, targetModules: ["q_proj", "v_proj"], baseModelNameOrPath: "m" };

test("a checkpoint round-trips weights, moments and trainer state exactly", async () => {
  const out = mkdtempSync(join(tmpdir(), "qlora-ck-"));
  const l = lora(1);
  const { path, sizeBytes } = await writeCheckpoint(out, { loraConfig, family: "llama", lora: l, state: state(10) });
  assert.equal(path, join(out, "checkpoint-10"));
  assert.deepEqual(readdirSync(path).sort(), ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"]);
  assert.ok(sizeBytes > 0);
  const back = await readCheckpoint(path);
  assert.deepEqual(back.state, state(10));
  assert.equal(back.lora.rank, 2);
  assert.equal(back.lora.scaling, 8);
  for (const [name, m] of Object.entries(l.modules)) {
    const r = back.lora.modules[name]!;
    for (const k of ["a", "b", "ma", "va", "mb", "vb"] as const) assert.deepEqual(r[k], m[k], `${name}.${k}`);
  }
  // Nothing but the checkpoint is left in out (the staging directory was renamed).
  assert.deepEqual(readdirSync(out), ["checkpoint-10"]);
  // Writing the same step again replaces it.
  await writeCheckpoint(out, { loraConfig, family: "llama", lora: lora(2), state: state(10) });
  const again = await readCheckpoint(path);
  assert.deepEqual(again.lora.modules["layers.0.self_attn.q_proj"]!.a, lora(2).modules["layers.0.self_attn.q_proj"]!.a);
});

test("rotation keeps the newest by step number; limit 0 keeps all; stale staging is removed", async () => {
  const out = mkdtempSync(join(tmpdir(), "qlora-rot-"));
  for (const step of [5, 10, 100, 20]) await writeCheckpoint(out, { loraConfig, family: "opt", lora: lora(step), state: state(step) });
  assert.deepEqual((await listCheckpoints(out)).map((c) => c.step), [5, 10, 20, 100]);
  assert.deepEqual(await rotateCheckpoints(out, 0), []);
  const removed = await rotateCheckpoints(out, 2);
  assert.deepEqual(removed, [join(out, "checkpoint-5"), join(out, "checkpoint-10")]);
  assert.deepEqual((await listCheckpoints(out)).map((c) => c.step), [20, 100]);
  // A crash mid-write leaves a hidden staging directory: not a checkpoint, and cleaned up.
  mkdirSync(join(out, ".checkpoint-30.tmp-123-abcd"));
  writeFileSync(join(out, ".checkpoint-30.tmp-123-abcd", "trainer_state.json"), "{");
  mkdirSync(join(out, "..checkpoint-30.tmp-123-abcd.tmp-9-ffff")); // the adapter writer's own staging
  mkdirSync(join(out, "checkpoint-x"));
  assert.deepEqual((await listCheckpoints(out)).map((c) => c.step), [20, 100]);
  await removeStaleStaging(out);
  assert.equal(existsSync(join(out, ".checkpoint-30.tmp-123-abcd")), false);
  assert.equal(existsSync(join(out, "..checkpoint-30.tmp-123-abcd.tmp-9-ffff")), false);
  assert.ok(existsSync(join(out, "checkpoint-x")), "unrelated directories are left alone");
  assert.deepEqual(await listCheckpoints(join(out, "missing")), []);
});
