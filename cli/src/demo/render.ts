/**
 * Terminal rendering for the demo: an ASCII loss chart and two generations side by side. Pure
 * functions over strings (tested on their own), plain ASCII frames so any terminal or log shows them.
 */

export interface Point {
  step: number;
  loss: number;
}

/** Characters safe to print: control characters (a random model emits them) become "·". */
export function printable(text: string): string {
  return text.replace(/\t/g, "  ").replace(/[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u2028\u2029]/g, "·");
}

function fmt(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
}

/**
 * A line chart of loss over steps: `height` rows, at most `width` columns in all (labels included).
 * Each column shows the loss interpolated linearly between the logged points around it ("*"), with
 * the logged points themselves drawn as "o". Returns the lines (no trailing newline).
 */
export function lossChart(points: readonly Point[], opts: { width?: number; height?: number } = {}): string[] {
  const pts = points.filter((p) => Number.isFinite(p.loss) && Number.isFinite(p.step)).slice().sort((a, b) => a.step - b.step);
  if (pts.length === 0) return ["(no loss logged)"];
  const height = Math.max(3, opts.height ?? 10);
  let lo = Math.min(...pts.map((p) => p.loss));
  let hi = Math.max(...pts.map((p) => p.loss));
  if (hi - lo < 1e-9) {
    hi += 0.5;
    lo -= 0.5;
  }
  const labels = [fmt(hi), fmt((hi + lo) / 2), fmt(lo)];
  const labelWidth = Math.max(...labels.map((l) => l.length));
  const plotWidth = Math.max(10, Math.min(72, (opts.width ?? 72) - labelWidth - 3));
  const first = pts[0]!.step;
  const last = pts.at(-1)!.step;
  const span = Math.max(1, last - first);
  const colOf = (step: number) => (pts.length === 1 ? 0 : Math.round(((step - first) / span) * (plotWidth - 1)));
  const rowOf = (loss: number) => Math.round(((hi - loss) / (hi - lo)) * (height - 1));
  const grid: string[][] = Array.from({ length: height }, () => new Array<string>(plotWidth).fill(" "));

  // The curve: each column's step, its loss interpolated between the neighbouring logs.
  const lastCol = pts.length === 1 ? 0 : plotWidth - 1;
  for (let c = 0; c <= lastCol; c++) {
    const step = first + (pts.length === 1 ? 0 : (c / (plotWidth - 1)) * span);
    let i = 0;
    while (i < pts.length - 2 && pts[i + 1]!.step < step) i++;
    const a = pts[i]!;
    const b = pts[Math.min(i + 1, pts.length - 1)]!;
    const f = b.step === a.step ? 0 : Math.min(1, Math.max(0, (step - a.step) / (b.step - a.step)));
    grid[rowOf(a.loss + f * (b.loss - a.loss))]![c] = "*";
  }
  for (const p of pts) grid[rowOf(p.loss)]![colOf(p.step)] = "o";

  const lines: string[] = [];
  for (let r = 0; r < height; r++) {
    const label = r === 0 ? labels[0]! : r === height - 1 ? labels[2]! : r === Math.floor((height - 1) / 2) ? labels[1]! : "";
    lines.push(`${label.padStart(labelWidth)} ${label ? "+" : "|"}${grid[r]!.join("").replace(/\s+$/, "")}`);
  }
  lines.push(`${" ".repeat(labelWidth)} +${"-".repeat(plotWidth)}`);
  const left = `step ${first}`;
  const right = `${last}`;
  lines.push(`${" ".repeat(labelWidth + 2)}${left}${right.padStart(Math.max(1, plotWidth - left.length))}`);
  return lines;
}

/**
 * Terminal columns a character takes: 0 for combining marks and invisible format characters, 2
 * for East Asian wide characters and emoji, else 1. (A random model's bytes decode to anything; the
 * frames must stay aligned whatever they are.)
 */
export function charWidth(ch: string): number {
  const cp = ch.codePointAt(0) ?? 0;
  if (/[\p{M}\p{Cf}]/u.test(ch)) return 0;
  if (
    (cp >= 0x1100 && cp <= 0x115f) ||
    (cp >= 0x2e80 && cp <= 0xa4cf && cp !== 0x303f) ||
    (cp >= 0xac00 && cp <= 0xd7a3) ||
    (cp >= 0xf900 && cp <= 0xfaff) ||
    (cp >= 0xfe30 && cp <= 0xfe4f) ||
    (cp >= 0xff00 && cp <= 0xff60) ||
    (cp >= 0xffe0 && cp <= 0xffe6) ||
    (cp >= 0x1f300 && cp <= 0x1faff) ||
    (cp >= 0x20000 && cp <= 0x3fffd)
  ) {
    return 2;
  }
  return 1;
}

export function displayWidth(s: string): number {
  let w = 0;
  for (const ch of s) w += charWidth(ch);
  return w;
}

/**
 * Wraps text to `width` columns, keeping its own line breaks: at the last space that fits when
 * there is one in the line's second half (words stay whole), else hard (babble has no spaces).
 */
export function wrap(text: string, width: number): string[] {
  const out: string[] = [];
  for (const para of printable(text).split("\n")) {
    let chars = [...para];
    if (chars.length === 0) out.push("");
    while (chars.length > 0) {
      // How many characters fit in `width` columns (at least one, so a wide character in a
      // one-column box still makes progress).
      let fit = 0;
      let cols = 0;
      while (fit < chars.length && cols + charWidth(chars[fit]!) <= width) cols += charWidth(chars[fit++]!);
      if (fit === chars.length) {
        out.push(chars.join(""));
        break;
      }
      fit = Math.max(1, fit);
      // A space at index ≤ fit: the words before it fit; the space itself is the line break.
      const space = chars.lastIndexOf(" ", fit);
      if (space >= Math.floor(fit / 2) && space > 0) {
        out.push(chars.slice(0, space).join(""));
        chars = chars.slice(space + 1);
      } else {
        out.push(chars.slice(0, fit).join(""));
        chars = chars.slice(fit);
      }
    }
  }
  return out;
}

/**
 * Two texts in two framed columns, fitting `width` columns in all:
 *
 *   +----------------+----------------+
 *   | base           | with adapter   |
 *   +----------------+----------------+
 *   | …              | …              |
 *   +----------------+----------------+
 */
export function sideBySide(left: { title: string; text: string }, right: { title: string; text: string }, width: number): string[] {
  const col = Math.max(12, Math.floor((Math.min(width, 160) - 7) / 2));
  const l = wrap(left.text, col);
  const r = wrap(right.text, col);
  const rule = `+${"-".repeat(col + 2)}+${"-".repeat(col + 2)}+`;
  const row = (a: string, b: string) => `| ${a}${" ".repeat(Math.max(0, col - displayWidth(a)))} | ${b}${" ".repeat(Math.max(0, col - displayWidth(b)))} |`;
  const title = (t: string) => wrap(t, col)[0] ?? "";
  const lines = [rule, row(title(left.title), title(right.title)), rule];
  for (let i = 0; i < Math.max(l.length, r.length); i++) lines.push(row(l[i] ?? "", r[i] ?? ""));
  lines.push(rule);
  return lines;
}

/** The longest substring of `a` that also occurs in `b` (for "the adapter reproduces the text"). */
export function longestCommonSubstring(a: string, b: string): string {
  let best = "";
  // O(|a|·|b|) dynamic programming on one row: the texts here are a few hundred characters.
  let prev = new Uint32Array(b.length + 1);
  for (let i = 1; i <= a.length; i++) {
    const cur = new Uint32Array(b.length + 1);
    for (let j = 1; j <= b.length; j++) {
      if (a[i - 1] === b[j - 1]) {
        cur[j] = prev[j - 1]! + 1;
        if (cur[j]! > best.length) best = a.slice(i - cur[j]!, i);
      }
    }
    prev = cur;
  }
  return best;
}
