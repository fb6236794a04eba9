/**
 * Sampling parameters (validated, with the model's generation_config.json defaults) and the
 * native sampler bound to one sequence's RNG (what NativeModel.forwardSample takes per row).
 */
import { randomBytes } from "node:crypto";
import { InvalidArgument } from "@qlora/core";
import { seedRng, type RowSampling, type SamplingParams } from "@qlora/kernels";
import type { TokenSampler } from "./sequence.js";

export interface SamplingOptions {
  /** 0 = greedy. */
  temperature?: number;
  /** 0 = off. */
  topK?: number;
  /** 1 = off. */
  topP?: number;
  /** 1 = off (Hugging Face semantics, over prompt + generated ids). */
  repetitionPenalty?: number;
  /** Same seed, same model, same prompt → same tokens. Default: a random seed. */
  seed?: number | bigint;
}

export interface ResolvedSampling extends SamplingParams {
  seed: bigint;
}

/**
 * The model's defaults (generation_config.json, Hugging Face semantics): without `do_sample`
 * generation is greedy; with it, temperature / top_k / top_p default to 1.0 / 50 / 1.0.
 */
export function samplingDefaults(generationConfig: Record<string, unknown> | null): Required<Omit<SamplingOptions, "seed">> {
  const g = generationConfig ?? {};
  const num = (k: string, d: number): number => (typeof g[k] === "number" && Number.isFinite(g[k]) ? (g[k] as number) : d);
  const repetitionPenalty = num("repetition_penalty", 1);
  if (g.do_sample !== true) return { temperature: 0, topK: 0, topP: 1, repetitionPenalty };
  return { temperature: num("temperature", 1), topK: num("top_k", 50), topP: num("top_p", 1), repetitionPenalty };
}

export function resolveSampling(options: SamplingOptions, defaults = samplingDefaults(null)): ResolvedSampling {
  const temperature = options.temperature ?? defaults.temperature;
  const topK = options.topK ?? defaults.topK;
  const topP = options.topP ?? defaults.topP;
  const repetitionPenalty = options.repetitionPenalty ?? defaults.repetitionPenalty;
  if (typeof temperature !== "number" || !Number.isFinite(temperature) || temperature < 0) {
    throw new InvalidArgument(`temperature must be a number >= 0, got ${temperature}`);
  }
  if (!Number.isSafeInteger(topK) || topK < 0) throw new InvalidArgument(`topK must be an integer >= 0 (0 = off), got ${topK}`);
  if (typeof topP !== "number" || !(topP > 0 && topP <= 1)) throw new InvalidArgument(`topP must be in (0, 1], got ${topP}`);
  if (typeof repetitionPenalty !== "number" || !Number.isFinite(repetitionPenalty) || repetitionPenalty <= 0) {
    throw new InvalidArgument(`repetitionPenalty must be a number > 0 (1 = off), got ${repetitionPenalty}`);
  }
  let seed: bigint;
  if (options.seed === undefined) {
    seed = randomBytes(8).readBigUInt64LE(0);
  } else if (typeof options.seed === "bigint") {
    seed = BigInt.asUintN(64, options.seed);
  } else {
    if (!Number.isSafeInteger(options.seed)) throw new InvalidArgument(`seed must be an integer, got ${options.seed}`);
    seed = BigInt.asUintN(64, BigInt(options.seed));
  }
  return { temperature, topK, topP, repetitionPenalty, seed };
}

/**
 * One sequence's sampling for the engine's kernel (NativeModel.forwardSample: on the model's device,
 * after the forward): its parameters and its own RNG, which the kernel advances in place.
 */
export class NativeSampler implements TokenSampler {
  private readonly rng: BigUint64Array;
  private readonly params: SamplingParams;

  constructor(sampling: ResolvedSampling) {
    this.params = {
      temperature: sampling.temperature,
      topK: sampling.topK,
      topP: sampling.topP,
      repetitionPenalty: sampling.repetitionPenalty,
    };
    this.rng = seedRng(sampling.seed);
  }

  rowSampling(context: Int32Array): RowSampling {
    return { params: this.params, recent: this.params.repetitionPenalty === 1 ? null : context, rng: this.rng };
  }
}
