/**
 * PEFT LoRA adapters (../../shared/docs/formats.md §4): `adapter_config.json` +
 * `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_{A,B}.weight`.
 */
import { mkdir, readFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { AlreadyExists, FailedPrecondition, fsyncDir, InvalidArgument, NotFound, pathExists, renameDirIntoPlace, tempSibling, writeFileSynced } from "@qlora/core";
import type { ModelFamily } from "./config.js";
import { f32Bytes, isFloatDtype, toFloat32 } from "./dtype.js";
import { readSafetensorsBuffer, serializeSafetensors } from "./safetensors.js";
import { canonicalToModulePath, modulePathToCanonical } from "./names.js";
import { PyFloat, pyJsonDumps, type PyJsonValue } from "./pyjson.js";
import { readJsonFile } from "./checkpoint.js";

export const ADAPTER_CONFIG = "adapter_config.json";
export const ADAPTER_WEIGHTS = "adapter_model.safetensors";

export type LoraBias = "none" | "all" | "lora_only";

export interface LoraAdapterConfig {
  peftType: "LORA";
  r: number;
  loraAlpha: number;
  loraDropout: number;
  /** A list of module-name suffixes, a regex string (PEFT semantics), or null (architecture default). */
  targetModules: string[] | string | null;
  useRslora: boolean;
  bias: LoraBias;
  baseModelNameOrPath: string | null;
  taskType: string | null;
  /** Per-module overrides (PEFT rank_pattern / alpha_pattern: regex or suffix → value). */
  rankPattern: Record<string, number>;
  alphaPattern: Record<string, number>;
  /** The config as read. */
  raw: Record<string, unknown>;
}

export interface LoraModule {
  /** lora_A.weight, row-major [r, in]. */
  a: Float32Array;
  /** lora_B.weight, row-major [out, r]. */
  b: Float32Array;
  r: number;
  inFeatures: number;
  outFeatures: number;
  /** alpha/r, or alpha/sqrt(r) with use_rslora (per-module patterns applied). */
  scaling: number;
}

export interface PeftAdapter {
  config: LoraAdapterConfig;
  /** Canonical module name (`layers.0.self_attn.q_proj`) → weights. */
  tensors: Map<string, LoraModule>;
  /** The default scaling (lora_alpha / r, or / sqrt(r) with rslora). */
  scaling: number;
}

function loraScaling(alpha: number, r: number, rslora: boolean): number {
  return rslora ? alpha / Math.sqrt(r) : alpha / r;
}

/** PEFT's get_pattern_key: a pattern matches a module when it equals it or matches `(.*\.)?(pattern)$`. */
function patternValue(patterns: Record<string, number>, modulePath: string): number | undefined {
  for (const [k, v] of Object.entries(patterns)) {
    if (k === modulePath) return v;
    let re: RegExp;
    try {
      re = new RegExp(`^(?:.*\\.)?(?:${k})$`);
    } catch {
      continue;
    }
    if (re.test(modulePath)) return v;
  }
  return undefined;
}

/** Validates adapter_config.json. */
export function parseLoraConfig(raw: unknown, what = ADAPTER_CONFIG): LoraAdapterConfig {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) throw new InvalidArgument(`${what}: not a JSON object`);
  const c = raw as Record<string, unknown>;
  if (c.peft_type !== "LORA") throw new FailedPrecondition(`${what}: peft_type ${JSON.stringify(c.peft_type)} is not supported (only LORA)`);
  const r = c.r ?? 8;
  if (typeof r !== "number" || !Number.isSafeInteger(r) || r <= 0) throw new InvalidArgument(`${what}: r must be a positive integer, got ${JSON.stringify(r)}`);
  const alpha = c.lora_alpha ?? 8;
  if (typeof alpha !== "number" || !Number.isFinite(alpha)) throw new InvalidArgument(`${what}: lora_alpha must be a number`);
  const dropout = c.lora_dropout ?? 0;
  if (typeof dropout !== "number" || !(dropout >= 0 && dropout < 1)) throw new InvalidArgument(`${what}: lora_dropout must be in [0, 1)`);
  const tm = c.target_modules ?? null;
  if (tm !== null && typeof tm !== "string" && !(Array.isArray(tm) && tm.every((x) => typeof x === "string"))) {
    throw new InvalidArgument(`${what}: target_modules must be a list of strings, a string or null`);
  }
  const rslora = c.use_rslora ?? false;
  if (typeof rslora !== "boolean") throw new InvalidArgument(`${what}: use_rslora must be a boolean`);
  const bias = c.bias ?? "none";
  if (bias !== "none" && bias !== "all" && bias !== "lora_only") throw new InvalidArgument(`${what}: bias must be "none", "all" or "lora_only"`);
  const strOrNull = (k: string): string | null => {
    const v = c[k];
    if (v === undefined || v === null) return null;
    if (typeof v !== "string") throw new InvalidArgument(`${what}: ${k} must be a string or null`);
    return v;
  };
  const pattern = (k: string, int: boolean): Record<string, number> => {
    const v = c[k] ?? {};
    if (typeof v !== "object" || v === null || Array.isArray(v)) throw new InvalidArgument(`${what}: ${k} must be an object`);
    for (const [pk, pv] of Object.entries(v)) {
      if (typeof pv !== "number" || !Number.isFinite(pv) || (int && (!Number.isSafeInteger(pv) || pv <= 0))) {
        throw new InvalidArgument(`${what}: ${k}[${JSON.stringify(pk)}] must be a ${int ? "positive integer" : "number"}`);
      }
    }
    return { ...(v as Record<string, number>) };
  };
  if (c.use_dora === true) throw new FailedPrecondition(`${what}: DoRA adapters (use_dora) are not supported`);
  if (c.fan_in_fan_out === true) throw new FailedPrecondition(`${what}: fan_in_fan_out adapters are not supported (Llama/OPT use nn.Linear)`);
  return {
    peftType: "LORA",
    r,
    loraAlpha: alpha,
    loraDropout: dropout,
    targetModules: tm === null ? null : typeof tm === "string" ? tm : (tm as string[]).slice(),
    useRslora: rslora,
    bias,
    baseModelNameOrPath: strOrNull("base_model_name_or_path"),
    taskType: strOrNull("task_type"),
    rankPattern: pattern("rank_pattern", true),
    alphaPattern: pattern("alpha_pattern", false),
    raw: c,
  };
}

const KEY_RE = /^(?:base_model\.model\.)?(.+)\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$/;

/** Reads a PEFT LoRA adapter directory (F32/F16/BF16 tensors on disk; returned as float32). */
export async function readPeftAdapter(dir: string): Promise<PeftAdapter> {
  const cfgPath = join(dir, ADAPTER_CONFIG);
  const config = parseLoraConfig(await readJsonFile(cfgPath), cfgPath);
  const wPath = join(dir, ADAPTER_WEIGHTS);
  let buf: Buffer;
  try {
    buf = await readFile(wPath);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    if (await pathExists(join(dir, "adapter_model.bin"))) {
      throw new FailedPrecondition(`${dir}: adapter_model.bin (pickle) is not supported; save the adapter with safetensors`);
    }
    throw new NotFound(`${wPath}: no such file`, { cause: e });
  }
  const st = readSafetensorsBuffer(buf, wPath);
  const halves = new Map<string, { path: string; A?: { shape: number[]; data: Float32Array }; B?: { shape: number[]; data: Float32Array } }>();
  for (const [key, t] of st.tensors) {
    const m = KEY_RE.exec(key);
    if (!m) throw new FailedPrecondition(`${wPath}: unsupported tensor ${JSON.stringify(key)} (only lora_A/lora_B weights are supported)`);
    const path = m[1]!;
    const canonical = modulePathToCanonical(path);
    if (!canonical) throw new InvalidArgument(`${wPath}: ${JSON.stringify(key)} is not inside a decoder layer`);
    if (!isFloatDtype(t.dtype)) throw new InvalidArgument(`${wPath}: ${key} has dtype ${t.dtype} (expected F32, F16 or BF16)`);
    if (t.shape.length !== 2) throw new InvalidArgument(`${wPath}: ${key} must be 2-D, got [${t.shape.join(", ")}]`);
    const h = halves.get(canonical) ?? { path };
    const which = m[2] as "A" | "B";
    if (h[which]) throw new InvalidArgument(`${wPath}: duplicate lora_${which} for ${canonical}`);
    h[which] = { shape: t.shape, data: toFloat32(t.data, t.dtype) };
    halves.set(canonical, h);
  }
  const tensors = new Map<string, LoraModule>();
  for (const [canonical, h] of halves) {
    if (!h.A || !h.B) throw new InvalidArgument(`${wPath}: ${canonical} has lora_${h.A ? "A" : "B"} but no lora_${h.A ? "B" : "A"}`);
    const r = patternValue(config.rankPattern, h.path) ?? config.r;
    const alpha = patternValue(config.alphaPattern, h.path) ?? config.loraAlpha;
    const [ra, inF] = h.A.shape as [number, number];
    const [outF, rb] = h.B.shape as [number, number];
    if (ra !== r || rb !== r) {
      throw new InvalidArgument(`${wPath}: ${canonical}: lora_A [${h.A.shape.join(", ")}] and lora_B [${h.B.shape.join(", ")}] do not match rank ${r}`);
    }
    tensors.set(canonical, { a: h.A.data, b: h.B.data, r, inFeatures: inF, outFeatures: outF, scaling: loraScaling(alpha, r, config.useRslora) });
  }
  if (tensors.size === 0) throw new InvalidArgument(`${wPath}: no LoRA tensors`);
  return { config, tensors, scaling: loraScaling(config.loraAlpha, config.r, config.useRslora) };
}

export interface LoraConfigInput {
  r: number;
  loraAlpha: number;
  loraDropout?: number;
  targetModules: string[] | string;
  useRslora?: boolean;
  bias?: LoraBias;
  baseModelNameOrPath?: string | null;
  taskType?: string | null;
  initLoraWeights?: boolean | string;
  layersToTransform?: number[] | null;
  revision?: string | null;
}

/**
 * The adapter_config.json object PEFT's save_pretrained writes for a LoraConfig: every field with its
 * default, `inference_mode` true. (`peft_version` is left out: it records the PEFT build that wrote
 * the file, and we are not PEFT; loaders treat it as optional.)
 */
export function loraConfigJson(c: LoraConfigInput): Record<string, PyJsonValue> {
  const tm = typeof c.targetModules === "string" ? c.targetModules : [...new Set(c.targetModules)].sort();
  return {
    alora_invocation_tokens: null,
    alpha_pattern: {},
    arrow_config: null,
    auto_mapping: null,
    base_model_name_or_path: c.baseModelNameOrPath ?? null,
    bias: c.bias ?? "none",
    corda_config: null,
    ensure_weight_tying: false,
    eva_config: null,
    exclude_modules: null,
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: c.initLoraWeights ?? true,
    kasa_config: null,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: c.layersToTransform ? c.layersToTransform.slice() : null,
    loftq_config: {},
    lora_alpha: Number.isInteger(c.loraAlpha) ? c.loraAlpha : new PyFloat(c.loraAlpha),
    lora_bias: false,
    lora_dropout: new PyFloat(c.loraDropout ?? 0),
    lora_ga_config: null,
    megatron_config: null,
    megatron_core: "megatron.core",
    modules_to_save: null,
    monteclora_config: null,
    peft_type: "LORA",
    qalora_group_size: 16,
    r: c.r,
    rank_pattern: {},
    revision: c.revision ?? null,
    target_modules: tm,
    target_parameters: null,
    task_type: c.taskType === undefined ? "CAUSAL_LM" : c.taskType,
    trainable_token_indices: null,
    use_bdlora: null,
    use_dora: false,
    use_qalora: false,
    use_rslora: c.useRslora ?? false,
    velora_config: null,
  };
}

export interface LoraModuleInput {
  /** [r, in] row-major. */
  a: Float32Array;
  /** [out, r] row-major. */
  b: Float32Array;
}

/**
 * Writes a PEFT adapter directory atomically (staged next to `dir`, renamed into place):
 * adapter_config.json (json.dumps(indent=2, sort_keys=True)) and adapter_model.safetensors (F32,
 * metadata {"format": "pt"}, keys `base_model.model.<module path>.lora_{A,B}.weight`).
 */
export async function writePeftAdapter(
  dir: string,
  adapter: { config: LoraConfigInput; family: ModelFamily; tensors: ReadonlyMap<string, LoraModuleInput> },
  opts: { overwrite?: boolean } = {},
): Promise<{ files: string[] }> {
  const { config, family } = adapter;
  if (!Number.isSafeInteger(config.r) || config.r <= 0) throw new InvalidArgument(`r must be a positive integer, got ${config.r}`);
  if (!Number.isFinite(config.loraAlpha)) throw new InvalidArgument("lora_alpha must be a number");
  if (adapter.tensors.size === 0) throw new InvalidArgument("an adapter needs at least one module");
  const r = config.r;
  const tensors: { name: string; dtype: "F32"; shape: number[]; data: Uint8Array }[] = [];
  for (const [module, w] of adapter.tensors) {
    const path = canonicalToModulePath(module, family);
    if (w.a.length % r !== 0 || w.b.length % r !== 0 || w.a.length === 0 || w.b.length === 0) {
      throw new InvalidArgument(`${module}: lora_A has ${w.a.length} values and lora_B ${w.b.length}; both must be non-empty multiples of r=${r}`);
    }
    tensors.push({ name: `base_model.model.${path}.lora_A.weight`, dtype: "F32", shape: [r, w.a.length / r], data: f32Bytes(w.a) });
    tensors.push({ name: `base_model.model.${path}.lora_B.weight`, dtype: "F32", shape: [w.b.length / r, r], data: f32Bytes(w.b) });
  }
  if (!opts.overwrite && (await pathExists(dir))) throw new AlreadyExists(`${dir} already exists`);
  await mkdir(dirname(dir), { recursive: true });
  const stage = tempSibling(dir);
  await mkdir(stage);
  try {
    await writeFileSynced(join(stage, ADAPTER_CONFIG), pyJsonDumps(loraConfigJson(config), { indent: 2, sortKeys: true }));
    await writeFileSynced(join(stage, ADAPTER_WEIGHTS), serializeSafetensors(tensors, { format: "pt" }));
    await fsyncDir(stage);
    await renameDirIntoPlace(stage, dir, opts.overwrite ?? false, () => new AlreadyExists(`${dir} already exists`));
  } catch (e) {
    await rm(stage, { recursive: true, force: true });
    throw e;
  }
  return { files: [ADAPTER_CONFIG, ADAPTER_WEIGHTS] };
}

