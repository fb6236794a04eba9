/**
 * The demo pipeline: quantize → train → serve, end to end through the three gRPC services.
 *
 * One process: the quantizer, trainer and inference services are started in-process on an
 * ephemeral 127.0.0.1 port with an embedded LocalStore (what `qlora serve` runs), and everything
 * after that is an ordinary gRPC client — UploadModel, Quantize, UploadDataset, CreateJob + WatchJob,
 * LoadAdapter, Generate — so the demo exercises exactly what a remote client would.
 *
 * The pipeline reports DemoEvents; the command (commands/demo.ts) renders them for a terminal or as
 * JSON lines. Nothing here prints.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, extname, join, resolve } from "node:path";
import { ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Cancelled, FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import {
  FinishReason,
  InferenceService,
  JobState,
  QuantizerService,
  Scheduler,
  TrainerService,
} from "@qlora/proto";
import { fromConnectError, startServer, type RunningServer } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { defaultHubCacheDir, downloadHfModel, HUB_SIDE_FILES, isHfRef, parseHfRef, type HubProgress } from "../hub/index.js";
import { DEMO_PROMPT, DEMO_TEXT, promptFromText } from "./text.js";
import { writeDemoModel } from "./tiny-model.js";

/** Chunk size of the client-streamed uploads (docs/rpc.md: well below the 64 MiB message limit). */
const UPLOAD_CHUNK = 256 * 1024;

/** Training settings the demo sends in CreateJob (the rest are the service's defaults). */
export interface DemoTraining {
  steps: number;
  rank: number;
  alpha: number;
  targets: string[];
  learningRate: number;
  batchSize: number;
  blockSize: number;
  warmupSteps: number;
  loggingSteps: number;
  seed: number;
}

/**
 * Offline model: a random base memorising a short text, so the adapter must carry all the knowledge:
 * every linear layer, rank 16, a high learning rate. With the built-in story the block is the whole
 * story (574 bytes = 574 tokens + BOS; see storyTraining), so every step is a full-batch step — the
 * fastest way to memorise — and the prompt plus the whole generation stay inside the positions the
 * adapter was trained on. Measured: the loss is 0.04 after 40 steps and the adapter recites the
 * story verbatim (about 3 s of training on two idle cores, ~45 s on a busy machine). With other
 * text (--data) the blocks are shorter and batched.
 */
export const BUILTIN_TRAINING: Omit<DemoTraining, "loggingSteps"> = {
  steps: 40,
  rank: 16,
  alpha: 32,
  targets: ["all-linear"],
  learningRate: 1e-2,
  batchSize: 2,
  blockSize: 256,
  warmupSteps: 4,
  seed: 42,
};

/** The built-in story in one block (the .txt dataset is cut into blocks from the file's start). */
export function storyTraining(base: DemoTraining): DemoTraining {
  return { ...base, batchSize: 1, blockSize: Buffer.byteLength(DEMO_TEXT) + 1 };
}

/** A real checkpoint (--model): it already speaks, so a gentler recipe still shows the change. */
export const CHECKPOINT_TRAINING: Omit<DemoTraining, "loggingSteps"> = {
  steps: 40,
  rank: 16,
  alpha: 32,
  targets: ["all-linear"],
  learningRate: 1e-3,
  batchSize: 2,
  blockSize: 64,
  warmupSteps: 2,
  seed: 42,
};

export interface DemoOptions {
  /** Local checkpoint directory or hf://ORG/NAME[@REV]; default: the built-in tiny model. */
  model?: string;
  /** Training text (.txt or .jsonl); default: the built-in text. */
  data?: string;
  steps?: number;
  /** Artifact store directory; default: a new temporary directory (kept, so results can be inspected). */
  dataDir?: string;
  /** Prompt for both generations; default: the opening words of the training text. */
  prompt?: string;
  maxNewTokens?: number;
  cwd: string;
  env: NodeJS.ProcessEnv;
  signal: AbortSignal;
}

export type DemoStage = "model" | "serve" | "upload" | "quantize" | "dataset" | "train" | "load" | "generate";

export type DemoEvent =
  | { type: "plan"; dataDir: string; dataDirIsTemp: boolean; model: ModelSource; data: DataSource; training: DemoTraining; prompt: string }
  | { type: "stage"; stage: DemoStage; index: number; total: number; title: string }
  | { type: "download"; progress: HubProgress }
  | { type: "note"; message: string }
  | { type: "listening"; url: string; services: string[] }
  | { type: "upload"; kind: "model" | "dataset"; name: string; filesDone: number; filesTotal: number; bytesDone: number; bytesTotal: number; file: string }
  | { type: "uploaded"; kind: "model" | "dataset"; name: string; files: number; sizeBytes: number; ms: number }
  | { type: "quantize"; tensorsDone: number; tensorsTotal: number; bytesDone: number; bytesTotal: number; tensor: string }
  | { type: "quantized"; name: string; sizeBytesIn: number; sizeBytesOut: number; parameters: number; blocksize: number; ms: number }
  | { type: "job"; id: string; adapter: string; totalSteps: number }
  | { type: "job-state"; state: string; message: string }
  | { type: "metrics"; step: number; totalSteps: number; epoch: number; loss: number; learningRate: number; gradNorm: number; tokensPerSecond: number }
  | { type: "trained"; adapter: string; ms: number; lossPng: string | null; firstLoss: number; lastLoss: number }
  | { type: "adapter-loaded"; name: string; residentBytes: number; loadMs: number }
  | { type: "generation"; which: "base" | "adapter"; text: string; completionTokens: number; finishReason: string; ms: number };

export interface ModelSource {
  kind: "builtin" | "local" | "hub";
  /** What the user gave (or "built-in"). */
  spec: string;
  /** Plain words about the model (for the built-in one: what it is, and that it is generated). */
  description: string;
}

export interface DataSource {
  kind: "builtin" | "file";
  path?: string;
  bytes: number;
  description: string;
}

export interface DemoResult {
  dataDir: string;
  dataDirIsTemp: boolean;
  url: string;
  baseModel: string;
  nf4Model: string;
  dataset: string;
  jobId: string;
  adapter: string;
  prompt: string;
  base: { text: string; completionTokens: number };
  adapterGeneration: { text: string; completionTokens: number };
  losses: { step: number; loss: number }[];
  lossPng: string | null;
  timingsMs: Record<DemoStage | "total", number>;
}

/** A store name from anything (a directory or repo name): the store's name rules, at most 64 characters. */
export function storeNameFrom(s: string): string {
  const cleaned = s
    .replace(/[^A-Za-z0-9._-]+/g, "-")
    .replace(/\.{2,}/g, ".")
    .replace(/^[^A-Za-z0-9]+/, "")
    .slice(0, 64)
    .replace(/[^A-Za-z0-9]+$/, "");
  return cleaned || "model";
}

/** The files of a local checkpoint worth uploading: what the runtime reads, nothing else. */
export async function checkpointFiles(dir: string): Promise<string[]> {
  let entries;
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`model directory ${dir} does not exist`);
    if ((e as NodeJS.ErrnoException).code === "ENOTDIR") throw new InvalidArgument(`--model ${dir} is not a directory`);
    throw e;
  }
  const side = new Set<string>(HUB_SIDE_FILES);
  const files = entries
    .filter((e) => e.isFile() && (side.has(e.name) || e.name.endsWith(".safetensors") || e.name === "model.safetensors.index.json"))
    .map((e) => e.name)
    .sort();
  if (!files.includes("config.json")) throw new InvalidArgument(`--model ${dir} has no config.json: not a Hugging Face checkpoint directory`);
  if (!files.some((f) => f.endsWith(".safetensors"))) throw new InvalidArgument(`--model ${dir} has no .safetensors weights`);
  return files;
}

async function sha256File(p: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(p)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/**
 * The messages of a client-streamed upload: the first names the artifact; each file goes in
 * chunks, the last chunk of a file carries its sha256 so the server checks what it stored.
 */
async function* uploadMessages(
  name: string,
  dir: string,
  files: { path: string; as: string }[],
  onBytes: (done: number, file: string, filesDone: number) => void,
  signal: AbortSignal,
): AsyncGenerator<{ name?: string; overwrite?: boolean; chunk: { path: string; data: Uint8Array; last: boolean; sha256?: string } }> {
  let first = true;
  let done = 0;
  let filesDone = 0;
  for (const f of files) {
    const full = join(dir, f.path);
    const digest = await sha256File(full);
    const size = (await stat(full)).size;
    let sent = 0;
    const stream = createReadStream(full, { highWaterMark: UPLOAD_CHUNK });
    let pending: Buffer | undefined;
    // One chunk of look-ahead so the last chunk of the file is known when it is sent.
    for await (const chunk of stream) {
      if (signal.aborted) throw new Cancelled("demo cancelled");
      if (pending) {
        yield { ...(first ? { name, overwrite: true } : {}), chunk: { path: f.as, data: pending, last: false } };
        first = false;
        sent += pending.length;
        done += pending.length;
        onBytes(done, f.as, filesDone);
      }
      pending = chunk as Buffer;
    }
    yield { ...(first ? { name, overwrite: true } : {}), chunk: { path: f.as, data: pending ?? new Uint8Array(0), last: true, sha256: digest } };
    first = false;
    done += pending?.length ?? 0;
    sent += pending?.length ?? 0;
    if (sent !== size) throw new FailedPrecondition(`${full} changed while it was uploaded`);
    onBytes(done, f.as, ++filesDone);
  }
}

/** Which training text and prompt: the user's file (its first words), or the built-in story. */
async function resolveData(o: DemoOptions): Promise<{ source: DataSource; dir: string; file: string; promptDefault: string }> {
  if (!o.data) {
    return {
      source: { kind: "builtin", bytes: Buffer.byteLength(DEMO_TEXT), description: "the built-in story (a few paragraphs written for this demo)" },
      dir: "",
      file: "",
      promptDefault: DEMO_PROMPT,
    };
  }
  const path = resolve(o.cwd, o.data);
  const ext = extname(path).toLowerCase();
  if (ext !== ".txt" && ext !== ".jsonl") throw new InvalidArgument(`--data must be a .txt or .jsonl file, got ${basename(path)}`);
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`--data ${path} does not exist`);
    throw e;
  }
  let promptDefault = promptFromText(text);
  if (ext === ".jsonl") {
    // The first record's own beginning: its prompt, or the start of its text.
    const firstLine = text.split("\n").find((l) => l.trim() !== "");
    try {
      const rec = JSON.parse(firstLine ?? "{}") as Record<string, unknown>;
      promptDefault =
        typeof rec.prompt === "string" ? rec.prompt : typeof rec.text === "string" ? promptFromText(rec.text) : typeof rec.instruction === "string" ? rec.instruction : promptDefault;
    } catch {
      // The trainer's upload check reports malformed JSON with its line number.
    }
  }
  return {
    source: { kind: "file", path, bytes: Buffer.byteLength(text), description: path },
    dir: resolve(path, ".."),
    file: basename(path),
    promptDefault,
  };
}

/** Runs the whole demo, reporting events as it goes. Throws typed errors (see the command). */
export async function runDemo(o: DemoOptions, emit: (e: DemoEvent) => void): Promise<DemoResult> {
  const t0 = Date.now();
  const timings = { model: 0, serve: 0, upload: 0, quantize: 0, dataset: 0, train: 0, load: 0, generate: 0, total: 0 } as DemoResult["timingsMs"];
  const ctl = new AbortController();
  const onAbort = () => ctl.abort(o.signal.reason);
  o.signal.addEventListener("abort", onAbort, { once: true });
  const signal = ctl.signal;
  const checkCancel = () => {
    if (signal.aborted) throw new Cancelled("demo cancelled");
  };

  const dataDirIsTemp = !o.dataDir;
  const dataDir = o.dataDir ? resolve(o.cwd, o.dataDir) : await mkdtemp(join(tmpdir(), "qlora-demo-"));
  await mkdir(dataDir, { recursive: true });
  const scratch = await mkdtemp(join(tmpdir(), "qlora-demo-src-"));
  const stages: DemoStage[] = ["model", "serve", "upload", "quantize", "dataset", "train", "load", "generate"];
  let stageStart = Date.now();
  let current: DemoStage | undefined;
  const stage = (s: DemoStage, title: string) => {
    if (current) timings[current] = Date.now() - stageStart;
    current = s;
    stageStart = Date.now();
    emit({ type: "stage", stage: s, index: stages.indexOf(s) + 1, total: stages.length, title });
  };

  let server: RunningServer | undefined;
  const serviceLog: string[] = [];
  let succeeded = false;
  try {
    // ---- the model -----------------------------------------------------------------------
    const data = await resolveData(o);
    let modelDir: string;
    let model: ModelSource;
    let baseName: string;
    if (!o.model) {
      model = { kind: "builtin", spec: "built-in", description: "" };
      baseName = "demo-tiny-llama";
    } else if (isHfRef(o.model)) {
      const ref = parseHfRef(o.model);
      model = { kind: "hub", spec: o.model, description: `${o.model} from ${o.env.HF_ENDPOINT || "https://huggingface.co"}` };
      baseName = storeNameFrom(ref.repo.split("/")[1]!);
    } else {
      const dir = resolve(o.cwd, o.model);
      model = { kind: "local", spec: o.model, description: `the local checkpoint ${dir}` };
      baseName = storeNameFrom(basename(dir));
    }
    const builtin = model.kind === "builtin";
    const recipe = builtin ? BUILTIN_TRAINING : CHECKPOINT_TRAINING;
    const steps = o.steps ?? recipe.steps;
    let training: DemoTraining = { ...recipe, steps, loggingSteps: Math.max(1, Math.round(steps / 20)) };
    if (builtin && data.source.kind === "builtin") training = storyTraining(training);
    if (builtin && data.source.kind === "file" && data.file.toLowerCase().endsWith(".txt") && data.source.bytes + 1 < training.blockSize) {
      // One token per byte: a text shorter than a block would leave the trainer nothing to cut.
      training.blockSize = Math.max(2, data.source.bytes + 1);
    }
    const prompt = o.prompt ?? data.promptDefault;
    if (prompt.trim() === "") throw new InvalidArgument("the prompt is empty");
    if (builtin) {
      model.description =
        "a tiny Llama-architecture model with seeded random weights and a byte-level tokenizer, generated by this project (no download): it has never seen any text";
    }
    emit({ type: "plan", dataDir, dataDirIsTemp, model, data: data.source, training, prompt });

    stage("model", builtin ? "Build the offline model" : model.kind === "hub" ? `Download ${o.model}` : `Read ${model.spec}`);
    if (builtin) {
      const info = await writeDemoModel(join(scratch, "model"));
      modelDir = info.dir;
      model.description = info.description;
      emit({ type: "note", message: `Model: ${info.description}.` });
    } else if (model.kind === "hub") {
      const snap = await downloadHfModel(parseHfRef(o.model!), {
        cacheDir: defaultHubCacheDir(o.env),
        env: o.env,
        signal,
        onProgress: (progress) => emit({ type: "download", progress }),
        onNote: (message) => emit({ type: "note", message }),
      });
      modelDir = snap.dir;
      emit({
        type: "note",
        message: `${snap.fromCache ? "Cached" : "Downloaded"} ${o.model} (commit ${snap.commit.slice(0, 12)}) in ${snap.dir}${snap.offline ? " — offline copy" : ""}`,
      });
    } else {
      modelDir = resolve(o.cwd, o.model!);
    }
    const modelFiles = await checkpointFiles(modelDir);
    const maxPositions = await readFile(join(modelDir, "config.json"), "utf8")
      .then((t) => Number((JSON.parse(t) as { max_position_embeddings?: unknown }).max_position_embeddings))
      .catch(() => NaN);
    if (Number.isInteger(maxPositions) && maxPositions >= 2 && maxPositions < training.blockSize) {
      emit({ type: "note", message: `block size ${training.blockSize} → ${maxPositions} (the model's max_position_embeddings)` });
      training.blockSize = maxPositions;
    }
    checkCancel();

    // ---- the services ----------------------------------------------------------------------
    stage("serve", "Start the quantizer, trainer and inference services (one process, one port)");
    const store = new LocalStore(dataDir);
    const [{ quantizerService }, { trainerService }, { inferenceService }] = await Promise.all([
      import("@qlora/quantizer"),
      import("@qlora/trainer"),
      import("@qlora/inference"),
    ]);
    const log = (svc: string) => (line: string) => serviceLog.push(`[${svc}] ${line}`);
    const registrations = [
      quantizerService(store),
      trainerService({ store, dataDir, log: log("trainer"), pollMs: 250, shutdownTimeoutMs: 15_000 }),
      inferenceService({ store, log: log("inference") }),
    ];
    server = await startServer({ host: "127.0.0.1", port: 0, services: registrations, gracePeriodMs: 2000 });
    emit({ type: "listening", url: server.url, services: registrations.map((r) => r.service.typeName) });
    const transport = createGrpcTransport({ baseUrl: server.url });
    const quantizer: Client<typeof QuantizerService> = createClient(QuantizerService, transport);
    const trainer: Client<typeof TrainerService> = createClient(TrainerService, transport);
    const inference: Client<typeof InferenceService> = createClient(InferenceService, transport);
    const call = { signal };
    checkCancel();

    // ---- UploadModel -----------------------------------------------------------------------
    stage("upload", `UploadModel "${baseName}"`);
    let totalBytes = 0;
    for (const f of modelFiles) totalBytes += (await stat(join(modelDir, f))).size;
    let t = Date.now();
    const uploaded = await quantizer.uploadModel(
      uploadMessages(baseName, modelDir, modelFiles.map((f) => ({ path: f, as: f })), (done, file, filesDone) =>
        emit({ type: "upload", kind: "model", name: baseName, filesDone, filesTotal: modelFiles.length, bytesDone: done, bytesTotal: totalBytes, file }), signal),
      call,
    );
    emit({ type: "uploaded", kind: "model", name: baseName, files: uploaded.model?.files.length ?? modelFiles.length, sizeBytes: Number(uploaded.model?.sizeBytes ?? totalBytes), ms: Date.now() - t });

    // ---- Quantize --------------------------------------------------------------------------
    let nf4Name = baseName;
    if (uploaded.model?.quantized) {
      stage("quantize", `Quantize (skipped: already NF4)`);
      emit({ type: "note", message: `"${baseName}" is already NF4-quantized; training on it as it is` });
    } else {
      nf4Name = `${baseName}-nf4`;
      stage("quantize", `Quantize "${baseName}" → "${nf4Name}" (NF4, blocksize 64, double quantization)`);
      t = Date.now();
      let result;
      for await (const ev of quantizer.quantize({ sourceModel: baseName, outputModel: nf4Name, overwrite: true }, call)) {
        if (ev.event.case === "progress") {
          const p = ev.event.value;
          emit({ type: "quantize", tensorsDone: p.tensorsDone, tensorsTotal: p.tensorsTotal, bytesDone: Number(p.bytesDone), bytesTotal: Number(p.bytesTotal), tensor: p.tensor });
        } else if (ev.event.case === "result") {
          result = ev.event.value;
        }
      }
      if (!result) throw new FailedPrecondition("Quantize ended without a result");
      emit({
        type: "quantized",
        name: nf4Name,
        sizeBytesIn: Number(uploaded.model?.sizeBytes ?? 0),
        sizeBytesOut: Number(result.sizeBytes),
        parameters: Number(result.parameters),
        blocksize: result.quantization?.blocksize ?? 64,
        ms: Date.now() - t,
      });
    }
    checkCancel();

    // ---- UploadDataset ---------------------------------------------------------------------
    const datasetName = "demo-text";
    stage("dataset", `UploadDataset "${datasetName}"`);
    let dataDirForUpload = data.dir;
    let dataFile = data.file;
    if (data.source.kind === "builtin") {
      dataDirForUpload = scratch;
      dataFile = "story.txt";
      await writeFile(join(scratch, dataFile), DEMO_TEXT);
    }
    // The service takes a plain file name with a .txt/.jsonl extension: send a safe one.
    const uploadAs = `train${extname(dataFile).toLowerCase()}`;
    t = Date.now();
    const ds = await trainer.uploadDataset(
      uploadMessages(datasetName, dataDirForUpload, [{ path: dataFile, as: uploadAs }], (done, file, filesDone) =>
        emit({ type: "upload", kind: "dataset", name: datasetName, filesDone, filesTotal: 1, bytesDone: done, bytesTotal: data.source.bytes, file }), signal),
      call,
    );
    emit({ type: "uploaded", kind: "dataset", name: datasetName, files: 1, sizeBytes: Number(ds.dataset?.sizeBytes ?? data.source.bytes), ms: Date.now() - t });
    checkCancel();

    // ---- CreateJob + WatchJob --------------------------------------------------------------
    // A fresh adapter name per run: a reused --data-dir keeps the adapters of earlier runs.
    const adapterName = `demo-adapter-${Date.now().toString(36)}`;
    stage("train", `Train a LoRA adapter on "${nf4Name}" (CreateJob, WatchJob)`);
    t = Date.now();
    const created = await trainer.createJob(
      {
        baseModel: nf4Name,
        dataset: datasetName,
        outputAdapter: adapterName,
        lora: { rank: training.rank, alpha: training.alpha, targetModules: training.targets },
        training: {
          maxSteps: training.steps,
          batchSize: training.batchSize,
          blockSize: training.blockSize,
          learningRate: training.learningRate,
          scheduler: Scheduler.LINEAR,
          warmupSteps: training.warmupSteps,
          loggingSteps: training.loggingSteps,
          // One checkpoint, at the end: the demo is not resumed, and checkpoints cost time.
          saveSteps: training.steps,
          seed: BigInt(training.seed),
        },
      },
      call,
    );
    const jobId = created.job!.id;
    emit({ type: "job", id: jobId, adapter: adapterName, totalSteps: training.steps });
    const losses: { step: number; loss: number }[] = [];
    let finalState = JobState.UNSPECIFIED;
    let finalMessage = "";
    try {
      for await (const ev of trainer.watchJob({ id: jobId }, call)) {
        if (ev.event.case === "state") {
          finalState = ev.event.value.state;
          finalMessage = ev.event.value.message;
          emit({ type: "job-state", state: JobState[finalState].toLowerCase(), message: finalMessage });
        } else if (ev.event.case === "metrics") {
          const m = ev.event.value;
          // An evaluation repeats the snapshot with eval_loss set; the demo has no eval set, and
          // the curve is of training loss only.
          if (m.evalLoss !== undefined) continue;
          losses.push({ step: m.step, loss: m.loss });
          emit({
            type: "metrics",
            step: m.step,
            totalSteps: m.totalSteps,
            epoch: m.epoch,
            loss: m.loss,
            learningRate: m.learningRate,
            gradNorm: m.gradNorm,
            tokensPerSecond: m.tokensPerSecond,
          });
        }
      }
    } catch (e) {
      if (signal.aborted) {
        await trainer.cancelJob({ id: jobId }).catch(() => undefined);
        throw new Cancelled("demo cancelled");
      }
      throw e;
    }
    const job = (await trainer.getJob({ id: jobId })).job!;
    if (job.state !== JobState.SUCCEEDED) {
      const why = job.error || finalMessage || `state ${JobState[job.state]}`;
      throw new FailedPrecondition(`training job ${jobId} did not succeed: ${why}`);
    }
    const adapterDir = await store.localPath("adapters", job.outputAdapter || adapterName);
    const png = join(adapterDir, "loss.png");
    const lossPng = await stat(png).then(() => png, () => null);
    emit({
      type: "trained",
      adapter: job.outputAdapter || adapterName,
      ms: Date.now() - t,
      lossPng,
      firstLoss: losses[0]?.loss ?? NaN,
      lastLoss: losses.at(-1)?.loss ?? NaN,
    });
    checkCancel();

    // ---- LoadAdapter -----------------------------------------------------------------------
    const adapter = job.outputAdapter || adapterName;
    stage("load", `LoadAdapter "${adapter}" into the inference service`);
    const loaded = await inference.loadAdapter({ name: adapter, model: nf4Name }, call);
    emit({ type: "adapter-loaded", name: adapter, residentBytes: Number(loaded.adapter?.residentBytes ?? 0), loadMs: loaded.adapter?.loadMs ?? 0 });

    // ---- Generate, without and with the adapter ---------------------------------------------
    stage("generate", "Generate (greedy) with the base alone and with the adapter");
    // The built-in pair: exactly the rest of the story (one token per byte), so a recitation ends
    // where the story does.
    const rest = Buffer.byteLength(DEMO_TEXT) - Buffer.byteLength(prompt);
    let maxNewTokens = o.maxNewTokens ?? (builtin ? (data.source.kind === "builtin" && rest > 0 ? rest : 150) : 64);
    // The service refuses a request that cannot fit the context. A prompt has at most one token
    // per byte plus the special tokens, so this bound is safe without the tokenizer at hand.
    const room = Number.isInteger(maxPositions) ? maxPositions - Buffer.byteLength(prompt) - 2 : Infinity;
    if (room < maxNewTokens) {
      maxNewTokens = Math.max(1, room);
      emit({ type: "note", message: `generating ${maxNewTokens} tokens: the model's context is ${maxPositions} tokens` });
    }
    const gens: Record<"base" | "adapter", { text: string; completionTokens: number }> = {
      base: { text: "", completionTokens: 0 },
      adapter: { text: "", completionTokens: 0 },
    };
    // Both requests at once: the inference service batches them in one forward per step.
    await Promise.all(
      (["base", "adapter"] as const).map(async (which) => {
        const started = Date.now();
        const r = await inference.generate(
          { model: nf4Name, adapter: which === "adapter" ? adapter : "", prompt, maxNewTokens, sampling: { temperature: 0 } },
          call,
        );
        gens[which] = { text: r.text, completionTokens: r.usage?.completionTokens ?? 0 };
        emit({
          type: "generation",
          which,
          text: r.text,
          completionTokens: r.usage?.completionTokens ?? 0,
          finishReason: FinishReason[r.finishReason].toLowerCase(),
          ms: Date.now() - started,
        });
      }),
    );
    timings.generate = Date.now() - stageStart;
    current = undefined;
    timings.total = Date.now() - t0;
    succeeded = true;
    return {
      dataDir,
      dataDirIsTemp,
      url: server.url,
      baseModel: baseName,
      nf4Model: nf4Name,
      dataset: datasetName,
      jobId,
      adapter,
      prompt,
      base: gens.base,
      adapterGeneration: gens.adapter,
      losses,
      lossPng,
      timingsMs: timings,
    };
  } catch (e) {
    if (signal.aborted && !(e instanceof Cancelled)) throw new Cancelled("demo cancelled", { cause: e });
    // Errors from the services arrive as ConnectErrors: back to the typed error they were.
    const err = e instanceof ConnectError ? fromConnectError(e) : e;
    if (serviceLog.length > 0 && err instanceof Error) {
      // What the services logged explains most failures; keep it with the error.
      (err as Error & { serviceLog?: string[] }).serviceLog = serviceLog.slice(-20);
    }
    throw err;
  } finally {
    o.signal.removeEventListener("abort", onAbort);
    if (server) await server.close().catch(() => undefined);
    await rm(scratch, { recursive: true, force: true });
    // A temporary store of a failed run holds nothing worth keeping; a given --data-dir is left alone.
    if (!succeeded && dataDirIsTemp) await rm(dataDir, { recursive: true, force: true });
  }
}
