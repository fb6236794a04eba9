/**
 * Model names as the OpenAI API and KServe see them: one per base model ("BASE") and one per base
 * with an adapter ("BASE:ADAPTER", the LoRAX/vLLM convention; store names cannot contain ":").
 * An adapter is listed under every store model it was trained on (its base_model_name_or_path
 * matches the model's store name, config _name_or_path, or the model it was quantized from), or
 * under every model when it names no base.
 */
import { InvalidArgument, NotFound } from "@qlora/core";
import type { EngineClient } from "../engine-client.js";
import type { LoadedModelInfo, ResidentAdapterInfo } from "../protocol.js";
import { baseName, type ArtifactStore, type StoreAccess, type StoredAdapter } from "../store-access.js";

export interface ModelName {
  /** Store name of the base ("" = the adapter's base / the default model). */
  model: string;
  /** Adapter name, "" for the base alone. */
  adapter: string;
}

export interface CatalogEntry {
  /** "BASE" or "BASE:ADAPTER". */
  id: string;
  model: string;
  adapter: string;
  /** The base is resident in the engine (any quantization). */
  loaded: boolean;
  /** For adapters: resident in the engine's adapter cache. */
  adapterResident: boolean;
  created: number;
  adapterInfo?: StoredAdapter;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** "BASE:ADAPTER" → parts; a single name is taken as a base model (see Catalog.resolve for adapters). */
export function parseModelName(id: string): ModelName {
  if (typeof id !== "string" || id.length === 0) throw new InvalidArgument("model is required (BASE or BASE:ADAPTER)");
  const i = id.indexOf(":");
  const model = i < 0 ? id : id.slice(0, i);
  const adapter = i < 0 ? "" : id.slice(i + 1);
  if ((model && !NAME.test(model)) || (i >= 0 && !NAME.test(adapter))) {
    throw new InvalidArgument(`model ${JSON.stringify(id.slice(0, 200))} is not a valid name (BASE or BASE:ADAPTER)`);
  }
  return { model, adapter };
}

export function modelId(model: string, adapter: string): string {
  return adapter ? `${model}:${adapter}` : model;
}

export class Catalog {
  constructor(
    private readonly store: ArtifactStore,
    private readonly access: StoreAccess,
    private readonly engine: EngineClient,
    private readonly engineStarted: () => boolean,
  ) {}

  async loadedModels(): Promise<LoadedModelInfo[]> {
    if (!this.engineStarted()) return [];
    return (await this.engine.call({ op: "listModels" })).models;
  }

  async residentAdapters(): Promise<ResidentAdapterInfo[]> {
    if (!this.engineStarted()) return [];
    return (await this.engine.call({ op: "listAdapters" })).adapters;
  }

  private async created(kind: "models" | "adapters", name: string): Promise<number> {
    try {
      const ms = Date.parse((await this.store.stat(kind, name)).createdAt);
      return Number.isFinite(ms) ? Math.floor(ms / 1000) : 0;
    } catch {
      return 0;
    }
  }

  /** Every base in the store, then every (base, adapter) pair that fits. */
  async list(): Promise<CatalogEntry[]> {
    const models = await this.store.list("models");
    const adapters = await this.access.listAdapters();
    const loaded = new Set((await this.loadedModels()).map((m) => m.name));
    const resident = new Set((await this.residentAdapters()).filter((a) => !a.unloading).map((a) => `${a.model}\u0000${a.name}`));
    const out: CatalogEntry[] = [];
    const aliases = new Map<string, Set<string>>();
    for (const m of models) {
      aliases.set(m, await this.access.modelAliases(m).catch(() => new Set([m])));
      out.push({ id: m, model: m, adapter: "", loaded: loaded.has(m), adapterResident: false, created: await this.created("models", m) });
    }
    for (const a of adapters) {
      const created = await this.created("adapters", a.name);
      for (const m of models) {
        if (a.baseModel) {
          const al = aliases.get(m)!;
          if (!al.has(baseName(a.baseModel)) && !al.has(a.baseModel)) continue;
        }
        out.push({
          id: modelId(m, a.name),
          model: m,
          adapter: a.name,
          loaded: loaded.has(m),
          adapterResident: resident.has(`${m}\u0000${a.name}`),
          created,
          adapterInfo: a,
        });
      }
    }
    return out;
  }

  /**
   * The base/adapter a model id names. "BASE:ADAPTER" as is; a single name is a base when the
   * store has such a model, else an adapter on its own base (vLLM serves LoRAs by name too).
   */
  async resolve(id: string): Promise<ModelName> {
    const n = parseModelName(id);
    if (n.adapter) {
      if (!(await this.store.exists("models", n.model))) throw new NotFound(`model ${n.model} is not in the store`);
      if (!(await this.store.exists("adapters", n.adapter))) throw new NotFound(`adapter ${n.adapter} is not in the store`);
      return n;
    }
    if (await this.store.exists("models", n.model)) return n;
    if (await this.store.exists("adapters", n.model)) return { model: "", adapter: n.model };
    throw new NotFound(`model ${id} is not in the store (GET /v1/models lists the names)`);
  }

  /** KServe readiness: the base is resident; for an adapter, also that it exists and fits the base. */
  async ready(id: string): Promise<boolean> {
    const n = await this.resolve(id);
    let model = n.model;
    if (n.adapter) {
      const a = await this.access.adapter(n.adapter);
      if (!model) model = (await this.access.modelForAdapterBase(a.baseModel)) ?? "";
      if (!model) return false;
      try {
        await this.access.checkAdapterBase(a, model);
      } catch {
        return false;
      }
    }
    return (await this.loadedModels()).some((m) => m.name === model);
  }
}
