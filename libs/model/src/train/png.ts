/**
 * The loss-curve image: a small RGB raster drawn in TypeScript (axes, grid, tick labels in a built-in
 * 5×7 bitmap font, train and eval lines, legend) and encoded as PNG with node:zlib. No dependencies,
 * so it works the same in a worker thread or a container with no fonts.
 */
import { deflateSync } from "node:zlib";
import { crc32 } from "./crc.js";

// ---- PNG encoding --------------------------------------------------------------------------

const PNG_SIGNATURE = Uint8Array.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, data.length);
  const typeBytes = new TextEncoder().encode(type);
  out.set(typeBytes, 4);
  out.set(data, 8);
  dv.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

/** Encodes an 8-bit RGB image (row-major, 3 bytes per pixel) as PNG (filter 0 on every row). */
export function encodePng(width: number, height: number, rgb: Uint8Array): Uint8Array {
  if (rgb.length !== width * height * 3) throw new RangeError("pixel buffer size does not match the image");
  const ihdr = new Uint8Array(13);
  const dv = new DataView(ihdr.buffer);
  dv.setUint32(0, width);
  dv.setUint32(4, height);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // colour type: truecolour
  ihdr[10] = 0; // deflate
  ihdr[11] = 0; // adaptive filtering (each row says which filter; we use none)
  ihdr[12] = 0; // no interlace
  const stride = width * 3;
  const raw = new Uint8Array(height * (stride + 1));
  for (let y = 0; y < height; y++) {
    raw[y * (stride + 1)] = 0;
    raw.set(rgb.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1);
  }
  const parts = [PNG_SIGNATURE, chunk("IHDR", ihdr), chunk("IDAT", deflateSync(raw)), chunk("IEND", new Uint8Array(0))];
  const total = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(total);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

// ---- raster --------------------------------------------------------------------------------

export type Rgb = readonly [number, number, number];

export class Raster {
  readonly data: Uint8Array;
  constructor(
    readonly width: number,
    readonly height: number,
    background: Rgb = [255, 255, 255],
  ) {
    this.data = new Uint8Array(width * height * 3);
    for (let i = 0; i < width * height; i++) this.data.set(background, i * 3);
  }
  set(x: number, y: number, c: Rgb): void {
    x = Math.round(x);
    y = Math.round(y);
    if (x < 0 || y < 0 || x >= this.width || y >= this.height) return;
    this.data.set(c, (y * this.width + x) * 3);
  }
  get(x: number, y: number): Rgb {
    const i = (y * this.width + x) * 3;
    return [this.data[i]!, this.data[i + 1]!, this.data[i + 2]!];
  }
  rect(x0: number, y0: number, w: number, h: number, c: Rgb): void {
    for (let y = y0; y < y0 + h; y++) for (let x = x0; x < x0 + w; x++) this.set(x, y, c);
  }
  /** A line `thickness` pixels wide (square brush), by stepping along the longer axis. */
  line(x0: number, y0: number, x1: number, y1: number, c: Rgb, thickness = 1): void {
    const n = Math.max(Math.abs(x1 - x0), Math.abs(y1 - y0), 1);
    const r0 = -Math.floor((thickness - 1) / 2);
    for (let i = 0; i <= n; i++) {
      const x = Math.round(x0 + ((x1 - x0) * i) / n);
      const y = Math.round(y0 + ((y1 - y0) * i) / n);
      for (let dy = 0; dy < thickness; dy++) for (let dx = 0; dx < thickness; dx++) this.set(x + r0 + dx, y + r0 + dy, c);
    }
  }
  /** Text in the 5×7 font, each font pixel drawn `scale`×`scale`; returns the width drawn. */
  text(x: number, y: number, s: string, c: Rgb, scale = 1): number {
    let cx = x;
    for (const ch of s) {
      const g = FONT[ch] ?? FONT["?"]!;
      for (let row = 0; row < 7; row++) {
        for (let col = 0; col < 5; col++) {
          if (g[row]![col] === "#") this.rect(cx + col * scale, y + row * scale, scale, scale, c);
        }
      }
      cx += 6 * scale;
    }
    return cx - x;
  }
}

export function textWidth(s: string, scale = 1): number {
  return [...s].length * 6 * scale;
}

// A 5×7 bitmap font for the characters the chart needs (digits, number punctuation, a few words).
const FONT: Record<string, string[]> = {
  "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
  "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
  "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
  "3": ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
  "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
  "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
  "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
  "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
  "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
  "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
  ".": [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."],
  "-": [".....", ".....", ".....", "#####", ".....", ".....", "....."],
  "+": [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."],
  " ": [".....", ".....", ".....", ".....", ".....", ".....", "....."],
  "?": [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."],
  a: [".....", ".....", ".###.", "....#", ".####", "#...#", ".####"],
  e: [".....", ".....", ".###.", "#...#", "#####", "#....", ".###."],
  i: ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."],
  l: [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
  n: [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"],
  o: [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."],
  p: [".....", ".....", "####.", "#...#", "####.", "#....", "#...."],
  r: [".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."],
  s: [".....", ".....", ".####", "#....", ".###.", "....#", "####."],
  t: [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."],
  v: [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."],
};

// ---- chart ---------------------------------------------------------------------------------

export interface Series {
  label: string;
  color: Rgb;
  points: { x: number; y: number }[];
  /** Mark each point with a small square (for sparse series such as eval loss). */
  markers?: boolean;
}

export const TRAIN_COLOR: Rgb = [31, 119, 180];
export const EVAL_COLOR: Rgb = [230, 110, 20];
const AXIS: Rgb = [40, 40, 40];
const GRID: Rgb = [228, 228, 228];

/** 1-2-5 ticks covering [lo, hi] with about `n` intervals. */
export function niceTicks(lo: number, hi: number, n = 5): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function formatTick(v: number): string {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(1).replace("e+", "e");
  return String(Number(v.toPrecision(4)));
}

/** Draws a line chart of the series (x = step, y = loss). */
export function renderLossChart(series: Series[], width = 800, height = 480): Raster {
  const img = new Raster(width, height);
  const scale = 2;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
  let xLo = Math.min(...all.map((p) => p.x), 0);
  let xHi = Math.max(...all.map((p) => p.x), 1);
  let yLo = Math.min(...all.map((p) => p.y));
  let yHi = Math.max(...all.map((p) => p.y));
  if (all.length === 0) {
    yLo = 0;
    yHi = 1;
  }
  if (!(yHi > yLo)) {
    const pad = Math.abs(yLo) * 0.1 || 0.5;
    yLo -= pad;
    yHi += pad;
  } else {
    const pad = (yHi - yLo) * 0.05;
    yLo -= pad;
    yHi += pad;
  }
  if (!(xHi > xLo)) xHi = xLo + 1;
  const yTicks = niceTicks(yLo, yHi, 5);
  const xTicks = niceTicks(xLo, xHi, 6);
  const left = 16 + Math.max(...yTicks.map((t) => textWidth(formatTick(t), scale))) + 10;
  const right = 24;
  const top = 44;
  const bottom = 64;
  const pw = width - left - right;
  const ph = height - top - bottom;
  const px = (x: number): number => left + ((x - xLo) / (xHi - xLo)) * pw;
  const py = (y: number): number => top + ph - ((y - yLo) / (yHi - yLo)) * ph;

  for (const t of yTicks) {
    const y = Math.round(py(t));
    img.line(left, y, left + pw, y, GRID);
    const s = formatTick(t);
    img.text(left - 8 - textWidth(s, scale), y - 7, s, AXIS, scale);
  }
  for (const t of xTicks) {
    const x = Math.round(px(t));
    img.line(x, top, x, top + ph, GRID);
    const s = formatTick(t);
    img.text(x - textWidth(s, scale) / 2, top + ph + 10, s, AXIS, scale);
  }
  img.line(left, top, left, top + ph, AXIS, 2);
  img.line(left, top + ph, left + pw, top + ph, AXIS, 2);
  img.text(left, 12, "loss", AXIS, scale);
  img.text(left + pw / 2 - textWidth("step", scale) / 2, height - 24, "step", AXIS, scale);

  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
    for (let i = 1; i < pts.length; i++) {
      img.line(px(pts[i - 1]!.x), py(pts[i - 1]!.y), px(pts[i]!.x), py(pts[i]!.y), s.color, 2);
    }
    if (s.markers || pts.length === 1) {
      for (const p of pts) img.rect(Math.round(px(p.x)) - 3, Math.round(py(p.y)) - 3, 7, 7, s.color);
    }
  }

  // Legend, top right.
  let lx = left + pw;
  for (const s of [...series].reverse()) {
    const w = textWidth(s.label, scale);
    lx -= w;
    img.text(lx, 12, s.label, AXIS, scale);
    lx -= 30;
    img.line(lx, 19, lx + 22, 19, s.color, 3);
    lx -= 20;
  }
  return img;
}

/** The PNG of the loss curves: train loss per logging step, eval loss per evaluation. */
export function lossChartPng(
  train: { step: number; loss: number }[],
  evals: { step: number; loss: number }[],
): Uint8Array {
  const series: Series[] = [{ label: "train", color: TRAIN_COLOR, points: train.map((p) => ({ x: p.step, y: p.loss })) }];
  if (evals.length > 0) {
    series.push({ label: "eval", color: EVAL_COLOR, points: evals.map((p) => ({ x: p.step, y: p.loss })), markers: true });
  }
  const img = renderLossChart(series);
  return encodePng(img.width, img.height, img.data);
}
