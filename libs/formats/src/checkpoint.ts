/**
 * A Hugging Face checkpoint directory: config.json + safetensors weights (single or sharded) +
 * tokenizer files. Original (F32/F16/BF16) or pre-quantized bitsandbytes 4-bit.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { InvalidArgument, NotFound, pathExists } from "@qlora/core";
import type { WeightTensor } from "./weight.js";
import { parseModelConfig, type ModelConfig } from "./config.js";
import { isFloatDtype, KERNEL_DTYPE, type FloatDtype } from "./dtype.js";
import { bnbWeightKeyOf, QUANT_STATE_SUFFIX, readBnb4bitWeight, type ReadBnb4bitOptions } from "./bnb4bit.js";
import { canonicalToHf, detectKeyPrefix, expectedWeights, hfToCanonical, linearWeightNames, type KeyPrefix } from "./names.js";
import { SafetensorsSet, type ShardedTensor } from "./sharded.js";
import { JsonSyntaxError, parseJson } from "./pyjson.js";

/** Files besides the weights that belong with a model (copied by the quantizer when present). */
export const TOKENIZER_FILES = [
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
] as const;

/** Reads and parses a JSON file: NotFound when missing, InvalidArgument when malformed. */
export async function readJsonFile(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`${path}: no such file`, { cause: e });
    throw e;
  }
  try {
    return parseJson(text);
  } catch (e) {
    if (e instanceof JsonSyntaxError) throw new InvalidArgument(`${path}: not valid JSON (${e.message})`);
    throw e;
  }
}

export class HfCheckpoint {
  private constructor(
    readonly dir: string,
    readonly config: ModelConfig,
    readonly weights: SafetensorsSet,
    readonly prefix: KeyPrefix,
  ) {}

  /**
   * Opens and validates a checkpoint: config.json (typed), the safetensors header(s), and that every
   * weight the architecture needs is present with the right shape and a float dtype (pre-quantized
   * linear weights: their bnb tensors are present).
   */
  static async open(dir: string): Promise<HfCheckpoint> {
    if (!(await pathExists(dir))) throw new NotFound(`${dir}: no such checkpoint directory`);
    const configPath = join(dir, "config.json");
    const config = parseModelConfig(await readJsonFile(configPath), configPath);
    const weights = await SafetensorsSet.open(dir);
    try {
      const prefix = detectKeyPrefix(config.family, weights.tensors.keys());
      const ck = new HfCheckpoint(dir, config, weights, prefix);
      ck.validate();
      return ck;
    } catch (e) {
      await weights.close();
      throw e;
    }
  }

  /** True when config.json carries a bitsandbytes quantization_config. */
  get prequantized(): boolean {
    return this.config.quantization !== null;
  }

  /** HF key → tensor info (dtype, shape, byte length, shard). */
  get tensors(): ReadonlyMap<string, ShardedTensor> {
    return this.weights.tensors;
  }

  canonicalName(hfKey: string): string | null {
    return hfToCanonical(hfKey, this.config.family, this.prefix);
  }

  hfName(canonical: string): string {
    return canonicalToHf(canonical, this.config.family, this.prefix);
  }

  /** Whether the checkpoint holds a tensor with this canonical name. */
  has(canonical: string): boolean {
    return this.weights.tensors.has(this.hfName(canonical));
  }

  /** Raw bytes of one tensor by HF key. */
  read(hfKey: string): Promise<Buffer> {
    return this.weights.read(hfKey);
  }

  /** Whether the weight (canonical name) is stored as bitsandbytes NF4. */
  isQuantized(canonical: string): boolean {
    return this.weights.tensors.has(`${this.hfName(canonical)}.${QUANT_STATE_SUFFIX}`);
  }

  /**
   * One weight as a WeightTensor by canonical name: dense f32/f16/bf16 as stored, or nf4 with the
   * absmax resolved to float32 (`doubleQuant: "keep"`: left double-quantized as stored, see
   * ReadBnb4bitOptions). A tied `lm_head` that is absent is NotFound (use embed_tokens).
   */
  async readWeight(canonical: string, options: ReadBnb4bitOptions = {}): Promise<WeightTensor> {
    const key = this.hfName(canonical);
    if (this.isQuantized(canonical)) {
      return readBnb4bitWeight(key, { info: (n) => this.weights.tensors.get(n), read: (n) => this.weights.read(n) }, options);
    }
    const t = this.weights.tensors.get(key);
    if (!t) throw new NotFound(`${this.dir}: no tensor ${key} (canonical ${canonical})`);
    if (!isFloatDtype(t.dtype)) throw new InvalidArgument(`${this.dir}: ${key} has dtype ${t.dtype}; weights must be F32, F16 or BF16`);
    return { dtype: KERNEL_DTYPE[t.dtype], shape: t.shape.slice(), data: await this.weights.read(key) };
  }

  /** Canonical names of the decoder layers' linear weights. */
  linearWeights(): string[] {
    return linearWeightNames(this.config);
  }

  /** Tokenizer & generation files present in the directory. */
  async tokenizerFiles(): Promise<string[]> {
    const out: string[] = [];
    for (const f of TOKENIZER_FILES) if (await pathExists(join(this.dir, f))) out.push(f);
    return out;
  }

  private validate(): void {
    const cfg = this.config;
    const where = this.dir;
    for (const [name, exp] of expectedWeights(cfg)) {
      const key = this.hfName(name);
      const t = this.weights.tensors.get(key);
      if (!t) {
        if (exp.required) throw new InvalidArgument(`${where}: missing tensor ${key} required by the ${cfg.architecture} config`);
        continue;
      }
      if (this.prequantized && this.weights.tensors.has(`${key}.${QUANT_STATE_SUFFIX}`)) {
        // Packed NF4: the logical shape lives in the quant state; readWeight checks it against the bytes.
        if (t.dtype !== "U8") throw new InvalidArgument(`${where}: ${key} has a quant state but dtype ${t.dtype} (expected U8)`);
        continue;
      }
      if (!isFloatDtype(t.dtype)) throw new InvalidArgument(`${where}: ${key} has dtype ${t.dtype}; weights must be F32, F16 or BF16`);
      if (t.shape.join(",") !== exp.shape.join(",")) {
        throw new InvalidArgument(`${where}: ${key} has shape [${t.shape.join(", ")}] but the config implies [${exp.shape.join(", ")}]`);
      }
    }
    if (!this.prequantized) {
      for (const k of this.weights.tensors.keys()) {
        if (bnbWeightKeyOf(k)) throw new InvalidArgument(`${where}: ${k} looks like a bitsandbytes tensor but config.json has no quantization_config`);
      }
    }
  }

  /** The dtype shared by the float tensors (the checkpoint's storage dtype), or null when mixed. */
  storageDtype(): FloatDtype | null {
    let d: FloatDtype | null = null;
    for (const [k, t] of this.weights.tensors) {
      if (bnbWeightKeyOf(k) || this.weights.tensors.has(`${k}.${QUANT_STATE_SUFFIX}`)) continue;
      if (!isFloatDtype(t.dtype)) continue;
      if (d && d !== t.dtype) return null;
      d = t.dtype;
    }
    return d;
  }

  close(): Promise<void> {
    return this.weights.close();
  }
}
