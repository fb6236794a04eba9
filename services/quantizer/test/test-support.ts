/**
 * Test material that other workspaces' tests import as `@qlora/quantizer/test-support` (the
 * package's "exports"; it resolves to dist/test, which deployments leave out, so product code must
 * never import it): a checkpoint large enough that quantizing it can be interrupted.
 */
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { canonicalToHf, expectedWeights, numel, parseModelConfig, ShardedSafetensorsWriter, type PyJsonValue } from "@qlora/formats";

/**
 * A Llama config whose quantization takes far longer than a cancel or a SIGINT takes to arrive
 * (8 layers of 256 x 1024 projections, ~8.6 M weights), for the cancellation tests.
 */
export const CANCELLABLE_LLAMA_CONFIG: Readonly<Record<string, PyJsonValue>> = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  hidden_size: 256,
  intermediate_size: 1024,
  num_hidden_layers: 8,
  num_attention_heads: 4,
  num_key_value_heads: 4,
  vocab_size: 1024,
  max_position_embeddings: 128,
  tie_word_embeddings: true,
};

/**
 * Writes a Llama checkpoint (model.safetensors + config.json) into `dir` (created if missing) with
 * every required weight filled from a cheap LCG: the quantizer does not care about the distribution,
 * and seeded normals would take seconds to generate at this size.
 */
export async function writeFastCheckpoint(dir: string, config: Readonly<Record<string, PyJsonValue>> = CANCELLABLE_LLAMA_CONFIG): Promise<void> {
  const cfg = parseModelConfig(config);
  const plan = [...expectedWeights(cfg)]
    .filter(([, e]) => e.required)
    .map(([name, e]) => ({ name: canonicalToHf(name, cfg.family, "model."), dtype: "F32" as const, shape: e.shape }));
  await mkdir(dir, { recursive: true });
  const w = await ShardedSafetensorsWriter.create(dir, plan, { maxShardSize: Number.MAX_SAFE_INTEGER });
  let x = 12345;
  for (const p of plan) {
    const a = new Float32Array(numel(p.shape));
    for (let i = 0; i < a.length; i++) {
      x = (Math.imul(x, 1103515245) + 12345) | 0;
      a[i] = ((x >>> 8) / (1 << 24) - 0.5) * 0.1;
    }
    await w.write(p.name, new Uint8Array(a.buffer));
  }
  await w.finish();
  await writeFile(path.join(dir, "config.json"), JSON.stringify(config));
}
