import path from "node:path";
// The model runtime loads the native addon: import it inside run() so `--help` never needs it.
import type { LoadedModel } from "@qlora/model";
import { defineCommand, UsageError, type Args } from "../command.js";
import { writeJsonLine } from "../output.js";

/** A decimal option in [min, max]; undefined when not given. */
function numberOption(args: Args, name: string, min: number, max: number): number | undefined {
  const raw = args.string(name);
  if (raw === undefined) return undefined;
  const v = Number(raw.trim());
  if (raw.trim() === "" || !Number.isFinite(v)) throw new UsageError(`--${name} must be a number, got "${raw}"`);
  if (v < min || v > max) throw new UsageError(`--${name} must be in [${min}, ${max}], got ${v}`);
  return v;
}

/** The adapter slot the CLI uses (one model, at most one adapter per process). */
const ADAPTER_SLOT = 0;

export const generate = defineCommand({
  name: "generate",
  summary: "Generate text from a model (optionally with a LoRA adapter)",
  usage: "qlora generate --model DIR [--adapter DIR] --prompt TEXT [options]",
  description: [
    "Loads a Hugging Face checkpoint (original F32/F16/BF16, quantized to NF4 while loading, or a",
    "pre-quantized one written by `qlora quantize`) and continues the prompt, streaming the completion",
    "to stdout. The prompt is encoded with the tokenizer's special tokens (BOS for Llama). With",
    "--temperature 0 decoding is greedy and runs to --max-new-tokens unless the model produces EOS.",
    "Sampling defaults come from the model's generation_config.json (greedy when it has none).",
    "With --json, prints one object {text, token_ids, finish_reason, usage, timings} at the end.",
  ].join("\n"),
  options: {
    model: { type: "string", value: "DIR", description: "Model directory (config.json, safetensors, tokenizer.json)" },
    adapter: { type: "string", value: "DIR", description: "PEFT LoRA adapter directory" },
    prompt: { type: "string", value: "TEXT", description: "Text to continue" },
    "max-new-tokens": { type: "string", value: "N", description: "Tokens to generate at most", default: "128" },
    temperature: { type: "string", value: "T", description: "0 = greedy", default: "generation_config.json, else 0" },
    "top-k": { type: "string", value: "K", description: "Keep the K most likely tokens (0 = off)" },
    "top-p": { type: "string", value: "P", description: "Nucleus sampling mass (1 = off)" },
    "repetition-penalty": { type: "string", value: "R", description: "Penalty for tokens already present (1 = off)" },
    seed: { type: "string", value: "S", description: "Random seed (same seed, same output)", default: "random" },
    stop: { type: "string", value: "TEXT", description: "Stop before this text (taken verbatim)" },
    quant: { type: "string", value: "nf4|none", description: "Base weights in NF4 or full precision", default: "nf4" },
    embeddings: { type: "string", value: "stored|nf4", description: "Token embeddings / lm_head as stored, or NF4 (smaller, slightly less accurate)", default: "stored" },
    "decode-matmul": { type: "string", value: "exact|int8", description: "Decode-step NF4 matmul: exact fp32 weights, or int8 activations (faster, ~1% error per output)", default: "exact" },
    device: { type: "string", value: "auto|cpu|cuda", description: "Where the model runs (auto: cuda when a GPU is usable)", default: "auto" },
  },
  async run({ args, io, json, signal }) {
    const modelDir = path.resolve(io.cwd, args.requiredString("model"));
    const prompt = args.string("prompt");
    if (prompt === undefined) throw new UsageError("--prompt is required");
    const quant = args.choice("quant", ["nf4", "none"] as const) ?? "nf4";
    const embeddings = args.choice("embeddings", ["stored", "nf4"] as const) ?? "stored";
    const decodeMatmul = args.choice("decode-matmul", ["exact", "int8"] as const) ?? "exact";
    const device = args.choice("device", ["auto", "cpu", "cuda"] as const) ?? "auto";
    const maxNewTokens = args.int("max-new-tokens", { min: 1, max: 1_000_000 }) ?? 128;
    const temperature = numberOption(args, "temperature", 0, 100);
    const topK = args.int("top-k", { min: 0 });
    const topP = numberOption(args, "top-p", Number.MIN_VALUE, 1);
    const repetitionPenalty = numberOption(args, "repetition-penalty", Number.MIN_VALUE, 100);
    const seedRaw = args.string("seed");
    let seed: bigint | undefined;
    if (seedRaw !== undefined) {
      if (!/^\d+$/.test(seedRaw.trim())) throw new UsageError(`--seed must be a non-negative integer, got "${seedRaw}"`);
      seed = BigInt(seedRaw.trim());
      if (seed >= 1n << 64n) throw new UsageError("--seed must be below 2^64");
    }
    const stopArg = args.string("stop");
    if (stopArg === "") throw new UsageError("--stop must not be empty");
    const stop = stopArg === undefined ? [] : [stopArg];

    const { generate: runGenerate, installAdapter, loadAdapter, loadModel } = await import("@qlora/model");
    const model: LoadedModel = await loadModel(modelDir, { quant, embeddings, decodeMatmul, device, maxSequences: 1 });
    try {
      let adapterSlot = -1;
      const adapterArg = args.string("adapter");
      if (adapterArg !== undefined) {
        const adapter = await loadAdapter(path.resolve(io.cwd, adapterArg), model);
        for (const w of adapter.warnings) io.stderr.write(`qlora generate: warning: ${w}\n`);
        installAdapter(model, ADAPTER_SLOT, adapter);
        adapterSlot = ADAPTER_SLOT;
      }
      const options = {
        prompt,
        adapterSlot,
        maxNewTokens,
        stop,
        signal,
        ...(temperature !== undefined ? { temperature } : {}),
        ...(topK !== undefined ? { topK } : {}),
        ...(topP !== undefined ? { topP } : {}),
        ...(repetitionPenalty !== undefined ? { repetitionPenalty } : {}),
        ...(seed !== undefined ? { seed } : {}),
        ...(json ? {} : { onToken: (delta: string) => void (delta.length > 0 && io.stdout.write(delta)) }),
      };
      const result = await runGenerate(model, options);
      if (json) {
        writeJsonLine(io, {
          text: result.text,
          token_ids: result.tokenIds,
          finish_reason: result.finishReason,
          device: model.device,
          usage: { prompt_tokens: result.usage.promptTokens, completion_tokens: result.usage.completionTokens },
          timings: {
            time_to_first_token_ms: result.timings.timeToFirstTokenMs,
            tokens_per_second: result.timings.tokensPerSecond,
            total_ms: result.timings.totalMs,
          },
        });
      } else {
        io.stdout.write("\n");
        if (io.isTTY) {
          const t = result.timings;
          io.stderr.write(
            `[${result.usage.completionTokens} tokens, ${result.finishReason}; first token ${t.timeToFirstTokenMs.toFixed(0)} ms, ` +
              `${t.tokensPerSecond.toFixed(1)} tokens/s; ${quant}${embeddings === "nf4" ? ", nf4 embeddings" : ""}${decodeMatmul === "int8" ? ", int8 decode matmul" : ""}, ${model.device}]\n`,
          );
        }
      }
      return result.finishReason === "cancelled" ? 130 : 0;
    } finally {
      model.dispose();
    }
  },
});
