/**
 * Output helpers shared by commands: human sizes and durations, JSON lines, and a progress
 * reporter that draws a bar on a terminal, prints a plain line now and then when stderr is a
 * file or pipe (logs stay readable), and prints nothing for --json (the command emits JSON events).
 */
import type { Io } from "./command.js";

export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** One JSON object per line; bigint → number (sizes here stay far below 2^53). */
export function writeJsonLine(io: Io, value: unknown): void {
  io.stdout.write(JSON.stringify(value, (_k, v: unknown) => (typeof v === "bigint" ? Number(v) : v)) + "\n");
}

export interface ProgressState {
  done: number;
  total: number;
  bytesDone: number;
  bytesTotal: number;
  label: string;
}

export interface ProgressReporter {
  update(p: ProgressState): void;
  /** Clears the bar (TTY) so the final message starts on a clean line. */
  finish(): void;
}

export function progressReporter(io: Io, opts: { json: boolean; unit: string; intervalMs?: number }): ProgressReporter {
  if (opts.json) return { update() {}, finish() {} };
  const interval = opts.intervalMs ?? (io.isTTY ? 80 : 2000);
  let last = 0;
  let drawn = false;

  const line = (p: ProgressState, width: number): string => {
    const frac = p.bytesTotal > 0 ? p.bytesDone / p.bytesTotal : p.total > 0 ? p.done / p.total : 0;
    const pct = `${Math.floor(frac * 100)}%`.padStart(4);
    const counts = `${p.done}/${p.total} ${opts.unit}  ${formatBytes(p.bytesDone)}/${formatBytes(p.bytesTotal)}`;
    if (!io.isTTY) return `${pct} ${counts}  ${p.label}`;
    // Leave about 25 columns for the tensor name; the bar shrinks first.
    const barWidth = Math.max(10, Math.min(30, width - counts.length - 12 - 25));
    const filled = Math.round(frac * barWidth);
    const bar = `[${"#".repeat(filled)}${"-".repeat(barWidth - filled)}]`;
    const text = `${bar} ${pct} ${counts}  ${p.label}`;
    return text.length > width - 1 ? text.slice(0, width - 2) + "…" : text;
  };

  return {
    update(p) {
      const now = Date.now();
      const final = p.total > 0 && p.done >= p.total;
      if (!final && now - last < interval) return;
      last = now;
      if (io.isTTY) {
        io.stderr.write(`\r\x1b[2K${line(p, io.columns)}`);
        drawn = true;
      } else if (!final) {
        io.stderr.write(line(p, io.columns) + "\n");
      }
    },
    finish() {
      if (io.isTTY && drawn) io.stderr.write("\r\x1b[2K");
      drawn = false;
    },
  };
}
