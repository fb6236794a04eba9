/**
 * Quantizes a Hugging Face checkpoint to the bitsandbytes NF4 layout that transformers loads as a
 * pre-quantized model (../../shared/docs/formats.md §1-3; our notes in docs/formats.md).
 *
 * Streaming: one input tensor is read, quantized (decoder linear weights) or copied (everything else),
 * and written before the next is read, so memory stays near the largest tensor. Atomic: everything is
 * written into a temp directory next to the output and renamed into place at the end; any failure
 * (bad input, I/O error, abort) removes the temp directory and leaves no output.
 */
import { copyFile, mkdir, open, readFile, rm, stat } from "node:fs/promises";
import { basename, dirname, join, resolve, sep } from "node:path";
import { AlreadyExists, Cancelled, FailedPrecondition, fsyncDir, fsyncFile, InvalidArgument, NotFound, pathExists, renameDirIntoPlace, tempSibling } from "@qlora/core";
import {
  bnb4bitPlan,
  bnb4bitTensors,
  bnbQuantizationConfig,
  bnbWeightKeyOf,
  canonicalToModulePath,
  DEFAULT_MAX_SHARD_SIZE,
  HfCheckpoint,
  isFloatDtype,
  isSkippedModule,
  isValidBlocksize,
  KERNEL_DTYPE,
  naturalCompare,
  numel,
  parseJson,
  parseQuantStateJson,
  pyJsonDumps,
  QUANT_STATE_SUFFIX,
  ShardedSafetensorsWriter,
  TORCH_DTYPE,
  TOKENIZER_FILES,
  type ComputeDtype,
  type ModelConfig,
  type PyJsonValue,
  type ShardPlanEntry,
} from "@qlora/formats";
import { doubleQuantizeAbsmax, quantizeNf4 } from "@qlora/kernels";
import { listFiles, MANIFEST_FILE, readManifestFile, sha256File, writeManifestFor, type ManifestFile } from "@qlora/store";

export interface QuantizeProgress {
  tensorsDone: number;
  tensorsTotal: number;
  /** Input bytes read so far. */
  bytesDone: number;
  bytesTotal: number;
  /** The input tensor just processed (its Hugging Face key). */
  tensor: string;
  /** Whether that tensor was quantized to NF4 (else copied unchanged). */
  quantized: boolean;
}

export interface QuantizeOptions {
  /** A Hugging Face checkpoint directory (config.json + safetensors, single or sharded). */
  modelDir: string;
  /** The directory to create. Must not exist unless `overwrite`. */
  outDir: string;
  /** NF4 block size: a power of two in 32..4096; default 64 (what transformers/bnb use). */
  blocksize?: number;
  /** Double quantization of the absmax (bnb_4bit_use_double_quant); default true. */
  doubleQuant?: boolean;
  /** bnb_4bit_compute_dtype written to quantization_config; default "bfloat16". */
  computeDtype?: ComputeDtype;
  /** Modules kept in full precision (transformers' llm_int8_skip_modules matching rules). */
  skipModules?: string[];
  /** Largest output shard in bytes; default 2 GB (2e9). Above it, shards + model.safetensors.index.json. */
  maxShardSize?: number;
  /** Replace an existing outDir (atomically swapped in at the end). Default false. */
  overwrite?: boolean;
  onProgress?: (p: QuantizeProgress) => void;
  signal?: AbortSignal;
  /** Recorded as `source_model` in manifest.json meta (e.g. the store name of the input). */
  sourceModel?: string;
}

/** The options that do not concern where the output goes (writeQuantizedCheckpoint's input). */
export type QuantizeSettings = Omit<QuantizeOptions, "outDir" | "overwrite">;

export interface QuantizationInfo {
  quantType: "nf4";
  blocksize: number;
  doubleQuant: boolean;
  computeDtype: ComputeDtype;
  /** llm_int8_skip_modules as written (empty: none, i.e. transformers' default of lm_head). */
  skipModules: string[];
}

export interface QuantizeResult {
  outDir: string;
  config: ModelConfig;
  quantization: QuantizationInfo;
  /** Every output file with size and sha256 (what manifest.json lists). */
  files: ManifestFile[];
  /** Weight shard file names. */
  shards: string[];
  indexFile: string | null;
  tensorsQuantized: number;
  tensorsCopied: number;
  bytesIn: number;
  /** Total size of the output files. */
  bytesOut: number;
  /** Parameters of the model (logical elements, counting quantized weights by their original shape). */
  parameters: number;
  elapsedMs: number;
}

interface ValidOptions {
  blocksize: number;
  doubleQuant: boolean;
  computeDtype: ComputeDtype;
  skipModules: string[];
  maxShardSize: number;
}

function validateOptions(o: QuantizeSettings): ValidOptions {
  const blocksize = o.blocksize ?? 64;
  if (!isValidBlocksize(blocksize)) throw new InvalidArgument(`blocksize must be a power of two in 32..4096, got ${blocksize}`);
  const computeDtype = o.computeDtype ?? "bfloat16";
  if (computeDtype !== "bfloat16" && computeDtype !== "float16" && computeDtype !== "float32") {
    throw new InvalidArgument(`compute dtype must be bfloat16, float16 or float32, got ${JSON.stringify(computeDtype)}`);
  }
  const skipModules = o.skipModules ?? [];
  if (!Array.isArray(skipModules) || !skipModules.every((s) => typeof s === "string" && /^[A-Za-z0-9_.-]+$/.test(s) && !s.startsWith(".") && !s.endsWith("."))) {
    throw new InvalidArgument(`skip modules must be module names like "q_proj" or "model.layers.0.mlp", got ${JSON.stringify(skipModules)}`);
  }
  const maxShardSize = o.maxShardSize ?? DEFAULT_MAX_SHARD_SIZE;
  if (!Number.isSafeInteger(maxShardSize) || maxShardSize < 1) throw new InvalidArgument(`max shard size must be a positive integer, got ${maxShardSize}`);
  if (o.doubleQuant !== undefined && typeof o.doubleQuant !== "boolean") throw new InvalidArgument("doubleQuant must be a boolean");
  return { blocksize, doubleQuant: o.doubleQuant ?? true, computeDtype, skipModules: [...new Set(skipModules)], maxShardSize };
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    const r = signal.reason;
    throw new Cancelled(r instanceof Error ? `quantization cancelled: ${r.message}` : "quantization cancelled", { cause: r });
  }
}

/**
 * Quantizes `modelDir` into a new directory `outDir`, atomically. Throws InvalidArgument (bad options,
 * malformed input), NotFound (missing input), FailedPrecondition (already quantized input),
 * AlreadyExists (outDir exists without overwrite), Cancelled (signal); on any error nothing is left.
 */
export async function quantizeCheckpoint(opts: QuantizeOptions): Promise<QuantizeResult> {
  const v = validateOptions(opts);
  const outDir = resolve(opts.outDir);
  const modelDir = resolve(opts.modelDir);
  if (outDir === modelDir || outDir.startsWith(modelDir + sep) || modelDir.startsWith(outDir + sep)) {
    throw new InvalidArgument(`output directory ${outDir} must not be inside the model directory or contain it`);
  }
  if (!opts.overwrite && (await pathExists(outDir))) throw new AlreadyExists(`${outDir} already exists (pass overwrite to replace it)`);
  checkAborted(opts.signal);
  // Open and validate the input before creating anything.
  const ck = await openInput(modelDir);
  await mkdir(dirname(outDir), { recursive: true });
  const stage = tempSibling(outDir);
  await mkdir(stage);
  try {
    const r = await writeInto(ck, stage, v, opts);
    checkAborted(opts.signal);
    await renameDirIntoPlace(stage, outDir, opts.overwrite ?? false, () => new AlreadyExists(`${outDir} already exists`));
    return { ...r, outDir };
  } catch (e) {
    await rm(stage, { recursive: true, force: true });
    throw e;
  } finally {
    await ck.close();
  }
}

/**
 * The same quantization written into an existing empty directory (e.g. an ArtifactStore staging
 * directory), without the final rename: the caller owns atomicity (commit/abort). On failure the
 * files written so far are left for the caller's abort to remove.
 */
export async function writeQuantizedCheckpoint(opts: QuantizeSettings & { stagingDir: string }): Promise<QuantizeResult> {
  const v = validateOptions(opts);
  const dir = resolve(opts.stagingDir);
  let entries: string[];
  try {
    entries = await listFiles(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`${dir}: no such directory`);
    throw e;
  }
  if (entries.length > 0) throw new FailedPrecondition(`${dir} is not empty`);
  checkAborted(opts.signal);
  const ck = await openInput(resolve(opts.modelDir));
  try {
    const r = await writeInto(ck, dir, v, opts);
    return { ...r, outDir: dir };
  } finally {
    await ck.close();
  }
}

async function openInput(modelDir: string): Promise<HfCheckpoint> {
  if (!(await pathExists(join(modelDir, "config.json")))) {
    if (!(await pathExists(modelDir))) throw new NotFound(`${modelDir}: no such model directory`);
    throw new NotFound(`${modelDir}: config.json is missing (not a Hugging Face checkpoint directory)`);
  }
  const ck = await HfCheckpoint.open(modelDir);
  if (ck.prequantized) {
    await ck.close();
    throw new FailedPrecondition(`${modelDir} is already quantized (config.json has a quantization_config)`);
  }
  return ck;
}

async function writeInto(ck: HfCheckpoint, dir: string, v: ValidOptions, opts: QuantizeSettings): Promise<Omit<QuantizeResult, "outDir">> {
  const t0 = Date.now();
  const cfg = ck.config;
  const linear = new Set(ck.linearWeights().map((c) => ck.hfName(c)));
  // transformers must know which modules stay full precision on load; once a list is given it
  // replaces its default (lm_head), so lm_head is always part of a non-empty list.
  const skipList = v.skipModules.length ? ["lm_head", ...v.skipModules.filter((s) => s !== "lm_head")] : null;
  const keys = [...ck.tensors.keys()].sort(naturalCompare);
  const quantize = new Map<string, boolean>();
  for (const k of keys) {
    const t = ck.tensors.get(k)!;
    let q = false;
    if (linear.has(k)) {
      const canonical = ck.canonicalName(k)!;
      const module = canonicalToModulePath(canonical.slice(0, -".weight".length), cfg.family);
      q = !isSkippedModule(module, skipList) && isFloatDtype(t.dtype) && t.shape.length === 2;
    }
    quantize.set(k, q);
  }
  const plan: ShardPlanEntry[] = [];
  for (const k of keys) {
    const t = ck.tensors.get(k)!;
    if (quantize.get(k)) plan.push(...bnb4bitPlan(k, t.shape, TORCH_DTYPE[t.dtype as "F32" | "F16" | "BF16"], v.blocksize, v.doubleQuant));
    else plan.push({ name: k, dtype: t.dtype, shape: t.shape.slice() });
  }
  const writer = await ShardedSafetensorsWriter.create(dir, plan, { maxShardSize: v.maxShardSize, metadata: { format: "pt" } });
  const bytesTotal = keys.reduce((a, k) => a + ck.tensors.get(k)!.byteLength, 0);
  let bytesDone = 0;
  let tensorsQuantized = 0;
  let parameters = 0;
  let shards: { files: string[]; indexFile: string | null };
  try {
    for (let i = 0; i < keys.length; i++) {
      checkAborted(opts.signal);
      const k = keys[i]!;
      const t = ck.tensors.get(k)!;
      const data = await ck.read(k);
      const q = quantize.get(k)!;
      if (q) {
        const dtype = t.dtype as "F32" | "F16" | "BF16";
        const n = numel(t.shape);
        const { packed, absmax } = quantizeNf4(data, KERNEL_DTYPE[dtype], n, v.blocksize);
        const parts = bnb4bitTensors(k, {
          shape: t.shape,
          dtype: TORCH_DTYPE[dtype],
          blocksize: v.blocksize,
          packed,
          ...(v.doubleQuant ? { doubleQuant: doubleQuantizeAbsmax(absmax) } : { absmax }),
        });
        for (const p of parts) await writer.write(p.name, p.data, p.shape);
        tensorsQuantized++;
      } else {
        await writer.write(k, data);
      }
      parameters += numel(t.shape);
      bytesDone += t.byteLength;
      opts.onProgress?.({ tensorsDone: i + 1, tensorsTotal: keys.length, bytesDone, bytesTotal, tensor: k, quantized: q });
    }
    shards = await writer.finish();
  } catch (e) {
    await writer.abort();
    throw e;
  }
  checkAborted(opts.signal);

  // config.json: the input's, re-parsed keeping Python's int/float distinction, plus quantization_config.
  const configText = await readFile(join(ck.dir, "config.json"), "utf8");
  const config = parseJson(configText, { lossless: true }) as Record<string, PyJsonValue>;
  config.quantization_config = bnbQuantizationConfig({ doubleQuant: v.doubleQuant, computeDtype: v.computeDtype, skipModules: skipList });
  await writeSynced(join(dir, "config.json"), pyJsonDumps(config, { indent: 2, sortKeys: true }) + "\n");
  for (const f of await ck.tokenizerFiles()) {
    await copyFile(join(ck.dir, f), join(dir, f));
    await fsyncFile(join(dir, f));
  }
  await fsyncDir(dir);
  const meta: Record<string, string> = { tool: "qlora quantize" };
  if (opts.sourceModel) meta.source_model = opts.sourceModel;
  const manifest = await writeManifestFor(dir, meta);
  await fsyncDir(dir);
  return {
    config: cfg,
    quantization: { quantType: "nf4", blocksize: v.blocksize, doubleQuant: v.doubleQuant, computeDtype: v.computeDtype, skipModules: skipList ?? [] },
    files: manifest.files,
    shards: shards.files,
    indexFile: shards.indexFile,
    tensorsQuantized,
    tensorsCopied: keys.length - tensorsQuantized,
    bytesIn: bytesTotal,
    bytesOut: manifest.total_size,
    parameters,
    elapsedMs: Date.now() - t0,
  };
}

async function writeSynced(path: string, text: string): Promise<void> {
  const fh = await open(path, "wx");
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export interface ModelDescription {
  name: string;
  /** config.architectures[0], e.g. "LlamaForCausalLM". */
  architecture: string;
  modelType: string;
  quantized: boolean;
  quantization: QuantizationInfo | null;
  /** Total size of the files. */
  sizeBytes: number;
  parameters: number;
  /** From manifest.json when present; otherwise sizes with sha256 "" unless `hash` was requested. */
  files: ManifestFile[];
  /** ISO 8601, from the manifest; null without one. */
  createdAt: string | null;
  sourceModel: string | null;
}

/**
 * Describes a model directory for GetModel/ListModels: architecture, quantization, size, parameter
 * count (quantized weights counted by their original shapes), files. Validates the checkpoint.
 */
export async function describeModel(dir: string, name = basename(dir), opts: { hash?: boolean } = {}): Promise<ModelDescription> {
  const ck = await HfCheckpoint.open(dir);
  try {
    let parameters = 0;
    let blocksize: number | null = null;
    for (const [k, t] of ck.tensors) {
      if (bnbWeightKeyOf(k)) continue;
      const qsKey = `${k}.${QUANT_STATE_SUFFIX}`;
      if (ck.tensors.has(qsKey)) {
        const qs = parseQuantStateJson(await ck.read(qsKey), k);
        parameters += numel(qs.shape);
        blocksize ??= qs.blocksize;
      } else parameters += numel(t.shape);
    }
    let files: ManifestFile[];
    let createdAt: string | null = null;
    let sourceModel: string | null = null;
    try {
      const m = await readManifestFile(dir);
      files = m.files;
      createdAt = m.created_at || null;
      sourceModel = m.meta.source_model ?? null;
    } catch (e) {
      if (!(e instanceof NotFound)) throw e;
      files = [];
      for (const p of await listFiles(dir)) {
        if (p === MANIFEST_FILE) continue;
        const abs = join(dir, ...p.split("/"));
        files.push({ path: p, size: (await stat(abs)).size, sha256: opts.hash ? await sha256File(abs) : "" });
      }
    }
    const q = ck.config.quantization;
    return {
      name,
      architecture: ck.config.architecture,
      modelType: ck.config.modelType,
      quantized: q !== null,
      quantization: q
        ? { quantType: "nf4", blocksize: blocksize ?? 64, doubleQuant: q.doubleQuant, computeDtype: q.computeDtype, skipModules: q.skipModules ?? [] }
        : null,
      sizeBytes: files.reduce((a, f) => a + f.size, 0),
      parameters,
      files,
      createdAt,
      sourceModel,
    };
  } finally {
    await ck.close();
  }
}
