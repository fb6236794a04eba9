/**
 * Checkpoints: `<out>/checkpoint-<step>/` with
 *   adapter_config.json + adapter_model.safetensors   the LoRA weights in PEFT format (F32, exact)
 *   optimizer.safetensors                            AdamW moments: <module>.lora_{A,B}.exp_avg{,_sq}
 *   trainer_state.json                               step, epoch, data position, RNG counters, logs
 *
 * A checkpoint is built in a hidden sibling directory and renamed into place, so `checkpoint-N`
 * either exists complete or not at all; a crash mid-write leaves only a `.checkpoint-N.tmp-*`
 * directory, which the next run removes. Rotation keeps the `limit` highest steps (HF sorts by step).
 */
import { mkdir, readdir, readFile, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { FailedPrecondition, fsyncDir, InvalidArgument, renameDirIntoPlace, tempSibling, writeFileSynced } from "@qlora/core";
import {
  f32Bytes,
  f32View,
  readJsonFile,
  readPeftAdapter,
  readSafetensorsBuffer,
  serializeSafetensors,
  writePeftAdapter,
  type LoraConfigInput,
  type ModelFamily,
} from "@qlora/formats";
import type { LoraState } from "./engine.js";

export const TRAINER_STATE = "trainer_state.json";
export const OPTIMIZER_STATE = "optimizer.safetensors";
const CHECKPOINT_RE = /^checkpoint-(\d+)$/;
// Our staging directory and the one writePeftAdapter stages inside it (a second leading dot).
const STAGING_RE = /^\.+checkpoint-\d+\.tmp-/;

/** One entry of the log history (HF's trainer_state.json log_history, in our field names). */
export type LogEntry =
  | {
      step: number;
      epoch: number;
      loss: number;
      learning_rate: number;
      grad_norm: number;
      tokens_per_second: number;
    }
  | { step: number; epoch: number; eval_loss: number };

/** Everything besides the tensors needed to continue a run exactly where it stopped. */
export interface TrainerState {
  format: "qlora-trainer-state";
  version: 1;
  global_step: number;
  max_steps: number;
  /** Fractional epoch, as HF: completed epochs + micro-batches done / micro-batches per epoch. */
  epoch: number;
  /** Data position: the epoch being read and how many of its micro-batches are consumed. */
  epoch_index: number;
  micro_step_in_epoch: number;
  micro_batches_per_epoch: number;
  /** Micro-batches processed since the start of the run (the dropout stream's counter). */
  global_micro_step: number;
  seed: number;
  /**
   * The random streams are pure functions of (seed, stream, counter), so their "state" is the counter:
   * data order of epoch e = permutation(seed, e); dropout of micro-step k = seed(seed, k).
   */
  rng: {
    algorithm: string;
    data_order_epoch: number;
    dropout_next_micro_step: number;
    lora_init_seed: string;
  };
  /** Running sums the logs are made of, so a resumed run logs the same numbers. */
  totals: {
    /** Σ per-step loss over all steps (train_loss = this / global_step, as HF). */
    loss_sum: number;
    window_loss_sum: number;
    window_steps: number;
    tokens_seen: number;
    target_tokens_seen: number;
  };
  log_history: LogEntry[];
  /** The trajectory-deciding options and data fingerprints: resume checks they did not change. */
  args: Record<string, unknown>;
  data: { train_sha256: string; train_rows: number; eval_sha256: string | null };
}

export interface CheckpointInfo {
  step: number;
  path: string;
}

/** Checkpoints in `out`, oldest step first. */
export async function listCheckpoints(out: string): Promise<CheckpointInfo[]> {
  let names: string[];
  try {
    names = await readdir(out);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw e;
  }
  const found: CheckpointInfo[] = [];
  for (const n of names) {
    const m = CHECKPOINT_RE.exec(n);
    if (m) found.push({ step: Number(m[1]), path: join(out, n) });
  }
  return found.sort((a, b) => a.step - b.step);
}

/** Removes half-written checkpoint directories left by a crash. */
export async function removeStaleStaging(out: string): Promise<void> {
  let names: string[];
  try {
    names = await readdir(out);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
    throw e;
  }
  for (const n of names) if (STAGING_RE.test(n)) await rm(join(out, n), { recursive: true, force: true });
}

/** Deletes all but the `limit` newest checkpoints (limit 0: keep all). Returns the removed paths. */
export async function rotateCheckpoints(out: string, limit: number): Promise<string[]> {
  if (limit <= 0) return [];
  const all = await listCheckpoints(out);
  const doomed = all.slice(0, Math.max(0, all.length - limit));
  for (const c of doomed) await rm(c.path, { recursive: true, force: true });
  return doomed.map((c) => c.path);
}

function momentName(module: string, which: "A" | "B", moment: "exp_avg" | "exp_avg_sq"): string {
  return `${module}.lora_${which}.${moment}`;
}

export interface CheckpointContent {
  /** PEFT adapter config for this run. */
  loraConfig: LoraConfigInput;
  family: ModelFamily;
  lora: LoraState;
  state: TrainerState;
}

/** Writes `<out>/checkpoint-<step>` atomically; returns its path and size in bytes. */
export async function writeCheckpoint(out: string, c: CheckpointContent): Promise<{ path: string; sizeBytes: number }> {
  const target = join(out, `checkpoint-${c.state.global_step}`);
  await mkdir(out, { recursive: true });
  const stage = tempSibling(target);
  try {
    const tensors = new Map<string, { a: Float32Array; b: Float32Array }>();
    for (const [name, m] of Object.entries(c.lora.modules)) tensors.set(name, { a: m.a, b: m.b });
    // writePeftAdapter stages and renames on its own; `stage` does not exist yet, so it becomes the
    // directory holding the adapter, and the rest is added before the final rename.
    await writePeftAdapter(stage, { config: c.loraConfig, family: c.family, tensors });
    const moments: { name: string; dtype: "F32"; shape: number[]; data: Uint8Array }[] = [];
    const r = c.lora.rank;
    for (const [name, m] of Object.entries(c.lora.modules)) {
      const inF = m.a.length / r;
      const outF = m.b.length / r;
      moments.push({ name: momentName(name, "A", "exp_avg"), dtype: "F32", shape: [r, inF], data: f32Bytes(m.ma) });
      moments.push({ name: momentName(name, "A", "exp_avg_sq"), dtype: "F32", shape: [r, inF], data: f32Bytes(m.va) });
      moments.push({ name: momentName(name, "B", "exp_avg"), dtype: "F32", shape: [outF, r], data: f32Bytes(m.mb) });
      moments.push({ name: momentName(name, "B", "exp_avg_sq"), dtype: "F32", shape: [outF, r], data: f32Bytes(m.vb) });
    }
    await writeFileSynced(
      join(stage, OPTIMIZER_STATE),
      serializeSafetensors(moments, { format: "qlora-adamw", step: String(c.state.global_step) }),
    );
    await writeFileSynced(join(stage, TRAINER_STATE), JSON.stringify(c.state, null, 2) + "\n");
    await fsyncDir(stage);
    await renameDirIntoPlace(stage, target, true, () => new FailedPrecondition(`${target} exists`));
  } catch (e) {
    await rm(stage, { recursive: true, force: true });
    throw e;
  }
  let sizeBytes = 0;
  for (const f of await readdir(target)) sizeBytes += (await stat(join(target, f))).size;
  return { path: target, sizeBytes };
}

/** Reads a checkpoint back: trainer state and the LoRA weights with their moments. */
export async function readCheckpoint(path: string): Promise<{ state: TrainerState; lora: LoraState }> {
  const state = (await readJsonFile(join(path, TRAINER_STATE))) as TrainerState;
  if (state?.format !== "qlora-trainer-state" || state.version !== 1) {
    throw new FailedPrecondition(`${path}/${TRAINER_STATE}: not a trainer state this version can resume from`);
  }
  const adapter = await readPeftAdapter(path);
  const optPath = join(path, OPTIMIZER_STATE);
  const opt = readSafetensorsBuffer(await readFile(optPath), optPath);
  const get = (name: string, len: number): Float32Array => {
    const t = opt.tensors.get(name);
    if (!t || t.dtype !== "F32") throw new InvalidArgument(`${optPath}: missing F32 tensor ${name}`);
    const v = f32View(t.data);
    if (v.length !== len) throw new InvalidArgument(`${optPath}: ${name} has ${v.length} values, expected ${len}`);
    // Copy: the engine takes ownership of fresh arrays, not views into a file buffer.
    return Float32Array.from(v);
  };
  const modules: LoraState["modules"] = {};
  for (const [name, m] of adapter.tensors) {
    modules[name] = {
      a: Float32Array.from(m.a),
      b: Float32Array.from(m.b),
      ma: get(momentName(name, "A", "exp_avg"), m.a.length),
      va: get(momentName(name, "A", "exp_avg_sq"), m.a.length),
      mb: get(momentName(name, "B", "exp_avg"), m.b.length),
      vb: get(momentName(name, "B", "exp_avg_sq"), m.b.length),
    };
  }
  return { state, lora: { rank: adapter.config.r, scaling: adapter.scaling, modules } };
}
