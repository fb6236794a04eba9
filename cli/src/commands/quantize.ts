import path from "node:path";
import { isQloraError } from "@qlora/core";
import { defineCommand } from "../command.js";
import { formatBytes, formatDuration, progressReporter, writeJsonLine } from "../output.js";

const COMPUTE_DTYPES = ["bfloat16", "float16", "float32"] as const;

export const quantize = defineCommand({
  name: "quantize",
  summary: "Quantize a Hugging Face checkpoint to NF4 (bitsandbytes 4-bit layout)",
  usage: "qlora quantize --model DIR --out DIR [options]",
  description: [
    "Reads a Hugging Face checkpoint directory (config.json, model.safetensors or sharded",
    "model-*.safetensors + index, tokenizer files; Llama family or OPT; F32/F16/BF16) and writes a",
    "pre-quantized checkpoint that transformers loads: every linear layer of the decoder blocks in",
    "NF4 (blockwise absmax, optionally double-quantized), everything else unchanged, config.json",
    "with a quantization_config, tokenizer files, manifest.json with a sha256 per file.",
    "",
    "Tensors are processed one at a time (memory stays near the largest tensor). The output appears",
    "complete or not at all: on any error or Ctrl-C nothing is left behind.",
    "",
    "Progress: a bar on a terminal, a line every few seconds otherwise; with --json, one JSON object",
    'per line on stdout: {"event":"progress",…} for each tensor, then {"event":"result",…}.',
  ].join("\n"),
  options: {
    model: { type: "string", short: "m", value: "DIR", description: "Input checkpoint directory" },
    out: { type: "string", short: "o", value: "DIR", description: "Output directory (must not exist unless --overwrite)" },
    blocksize: { type: "string", value: "N", description: "NF4 block size: a power of two in 32..4096", default: "64" },
    "no-double-quant": { type: "boolean", description: "Keep the absmax in float32 (no double quantization)" },
    "compute-dtype": {
      type: "string",
      value: "DTYPE",
      description: `bnb_4bit_compute_dtype: ${COMPUTE_DTYPES.join(" | ")}`,
      default: "bfloat16",
    },
    "skip-modules": {
      type: "string",
      value: "NAME,…",
      multiple: true,
      description: "Modules kept in full precision (e.g. o_proj or model.layers.0.mlp); lm_head always is",
    },
    overwrite: { type: "boolean", description: "Replace --out if it exists (swapped in atomically at the end)" },
  },
  async run({ args, io, json, signal }) {
    const modelDir = path.resolve(io.cwd, args.requiredString("model"));
    const outDir = path.resolve(io.cwd, args.requiredString("out"));
    const blocksize = args.int("blocksize") ?? 64;
    const computeDtype = args.choice("compute-dtype", COMPUTE_DTYPES) ?? "bfloat16";
    const skipModules = args.list("skip-modules");

    // Loaded here, not at startup: it pulls in the native kernels, which `--help` does not need.
    const { quantizeCheckpoint } = await import("@qlora/quantizer");
    const progress = progressReporter(io, { json, unit: "tensors" });
    let result;
    try {
      result = await quantizeCheckpoint({
        modelDir,
        outDir,
        blocksize,
        doubleQuant: !args.bool("no-double-quant"),
        computeDtype,
        skipModules,
        overwrite: args.bool("overwrite"),
        signal,
        onProgress: (p) => {
          if (json) writeJsonLine(io, { event: "progress", ...p });
          else progress.update({ done: p.tensorsDone, total: p.tensorsTotal, bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, label: p.tensor });
        },
      });
    } catch (e) {
      progress.finish();
      if (signal.aborted && isQloraError(e) && e.code === "CANCELLED") {
        if (json) writeJsonLine(io, { event: "cancelled" });
        else io.stderr.write("qlora quantize: cancelled, nothing was written\n");
        return 130;
      }
      throw e;
    }
    progress.finish();

    const q = result.quantization;
    if (json) {
      writeJsonLine(io, {
        event: "result",
        outDir: result.outDir,
        architecture: result.config.architecture,
        modelType: result.config.modelType,
        quantization: q,
        tensorsQuantized: result.tensorsQuantized,
        tensorsCopied: result.tensorsCopied,
        parameters: result.parameters,
        bytesIn: result.bytesIn,
        bytesOut: result.bytesOut,
        elapsedMs: result.elapsedMs,
        shards: result.shards,
        indexFile: result.indexFile,
        files: result.files,
      });
    } else {
      const settings = `blocksize ${q.blocksize}, ${q.doubleQuant ? "double quant" : "no double quant"}, compute ${q.computeDtype}`;
      io.stdout.write(
        `Quantized ${result.tensorsQuantized} of ${result.tensorsQuantized + result.tensorsCopied} tensors to NF4 (${settings})\n` +
          `  ${modelDir} (${formatBytes(result.bytesIn)}) -> ${result.outDir} (${formatBytes(result.bytesOut)}) in ${formatDuration(result.elapsedMs)}\n`,
      );
    }
    return 0;
  },
});
