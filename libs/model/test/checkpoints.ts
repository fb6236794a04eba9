/**
 * Test checkpoints derived from stories260K: a copy with edited weights (LoRA merged in) and a
 * bitsandbytes pre-quantized copy, written with the formats library's own writers.
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  HfCheckpoint,
  bnb4bitTensors,
  bnbQuantizationConfig,
  f32Bytes,
  serializeSafetensors,
  toFloat32,
  type NamedTensor,
} from "@qlora/formats";
import { doubleQuantizeAbsmax, quantizeNf4 } from "@qlora/kernels";

const SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

function copySideFiles(src: string, dst: string, config?: Record<string, unknown>): void {
  mkdirSync(dst, { recursive: true });
  for (const f of SIDE_FILES) if (existsSync(join(src, f))) copyFileSync(join(src, f), join(dst, f));
  const cfg = config ?? JSON.parse(readFileSync(join(src, "config.json"), "utf8"));
  writeFileSync(join(dst, "config.json"), JSON.stringify(cfg, null, 2));
}

/** All tensors of a (dense) checkpoint as float32, by HF key. */
export async function readAllF32(dir: string): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
  const ck = await HfCheckpoint.open(dir);
  try {
    const out = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const [key, info] of ck.tensors) {
      const bytes = await ck.read(key);
      out.set(key, { shape: info.shape.slice(), data: toFloat32(bytes, info.dtype as "F32" | "F16" | "BF16") });
    }
    return out;
  } finally {
    await ck.close();
  }
}

/** Writes `tensors` (float32) as a dense checkpoint in `dst`, with src's config and tokenizer. */
export function writeDenseCheckpoint(src: string, dst: string, tensors: Map<string, { shape: number[]; data: Float32Array }>): void {
  copySideFiles(src, dst);
  const list: NamedTensor[] = [...tensors].map(([name, t]) => ({ name, dtype: "F32", shape: t.shape, data: f32Bytes(t.data) }));
  writeFileSync(join(dst, "model.safetensors"), serializeSafetensors(list, { format: "pt" }));
}

/** float32 → bfloat16 bits, round to nearest even (test data has no NaN). */
function toBf16Bytes(a: Float32Array): Uint8Array {
  const u = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = (u[i]! + 0x7fff + ((u[i]! >>> 16) & 1)) >>> 16;
  return new Uint8Array(out.buffer);
}

/** src with every tensor stored as BF16 (torch_dtype bfloat16), like most hub checkpoints. */
export async function writeBf16Checkpoint(src: string, dst: string): Promise<void> {
  const tensors = await readAllF32(src);
  const config = { ...JSON.parse(readFileSync(join(src, "config.json"), "utf8")), torch_dtype: "bfloat16" };
  copySideFiles(src, dst, config);
  const list: NamedTensor[] = [...tensors].map(([name, t]) => ({ name, dtype: "BF16", shape: t.shape, data: toBf16Bytes(t.data) }));
  writeFileSync(join(dst, "model.safetensors"), serializeSafetensors(list, { format: "pt" }));
}

/**
 * Writes src as a bitsandbytes NF4 checkpoint (every decoder linear quantized, blocksize 64),
 * like `qlora quantize` / transformers' save_pretrained of a load_in_4bit model.
 */
export async function writeBnbCheckpoint(src: string, dst: string, doubleQuant: boolean): Promise<void> {
  const ck = await HfCheckpoint.open(src);
  try {
    const linear = new Set(ck.linearWeights().map((n) => ck.hfName(n)));
    const list: NamedTensor[] = [];
    for (const [key, info] of ck.tensors) {
      const bytes = await ck.read(key);
      if (!linear.has(key)) {
        list.push({ name: key, dtype: info.dtype, shape: info.shape.slice(), data: bytes });
        continue;
      }
      const n = info.shape.reduce((a, b) => a * b, 1);
      const q = quantizeNf4(bytes, "f32", n, 64);
      list.push(
        ...bnb4bitTensors(key, {
          shape: info.shape.slice(),
          dtype: "float32",
          blocksize: 64,
          packed: q.packed,
          ...(doubleQuant ? { doubleQuant: doubleQuantizeAbsmax(q.absmax, 256) } : { absmax: q.absmax }),
        }),
      );
    }
    const config = { ...ck.config.raw, quantization_config: bnbQuantizationConfig({ doubleQuant, computeDtype: "float32", skipModules: null }) };
    copySideFiles(src, dst, config);
    writeFileSync(join(dst, "model.safetensors"), serializeSafetensors(list, { format: "pt" }));
  } finally {
    await ck.close();
  }
}
