import path from "node:path";
import { Cancelled } from "@qlora/core";
import { train as runTraining, TRAIN_DEFAULTS, type TrainEvent, type TrainOptions } from "@qlora/model";
import { defineCommand, UsageError, type Args, type Io } from "../command.js";
import { formatDuration, writeJsonLine } from "../output.js";

/** A decimal option; undefined when not given. Range rules are the trainer's (InvalidArgument). */
function numberOption(args: Args, name: string): number | undefined {
  const raw = args.string(name);
  if (raw === undefined) return undefined;
  const v = Number(raw.trim());
  if (raw.trim() === "" || !Number.isFinite(v)) throw new UsageError(`--${name} must be a number, got "${raw}"`);
  return v;
}

/** An integer option; negative values pass through so the trainer names the rule they break. */
function intOption(args: Args, name: string): number | undefined {
  return args.int(name);
}

function fmt(x: number, digits = 4): string {
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toFixed(digits);
}

/** Human output: one line per logging step on stdout, a progress bar on stderr when it is a terminal. */
function humanReporter(io: Io): { onEvent(e: TrainEvent): void; clear(): void } {
  let drawn = false;
  let lastDraw = 0;
  let startedAt = Date.now();
  const clear = (): void => {
    if (drawn) io.stderr.write("\r\x1b[2K");
    drawn = false;
  };
  const bar = (step: number, total: number, epoch: number): void => {
    if (!io.isTTY) return;
    const now = Date.now();
    if (step < total && now - lastDraw < 100) return;
    lastDraw = now;
    const frac = total > 0 ? step / total : 0;
    const elapsed = now - startedAt;
    const eta = step > 0 ? formatDuration((elapsed / step) * (total - step)) : "?";
    const tail = ` ${Math.floor(frac * 100)}% ${step}/${total} steps, epoch ${epoch.toFixed(2)}, eta ${eta}`;
    const width = Math.max(10, Math.min(40, io.columns - tail.length - 3));
    const filled = Math.round(frac * width);
    io.stderr.write(`\r\x1b[2K[${"#".repeat(filled)}${"-".repeat(width - filled)}]${tail}`);
    drawn = true;
  };
  const line = (s: string): void => {
    const wasDrawn = drawn;
    clear();
    io.stdout.write(s + "\n");
    if (wasDrawn) lastDraw = 0;
  };
  return {
    clear,
    onEvent(e) {
      switch (e.type) {
        case "start":
          startedAt = Date.now();
          line(
            `training ${e.totalSteps} steps (${e.stepsPerEpoch} per epoch) on ${e.trainRows} rows (${e.device})` +
              `${e.evalRows !== null ? ` (eval: ${e.evalRows})` : ""}, ${e.trainableParameters.toLocaleString("en-US")} trainable parameters` +
              `${e.resumedFromStep > 0 ? `; resuming from step ${e.resumedFromStep}` : ""}` +
              `${e.dataset.truncated > 0 ? `; ${e.dataset.truncated} examples truncated` : ""}` +
              `${e.dataset.dropped > 0 ? `; ${e.dataset.dropped} examples dropped (nothing to train on)` : ""}`,
          );
          break;
        case "step":
          bar(e.step, e.totalSteps, e.epoch);
          break;
        case "log":
          line(
            `step ${e.step}/${e.totalSteps}  epoch ${e.epoch.toFixed(2)}  loss ${fmt(e.loss)}  lr ${e.learningRate.toExponential(2)}  ` +
              `grad_norm ${fmt(e.gradNorm)}  ${e.tokensPerSecond.toFixed(0)} tokens/s`,
          );
          break;
        case "eval":
          line(`step ${e.step}  epoch ${e.epoch.toFixed(2)}  eval_loss ${fmt(e.evalLoss)}`);
          break;
        case "checkpoint":
          line(`saved ${e.path}${e.removed.length ? ` (removed ${e.removed.map((p) => path.basename(p)).join(", ")})` : ""}`);
          break;
        case "end":
          line(
            `done: ${e.step} steps in ${formatDuration(e.runtimeSeconds * 1000)}, train_loss ${fmt(e.trainLoss)}` +
              `${e.evalLoss !== null ? `, eval_loss ${fmt(e.evalLoss)}` : ""}; adapter in ${e.out}`,
          );
          break;
      }
    },
  };
}

/** JSON lines: every event but the per-step progress ticks. */
function jsonEvent(io: Io, e: TrainEvent): void {
  if (e.type === "step") return;
  writeJsonLine(io, { event: e.type, ...Object.fromEntries(Object.entries(e).filter(([k]) => k !== "type")) });
}

export const train = defineCommand({
  name: "train",
  summary: "Fine-tune a LoRA adapter on a frozen NF4 base (QLoRA)",
  usage: "qlora train --model DIR --data FILE --out DIR [options]",
  description: [
    "Trains a PEFT LoRA adapter on a text (.txt: blocks of the whole file, as Hugging Face's",
    "TextDataset) or .jsonl dataset ({text}, {prompt,completion}, alpaca {instruction,input,output},",
    "chat {messages}; loss only on completions/outputs/assistant turns) with the base model frozen in",
    "NF4. Defaults follow the classic QLoRA example (r=8, alpha=16, dropout 0.05, q_proj,v_proj,",
    "3 epochs, batch 2, lr 2e-4 linear, logging every 5 steps, a checkpoint every 10 keeping 1).",
    "",
    "--out receives the adapter (adapter_config.json, adapter_model.safetensors), checkpoint-<step>/",
    "directories, metrics.jsonl, TensorBoard logs in runs/ and loss.png. Ctrl-C saves a checkpoint",
    "and stops; --resume continues from the newest checkpoint with the same data order and seeds,",
    "so the result equals an uninterrupted run. Details: docs/training.md.",
  ].join("\n"),
  options: {
    model: { type: "string", value: "DIR", description: "Base model directory (original or NF4 checkpoint)" },
    data: { type: "string", value: "FILE", description: "Training data (.txt or .jsonl)" },
    out: { type: "string", value: "DIR", description: "Output directory" },
    rank: { type: "string", value: "R", description: "LoRA rank", default: String(TRAIN_DEFAULTS.rank) },
    alpha: { type: "string", value: "A", description: "LoRA alpha (scaling alpha/r)", default: String(TRAIN_DEFAULTS.alpha) },
    dropout: { type: "string", value: "P", description: "Dropout on the LoRA branch input", default: String(TRAIN_DEFAULTS.dropout) },
    target: {
      type: "string",
      value: "NAMES",
      multiple: true,
      description: "Target modules, comma-separated, or all-linear",
      default: TRAIN_DEFAULTS.target,
    },
    epochs: { type: "string", value: "N", description: "Epochs (may be fractional)", default: String(TRAIN_DEFAULTS.epochs) },
    "max-steps": { type: "string", value: "N", description: "Optimizer steps (overrides --epochs)" },
    "batch-size": { type: "string", value: "N", description: "Sequences per micro-batch", default: String(TRAIN_DEFAULTS.batchSize) },
    "grad-accum": { type: "string", value: "N", description: "Micro-batches per optimizer step", default: String(TRAIN_DEFAULTS.gradAccum) },
    "block-size": { type: "string", value: "N", description: "Tokens per sequence", default: String(TRAIN_DEFAULTS.blockSize) },
    lr: { type: "string", value: "LR", description: "Peak learning rate (AdamW)", default: "2e-4" },
    scheduler: { type: "string", value: "NAME", description: "linear, constant or cosine", default: TRAIN_DEFAULTS.scheduler },
    "warmup-steps": { type: "string", value: "N", description: "Linear warmup steps", default: String(TRAIN_DEFAULTS.warmupSteps) },
    "weight-decay": { type: "string", value: "W", description: "Decoupled weight decay", default: String(TRAIN_DEFAULTS.weightDecay) },
    "max-grad-norm": { type: "string", value: "N", description: "Gradient clipping norm (0: off)", default: "1.0" },
    seed: { type: "string", value: "S", description: "Seed for LoRA init, data order and dropout", default: String(TRAIN_DEFAULTS.seed) },
    "save-steps": { type: "string", value: "N", description: "Checkpoint every N steps (0: never)", default: String(TRAIN_DEFAULTS.saveSteps) },
    "save-total-limit": { type: "string", value: "N", description: "Checkpoints kept (0: all)", default: String(TRAIN_DEFAULTS.saveTotalLimit) },
    "logging-steps": { type: "string", value: "N", description: "Log every N steps", default: String(TRAIN_DEFAULTS.loggingSteps) },
    "eval-data": { type: "string", value: "FILE", description: "Validation data (.txt or .jsonl)" },
    "eval-steps": { type: "string", value: "N", description: "Evaluate every N steps", default: "--save-steps" },
    packing: { type: "boolean", description: "Pack short jsonl examples into blocks (no attention across them)" },
    quant: { type: "string", value: "nf4|none", description: "Base weights in NF4 or full precision", default: "nf4" },
    device: { type: "string", value: "auto|cpu|cuda", description: "Where training runs (auto: cuda when a GPU is usable)", default: "auto" },
    resume: { type: "boolean", description: "Continue from the newest checkpoint in --out" },
  },
  async run({ args, io, json, signal }) {
    const resolve = (p: string): string => path.resolve(io.cwd, p);
    // Resolved by the trainer before anything is read: cuda without a usable GPU is FailedPrecondition
    // naming the reason (never a silent CPU fallback); the start event reports the device used.
    const device = args.choice("device", ["auto", "cpu", "cuda"] as const) ?? "auto";
    const modelArg = args.requiredString("model");
    const options: TrainOptions = {
      model: resolve(modelArg),
      data: resolve(args.requiredString("data")),
      out: resolve(args.requiredString("out")),
      // adapter_config.json names the base as given on the command line (PEFT records the hub id or path).
      baseModelName: modelArg,
      checkpointOnCancel: true,
      resume: args.bool("resume"),
      packing: args.bool("packing"),
      device,
    };
    const set = <K extends keyof TrainOptions>(key: K, v: TrainOptions[K] | undefined): void => {
      if (v !== undefined) options[key] = v;
    };
    set("rank", intOption(args, "rank"));
    set("alpha", numberOption(args, "alpha"));
    set("dropout", numberOption(args, "dropout"));
    const targets = args.list("target");
    if (args.has("target") && targets.length === 0) throw new UsageError("--target must name at least one module (or all-linear)");
    if (targets.length > 0) options.target = targets;
    set("epochs", numberOption(args, "epochs"));
    set("maxSteps", intOption(args, "max-steps"));
    set("batchSize", intOption(args, "batch-size"));
    set("gradAccum", intOption(args, "grad-accum"));
    set("blockSize", intOption(args, "block-size"));
    set("lr", numberOption(args, "lr"));
    set("scheduler", args.choice("scheduler", ["linear", "constant", "cosine"] as const));
    set("warmupSteps", intOption(args, "warmup-steps"));
    set("weightDecay", numberOption(args, "weight-decay"));
    set("maxGradNorm", numberOption(args, "max-grad-norm"));
    set("seed", intOption(args, "seed"));
    set("saveSteps", intOption(args, "save-steps"));
    set("saveTotalLimit", intOption(args, "save-total-limit"));
    set("loggingSteps", intOption(args, "logging-steps"));
    const evalData = args.string("eval-data");
    if (evalData !== undefined) options.evalData = resolve(evalData);
    set("evalSteps", intOption(args, "eval-steps"));
    set("quant", args.choice("quant", ["nf4", "none"] as const));

    const human = json ? undefined : humanReporter(io);
    try {
      await runTraining(options, { signal, onEvent: (e) => (json ? jsonEvent(io, e) : human!.onEvent(e)) });
      return 0;
    } catch (e) {
      human?.clear();
      if (e instanceof Cancelled) {
        const hint = `${e.message}; continue with --resume`;
        if (json) writeJsonLine(io, { event: "cancelled", message: hint });
        else io.stderr.write(`qlora train: ${hint}\n`);
        return 130;
      }
      throw e;
    } finally {
      human?.clear();
    }
  },
});
