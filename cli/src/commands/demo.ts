/**
 * `qlora demo`: quantize → train → serve, end to end through the three gRPC services, in one
 * process. The pipeline lives in ../demo/run.ts (loaded inside run(): it pulls in the services and
 * the native kernels, which `qlora --help` must not need); this file parses options and renders.
 */
import { isQloraError } from "@qlora/core";
import { defineCommand, UsageError, type Io } from "../command.js";
import { formatBytes, formatDuration, progressReporter, writeJsonLine, type ProgressReporter } from "../output.js";
import type { DemoEvent, DemoResult } from "../demo/run.js";
import { lossChart, printable, sideBySide } from "../demo/render.js";

export const demo = defineCommand({
  name: "demo",
  summary: "Quantize → train → serve end to end through the three gRPC services (offline by default)",
  usage: "qlora demo [--model DIR|hf://ORG/NAME[@REV]] [--data FILE] [--steps N] [--data-dir DIR] [options]",
  description: [
    "Starts the quantizer, trainer and inference services in this process (one ephemeral port, an",
    "embedded artifact store) and drives them as a gRPC client: UploadModel, Quantize (NF4), UploadDataset,",
    "CreateJob + WatchJob (a LoRA adapter is trained on the frozen NF4 base), LoadAdapter, and Generate",
    "with and without the adapter. Prints both generations side by side and the loss curve.",
    "",
    "Without --model it needs no network: it builds a tiny Llama-architecture model with seeded random",
    "weights and a byte-level tokenizer, and trains on a short built-in story. The base babbles; the",
    "adapter recites the story. With --model it uses a local Hugging Face checkpoint directory, or",
    "downloads one from the hub (hf://ORG/NAME[@REVISION]; HF_ENDPOINT, HF_TOKEN; cached in",
    "$QLORA_CACHE_DIR/hub or ~/.cache/qlora/hub, resumable, checksummed). See docs/demo.md.",
  ].join("\n"),
  options: {
    model: { type: "string", short: "m", value: "DIR|hf://ORG/NAME", description: "Base model: a checkpoint directory or a hub model", default: "the built-in tiny model" },
    data: { type: "string", short: "d", value: "FILE", description: "Training text (.txt, or .jsonl records)", default: "the built-in story" },
    steps: { type: "string", value: "N", description: "Optimizer steps", default: "40" },
    "data-dir": { type: "string", value: "DIR", description: "Artifact store directory (kept)", default: "a new temporary directory" },
    prompt: { type: "string", value: "TEXT", description: "Prompt for both generations", default: "the training text's first words" },
    "max-new-tokens": { type: "string", value: "N", description: "Tokens to generate", default: "the rest of the built-in story, else 150 (64 with --model)" },
  },
  async run({ args, io, json, signal }) {
    const steps = args.int("steps", { min: 1, max: 100_000 });
    const maxNewTokens = args.int("max-new-tokens", { min: 1, max: 4096 });
    const model = args.string("model");
    if (model === "") throw new UsageError("--model must not be empty");
    const data = args.string("data");
    if (data === "") throw new UsageError("--data must not be empty");
    const prompt = args.string("prompt");
    if (prompt !== undefined && prompt.trim() === "") throw new UsageError("--prompt must not be empty");
    const dataDir = args.string("data-dir");
    if (model?.startsWith("hf://")) {
      // Malformed references are a usage error, before anything starts.
      const { parseHfRef } = await import("../hub/ref.js");
      try {
        parseHfRef(model);
      } catch (e) {
        throw new UsageError(e instanceof Error ? e.message : String(e));
      }
    }

    const { runDemo } = await import("../demo/run.js");
    const view = demoView(io, json);
    let result: DemoResult;
    try {
      result = await runDemo(
        {
          ...(model !== undefined ? { model } : {}),
          ...(data !== undefined ? { data } : {}),
          ...(steps !== undefined ? { steps } : {}),
          ...(dataDir !== undefined ? { dataDir } : {}),
          ...(prompt !== undefined ? { prompt } : {}),
          ...(maxNewTokens !== undefined ? { maxNewTokens } : {}),
          cwd: io.cwd,
          env: io.env,
          signal,
        },
        (e) => view.event(e),
      );
    } catch (e) {
      view.abort();
      if (signal.aborted && isQloraError(e) && e.code === "CANCELLED") {
        if (json) writeJsonLine(io, { event: "cancelled" });
        else io.stderr.write("qlora demo: cancelled\n");
        return 130;
      }
      const log = (e as { serviceLog?: string[] }).serviceLog;
      if (log?.length && !json) io.stderr.write(`qlora demo: the services' last messages:\n${log.map((l) => `  ${l}`).join("\n")}\n`);
      throw e;
    }
    view.result(result);
    return 0;
  },
});

export interface DemoView {
  event(e: DemoEvent): void;
  result(r: DemoResult): void;
  /** Clears any progress bar before an error line. */
  abort(): void;
}

/** How the demo shows its events: JSON lines, or the terminal rendering (exported for tests). */
export function demoView(io: Io, json: boolean): DemoView {
  return json ? new JsonView(io) : new TextView(io);
}

/** --json: every event as one JSON object per line ({"event": type, …}), then the result. */
class JsonView implements DemoView {
  constructor(private readonly io: Io) {}
  event(e: DemoEvent): void {
    const { type, ...rest } = e;
    writeJsonLine(this.io, { event: type, ...rest });
  }
  result(r: DemoResult): void {
    writeJsonLine(this.io, { event: "result", ...r });
  }
  abort(): void {}
}

/** The terminal: stages and results on stdout, progress bars on stderr. */
class TextView implements DemoView {
  private progress: ProgressReporter | undefined;
  private progressKind = "";
  private readonly out: (s: string) => void;
  private prompt = "";

  constructor(private readonly io: Io) {
    this.out = (s) => void io.stdout.write(s + "\n");
  }

  private bar(kind: string, unit: string): ProgressReporter {
    if (this.progressKind !== kind || !this.progress) {
      this.progress?.finish();
      this.progress = progressReporter(this.io, { json: false, unit });
      this.progressKind = kind;
    }
    return this.progress;
  }

  private endBar(): void {
    this.progress?.finish();
    this.progress = undefined;
    this.progressKind = "";
  }

  abort(): void {
    this.endBar();
  }

  event(e: DemoEvent): void {
    const say = (s: string) => {
      this.endBar();
      this.out(s);
    };
    switch (e.type) {
      case "plan": {
        const t = e.training;
        this.prompt = e.prompt;
        say("qlora demo: quantize → train → serve, end to end through the quantizer, trainer and inference gRPC services");
        say("");
        say(`  model   ${e.model.kind === "builtin" ? "built-in (offline)" : e.model.spec}`);
        if (e.model.kind === "builtin") say(`          ${e.model.description}`);
        say(`  data    ${e.data.kind === "builtin" ? `${e.data.description}, ${formatBytes(e.data.bytes)}` : `${e.data.path} (${formatBytes(e.data.bytes)})`}`);
        say(`  train   ${t.steps} steps, LoRA r=${t.rank} alpha=${t.alpha} on ${t.targets.join(",")}, lr ${t.learningRate}, batch ${t.batchSize} × ${t.blockSize} tokens`);
        say(`  store   ${e.dataDir}${e.dataDirIsTemp ? " (a new temporary directory, kept afterwards)" : ""}`);
        say("");
        return;
      }
      case "stage":
        say(`[${e.index}/${e.total}] ${e.title}`);
        return;
      case "note":
        say(`      ${e.message}`);
        return;
      case "download":
        this.bar("download", "files").update({
          done: e.progress.filesDone,
          total: e.progress.filesTotal,
          bytesDone: e.progress.bytesDone,
          bytesTotal: e.progress.bytesTotal,
          label: e.progress.file,
        });
        return;
      case "listening":
        say(`      listening on ${e.url}: ${e.services.join(", ")}`);
        return;
      case "upload":
        this.bar(`upload-${e.kind}`, "files").update({ done: e.filesDone, total: e.filesTotal, bytesDone: e.bytesDone, bytesTotal: e.bytesTotal, label: e.file });
        return;
      case "uploaded":
        say(`      stored "${e.name}": ${e.files} file${e.files === 1 ? "" : "s"}, ${formatBytes(e.sizeBytes)} in ${formatDuration(e.ms)}`);
        return;
      case "quantize":
        this.bar("quantize", "tensors").update({ done: e.tensorsDone, total: e.tensorsTotal, bytesDone: e.bytesDone, bytesTotal: e.bytesTotal, label: e.tensor });
        return;
      case "quantized":
        say(`      "${e.name}": ${formatBytes(e.sizeBytesIn)} → ${formatBytes(e.sizeBytesOut)} (${(e.parameters / 1e6).toFixed(2)}M parameters, NF4 blocks of ${e.blocksize}) in ${formatDuration(e.ms)}`);
        return;
      case "job":
        say(`      job ${e.id} → adapter "${e.adapter}", ${e.totalSteps} steps`);
        return;
      case "job-state":
        // The service's messages usually start with the state ("running on trainer-…").
        if (e.state !== "succeeded") say(`      ${!e.message ? e.state : e.message.startsWith(e.state) ? e.message : `${e.state}: ${e.message}`}`);
        return;
      case "metrics": {
        const w = String(e.totalSteps).length;
        say(
          `      step ${String(e.step).padStart(w)}/${e.totalSteps}  epoch ${e.epoch.toFixed(2)}  loss ${e.loss.toFixed(4)}  ` +
            `lr ${e.learningRate.toExponential(2)}  grad_norm ${e.gradNorm.toFixed(4)}  ${Math.round(e.tokensPerSecond)} tokens/s`,
        );
        return;
      }
      case "trained":
        say(`      trained in ${formatDuration(e.ms)}: loss ${e.firstLoss.toFixed(3)} → ${e.lastLoss.toFixed(3)}`);
        return;
      case "adapter-loaded":
        say(`      resident: ${formatBytes(e.residentBytes)}, loaded in ${formatDuration(e.loadMs)}`);
        return;
      case "generation":
        say(`      ${e.which === "base" ? "base alone   " : "with adapter "}: ${e.completionTokens} tokens in ${formatDuration(e.ms)} (${e.finishReason})`);
        return;
    }
  }

  result(r: DemoResult): void {
    this.endBar();
    const width = Math.max(60, Math.min(this.io.columns || 80, 120));
    this.out("");
    this.out(`Prompt: ${JSON.stringify(r.prompt)} (greedy decoding; the completions follow)`);
    for (const line of sideBySide(
      { title: `base "${r.nf4Model}" alone`, text: r.base.text },
      { title: `with adapter "${r.adapter}"`, text: r.adapterGeneration.text },
      width,
    )) {
      this.out(line);
    }
    if (r.base.text === r.adapterGeneration.text) this.out("(the two generations are identical: the adapter did not change the output)");
    this.out("");
    this.out(`Training loss (one point per logging step; ${r.losses.length} points)`);
    for (const line of lossChart(r.losses, { width, height: 10 })) this.out(printable(line));
    this.out(r.lossPng ? `Loss curve as PNG (written by the trainer): ${r.lossPng}` : "(the trainer wrote no loss.png)");
    this.out("");
    const t = r.timingsMs;
    this.out(
      `Done in ${formatDuration(t.total)} (model ${formatDuration(t.model)}, upload ${formatDuration(t.upload)}, quantize ${formatDuration(t.quantize)}, ` +
        `train ${formatDuration(t.train)}, generate ${formatDuration(t.generate)}).`,
    );
    this.out(
      `Artifacts (models, dataset, adapter, job database) are in ${r.dataDir}` +
        (r.dataDirIsTemp ? `; remove it when done: rm -rf ${r.dataDir}` : "") +
        `\nServe them again with: qlora serve --data-dir ${r.dataDir}`,
    );
  }
}
