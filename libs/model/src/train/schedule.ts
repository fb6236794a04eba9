/**
 * Learning-rate schedules with warmup, the Hugging Face `get_*_schedule_with_warmup` formulas.
 * `lrLambda(k)` is the multiplier LambdaLR holds after k scheduler steps; the optimizer step number
 * s (1-based) runs with base_lr × lrLambda(s − 1), because the Trainer steps the scheduler after the
 * optimizer.
 */
import { InvalidArgument } from "@qlora/core";

export type SchedulerName = "linear" | "constant" | "cosine";
export const SCHEDULERS: readonly SchedulerName[] = ["linear", "constant", "cosine"];

export interface ScheduleSpec {
  scheduler: SchedulerName;
  warmupSteps: number;
  totalSteps: number;
}

/**
 * The multiplier after `k` scheduler steps.
 * - warmup (all three): k / max(1, warmup) while k < warmup;
 * - linear: max(0, (total − k) / max(1, total − warmup));
 * - cosine (num_cycles 0.5): max(0, ½(1 + cos(π · progress))), progress = (k − warmup) / max(1, total − warmup);
 * - constant: 1. (HF's plain "constant" ignores warmup; with warmup > 0 this is
 *   constant_with_warmup, which is what asking for warmup means.)
 */
export function lrLambda(spec: ScheduleSpec, k: number): number {
  const { warmupSteps: w, totalSteps: n } = spec;
  if (k < w) return k / Math.max(1, w);
  switch (spec.scheduler) {
    case "constant":
      return 1;
    case "linear":
      return Math.max(0, (n - k) / Math.max(1, n - w));
    case "cosine": {
      const progress = (k - w) / Math.max(1, n - w);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * 2 * 0.5 * progress)));
    }
  }
}

/** Learning rate used by optimizer step `step` (1-based). */
export function learningRateAt(baseLr: number, spec: ScheduleSpec, step: number): number {
  return baseLr * lrLambda(spec, step - 1);
}

export function parseScheduler(s: string): SchedulerName {
  if ((SCHEDULERS as readonly string[]).includes(s)) return s as SchedulerName;
  throw new InvalidArgument(`unknown scheduler "${s}"; use ${SCHEDULERS.join(", ")}`);
}
