/**
 * Checkpoint → NativeModel.
 *
 * - Original checkpoints (F32/F16/BF16) with quant "nf4": every decoder-layer linear weight is
 *   quantized to NF4 as it is read (bitsandbytes `load_in_4bit`), chunk by chunk through one
 *   reused 4 MiB read buffer, so no full-precision tensor is ever in memory (nor left behind as
 *   garbage for the GC): the load peak is the packed model plus that buffer.
 *   Embeddings, lm_head, norms and biases stay as stored (the engine takes f16/bf16 as is), unless
 *   `embeddings: "nf4"` (embed_tokens and an untied lm_head quantized the same way; OPT's
 *   position embeddings stay as stored).
 * - Pre-quantized checkpoints (bitsandbytes layout written by `qlora quantize`): NF4 straight from
 *   disk; double-quantized scales stay as stored (U8 codes + nested fp32 + offset, `absmaxDq`).
 * - Double quantization (`doubleQuant`, default true like bnb_4bit_use_double_quant): the block
 *   scales of weights quantized while loading are double-quantized with doubleQuantizeAbsmax (what
 *   the quantizer service writes), so quantize-on-load and `qlora quantize` + load give the engine
 *   the same bytes; the kernels resolve scales per row / panel as they decode (bit-identical to the
 *   resolved fp32 absmax). `doubleQuant: false` keeps fp32 absmax (resolving a double-quantized file).
 * - quant "none": full precision as stored. A pre-quantized checkpoint has no full precision to
 *   keep; its NF4 weights are dequantized to float32 (the exact values the NF4 path computes with),
 *   which makes it a reference for the packed kernels.
 */
import { join } from "node:path";
import { InvalidArgument, NotFound } from "@qlora/core";
import { HfCheckpoint, KERNEL_DTYPE, expectedWeights, isFloatDtype, readJsonFile, type ModelConfig } from "@qlora/formats";
import {
  NativeModel,
  dequantizeAbsmax,
  dequantizeNf4,
  doubleQuantizeAbsmax,
  quantizeNf4,
  checkNf4Blocksize,
  resolveDevice,
  type DecodeMatmul,
  type Device,
  type DeviceRequest,
  type EngineConfig,
  type EngineOptions,
} from "@qlora/kernels";
import { engineConfigFor } from "./engine-config.js";
import { loadTokenizer, type ModelTokenizer } from "./tokenizer.js";
import { samplingDefaults } from "./sampling.js";

/** The weight tensor the engine takes (structurally @qlora/kernels' WeightTensor). */
type EngineWeights = ConstructorParameters<typeof NativeModel>[1];
type EngineTensor = EngineWeights[string];

export type QuantMode = "nf4" | "none";
/** embed_tokens / lm_head: "stored" as in the file, or "nf4" (quantized while loading). */
export type EmbeddingsMode = "stored" | "nf4";

export interface LoadModelOptions {
  /** "nf4" (default): decoder linears in NF4; "none": full precision. */
  quant?: QuantMode;
  /** NF4 block size when quantizing while loading (default 64, as bitsandbytes). */
  blocksize?: number;
  /**
   * Keep NF4 block scales double-quantized in memory (default true, as bnb_4bit_use_double_quant):
   * ~1.06 bytes per 64 weights instead of 4 (Llama-3.2-1B: 15 MiB of scales instead of 58).
   * false: float32 absmax (a double-quantized checkpoint is resolved on load).
   */
  doubleQuant?: boolean;
  /**
   * "stored" (default): embed_tokens and lm_head as in the file. "nf4": both quantized to NF4
   * (blocksize as above) while loading, so a tied lm_head GEMV reads 4-bit weights (Llama-3.2-1B:
   * 525 MB BF16 → 148 MB); costs some accuracy (docs/model.md).
   */
  embeddings?: EmbeddingsMode;
  /** KV-cache slots (sequences decoded at the same time). */
  maxSequences?: number;
  /** Tokens per sequence (prompt + generated); default min(max_position_embeddings, 2048). */
  maxContext?: number;
  /**
   * Decode-step matmul over NF4 weights: "exact" (default) or "int8" (int8 activations, faster,
   * ~1% relative error per output; see EngineOptions.decodeMatmul and docs/engine.md).
   */
  decodeMatmul?: DecodeMatmul;
  /**
   * "cpu" (default), "cuda" (FailedPrecondition with the reason when no GPU can be used) or "auto"
   * (cuda when available). Resolved before any weight is read; the result is LoadedModel.device.
   */
  device?: DeviceRequest;
}

export interface LoadStats {
  /** Where the linear weights came from: quantized while loading, NF4 on disk, or as stored. */
  source: "quantized-on-load" | "prequantized" | "dense";
  /** Linear weights handed to the engine as NF4. */
  nf4Tensors: number;
  /** Bytes of weights handed to the engine (packed NF4 + scales, dense as stored). */
  weightBytes: number;
  loadMs: number;
}

export class LoadedModel {
  private disposed = false;

  constructor(
    readonly dir: string,
    readonly config: ModelConfig,
    readonly engineConfig: EngineConfig,
    readonly native: NativeModel,
    readonly tokenizer: ModelTokenizer,
    readonly quant: QuantMode,
    /** generation_config.json as read (null when absent). */
    readonly generationConfig: Record<string, unknown> | null,
    /** Token ids that end generation (config.json ∪ generation_config.json ∪ tokenizer eos). */
    readonly eosTokenIds: readonly number[],
    readonly stats: LoadStats,
    readonly embeddings: EmbeddingsMode = "stored",
    /** Where the engine runs (the resolved LoadModelOptions.device). */
    readonly device: Device = "cpu",
  ) {}

  get vocabSize(): number {
    return this.engineConfig.vocabSize;
  }

  /** Tokens one sequence may hold (prompt + generated). */
  get maxContext(): number {
    return this.native.maxContext;
  }

  /** Sampling defaults from generation_config.json (greedy unless it says do_sample). */
  get samplingDefaults(): ReturnType<typeof samplingDefaults> {
    return samplingDefaults(this.generationConfig);
  }

  /** Bytes the engine holds: weights, KV caches as allocated now (they grow with the sequences), adapters, scratch. */
  residentBytes(): number {
    return this.native.residentBytes();
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.native.dispose();
  }
}

function idList(v: unknown): number[] {
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === "number" && Number.isSafeInteger(x) && x >= 0);
  return [];
}

async function readOptionalJson(path: string): Promise<Record<string, unknown> | null> {
  try {
    const v = await readJsonFile(path);
    return typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
  } catch (e) {
    if (e instanceof NotFound) return null;
    throw e;
  }
}

function tensorBytes(t: EngineTensor): number {
  const dq = t.absmaxDq;
  const scales = t.absmax?.byteLength ?? (dq ? dq.qabsmax.byteLength + dq.nestedAbsmax.byteLength : 0);
  return t.data.byteLength + scales;
}

/** An nf4 tensor's scales as float32 (resolving a double-quantized form). */
function resolvedAbsmax(t: EngineTensor): Float32Array {
  if (t.absmax) return t.absmax;
  const dq = t.absmaxDq!;
  return dequantizeAbsmax(dq.qabsmax, dq.nestedAbsmax, dq.offset, dq.quantMap, dq.nestedBlocksize ?? 256);
}

/** Bytes of the read buffer that dense tensors stream through while being quantized. */
const QUANTIZE_CHUNK_BYTES = 4 << 20;

/**
 * Reads a dense (F32/F16/BF16) tensor chunk by chunk into `chunk` and quantizes each chunk into
 * its part of the packed result (NF4 blocks are independent, so this equals quantizing the whole
 * tensor at once). Only the packed bytes and absmax are allocated. (Exported for tests.)
 */
export async function readQuantized(ck: HfCheckpoint, name: string, chunk: Uint8Array, blocksize: number): Promise<EngineTensor> {
  const key = ck.hfName(name);
  const info = ck.tensors.get(key);
  if (!info) throw new NotFound(`${ck.dir}: no tensor ${key} (canonical ${name})`);
  if (!isFloatDtype(info.dtype)) throw new InvalidArgument(`${ck.dir}: ${key} has dtype ${info.dtype}; weights must be F32, F16 or BF16`);
  const dtype = KERNEL_DTYPE[info.dtype];
  const es = dtype === "f32" ? 4 : 2;
  const n = info.shape.reduce((a, b) => a * b, 1);
  const packed = new Uint8Array(Math.ceil(n / 2));
  const absmax = new Float32Array(Math.ceil(n / blocksize));
  const per = Math.max(1, Math.floor(chunk.byteLength / es / blocksize)) * blocksize; // elements per chunk, whole blocks
  if (per * es > chunk.byteLength) throw new InvalidArgument(`quantize chunk of ${chunk.byteLength} bytes is smaller than one block`);
  for (let e0 = 0; e0 < n; e0 += per) {
    const cn = Math.min(per, n - e0);
    const src = chunk.subarray(0, cn * es);
    await ck.weights.readRangeInto(key, e0 * es, src);
    const p0 = e0 / 2, b0 = e0 / blocksize; // e0 is a multiple of the (even) blocksize
    quantizeNf4(src, dtype, cn, blocksize, {
      packed: packed.subarray(p0, p0 + Math.ceil(cn / 2)),
      absmax: absmax.subarray(b0, b0 + Math.ceil(cn / blocksize)),
    });
  }
  return { dtype: "nf4", shape: info.shape.slice(), data: packed, absmax, blocksize };
}

/** The weights handed to the engine, by canonical name, and what they amount to. */
export interface EngineWeightSet {
  weights: EngineWeights;
  nf4Tensors: number;
  weightBytes: number;
}

/**
 * Reads the engine's weights from an open checkpoint as loadModel does (exported for tests, which
 * compare the weights two load paths produce). Options as LoadModelOptions, all required.
 */
export async function readEngineWeights(
  ck: HfCheckpoint,
  engineConfig: EngineConfig,
  opts: { quant: QuantMode; embeddings: EmbeddingsMode; blocksize: number; doubleQuant: boolean },
): Promise<EngineWeightSet> {
  const { quant, embeddings, blocksize, doubleQuant } = opts;
  const linear = new Set(ck.linearWeights());
  // what is quantized while loading (when stored dense): the linears, and with embeddings "nf4"
  // the token embedding and an untied lm_head (never OPT's position embeddings)
  const toNf4 = (name: string) => (quant === "nf4" && linear.has(name)) || (embeddings === "nf4" && (name === "embed_tokens" || name === "lm_head"));
  let chunk: Uint8Array | null = null; // allocated on first use, reused for every tensor
  const weights: EngineWeights = {};
  let nf4Tensors = 0;
  let weightBytes = 0;
  for (const [name, expected] of expectedWeights(ck.config)) {
    // A tied lm_head is embed_tokens; a stored copy (OPT files carry one) is not read.
    if (name === "lm_head" && engineConfig.tiedEmbeddings) continue;
    if (!expected.required && !ck.has(name)) continue;
    let t: EngineTensor;
    if (toNf4(name) && !ck.isQuantized(name)) {
      chunk ??= new Uint8Array(QUANTIZE_CHUNK_BYTES);
      t = await readQuantized(ck, name, chunk, blocksize);
      if (doubleQuant) {
        // the quantizer service's own step (bnb4bit double quant): same codes, nested scales, offset
        const { absmax, ...rest } = t;
        t = { ...rest, absmaxDq: doubleQuantizeAbsmax(absmax!) };
      }
    } else {
      // NF4 on disk: scales as stored when kept in NF4 with double quant, else resolved to float32
      t = await ck.readWeight(name, { doubleQuant: quant === "nf4" && doubleQuant ? "keep" : "resolve" });
    }
    if (t.dtype === "nf4" && !toNf4(name) && quant === "none") {
      // NF4 on disk (bitsandbytes) but full precision wanted
      const n = t.shape.reduce((a, b) => a * b, 1);
      const dense = dequantizeNf4(t.data, resolvedAbsmax(t), n, t.blocksize!);
      t = { dtype: "f32", shape: t.shape, data: new Uint8Array(dense.buffer, dense.byteOffset, dense.byteLength) };
    }
    if (t.dtype === "nf4") nf4Tensors++;
    weightBytes += tensorBytes(t);
    weights[name] = t;
  }
  return { weights, nf4Tensors, weightBytes };
}

/** Load a Hugging Face checkpoint directory (see the file comment for the quant modes). */
export async function loadModel(dir: string, options: LoadModelOptions = {}): Promise<LoadedModel> {
  const quant = options.quant ?? "nf4";
  if (quant !== "nf4" && quant !== "none") throw new InvalidArgument(`quant must be "nf4" or "none", got ${JSON.stringify(quant)}`);
  const embeddings = options.embeddings ?? "stored";
  if (embeddings !== "stored" && embeddings !== "nf4") {
    throw new InvalidArgument(`embeddings must be "stored" or "nf4", got ${JSON.stringify(embeddings)}`);
  }
  if (options.decodeMatmul !== undefined && options.decodeMatmul !== "exact" && options.decodeMatmul !== "int8") {
    throw new InvalidArgument(`decodeMatmul must be "exact" or "int8", got ${JSON.stringify(options.decodeMatmul)}`);
  }
  const blocksize = options.blocksize ?? 64;
  checkNf4Blocksize(blocksize);
  const doubleQuant = options.doubleQuant ?? true;
  if (typeof doubleQuant !== "boolean") throw new InvalidArgument(`doubleQuant must be a boolean, got ${JSON.stringify(doubleQuant)}`);
  if (options.device !== undefined && !["auto", "cpu", "cuda"].includes(options.device)) {
    throw new InvalidArgument(`device must be "auto", "cpu" or "cuda", got ${JSON.stringify(options.device)}`);
  }
  const device = resolveDevice(options.device ?? "cpu");
  const t0 = performance.now();

  const ck = await HfCheckpoint.open(dir);
  let tokenizer: ModelTokenizer;
  let generationConfig: Record<string, unknown> | null;
  try {
    // Cheap files first: a directory without a usable tokenizer fails before any weight is read.
    tokenizer = await loadTokenizer(dir);
    generationConfig = await readOptionalJson(join(dir, "generation_config.json"));
  } catch (e) {
    await ck.close();
    throw e;
  }
  let native: NativeModel;
  let engineConfig: EngineConfig;
  let stats: LoadStats;
  try {
    engineConfig = engineConfigFor(ck.config);
    const { weights, nf4Tensors, weightBytes } = await readEngineWeights(ck, engineConfig, { quant, embeddings, blocksize, doubleQuant });
    const maxPos = ck.config.maxPositionEmbeddings;
    const maxContext = options.maxContext ?? Math.min(maxPos, 2048);
    if (!Number.isSafeInteger(maxContext) || maxContext < 2 || maxContext > maxPos) {
      throw new InvalidArgument(`maxContext must be an integer in 2..${maxPos} (max_position_embeddings), got ${maxContext}`);
    }
    const engineOptions: EngineOptions = { maxContext, device };
    if (options.maxSequences !== undefined) engineOptions.maxSequences = options.maxSequences;
    if (options.decodeMatmul !== undefined) engineOptions.decodeMatmul = options.decodeMatmul;
    native = new NativeModel(engineConfig, weights, engineOptions);
    stats = {
      source: ck.prequantized ? "prequantized" : quant === "nf4" ? "quantized-on-load" : "dense",
      nf4Tensors,
      weightBytes,
      loadMs: 0,
    };
  } finally {
    await ck.close();
  }

  const eos = new Set<number>([
    ...idList(ck.config.eosTokenId),
    ...idList(generationConfig?.eos_token_id),
    ...(tokenizer.eosTokenId !== null ? [tokenizer.eosTokenId] : []),
  ]);
  stats.loadMs = performance.now() - t0;
  return new LoadedModel(dir, ck.config, engineConfig, native, tokenizer, quant, generationConfig, [...eos], stats, embeddings, device);
}
