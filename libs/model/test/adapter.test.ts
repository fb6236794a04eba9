import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InvalidArgument, NotFound } from "@qlora/core";
import { writePeftAdapter, type LoraModuleInput } from "@qlora/formats";
import { evaluate, installAdapter, loadAdapter, loadModel, type LoadedModel } from "../src/index.js";
import { haveStories, skipNoStories, storiesDir, storiesReference } from "./fixtures.js";
import { readAllF32, writeDenseCheckpoint } from "./checkpoints.js";

const tmp = mkdtempSync(join(tmpdir(), "qlora-adapter-"));
let base: LoadedModel;

/** A reproducible uniform(-scale, scale) stream (LCG; test data only). */
function randomArray(n: number, seed: number, scale: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = (s / 2 ** 32 - 0.5) * 2 * scale;
  }
  return a;
}

// stories260K: H 64, q 64 (8 heads × 8), kv 32, I 172.
const R = 4;
const ALPHA = 16;
const TARGETS: Record<string, [number, number]> = {
  "layers.0.self_attn.q_proj": [64, 64],
  "layers.2.mlp.down_proj": [64, 172],
  "layers.4.self_attn.v_proj": [32, 64],
  "layers.1.mlp.gate_proj": [172, 64],
};
/** alpha_pattern gives down_proj its own alpha (its scaling is folded into B by the loader). */
const DOWN_ALPHA = 2;

function adapterTensors(seed: number, shapes = TARGETS): Map<string, LoraModuleInput> {
  const m = new Map<string, LoraModuleInput>();
  let k = seed;
  for (const [name, [out, inp]] of Object.entries(shapes)) {
    m.set(name, { a: randomArray(R * inp, k++, 0.5), b: randomArray(out * R, k++, 0.5) });
  }
  return m;
}

async function writeAdapter(dir: string, tensors: Map<string, LoraModuleInput>, extra: Record<string, unknown> = {}, baseName = "stories260K"): Promise<void> {
  await writePeftAdapter(dir, {
    config: { r: R, loraAlpha: ALPHA, targetModules: ["q_proj", "v_proj", "down_proj", "gate_proj"], baseModelNameOrPath: baseName },
    family: "llama",
    tensors,
  });
  const cfgPath = join(dir, "adapter_config.json");
  const cfg = JSON.parse(readFileSync(cfgPath, "utf8"));
  writeFileSync(cfgPath, JSON.stringify({ ...cfg, ...extra }, null, 2));
}

before(async () => {
  if (!haveStories) return;
  base = await loadModel(storiesDir, { quant: "none", maxSequences: 2 });
});
after(() => {
  base?.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

function allLogits(m: LoadedModel, ids: number[], adapter: number): Float32Array {
  const seq = m.native.createSequence();
  try {
    return m.native.forward([{ seq, tokens: Int32Array.from(ids), adapter }], { allLogits: true }).slice();
  } finally {
    m.native.dropSequence(seq);
  }
}

test("a LoRA adapter changes the logits by exactly the merged-weights delta", { skip: skipNoStories }, async (t) => {
  const tensors = adapterTensors(11);
  const adir = join(tmp, "lora");
  await writeAdapter(adir, tensors, { alpha_pattern: { down_proj: DOWN_ALPHA } });
  const adapter = await loadAdapter(adir, base);
  assert.deepEqual(adapter.modules, Object.keys(TARGETS).sort());
  assert.equal(adapter.rank, R);
  assert.equal(adapter.engine.scaling, ALPHA / R);
  assert.deepEqual(adapter.warnings, []);
  assert.equal(adapter.bytes, [...tensors.values()].reduce((s, t) => s + (t.a.length + t.b.length) * 4, 0));

  // Merged checkpoint: W + s·B·A (s = alpha/r, or the module's alpha_pattern alpha / r).
  const weights = await readAllF32(storiesDir);
  for (const [name, t] of tensors) {
    const [out, inp] = TARGETS[name]!;
    const s = (name.endsWith("down_proj") ? DOWN_ALPHA : ALPHA) / R;
    const w = weights.get(`model.${name}.weight`)!;
    for (let o = 0; o < out; o++) {
      for (let i = 0; i < inp; i++) {
        let acc = 0;
        for (let k = 0; k < R; k++) acc += t.b[o * R + k]! * t.a[k * inp + i]!;
        w.data[o * inp + i]! += s * acc;
      }
    }
  }
  const mdir = join(tmp, "merged");
  writeDenseCheckpoint(storiesDir, mdir, weights);
  const merged = await loadModel(mdir, { quant: "none", maxSequences: 1 });
  try {
    installAdapter(base, 0, adapter);
    const ids = storiesReference().cross_entropy.ids;
    const withAdapter = allLogits(base, ids, 0);
    const baseLogits = allLogits(base, ids, -1);
    const mergedLogits = allLogits(merged, ids, -1);
    let diffMerged = 0;
    let diffBase = 0;
    for (let i = 0; i < withAdapter.length; i++) {
      diffMerged = Math.max(diffMerged, Math.abs(withAdapter[i]! - mergedLogits[i]!));
      diffBase = Math.max(diffBase, Math.abs(withAdapter[i]! - baseLogits[i]!));
    }
    t.diagnostic(`max |logit change| from the adapter ${diffBase.toFixed(4)}; adapter vs merged ${diffMerged.toExponential(2)}`);
    assert.ok(diffBase > 0.5, `the adapter must matter (max change ${diffBase})`);
    assert.ok(diffMerged < 2e-4, `unmerged LoRA vs merged weights: max diff ${diffMerged}`);

    const eA = await evaluate(base, [storiesReference().cross_entropy.text], 0);
    const eM = await evaluate(merged, [storiesReference().cross_entropy.text], -1);
    assert.ok(Math.abs(eA.loss - eM.loss) < 1e-4, `${eA.loss} vs ${eM.loss}`);
  } finally {
    merged.dispose();
    base.native.removeAdapter(0);
  }
});

test("rsLoRA scaling is alpha / sqrt(r)", { skip: skipNoStories }, async () => {
  const dir = join(tmp, "rslora");
  await writeAdapter(dir, adapterTensors(5), { use_rslora: true });
  const a = await loadAdapter(dir, base);
  assert.equal(a.engine.scaling, ALPHA / Math.sqrt(R));
});

test("adapters that do not fit the base are refused with a clear error", { skip: skipNoStories }, async () => {
  // Trained on a wider model: q_proj [128, 128].
  const wide = join(tmp, "wide");
  await writeAdapter(wide, adapterTensors(1, { "layers.0.self_attn.q_proj": [128, 128] }), {}, "some-org/bigger-model");
  await assert.rejects(loadAdapter(wide, base), (e: unknown) => {
    assert.ok(e instanceof InvalidArgument, String(e));
    assert.match(e.message, /does not fit the base model/);
    assert.match(e.message, /layers\.0\.self_attn\.q_proj/);
    assert.match(e.message, /some-org\/bigger-model/);
    return true;
  });
  // A layer the base does not have.
  const deep = join(tmp, "deep");
  await writeAdapter(deep, adapterTensors(2, { "layers.7.self_attn.q_proj": [64, 64] }));
  await assert.rejects(loadAdapter(deep, base), /the base has 5 layers/);
  // An OPT module name on a Llama base.
  const opt = join(tmp, "opt");
  await writePeftAdapter(opt, {
    config: { r: R, loraAlpha: ALPHA, targetModules: ["fc1"] },
    family: "opt",
    tensors: new Map([["layers.0.fc1", { a: randomArray(R * 64, 3, 0.1), b: randomArray(172 * R, 4, 0.1) }]]),
  });
  await assert.rejects(loadAdapter(opt, base), /not a linear layer/);
});

test("corrupt and missing adapter files", { skip: skipNoStories }, async () => {
  const dir = join(tmp, "corrupt");
  await writeAdapter(dir, adapterTensors(9));
  truncateSync(join(dir, "adapter_model.safetensors"), 100);
  await assert.rejects(loadAdapter(dir, base), InvalidArgument);
  const badJson = join(tmp, "badjson");
  await writeAdapter(badJson, adapterTensors(9));
  writeFileSync(join(badJson, "adapter_config.json"), "{ nope");
  await assert.rejects(loadAdapter(badJson, base), InvalidArgument);
  await assert.rejects(loadAdapter(join(tmp, "absent"), base), NotFound);
});

test("base_model_name_or_path naming another model is a warning, not an error", { skip: skipNoStories }, async () => {
  const dir = join(tmp, "other-base");
  await writeAdapter(dir, adapterTensors(21), {}, "meta-llama/Llama-2-7b-hf");
  const a = await loadAdapter(dir, base);
  assert.equal(a.warnings.length, 1);
  assert.match(a.warnings[0]!, /Llama-2-7b-hf/);
  const same = join(tmp, "same-base");
  await writeAdapter(same, adapterTensors(22), {}, "/somewhere/else/stories260K/");
  assert.deepEqual((await loadAdapter(same, base)).warnings, []);
});
