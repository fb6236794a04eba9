/**
 * LoRA target modules: names as PEFT takes them (`q_proj`, `self_attn.q_proj`, a full module path,
 * or `all-linear`) → the engine's canonical module names (`layers.{i}.self_attn.q_proj`).
 *
 * PEFT matches a target string against each full module path (e.g. `model.layers.0.self_attn.q_proj`)
 * by equality or by `path.endswith("." + target)`. `all-linear` is every linear layer inside the
 * decoder blocks (the output layer is excluded, as in PEFT). Unlike PEFT, which only complains when
 * nothing matches at all, each name must match something here: a typo is an error, not a silently
 * smaller adapter.
 */
import { InvalidArgument } from "@qlora/core";
import { canonicalToModulePath, LINEAR_MODULES, type ModelFamily } from "@qlora/formats";

export interface ResolvedTargets {
  /** Canonical module names, in layer order. */
  modules: string[];
  /** What adapter_config.json records as target_modules (PEFT stores all-linear expanded to short names). */
  peftTargetModules: string[];
}

/** Splits "q_proj,v_proj" / ["q_proj", "v_proj"] into names. */
export function parseTargetList(target: string | readonly string[]): string[] {
  const raw = typeof target === "string" ? [target] : [...target];
  return raw
    .flatMap((s) => s.split(","))
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
}

export function resolveTargets(family: ModelFamily, numLayers: number, target: string | readonly string[]): ResolvedTargets {
  const names = [...new Set(parseTargetList(target))];
  const shortNames = LINEAR_MODULES[family].map((m) => m.split(".").at(-1)!);
  const valid = `${shortNames.join(", ")} or all-linear`;
  if (names.length === 0) throw new InvalidArgument(`no LoRA target modules given; use ${valid}`);
  const all: string[] = [];
  for (let i = 0; i < numLayers; i++) for (const m of LINEAR_MODULES[family]) all.push(`layers.${i}.${m}`);

  if (names.includes("all-linear")) {
    if (names.length > 1) {
      throw new InvalidArgument(`"all-linear" already targets every linear layer; do not combine it with ${names.filter((n) => n !== "all-linear").join(", ")}`);
    }
    return { modules: all, peftTargetModules: [...shortNames].sort() };
  }

  const chosen = new Set<string>();
  for (const name of names) {
    const hits = all.filter((m) => {
      const path = canonicalToModulePath(m, family);
      return path === name || path.endsWith("." + name);
    });
    if (hits.length === 0) {
      throw new InvalidArgument(`unknown target module "${name}" for a ${family} model; valid target modules: ${valid}`);
    }
    for (const h of hits) chosen.add(h);
  }
  return { modules: all.filter((m) => chosen.has(m)), peftTargetModules: names };
}
