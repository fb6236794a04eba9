/**
 * The order rows are seen in: a fresh permutation each epoch (a pure function of seed and epoch, see
 * rng.ts), cut into micro-batches of `batchSize` rows; the last micro-batch of an epoch may be smaller
 * (DataLoader drop_last=False). Evaluation walks the rows in file order.
 */
import { epochPermutation } from "./rng.js";
import { collate } from "./rows.js";
import type { Batch, TrainDataset } from "./types.js";

/** Micro-batches in one epoch: ceil(rows / batchSize). */
export function microBatchesPerEpoch(rows: number, batchSize: number): number {
  return Math.ceil(rows / batchSize);
}

/** Row order of one epoch. */
export function epochOrder(ds: TrainDataset, seed: number | bigint, epoch: number): Uint32Array {
  return epochPermutation(ds.rows.length, seed, epoch);
}

/** Micro-batch `index` of an epoch whose order is `order`. */
export function microBatch(ds: TrainDataset, order: Uint32Array, index: number, batchSize: number): Batch {
  const start = index * batchSize;
  const end = Math.min(start + batchSize, order.length);
  if (start >= end) throw new RangeError(`micro-batch ${index} is past the end of the epoch`);
  const rows = [];
  for (let i = start; i < end; i++) rows.push(ds.rows[order[i]!]!);
  return collate(rows, ds.padId);
}

/** Evaluation batches, rows in file order. */
export function* evalBatches(ds: TrainDataset, batchSize: number): Generator<Batch> {
  for (let s = 0; s < ds.rows.length; s += batchSize) {
    yield collate(ds.rows.slice(s, s + batchSize), ds.padId);
  }
}
