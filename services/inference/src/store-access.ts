/**
 * What the inference service reads from the artifact store: model and adapter directories by
 * name, adapter metadata (adapter_config.json) and the rule that an adapter belongs to a base.
 *
 * Only small JSON files and safetensors headers are read here (on the event loop, async); weights
 * are read by the engine worker.
 *
 * Adapter limits: before an adapter is handed to the engine (LoadAdapter, or a Generate/Score that
 * names it), its rank (adapter_config.json `r` and `rank_pattern`, and the shapes of the lora_A /
 * lora_B tensors in the safetensors header) and its file size are checked against the server's
 * limits, so an oversized or corrupted adapter is refused (INVALID_ARGUMENT) before any tensor
 * data is read and before the engine serving the base model is touched.
 */
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { FailedPrecondition, InvalidArgument, NotFound, errorMessage } from "@qlora/core";
import { ADAPTER_WEIGHTS, SafetensorsFile } from "@qlora/formats";
import type { ArtifactStore as StoreApi } from "@qlora/store";

/** The parts of libs/store's ArtifactStore this service uses (LocalStore implements them). */
export type ArtifactStore = Pick<StoreApi, "exists" | "list" | "stat" | "localPath">;

export interface StoredLora {
  rank: number;
  alpha: number;
  targetModules: string[];
  useRslora: boolean;
}

export interface StoredAdapter {
  name: string;
  dir: string;
  /** adapter_config.json base_model_name_or_path ("" when absent). */
  baseModel: string;
  lora: StoredLora;
  /** The largest rank adapter_config.json declares: `r` and any `rank_pattern` value. */
  maxConfiguredRank: number;
  sizeBytes: number;
  /** sha256 of adapter_model.safetensors from the store's manifest ("" without one). */
  sha256: string;
  jobId: string;
}

/** Last path component of a Hugging Face id or a path: "facebook/opt-125m" → "opt-125m". */
export function baseName(ref: string): string {
  const parts = ref.replace(/\\/g, "/").replace(/\/+$/, "").split("/");
  return parts[parts.length - 1] ?? "";
}

/** What an adapter may ask of the engine (`qlora serve --max-adapter-rank / --max-adapter-bytes`). */
export interface AdapterLimits {
  /** Largest LoRA rank of any module (default 256). */
  maxRank: number;
  /** Largest adapter_model.safetensors, in bytes (default 1 GiB). */
  maxBytes: number;
}

export const DEFAULT_ADAPTER_LIMITS: AdapterLimits = { maxRank: 256, maxBytes: 1024 ** 3 };

/**
 * lora_A / lora_B weight names (PEFT's, as libs/formats reads them): A is [r, in], B is [out, r].
 * Other tensors are left to the loader, which refuses them.
 */
const LORA_TENSOR = /\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$/;

export class StoreAccess {
  readonly limits: AdapterLimits;
  /** Weights files whose header passed the limits, by path → size/mtime/inode when checked. */
  private readonly headersChecked = new Map<string, string>();

  constructor(
    private readonly store: ArtifactStore,
    limits: Partial<AdapterLimits> = {},
  ) {
    this.limits = { ...DEFAULT_ADAPTER_LIMITS, ...limits };
    for (const [k, v] of Object.entries(this.limits)) {
      if (!Number.isSafeInteger(v) || v < 1) throw new InvalidArgument(`adapter limit ${k} must be a positive integer, got ${v}`);
    }
  }

  async modelDir(name: string): Promise<string> {
    if (!(await this.store.exists("models", name))) throw new NotFound(`model ${name} is not in the store`);
    return this.store.localPath("models", name);
  }

  private async meta(kind: "models" | "adapters", name: string): Promise<{ meta: Record<string, string>; sha: Map<string, string> }> {
    try {
      const st = await this.store.stat(kind, name);
      return { meta: st.meta, sha: new Map(st.files.map((f) => [f.path, f.sha256])) };
    } catch {
      return { meta: {}, sha: new Map() };
    }
  }

  async adapter(name: string): Promise<StoredAdapter> {
    if (!(await this.store.exists("adapters", name))) throw new NotFound(`adapter ${name} is not in the store`);
    const dir = await this.store.localPath("adapters", name);
    let cfg: Record<string, unknown>;
    try {
      cfg = JSON.parse(await readFile(join(dir, "adapter_config.json"), "utf8")) as Record<string, unknown>;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") {
        throw new InvalidArgument(`adapter ${name}: adapter_config.json is missing`);
      }
      throw new InvalidArgument(`adapter ${name}: adapter_config.json is not valid JSON: ${errorMessage(e)}`);
    }
    if (cfg === null || typeof cfg !== "object" || Array.isArray(cfg)) {
      throw new InvalidArgument(`adapter ${name}: adapter_config.json is not an object`);
    }
    if (cfg.peft_type !== undefined && cfg.peft_type !== "LORA") {
      throw new InvalidArgument(`adapter ${name}: peft_type ${JSON.stringify(cfg.peft_type)} is not LORA`);
    }
    let sizeBytes = 0;
    try {
      sizeBytes = (await stat(join(dir, "adapter_model.safetensors"))).size;
    } catch {
      throw new InvalidArgument(`adapter ${name}: adapter_model.safetensors is missing`);
    }
    const { meta, sha } = await this.meta("adapters", name);
    const r = typeof cfg.r === "number" ? cfg.r : 8;
    const targets = cfg.target_modules;
    const pattern = cfg.rank_pattern && typeof cfg.rank_pattern === "object" ? Object.values(cfg.rank_pattern as object) : [];
    const maxConfiguredRank = Math.max(r, ...pattern.filter((v): v is number => typeof v === "number"));
    return {
      name,
      dir,
      maxConfiguredRank,
      baseModel: typeof cfg.base_model_name_or_path === "string" ? cfg.base_model_name_or_path : "",
      lora: {
        rank: r,
        alpha: typeof cfg.lora_alpha === "number" ? cfg.lora_alpha : 8,
        targetModules: Array.isArray(targets) ? targets.map(String) : typeof targets === "string" ? [targets] : [],
        useRslora: cfg.use_rslora === true,
      },
      sizeBytes,
      sha256: sha.get("adapter_model.safetensors") ?? "",
      jobId: meta.job_id ?? "",
    };
  }

  /**
   * An adapter the engine may load: `adapter(name)` plus the limits (INVALID_ARGUMENT naming the
   * limit and the value). The safetensors header is read (and validated) only when the file
   * changed since it last passed, so requests for a known adapter cost one stat.
   */
  async servableAdapter(name: string): Promise<StoredAdapter> {
    const a = await this.adapter(name);
    const { maxRank, maxBytes } = this.limits;
    if (a.maxConfiguredRank > maxRank) {
      throw new InvalidArgument(`adapter ${name}: LoRA rank ${a.maxConfiguredRank} (adapter_config.json) is above this server's limit of ${maxRank} (max adapter rank)`);
    }
    const path = join(a.dir, ADAPTER_WEIGHTS);
    const st = await stat(path);
    const stamp = `${st.size}:${st.mtimeMs}:${st.ino}`;
    if (this.headersChecked.get(path) === stamp) return a;
    if (st.size > maxBytes) {
      throw new InvalidArgument(`adapter ${name}: ${ADAPTER_WEIGHTS} has ${st.size} bytes, above this server's limit of ${maxBytes} bytes (max adapter bytes)`);
    }
    // The header alone (validated: dtypes, shapes, offsets that tile the file); no tensor data.
    const file = await SafetensorsFile.open(path);
    let tensorRank = 0;
    let where = "";
    try {
      for (const [key, t] of file.tensors) {
        const m = LORA_TENSOR.exec(key);
        if (!m || t.shape.length !== 2) continue;
        const r = m[1] === "A" ? t.shape[0]! : t.shape[1]!;
        if (r > tensorRank) {
          tensorRank = r;
          where = key;
        }
      }
    } finally {
      await file.close();
    }
    if (tensorRank > maxRank) {
      throw new InvalidArgument(`adapter ${name}: LoRA rank ${tensorRank} (${where} in ${ADAPTER_WEIGHTS}) is above this server's limit of ${maxRank} (max adapter rank)`);
    }
    this.headersChecked.set(path, stamp);
    return a;
  }

  async listAdapters(): Promise<StoredAdapter[]> {
    const names = await this.store.list("adapters");
    const out: StoredAdapter[] = [];
    for (const n of names) {
      try {
        out.push(await this.adapter(n));
      } catch {
        // A broken adapter in the store is reported when someone uses it, not by List.
      }
    }
    return out;
  }

  /**
   * Names the base model is known by: its store name, the `_name_or_path` transformers writes
   * into config.json, and (for a checkpoint written by `qlora quantize`) the model it was
   * quantized from. An adapter trained on the original applies to its NF4 copy.
   */
  async modelAliases(name: string): Promise<Set<string>> {
    const aliases = new Set([name]);
    const dir = await this.store.localPath("models", name);
    try {
      const cfg = JSON.parse(await readFile(join(dir, "config.json"), "utf8")) as Record<string, unknown>;
      if (typeof cfg._name_or_path === "string" && cfg._name_or_path) aliases.add(baseName(cfg._name_or_path));
    } catch {
      // No readable config: the loader reports that with a proper error.
    }
    const { meta } = await this.meta("models", name);
    if (meta.source_model) aliases.add(baseName(meta.source_model));
    return aliases;
  }

  /** The store model an adapter's base_model_name_or_path refers to, if any. */
  async modelForAdapterBase(base: string): Promise<string | null> {
    if (!base) return null;
    const candidate = baseName(base);
    if (candidate && (await this.store.exists("models", candidate).catch(() => false))) return candidate;
    return null;
  }

  /** FAILED_PRECONDITION when the adapter says it was trained on a different base. */
  async checkAdapterBase(adapter: StoredAdapter, model: string): Promise<void> {
    if (!adapter.baseModel) return; // PEFT allows it unset; the weight shapes are still checked
    const aliases = await this.modelAliases(model);
    if (aliases.has(baseName(adapter.baseModel)) || aliases.has(adapter.baseModel)) return;
    throw new FailedPrecondition(
      `adapter ${adapter.name} was trained on ${JSON.stringify(adapter.baseModel)}, not on model ${model}`,
    );
  }
}
