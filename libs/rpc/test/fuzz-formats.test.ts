/**
 * Bounded, seeded fuzzing of the parsers that read untrusted bytes (uploaded checkpoints and
 * adapters, configs, request headers, token files):
 *
 * - libs/formats: parseJson, readSafetensorsBuffer, SafetensorsFile.open, readPeftAdapter
 * - libs/rpc: validateUploadPath, parseAuthConfig, parseTraceparent, parsePrometheusText
 *
 * Inputs are random bytes and mutations of valid files (bit flips, splices, truncations,
 * "interesting" numbers in headers, structural edits of safetensors headers: dtypes, shapes,
 * offsets, length prefixes). Every call must return or throw one of the typed errors
 * (QloraError: InvalidArgument, FailedPrecondition, NotFound, …; JsonSyntaxError from parseJson),
 * never a TypeError/RangeError or a crash, and memory must stay bounded (a header that claims
 * terabytes must not allocate them).
 *
 * Time- and count-limited: QLORA_FUZZ_MS (default 5000, spread over the targets) and
 * QLORA_FUZZ_SEED (default fixed, so CI runs are reproducible; a failure prints the seed,
 * target, iteration and the input).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { QloraError } from "@qlora/core";
import {
  JsonSyntaxError,
  SafetensorsFile,
  parseJson,
  readPeftAdapter,
  readSafetensorsBuffer,
  serializeSafetensors,
  loraConfigJson,
  type SafetensorsDtype,
} from "@qlora/formats";
import { parseAuthConfig, parsePrometheusText, parseTraceparent, validateUploadPath } from "../src/index.js";

const SEED = Number(process.env.QLORA_FUZZ_SEED ?? 0x5eed_2026);
const BUDGET_MS = Number(process.env.QLORA_FUZZ_MS ?? 5000);
const MiB = 1024 * 1024;

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class Gen {
  readonly next: () => number;
  constructor(seed: number) {
    this.next = rng(seed);
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
}

const INTERESTING_NUMBERS = ["0", "-1", "1", "255", "65536", "2147483647", "4294967296", "9007199254740991", "9007199254740993", "18446744073709551615", "1e308", "-0", "1.5", "NaN", "1e999", "123456789012345678901234567890"];
const INTERESTING_STRINGS = ['"', "\\", "\\u0000", "\\ud800", "\u0000", "\uffff", "__metadata__", "F32", "I64", "BOOL", "{", "}", "[", "]", ",", ":", "null", "true", "📦", "\"\"", " ".repeat(64)];

/** One random mutation of `input` (never longer than ~2x + 1 KiB). */
function mutate(g: Gen, input: Uint8Array, corpus: readonly Uint8Array[]): Uint8Array {
  const b = Buffer.from(input);
  switch (g.int(9)) {
    case 0: {
      // bit flips
      const out = Buffer.from(b);
      for (let k = 1 + g.int(8); k > 0 && out.length; k--) out[g.int(out.length)]! ^= 1 << g.int(8);
      return out;
    }
    case 1: {
      const out = Buffer.from(b);
      for (let k = 1 + g.int(4); k > 0 && out.length; k--) out[g.int(out.length)] = g.pick([0, 0xff, 0x7f, 0x80, 0x22, 0x5c, 0x7b, 0x7d, g.int(256)]);
      return out;
    }
    case 2:
      return b.subarray(0, g.int(b.length + 1)); // truncate
    case 3: {
      const at = g.int(b.length + 1);
      return Buffer.concat([b.subarray(0, at), g.bytes(1 + g.int(32)), b.subarray(at)]);
    }
    case 4: {
      const at = g.int(b.length + 1);
      return Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + 1 + g.int(64)))]);
    }
    case 5: {
      // splice with another corpus entry
      const o = g.pick(corpus);
      return Buffer.concat([b.subarray(0, g.int(b.length + 1)), o.subarray(g.int(o.length + 1))]);
    }
    case 6: {
      // replace a number in the text with an interesting one
      const s = b.toString("latin1");
      const nums = [...s.matchAll(/-?\d+(\.\d+)?(e[+-]?\d+)?/gi)];
      if (!nums.length) return b;
      const m = g.pick(nums);
      return Buffer.from(s.slice(0, m.index) + g.pick(INTERESTING_NUMBERS) + s.slice(m.index! + m[0].length), "latin1");
    }
    case 7: {
      const s = b.toString("utf8");
      const at = g.int(s.length + 1);
      return Buffer.from(s.slice(0, at) + g.pick(INTERESTING_STRINGS) + s.slice(at), "utf8");
    }
    default: {
      // duplicate a range
      const a = g.int(b.length + 1);
      const e = Math.min(b.length, a + g.int(128));
      return Buffer.concat([b.subarray(0, e), b.subarray(a, e), b.subarray(e)]);
    }
  }
}

interface Target {
  name: string;
  share: number;
  maxIterations: number;
  run(g: Gen, i: number): Promise<{ input: Uint8Array | string }> | { input: Uint8Array | string };
  typed(e: unknown): boolean;
}

const isTyped = (e: unknown) => e instanceof QloraError;

async function fuzz(t: Target): Promise<{ iterations: number; peakRssDelta: number }> {
  const g = new Gen(SEED ^ hashName(t.name));
  const deadline = Date.now() + BUDGET_MS * t.share;
  const rss0 = process.memoryUsage.rss();
  let peak = 0;
  let i = 0;
  for (; i < t.maxIterations && Date.now() < deadline; i++) {
    let input: Uint8Array | string = "";
    try {
      const r = await t.run(g, i);
      input = r.input;
    } catch (e) {
      const last = (e as { fuzzInput?: Uint8Array | string }).fuzzInput ?? input;
      if (!t.typed(e)) {
        const shown = typeof last === "string" ? JSON.stringify(last.slice(0, 400)) : Buffer.from(last).subarray(0, 400).toString("base64");
        assert.fail(`${t.name}: untyped error at seed ${SEED} iteration ${i}: ${(e as Error)?.stack ?? String(e)}\ninput: ${shown}`);
      }
    }
    if (i % 50 === 0) peak = Math.max(peak, process.memoryUsage.rss() - rss0);
  }
  peak = Math.max(peak, process.memoryUsage.rss() - rss0);
  return { iterations: i, peakRssDelta: peak };
}

function hashName(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return h >>> 0;
}

/** Runs f(input), tagging a thrown error with the input for the report. */
function withInput<T>(input: Uint8Array | string, f: () => T): T {
  try {
    return f();
  } catch (e) {
    if (e && typeof e === "object") (e as { fuzzInput?: unknown }).fuzzInput = input;
    throw e;
  }
}
async function withInputAsync<T>(input: Uint8Array | string, f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    if (e && typeof e === "object") (e as { fuzzInput?: unknown }).fuzzInput = input;
    throw e;
  }
}

// ---- seed corpora ---------------------------------------------------------------------------------

const DTYPES: SafetensorsDtype[] = ["F32", "F16", "BF16", "U8", "I64", "BOOL"] as SafetensorsDtype[];

function validSafetensors(g: Gen): Buffer {
  const n = 1 + g.int(4);
  const tensors = [];
  for (let k = 0; k < n; k++) {
    const dtype = g.pick(DTYPES);
    const shape = Array.from({ length: g.int(3) + 1 }, () => 1 + g.int(4));
    const elems = shape.reduce((a, b) => a * b, 1);
    const size = dtype === "F32" ? 4 : dtype === "I64" ? 8 : dtype === "F16" || dtype === "BF16" ? 2 : 1;
    tensors.push({ name: `base_model.model.model.layers.${k}.self_attn.q_proj.lora_${k % 2 ? "B" : "A"}.weight`, dtype, shape, data: g.bytes(elems * size) });
  }
  return serializeSafetensors(tensors, g.int(2) ? { format: "pt" } : null);
}

/** A structured edit of a safetensors header: keeps the file parseable as far as possible. */
function editHeader(g: Gen, file: Buffer): Buffer {
  const n = Number(file.readBigUInt64LE(0));
  let header: Record<string, Record<string, unknown>>;
  try {
    header = JSON.parse(file.subarray(8, 8 + n).toString("utf8")) as typeof header;
  } catch {
    return file;
  }
  const names = Object.keys(header).filter((k) => k !== "__metadata__");
  const e = header[g.pick(names)]!;
  switch (g.int(6)) {
    case 0:
      e.dtype = g.pick(["F32", "F64", "I8", "F8_E4M3", "Q4", "", 7, null, "f32"]);
      break;
    case 1:
      e.shape = g.pick([[1e9, 1e9], [2 ** 53], [-1, 4], [0], [], [4.5], ["4"], [1, 2, 3, 4, 5, 6, 7, 8, 9], [65536, 65536, 65536], null]);
      break;
    case 2:
      e.data_offsets = g.pick([[0, 2 ** 53], [5, 1], [-8, 0], [0], [0, 0], [2 ** 40, 2 ** 40 + 16], null, [0, 1.5]]);
      break;
    case 3:
      header[g.pick(["__metadata__", names[0]!])] = g.pick([{ a: 1 }, [], "x", null, { k: "v".repeat(1000) }]) as Record<string, unknown>;
      break;
    case 4:
      header[`dup-${g.int(3)}`] = { ...e };
      break;
    default:
      delete header[g.pick(names)];
  }
  const json = Buffer.from(JSON.stringify(header), "utf8");
  const len = Buffer.alloc(8);
  // Sometimes a lying length prefix.
  len.writeBigUInt64LE(g.int(4) === 0 ? BigInt(g.pick([0, 1, json.length + 1, 2 ** 31, Number.MAX_SAFE_INTEGER, 100_000_001])) : BigInt(json.length));
  return Buffer.concat([len, json, file.subarray(8 + n)]);
}

function randomJsonText(g: Gen, depth = 0): string {
  const k = g.int(depth > 6 ? 4 : 7);
  switch (k) {
    case 0:
      return g.pick(INTERESTING_NUMBERS);
    case 1:
      return JSON.stringify(String.fromCharCode(...Array.from({ length: g.int(12) }, () => g.int(0x10000))));
    case 2:
      return g.pick(["true", "false", "null"]);
    case 3:
      return `"${g.pick(INTERESTING_STRINGS)}"`;
    case 4:
      return `[${Array.from({ length: g.int(4) }, () => randomJsonText(g, depth + 1)).join(",")}]`;
    case 5:
      return `{${Array.from({ length: g.int(4) }, () => `${JSON.stringify(g.pick(["r", "lora_alpha", "target_modules", "a", "a", "__metadata__"]))}:${randomJsonText(g, depth + 1)}`).join(",")}}`;
    default:
      return "[".repeat(g.int(2000)) + "]".repeat(g.int(2000));
  }
}

const CONFIGS = [
  JSON.stringify(loraConfigJson({ r: 4, loraAlpha: 8, targetModules: ["q_proj", "v_proj"], baseModelNameOrPath: "stories260K" })),
  '{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":5,"vocab_size":512,"rms_norm_eps":1e-05,"rope_scaling":null,"torch_dtype":"float32"}',
  '{"tokens":[{"name":"a","token":"0123456789abcdefgh","rpcs":["*"],"quota":{"maxConcurrent":2}}],"public":["grpc.health.v1.Health/*"]}',
];

test(`fuzz: parsers return or throw typed errors, with bounded memory (seed ${SEED}, ${BUDGET_MS} ms)`, { timeout: BUDGET_MS * 4 + 30_000 }, async () => {
  const work = await mkdtemp(path.join(tmpdir(), "qlora-fuzz-"));
  const corpusGen = new Gen(SEED);
  const stCorpus: Uint8Array[] = Array.from({ length: 8 }, () => validSafetensors(corpusGen));
  const jsonCorpus: Uint8Array[] = CONFIGS.map((c) => Buffer.from(c));
  const stFile = path.join(work, "m.safetensors");
  const adapterDir = path.join(work, "adapter");
  await import("node:fs/promises").then((fs) => fs.mkdir(adapterDir));
  const goodAdapter = serializeSafetensors([
    { name: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", dtype: "F32" as SafetensorsDtype, shape: [4, 8], data: new Uint8Array(128) },
    { name: "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", dtype: "F32" as SafetensorsDtype, shape: [8, 4], data: new Uint8Array(128) },
  ]);
  stCorpus.push(goodAdapter);

  const targets: Target[] = [
    {
      name: "parseJson",
      share: 0.2,
      maxIterations: 200_000,
      run(g) {
        const text = g.int(3) === 0 ? randomJsonText(g) : Buffer.from(mutate(g, g.pick(jsonCorpus), jsonCorpus)).toString(g.int(2) ? "utf8" : "latin1");
        withInput(text, () => parseJson(text, { rejectDuplicateKeys: g.int(2) === 0, lossless: g.int(2) === 0 }));
        return { input: text };
      },
      typed: (e) => e instanceof JsonSyntaxError || isTyped(e),
    },
    {
      name: "readSafetensorsBuffer",
      share: 0.3,
      maxIterations: 200_000,
      run(g) {
        const base = g.pick(stCorpus);
        const r = g.int(10);
        const input = r === 0 ? g.bytes(g.int(256)) : r < 5 ? editHeader(g, Buffer.from(base)) : mutate(g, base, stCorpus);
        const res = withInput(input, () => readSafetensorsBuffer(input, "fuzz"));
        // What it accepts must be consistent: every tensor's data lies inside the input.
        for (const t of res.tensors.values()) assert.ok(t.data.byteLength === t.byteLength && t.data.byteLength <= input.byteLength);
        return { input };
      },
      typed: isTyped,
    },
    {
      name: "SafetensorsFile.open",
      share: 0.2,
      maxIterations: 5_000,
      async run(g) {
        const base = g.pick(stCorpus);
        const input = g.int(2) ? editHeader(g, Buffer.from(base)) : mutate(g, base, stCorpus);
        await writeFile(stFile, input);
        await withInputAsync(input, async () => {
          const f = await SafetensorsFile.open(stFile);
          try {
            for (const name of f.tensors.keys()) await f.read(name);
          } finally {
            await f.close();
          }
        });
        return { input };
      },
      typed: isTyped,
    },
    {
      name: "readPeftAdapter",
      share: 0.2,
      maxIterations: 5_000,
      async run(g) {
        const cfg = g.int(2) ? mutate(g, jsonCorpus[0]!, jsonCorpus) : jsonCorpus[0]!;
        const weights = g.int(3) ? (g.int(2) ? editHeader(g, Buffer.from(goodAdapter)) : mutate(g, goodAdapter, stCorpus)) : goodAdapter;
        await writeFile(path.join(adapterDir, "adapter_config.json"), cfg);
        await writeFile(path.join(adapterDir, "adapter_model.safetensors"), weights);
        await withInputAsync(Buffer.concat([cfg, Buffer.from("\n---\n"), weights]), () => readPeftAdapter(adapterDir));
        return { input: cfg };
      },
      typed: isTyped,
    },
    {
      name: "rpc parsers (upload paths, token files, traceparent, Prometheus text)",
      share: 0.1,
      maxIterations: 100_000,
      run(g) {
        const s = Buffer.from(mutate(g, Buffer.from(g.pick(["config.json", "a/b/c.safetensors", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "# TYPE a counter\na_total{x=\"1\"} 3\n"])), jsonCorpus)).toString("utf8");
        withInput(s, () => {
          try {
            validateUploadPath(s);
          } catch (e) {
            if (!isTyped(e)) throw e;
          }
          const tp = parseTraceparent(s);
          if (tp) assert.match(tp.traceId, /^[0-9a-f]{32}$/);
          try {
            parsePrometheusText(s);
          } catch (e) {
            if (!(e instanceof Error) || !/^line \d+:/.test(e.message)) throw e;
          }
        });
        const cfgText = Buffer.from(mutate(g, jsonCorpus[2]!, jsonCorpus)).toString("utf8");
        let json: unknown;
        try {
          json = JSON.parse(cfgText);
        } catch {
          return { input: cfgText };
        }
        withInput(cfgText, () => parseAuthConfig(json));
        return { input: cfgText };
      },
      typed: isTyped,
    },
  ];

  try {
    const report: string[] = [];
    for (const t of targets) {
      const r = await fuzz(t);
      report.push(`${t.name}: ${r.iterations} inputs, peak RSS +${(r.peakRssDelta / MiB).toFixed(1)} MiB`);
      assert.ok(r.iterations >= Math.min(t.maxIterations, 20), `${t.name} ran (${r.iterations} inputs)`);
      // Inputs are at most a few KiB; a parser that believed a header's sizes would allocate GiBs.
      assert.ok(r.peakRssDelta < 256 * MiB, `${t.name}: memory grew by ${(r.peakRssDelta / MiB).toFixed(0)} MiB`);
    }
    process.stdout.write(`# fuzz (seed ${SEED}): ${report.join("; ")}\n`);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
});
