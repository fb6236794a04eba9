/**
 * Examples → rows (one sequence each, or several packed), and rows → micro-batches in the engine's
 * B × T layout.
 */
import type { Batch, Example, Row } from "./types.js";

/** One example per row (padding happens per micro-batch, to its longest row). */
export function unpackedRows(examples: Example[]): Row[] {
  return examples.map((e) => ({ tokens: e.tokens, targets: e.targets }));
}

/**
 * Greedy sequential packing: examples are appended, in file order, to the current row while they fit
 * in `blockSize`; an example that does not fit starts a new row. Each example keeps its own segment id
 * (0, 1, … within the row), so the engine restricts attention to the segment and restarts positions,
 * and no label crosses from one example into the next. Packing is done once, before shuffling: the
 * per-epoch shuffle then permutes whole packed rows.
 */
export function packRows(examples: Example[], blockSize: number): Row[] {
  const rows: Row[] = [];
  let parts: Example[] = [];
  let used = 0;
  const flush = (): void => {
    if (parts.length === 0) return;
    const tokens = new Int32Array(used);
    const targets = new Uint8Array(used);
    const segments = new Int32Array(used);
    let o = 0;
    parts.forEach((p, seg) => {
      tokens.set(p.tokens, o);
      targets.set(p.targets, o);
      // The first token of a segment is never a target: nothing of its own example precedes it.
      targets[o] = 0;
      segments.fill(seg, o, o + p.tokens.length);
      o += p.tokens.length;
    });
    rows.push({ tokens, targets, segments });
    parts = [];
    used = 0;
  };
  for (const e of examples) {
    if (used + e.tokens.length > blockSize) flush();
    parts.push(e);
    used += e.tokens.length;
  }
  flush();
  return rows;
}

/** Labels a row would get, and how many of them are real targets. */
export function rowTargetCount(row: Row): number {
  let n = 0;
  const { targets, segments } = row;
  for (let t = 0; t + 1 < row.tokens.length; t++) {
    if (targets[t + 1] && (!segments || segments[t + 1] === segments[t])) n++;
  }
  return n;
}

/**
 * Stacks rows into one micro-batch, right-padded to the longest row with `padId`. labels[t] is the
 * next token when it is a target of the same segment, else -100. Padding positions get a segment id
 * of their own so they never share attention with real tokens.
 */
export function collate(rows: Row[], padId: number): Batch {
  const B = rows.length;
  let T = 0;
  for (const r of rows) T = Math.max(T, r.tokens.length);
  const packed = rows.some((r) => r.segments !== undefined);
  const tokens = new Int32Array(B * T).fill(padId);
  const labels = new Int32Array(B * T).fill(-100);
  const segments = packed ? new Int32Array(B * T) : undefined;
  let targetTokens = 0;
  let inputTokens = 0;
  for (let b = 0; b < B; b++) {
    const r = rows[b]!;
    const L = r.tokens.length;
    const base = b * T;
    tokens.set(r.tokens, base);
    inputTokens += L;
    for (let t = 0; t + 1 < L; t++) {
      if (r.targets[t + 1] && (!r.segments || r.segments[t + 1] === r.segments[t])) {
        labels[base + t] = r.tokens[t + 1]!;
        targetTokens++;
      }
    }
    if (segments) {
      let maxSeg = -1;
      if (r.segments) {
        segments.set(r.segments, base);
        for (let t = 0; t < L; t++) maxSeg = Math.max(maxSeg, r.segments[t]!);
      } else {
        maxSeg = 0; // an unpacked row is one segment (id 0)
      }
      segments.fill(maxSeg + 1, base + L, base + T);
    }
  }
  const batch: Batch = { tokens, labels, batchSize: B, seqLen: T, targetTokens, inputTokens };
  if (segments) batch.segments = segments;
  return batch;
}
