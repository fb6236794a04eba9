/**
 * The bitsandbytes 4-bit (NF4) serialization of a Linear weight, and transformers'
 * `quantization_config` (../../shared/docs/formats.md §3).
 *
 * For a weight key `<module>.weight` of shape [out, in] (n = out·in elements, B = ceil(n/blocksize)):
 *   <module>.weight                                U8  [(n+1)/2, 1]   packed codes
 *   <module>.weight.absmax                         U8  [B] (double quant) | F32 [B]
 *   <module>.weight.quant_map                      F32 [16]           the NF4 table
 *   <module>.weight.nested_absmax                  F32 [ceil(B/256)]  double quant only
 *   <module>.weight.nested_quant_map               F32 [256]          double quant only
 *   <module>.weight.quant_state.bitsandbytes__nf4  U8  [len]          json.dumps of the non-tensor fields
 */
import { FailedPrecondition, InvalidArgument } from "@qlora/core";
import { dequantizeAbsmax, NF4_CODE } from "@qlora/kernels";
import type { WeightTensor } from "./weight.js";
import { f32Bytes, f32View, numel, type SafetensorsDtype, type TorchFloatDtype } from "./dtype.js";
import { PyFloat, pyJsonDumps, type PyJsonValue } from "./pyjson.js";
import type { ShardPlanEntry } from "./sharded.js";
import type { TensorInfo } from "./safetensors.js";

export const QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4";
/** bitsandbytes' hard-coded blocksize of the 8-bit quantization of the absmax. */
export const NESTED_BLOCKSIZE = 256;

/** The tensor-key suffixes that accompany a quantized `<module>.weight`, in QuantState.as_dict order. */
export const BNB_AUX_SUFFIXES = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_SUFFIX] as const;

/** True for `<module>.weight.absmax` & co. (not for the packed `.weight` itself). */
export function isBnbAuxKey(name: string): boolean {
  return BNB_AUX_SUFFIXES.some((s) => name.endsWith(`.weight.${s}`)) || /\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$/.test(name);
}

/** The weight key a bnb aux key belongs to, or null. */
export function bnbWeightKeyOf(name: string): string | null {
  for (const s of [...BNB_AUX_SUFFIXES, "quant_state.bitsandbytes__fp4"]) {
    if (name.endsWith(`.weight.${s}`)) return name.slice(0, -(s.length + 1));
  }
  return null;
}

export function isValidBlocksize(bs: number): boolean {
  return Number.isInteger(bs) && bs >= 32 && bs <= 4096 && (bs & (bs - 1)) === 0;
}

export interface QuantState {
  quantType: "nf4";
  blocksize: number;
  /** The weight's dtype before quantization (what dequantization returns in bnb). */
  dtype: TorchFloatDtype;
  /** Original (logical) shape, e.g. [out, in]. */
  shape: number[];
  /** float32 mean of the absmax subtracted before 8-bit quantization; present iff double quant. */
  nestedOffset?: number;
}

/**
 * `json.dumps(qs_dict)` exactly as bitsandbytes packs it (Python separators, field order of
 * QuantState.as_dict, `nested_offset` = repr of the float32 offset as a Python float).
 */
export function quantStateJson(s: QuantState): string {
  const d: Record<string, PyJsonValue> = {
    quant_type: "nf4",
    blocksize: s.blocksize,
    dtype: s.dtype,
    shape: s.shape.slice(),
  };
  if (s.nestedOffset !== undefined) {
    d.nested_blocksize = NESTED_BLOCKSIZE;
    d.nested_dtype = "float32";
    d.nested_offset = new PyFloat(Math.fround(s.nestedOffset));
  }
  return pyJsonDumps(d);
}

/** Parses the packed quant_state JSON of one weight. */
export function parseQuantStateJson(bytes: Uint8Array, what: string): QuantState & { nestedBlocksize?: number } {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes)) as Record<string, unknown>;
  } catch {
    throw new InvalidArgument(`${what}: quant_state is not valid UTF-8 JSON`);
  }
  if (o === null || typeof o !== "object" || Array.isArray(o)) throw new InvalidArgument(`${what}: quant_state is not a JSON object`);
  if (o.quant_type !== "nf4") throw new FailedPrecondition(`${what}: quant_type ${JSON.stringify(o.quant_type)} is not supported (only nf4)`);
  if (typeof o.blocksize !== "number" || !isValidBlocksize(o.blocksize)) throw new InvalidArgument(`${what}: bad blocksize ${JSON.stringify(o.blocksize)}`);
  if (o.dtype !== "float32" && o.dtype !== "float16" && o.dtype !== "bfloat16") throw new InvalidArgument(`${what}: unsupported dtype ${JSON.stringify(o.dtype)}`);
  if (!Array.isArray(o.shape) || !o.shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
    throw new InvalidArgument(`${what}: bad shape ${JSON.stringify(o.shape)}`);
  }
  const out: QuantState & { nestedBlocksize?: number } = {
    quantType: "nf4",
    blocksize: o.blocksize,
    dtype: o.dtype,
    shape: (o.shape as number[]).slice(),
  };
  if (o.nested_offset !== undefined) {
    if (typeof o.nested_offset !== "number" || !Number.isFinite(o.nested_offset)) throw new InvalidArgument(`${what}: bad nested_offset`);
    if (o.nested_dtype !== undefined && o.nested_dtype !== "float32") throw new InvalidArgument(`${what}: unsupported nested_dtype ${JSON.stringify(o.nested_dtype)}`);
    const nb = o.nested_blocksize ?? NESTED_BLOCKSIZE;
    if (typeof nb !== "number" || !Number.isSafeInteger(nb) || nb < 1) throw new InvalidArgument(`${what}: bad nested_blocksize`);
    out.nestedOffset = o.nested_offset;
    out.nestedBlocksize = nb;
  }
  return out;
}

/**
 * The shard-plan entries of one quantized weight, in QuantState.as_dict order, grouped so they share a
 * shard (transformers loads a 4-bit param from the keys of one shard). With double quant the JSON's
 * length depends on the offset computed during quantization, so that entry has no shape yet.
 */
export function bnb4bitPlan(
  weightKey: string,
  shape: readonly number[],
  dtype: TorchFloatDtype,
  blocksize: number,
  doubleQuant: boolean,
): ShardPlanEntry[] {
  const n = numel(shape);
  const b = Math.ceil(n / blocksize);
  const group = weightKey;
  const e: ShardPlanEntry[] = [
    { name: weightKey, dtype: "U8", shape: [Math.ceil(n / 2), 1], group },
    { name: `${weightKey}.absmax`, dtype: doubleQuant ? "U8" : "F32", shape: [b], group },
    { name: `${weightKey}.quant_map`, dtype: "F32", shape: [16], group },
  ];
  if (doubleQuant) {
    e.push({ name: `${weightKey}.nested_absmax`, dtype: "F32", shape: [Math.ceil(b / NESTED_BLOCKSIZE)], group });
    e.push({ name: `${weightKey}.nested_quant_map`, dtype: "F32", shape: [256], group });
  }
  const json = quantStateJson({ quantType: "nf4", blocksize, dtype, shape: [...shape], ...(doubleQuant ? { nestedOffset: 0 } : {}) });
  e.push(
    doubleQuant
      ? // "0.0" stands in for an offset repr of up to ~24 characters.
        { name: `${weightKey}.${QUANT_STATE_SUFFIX}`, dtype: "U8", sizeHint: json.length + 21, group }
      : { name: `${weightKey}.${QUANT_STATE_SUFFIX}`, dtype: "U8", shape: [Buffer.byteLength(json, "utf8")], group },
  );
  return e;
}

export interface Bnb4bitParts {
  shape: number[];
  /** Original safetensors dtype of the weight. */
  dtype: TorchFloatDtype;
  blocksize: number;
  /** ceil(n/2) packed bytes. */
  packed: Uint8Array;
  /** Without double quant: the float32 absmax. */
  absmax?: Float32Array;
  /** With double quant: doubleQuantizeAbsmax's result. */
  doubleQuant?: { qabsmax: Uint8Array; nestedAbsmax: Float32Array; offset: number; quantMap: Float32Array };
}

export interface NamedTensor {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  data: Uint8Array;
}

/** The tensors of one quantized weight, ready to write (keys as in bnb4bitPlan). */
export function bnb4bitTensors(weightKey: string, p: Bnb4bitParts): NamedTensor[] {
  const n = numel(p.shape);
  const b = Math.ceil(n / p.blocksize);
  if (p.packed.byteLength !== Math.ceil(n / 2)) throw new InvalidArgument(`${weightKey}: packed has ${p.packed.byteLength} bytes, expected ${Math.ceil(n / 2)}`);
  const out: NamedTensor[] = [{ name: weightKey, dtype: "U8", shape: [Math.ceil(n / 2), 1], data: p.packed }];
  const quantMap = new Float32Array(NF4_CODE);
  if (p.doubleQuant) {
    const dq = p.doubleQuant;
    if (dq.qabsmax.length !== b) throw new InvalidArgument(`${weightKey}: qabsmax has ${dq.qabsmax.length} codes, expected ${b}`);
    if (dq.quantMap.length !== 256) throw new InvalidArgument(`${weightKey}: nested quant map must have 256 entries`);
    out.push({ name: `${weightKey}.absmax`, dtype: "U8", shape: [b], data: dq.qabsmax });
    out.push({ name: `${weightKey}.quant_map`, dtype: "F32", shape: [16], data: f32Bytes(quantMap) });
    out.push({ name: `${weightKey}.nested_absmax`, dtype: "F32", shape: [dq.nestedAbsmax.length], data: f32Bytes(dq.nestedAbsmax) });
    out.push({ name: `${weightKey}.nested_quant_map`, dtype: "F32", shape: [256], data: f32Bytes(dq.quantMap) });
  } else {
    if (!p.absmax || p.absmax.length !== b) throw new InvalidArgument(`${weightKey}: absmax must have ${b} values`);
    out.push({ name: `${weightKey}.absmax`, dtype: "F32", shape: [b], data: f32Bytes(p.absmax) });
    out.push({ name: `${weightKey}.quant_map`, dtype: "F32", shape: [16], data: f32Bytes(quantMap) });
  }
  const json = Buffer.from(
    quantStateJson({
      quantType: "nf4",
      blocksize: p.blocksize,
      dtype: p.dtype,
      shape: p.shape,
      ...(p.doubleQuant ? { nestedOffset: p.doubleQuant.offset } : {}),
    }),
    "utf8",
  );
  out.push({ name: `${weightKey}.${QUANT_STATE_SUFFIX}`, dtype: "U8", shape: [json.byteLength], data: json });
  return out;
}

/** Where readBnb4bitWeight finds tensors (a SafetensorsSet, a checkpoint, an in-memory map). */
export interface TensorSource {
  info(name: string): TensorInfo | undefined;
  read(name: string): Promise<Uint8Array>;
}

export interface ReadBnb4bitOptions {
  /**
   * A double-quantized weight: "resolve" (default) hands back float32 `absmax` (resolved with the
   * stored nested_quant_map, as bitsandbytes does); "keep" hands back `absmaxDq` — the U8 codes,
   * nested_absmax, nested_quant_map and offset exactly as stored, which the kernels decode as they
   * go (1 byte per block instead of 4). A weight stored without double quant always has `absmax`.
   */
  doubleQuant?: "resolve" | "keep";
}

/**
 * Reads one quantized weight back into a WeightTensor: nf4 packed codes + the block scales (see
 * ReadBnb4bitOptions). Checks every dtype and shape against the quant state.
 */
export async function readBnb4bitWeight(weightKey: string, src: TensorSource, options: ReadBnb4bitOptions = {}): Promise<WeightTensor> {
  const need = (suffix: string, dtype: SafetensorsDtype): TensorInfo => {
    const name = suffix ? `${weightKey}.${suffix}` : weightKey;
    const t = src.info(name);
    if (!t) throw new InvalidArgument(`${weightKey}: missing ${name}`);
    if (t.dtype !== dtype) throw new InvalidArgument(`${name}: dtype ${t.dtype}, expected ${dtype}`);
    return t;
  };
  if (!src.info(`${weightKey}.${QUANT_STATE_SUFFIX}`)) {
    if (src.info(`${weightKey}.quant_state.bitsandbytes__fp4`)) throw new FailedPrecondition(`${weightKey}: FP4 weights are not supported (only NF4)`);
    throw new InvalidArgument(`${weightKey}: missing ${weightKey}.${QUANT_STATE_SUFFIX}`);
  }
  need(QUANT_STATE_SUFFIX, "U8");
  const qs = parseQuantStateJson(await src.read(`${weightKey}.${QUANT_STATE_SUFFIX}`), weightKey);
  const n = numel(qs.shape);
  const b = Math.ceil(n / qs.blocksize);
  const w = need("", "U8");
  if (w.byteLength !== Math.ceil(n / 2)) {
    throw new InvalidArgument(`${weightKey}: packed weight has ${w.byteLength} bytes, shape [${qs.shape.join(", ")}] needs ${Math.ceil(n / 2)}`);
  }
  const qm = need("quant_map", "F32");
  if (qm.byteLength !== 64) throw new InvalidArgument(`${weightKey}.quant_map: expected 16 values`);
  const quantMap = f32View(await src.read(`${weightKey}.quant_map`));
  for (let i = 0; i < 16; i++) {
    if (quantMap[i] !== NF4_CODE[i]) throw new FailedPrecondition(`${weightKey}.quant_map is not the NF4 table (entry ${i} = ${quantMap[i]})`);
  }
  const keep = (options.doubleQuant ?? "resolve") === "keep";
  const packedWeight = (scales: Pick<WeightTensor, "absmax" | "absmaxDq">): Promise<WeightTensor> =>
    src.read(weightKey).then((data) => ({ dtype: "nf4", shape: qs.shape, data, ...scales, blocksize: qs.blocksize }));
  let absmax: Float32Array;
  if (qs.nestedOffset !== undefined) {
    const a = need("absmax", "U8");
    if (a.byteLength !== b) throw new InvalidArgument(`${weightKey}.absmax: ${a.byteLength} codes, expected ${b}`);
    const nb = qs.nestedBlocksize ?? NESTED_BLOCKSIZE;
    const na = need("nested_absmax", "F32");
    if (na.byteLength !== Math.ceil(b / nb) * 4) throw new InvalidArgument(`${weightKey}.nested_absmax: expected ${Math.ceil(b / nb)} values`);
    const nq = need("nested_quant_map", "F32");
    if (nq.byteLength !== 256 * 4) throw new InvalidArgument(`${weightKey}.nested_quant_map: expected 256 values`);
    const qabsmax = new Uint8Array(await src.read(`${weightKey}.absmax`));
    const nestedAbsmax = f32View(await src.read(`${weightKey}.nested_absmax`));
    const offset = Math.fround(qs.nestedOffset);
    const quantMap = f32View(await src.read(`${weightKey}.nested_quant_map`));
    if (keep) return packedWeight({ absmaxDq: { qabsmax, nestedAbsmax, offset, quantMap, nestedBlocksize: nb } });
    absmax = dequantizeAbsmax(qabsmax, nestedAbsmax, offset, quantMap, nb);
  } else {
    const a = need("absmax", "F32");
    if (a.byteLength !== b * 4) throw new InvalidArgument(`${weightKey}.absmax: ${a.byteLength / 4} values, expected ${b}`);
    absmax = f32View(await src.read(`${weightKey}.absmax`));
  }
  return packedWeight({ absmax });
}

export type ComputeDtype = TorchFloatDtype;

export interface BnbQuantizationInfo {
  quantType: "nf4";
  doubleQuant: boolean;
  computeDtype: ComputeDtype;
  /** llm_int8_skip_modules (null: transformers' default, i.e. lm_head). */
  skipModules: string[] | null;
}

/**
 * transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...).to_dict()`:
 * exactly its 13 keys (formats.md §3.4). llm_int8_threshold is a Python float.
 */
export function bnbQuantizationConfig(q: { doubleQuant: boolean; computeDtype: ComputeDtype; skipModules: string[] | null }): Record<string, PyJsonValue> {
  return {
    _load_in_4bit: true,
    _load_in_8bit: false,
    bnb_4bit_compute_dtype: q.computeDtype,
    bnb_4bit_quant_storage: "uint8",
    bnb_4bit_quant_type: "nf4",
    bnb_4bit_use_double_quant: q.doubleQuant,
    llm_int8_enable_fp32_cpu_offload: false,
    llm_int8_has_fp16_weight: false,
    llm_int8_skip_modules: q.skipModules ? q.skipModules.slice() : null,
    llm_int8_threshold: new PyFloat(6.0),
    load_in_4bit: true,
    load_in_8bit: false,
    quant_method: "bitsandbytes",
  };
}

/** Validates a config.json `quantization_config` of a pre-quantized checkpoint. */
export function parseBnbQuantizationConfig(v: unknown, what: string): BnbQuantizationInfo {
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new InvalidArgument(`${what}: not an object`);
  const q = v as Record<string, unknown>;
  if (q.quant_method !== "bitsandbytes") {
    throw new FailedPrecondition(`${what}: quant_method ${JSON.stringify(q.quant_method)} is not supported (only bitsandbytes 4-bit)`);
  }
  const in4 = q.load_in_4bit ?? q._load_in_4bit;
  if (in4 !== true) throw new FailedPrecondition(`${what}: only 4-bit bitsandbytes checkpoints are supported (load_in_4bit is not true)`);
  const qt = q.bnb_4bit_quant_type ?? "fp4";
  if (qt !== "nf4") throw new FailedPrecondition(`${what}: bnb_4bit_quant_type ${JSON.stringify(qt)} is not supported (only nf4)`);
  const storage = q.bnb_4bit_quant_storage ?? "uint8";
  if (storage !== "uint8") throw new FailedPrecondition(`${what}: bnb_4bit_quant_storage ${JSON.stringify(storage)} is not supported (only uint8)`);
  const cd = q.bnb_4bit_compute_dtype ?? "float32";
  if (cd !== "float32" && cd !== "float16" && cd !== "bfloat16") throw new InvalidArgument(`${what}: bad bnb_4bit_compute_dtype ${JSON.stringify(cd)}`);
  const dq = q.bnb_4bit_use_double_quant ?? false;
  if (typeof dq !== "boolean") throw new InvalidArgument(`${what}: bnb_4bit_use_double_quant must be a boolean`);
  const sm = q.llm_int8_skip_modules ?? null;
  if (sm !== null && (!Array.isArray(sm) || !sm.every((s) => typeof s === "string"))) {
    throw new InvalidArgument(`${what}: llm_int8_skip_modules must be a list of strings or null`);
  }
  return { quantType: "nf4", doubleQuant: dq, computeDtype: cd, skipModules: sm ? (sm as string[]).slice() : null };
}

/**
 * Whether transformers keeps module `fullName` (e.g. "model.layers.0.self_attn.q_proj") in full
 * precision given llm_int8_skip_modules: its rule in `_replace_with_bnb_linear` is that the module's
 * own name equals an entry, or the full name equals an entry, or an entry followed by "." occurs in
 * the full name (an ancestor module).
 */
export function isSkippedModule(fullName: string, skipModules: readonly string[] | null): boolean {
  if (!skipModules) return false;
  const leaf = fullName.slice(fullName.lastIndexOf(".") + 1);
  return skipModules.some((k) => k === leaf || k === fullName || fullName.includes(k + "."));
}
