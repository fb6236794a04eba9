import path from "node:path";
// The model runtime loads the native addon: it is imported inside run() so `--help` never needs it.
import { defineCommand } from "../command.js";
import { writeJsonLine } from "../output.js";

const ADAPTER_SLOT = 0;

export const evalCommand = defineCommand({
  name: "eval",
  summary: "Mean next-token cross-entropy (and perplexity) of a model on a data file",
  usage: "qlora eval --model DIR [--adapter DIR] --data FILE [--quant nf4|none] [--embeddings stored|nf4] [--device auto|cpu|cuda]",
  description: [
    "Scores every example of FILE — .jsonl with one {\"text\": ...} per line, or .txt with one example",
    "per non-empty line — encoded with the tokenizer's special tokens (BOS + tokens). The loss is the",
    "token-weighted mean next-token cross-entropy over all examples; perplexity = exp(loss).",
    "With --json, prints {loss, perplexity, tokens, examples, device}.",
  ].join("\n"),
  options: {
    model: { type: "string", value: "DIR", description: "Model directory (config.json, safetensors, tokenizer.json)" },
    adapter: { type: "string", value: "DIR", description: "PEFT LoRA adapter directory" },
    data: { type: "string", value: "FILE", description: "Examples: .jsonl ({\"text\": ...} per line) or .txt (one per line)" },
    quant: { type: "string", value: "nf4|none", description: "Base weights in NF4 or full precision", default: "nf4" },
    device: { type: "string", value: "auto|cpu|cuda", description: "Where the model runs (auto: cuda when a GPU is usable)", default: "auto" },
    embeddings: { type: "string", value: "stored|nf4", description: "Token embeddings / lm_head as stored, or NF4 (smaller, slightly less accurate)", default: "stored" },
  },
  async run({ args, io, json, signal }) {
    const modelDir = path.resolve(io.cwd, args.requiredString("model"));
    const dataFile = path.resolve(io.cwd, args.requiredString("data"));
    const quant = args.choice("quant", ["nf4", "none"] as const) ?? "nf4";
    const embeddings = args.choice("embeddings", ["stored", "nf4"] as const) ?? "stored";
    const device = args.choice("device", ["auto", "cpu", "cuda"] as const) ?? "auto";
    // Read the data first: a malformed file should fail before a model is loaded.
    const { evaluate, installAdapter, loadAdapter, loadModel, readEvalExamples } = await import("@qlora/model");
    const texts = await readEvalExamples(dataFile);
    const model = await loadModel(modelDir, { quant, embeddings, device, maxSequences: 1 });
    try {
      let adapterSlot = -1;
      const adapterArg = args.string("adapter");
      if (adapterArg !== undefined) {
        const adapter = await loadAdapter(path.resolve(io.cwd, adapterArg), model);
        for (const w of adapter.warnings) io.stderr.write(`qlora eval: warning: ${w}\n`);
        installAdapter(model, ADAPTER_SLOT, adapter);
        adapterSlot = ADAPTER_SLOT;
      }
      const r = await evaluate(model, texts, adapterSlot, { signal });
      if (json) {
        writeJsonLine(io, { loss: r.loss, perplexity: r.perplexity, tokens: r.tokens, examples: r.examples, device: model.device });
      } else {
        io.stdout.write(
          `loss ${r.loss.toFixed(6)}  perplexity ${r.perplexity.toFixed(4)}  (${r.tokens} tokens, ${r.examples} example${r.examples === 1 ? "" : "s"}; ${quant}${embeddings === "nf4" ? ", nf4 embeddings" : ""}, ${model.device})\n`,
        );
      }
      return 0;
    } finally {
      model.dispose();
    }
  },
});
