/**
 * PEFT LoRA adapters → the engine's adapter slots.
 *
 * The formats reader parses and validates the files on their own; here the adapter is checked
 * against the base it is going to run on (every module must be a decoder-layer linear of this
 * model, with lora_A [r, in] and lora_B [out, r] matching its weight), and converted to the
 * engine's shape: one scaling per adapter plus per-module A/B.
 */
import { basename } from "node:path";
import { InvalidArgument } from "@qlora/core";
import { LINEAR_MODULES, expectedWeights, readPeftAdapter, type LoraAdapterConfig, type ModelConfig } from "@qlora/formats";
import type { NativeModel } from "@qlora/kernels";
import type { LoadedModel } from "./loader.js";

export type EngineAdapter = Parameters<NativeModel["setAdapter"]>[1];

export interface LoadedAdapter {
  dir: string;
  config: LoraAdapterConfig;
  /** What NativeModel.setAdapter takes. */
  engine: EngineAdapter;
  /** Canonical module names (`layers.0.self_attn.q_proj`), sorted. */
  modules: string[];
  /** Largest rank over the modules (rank_pattern may vary it). */
  rank: number;
  /** Float32 bytes of all A and B matrices. */
  bytes: number;
  /** Non-fatal findings, e.g. base_model_name_or_path naming another model. */
  warnings: string[];
}

const MODULE_RE = /^layers\.(\d+)\.(.+)$/;

/** Names the base may go by: its directory, config `_name_or_path`, and their last path parts. */
function baseNames(modelDir: string, config: ModelConfig): Set<string> {
  const names = new Set<string>();
  const add = (s: unknown): void => {
    if (typeof s !== "string" || s.length === 0) return;
    const trimmed = s.replace(/\/+$/, "");
    names.add(trimmed);
    names.add(basename(trimmed));
  };
  add(modelDir);
  add(config.raw._name_or_path);
  return names;
}

/**
 * Read a PEFT adapter directory and check it against `model`'s architecture. Errors:
 * NotFound (missing files), InvalidArgument (corrupt files, modules or shapes that do not fit
 * this base), FailedPrecondition (adapter kinds the engine does not run: DoRA, pickles, …).
 */
export async function loadAdapter(dir: string, model: Pick<LoadedModel, "dir" | "config">): Promise<LoadedAdapter> {
  const peft = await readPeftAdapter(dir);
  const cfg = model.config;
  const expected = expectedWeights(cfg);
  const linears = new Set(LINEAR_MODULES[cfg.family]);
  const problems: string[] = [];
  const modules: EngineAdapter["modules"] = {};
  let rank = 0;
  let bytes = 0;
  for (const [name, m] of peft.tensors) {
    const match = MODULE_RE.exec(name);
    if (!match || !linears.has(match[2]!)) {
      problems.push(`${name} is not a linear layer of a ${cfg.architecture}`);
      continue;
    }
    const layer = Number(match[1]);
    if (layer >= cfg.numLayers) {
      problems.push(`${name}: the base has ${cfg.numLayers} layers`);
      continue;
    }
    const w = expected.get(`${name}.weight`);
    if (w === undefined) {
      problems.push(`${name} does not exist in the base`);
      continue;
    }
    const [out, inp] = w.shape as [number, number];
    if (m.inFeatures !== inp || m.outFeatures !== out) {
      problems.push(
        `${name}: lora_A [${m.r}, ${m.inFeatures}] / lora_B [${m.outFeatures}, ${m.r}] do not fit the base weight [${out}, ${inp}] ` +
          `(expected lora_A [${m.r}, ${inp}], lora_B [${out}, ${m.r}])`,
      );
      continue;
    }
    // The engine has one scaling per adapter; a module with its own (rank/alpha patterns)
    // gets its ratio folded into a copy of B, which is exact: Δy = s·(x·Aᵀ)·Bᵀ is linear in B.
    let b = m.b;
    if (m.scaling !== peft.scaling) {
      const ratio = m.scaling / peft.scaling;
      b = m.b.map((v) => v * ratio);
    }
    modules[name] = { a: m.a, b, rank: m.r };
    rank = Math.max(rank, m.r);
    bytes += (m.a.length + b.length) * 4;
  }
  if (problems.length > 0) {
    const shown = problems.slice(0, 4).join("; ");
    const more = problems.length > 4 ? `; and ${problems.length - 4} more` : "";
    const base = peft.config.baseModelNameOrPath ? ` (trained on ${peft.config.baseModelNameOrPath})` : "";
    throw new InvalidArgument(`adapter ${dir}${base} does not fit the base model ${model.dir}: ${shown}${more}`);
  }
  if (!Number.isFinite(peft.scaling)) throw new InvalidArgument(`adapter ${dir}: lora_alpha / r is not finite`);

  const warnings: string[] = [];
  const declared = peft.config.baseModelNameOrPath;
  if (declared) {
    const names = baseNames(model.dir, cfg);
    const d = declared.replace(/\/+$/, "");
    if (!names.has(d) && !names.has(basename(d))) {
      warnings.push(`adapter_config.json says base_model_name_or_path ${JSON.stringify(declared)}, the model is ${model.dir}`);
    }
  }
  return {
    dir,
    config: peft.config,
    engine: { scaling: peft.scaling, modules },
    modules: Object.keys(modules).sort(),
    rank,
    bytes,
    warnings,
  };
}

/** Install an adapter in an engine slot (replacing what the slot held). */
export function installAdapter(model: Pick<LoadedModel, "native">, slot: number, adapter: LoadedAdapter): void {
  model.native.setAdapter(slot, adapter.engine);
}
