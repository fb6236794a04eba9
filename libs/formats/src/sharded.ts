/**
 * Sharded safetensors: `model.safetensors`, or `model-0000i-of-0000n.safetensors` +
 * `model.safetensors.index.json` (../../shared/docs/formats.md §7.3), for reading and for streaming writes.
 */
import { open, readFile, rename, rm, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { FailedPrecondition, fsyncDir, InvalidArgument, NotFound, pathExists, tempSibling } from "@qlora/core";
import { tensorByteLength, type SafetensorsDtype } from "./dtype.js";
import { SafetensorsFile, SafetensorsWriter, type TensorInfo, type TensorPlan } from "./safetensors.js";
import { parseJson, pyJsonDumps, JsonSyntaxError, type PyJsonValue } from "./pyjson.js";

export const SINGLE_FILE = "model.safetensors";
export const INDEX_FILE = "model.safetensors.index.json";
/** transformers writes shards no larger than this by default in our service (decimal GB, like HF). */
export const DEFAULT_MAX_SHARD_SIZE = 2_000_000_000;

/** A plain file name inside the checkpoint directory: no separators, no "..", not hidden. */
export function isPlainFileName(s: string): boolean {
  return /^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(s) && !s.includes("..") && s.length <= 255;
}

export interface ShardedTensor extends TensorInfo {
  /** The shard file (name inside the directory). */
  file: string;
}

/** The safetensors weights of one checkpoint directory, single file or sharded. */
export class SafetensorsSet {
  private constructor(
    readonly dir: string,
    /** Shard file names in index order (one entry for a single file). */
    readonly files: string[],
    private readonly handles: Map<string, SafetensorsFile>,
    readonly tensors: ReadonlyMap<string, ShardedTensor>,
    /** The index file name when sharded. */
    readonly indexFile: string | null,
  ) {}

  /**
   * Opens `dir`: the index when present (every shard must exist and hold exactly the tensors the
   * weight_map assigns to it), else `model.safetensors`.
   */
  static async open(dir: string): Promise<SafetensorsSet> {
    const indexPath = join(dir, INDEX_FILE);
    if (await pathExists(indexPath)) {
      const weightMap = await readIndex(indexPath);
      const files = [...new Set(Object.values(weightMap))];
      for (const f of files) {
        if (!(await pathExists(join(dir, f)))) throw new NotFound(`${indexPath}: shard ${f} does not exist`);
      }
      const handles = new Map<string, SafetensorsFile>();
      try {
        for (const f of files) handles.set(f, await SafetensorsFile.open(join(dir, f)));
        const tensors = new Map<string, ShardedTensor>();
        for (const [f, h] of handles) {
          for (const [name, info] of h.tensors) {
            if (tensors.has(name)) throw new InvalidArgument(`${indexPath}: tensor ${JSON.stringify(name)} appears in ${tensors.get(name)!.file} and ${f}`);
            if (weightMap[name] !== f) {
              throw new InvalidArgument(
                `${indexPath}: tensor ${JSON.stringify(name)} is in ${f} but the weight_map ${weightMap[name] ? `says ${weightMap[name]}` : "does not list it"}`,
              );
            }
            tensors.set(name, { ...info, file: f });
          }
        }
        for (const [name, f] of Object.entries(weightMap)) {
          if (!tensors.has(name)) throw new InvalidArgument(`${indexPath}: tensor ${JSON.stringify(name)} is mapped to ${f} but that shard does not contain it`);
        }
        return new SafetensorsSet(dir, files, handles, tensors, INDEX_FILE);
      } catch (e) {
        for (const h of handles.values()) await h.close();
        throw e;
      }
    }
    const single = join(dir, SINGLE_FILE);
    if (!(await pathExists(single))) throw new NotFound(`${dir}: neither ${SINGLE_FILE} nor ${INDEX_FILE} exists`);
    const h = await SafetensorsFile.open(single);
    const tensors = new Map<string, ShardedTensor>();
    for (const [name, info] of h.tensors) tensors.set(name, { ...info, file: SINGLE_FILE });
    return new SafetensorsSet(dir, [SINGLE_FILE], new Map([[SINGLE_FILE, h]]), tensors, null);
  }

  info(name: string): ShardedTensor {
    const t = this.tensors.get(name);
    if (!t) throw new NotFound(`${this.dir}: no tensor named ${JSON.stringify(name)}`);
    return t;
  }

  /** Reads one tensor (one positional read in its shard). */
  async read(name: string): Promise<Buffer> {
    const t = this.info(name);
    return this.handles.get(t.file)!.read(name);
  }

  async readRange(name: string, start: number, length: number): Promise<Buffer> {
    const t = this.info(name);
    return this.handles.get(t.file)!.readRange(name, start, length);
  }

  /** Reads part of a tensor into a caller's buffer (SafetensorsFile.readRangeInto). */
  async readRangeInto(name: string, start: number, target: Uint8Array): Promise<void> {
    const t = this.info(name);
    return this.handles.get(t.file)!.readRangeInto(name, start, target);
  }

  /** The metadata of the first shard (transformers puts {"format": "pt"} in each). */
  metadata(): Record<string, string> | null {
    return this.handles.get(this.files[0]!)?.metadata ?? null;
  }

  async close(): Promise<void> {
    for (const h of this.handles.values()) await h.close();
  }
}

/** Reads and validates `model.safetensors.index.json`; returns its weight_map. */
export async function readIndex(indexPath: string): Promise<Record<string, string>> {
  let parsed: unknown;
  try {
    parsed = parseJson(await readFile(indexPath, "utf8"), { rejectDuplicateKeys: true });
  } catch (e) {
    if (e instanceof JsonSyntaxError) throw new InvalidArgument(`${indexPath}: not valid JSON (${e.message})`);
    throw e;
  }
  const wm = (parsed as { weight_map?: unknown } | null)?.weight_map;
  if (parsed === null || typeof parsed !== "object" || wm === null || typeof wm !== "object" || Array.isArray(wm)) {
    throw new InvalidArgument(`${indexPath}: missing "weight_map" object`);
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof v !== "string" || !isPlainFileName(v) || !v.endsWith(".safetensors")) {
      throw new InvalidArgument(`${indexPath}: weight_map[${JSON.stringify(k)}] = ${JSON.stringify(v)} is not a shard file name in this directory`);
    }
    out[k] = v;
  }
  if (Object.keys(out).length === 0) throw new InvalidArgument(`${indexPath}: empty weight_map`);
  return out;
}

/** Shard file name i (0-based) of n, HF style; a single shard is `model.safetensors`. */
export function shardFileName(i: number, n: number, baseName = "model"): string {
  if (n === 1) return `${baseName}.safetensors`;
  return `${baseName}-${String(i + 1).padStart(5, "0")}-of-${String(n).padStart(5, "0")}.safetensors`;
}

export interface ShardPlanEntry {
  name: string;
  dtype: SafetensorsDtype;
  /** Undefined: a 1-D tensor whose length is only known when it is written (e.g. a JSON blob). */
  shape?: number[];
  /** Size estimate in bytes for shard assignment when shape is undefined. */
  sizeHint?: number;
  /** Consecutive entries with the same group always land in the same shard (a weight and its quant state). */
  group?: string;
}

export interface ShardedWriterOptions {
  /** Largest shard in bytes of tensor data (a group larger than this gets a shard of its own). */
  maxShardSize?: number;
  /** safetensors `__metadata__` of every shard; default {"format": "pt"} like transformers. */
  metadata?: Record<string, string> | null;
  baseName?: string;
}

interface ShardState {
  file: string;
  names: string[];
  allKnown: boolean;
  remaining: number;
  writer: SafetensorsWriter | null;
  spool: { fh: FileHandle; path: string; pos: number; regions: Map<string, { at: number; len: number; shape: number[] }> } | null;
  finished: boolean;
}

/**
 * Streaming writer for a sharded checkpoint. The plan is the ordered tensor list; shards are assigned
 * greedily in that order (huggingface_hub's rule), keeping groups together.
 *
 * A shard whose tensor sizes are all known is written directly: header first, then each tensor at its
 * final offset as it arrives. A shard that contains a tensor of unknown size (bitsandbytes'
 * quant_state JSON, whose length depends on the nested offset computed during quantization) cannot
 * know its header or offsets up front, so its tensors are appended to a spool file as they arrive and
 * copied into a SafetensorsWriter in chunks once the shard is complete. Memory stays at one tensor
 * plus one copy chunk either way.
 */
export class ShardedSafetensorsWriter {
  private shards: ShardState[];
  private byName = new Map<string, { shard: ShardState; entry: ShardPlanEntry }>();
  private finishedFiles: string[] = [];
  private sizes = new Map<string, number>();
  private closed = false;

  private constructor(
    readonly dir: string,
    plan: ShardState[],
    entries: ShardPlanEntry[],
    private readonly metadata: Record<string, string> | null,
    private readonly baseName: string,
  ) {
    this.shards = plan;
    const entryByName = new Map(entries.map((e) => [e.name, e]));
    for (const s of plan) for (const n of s.names) this.byName.set(n, { shard: s, entry: entryByName.get(n)! });
  }

  static async create(dir: string, entries: readonly ShardPlanEntry[], opts: ShardedWriterOptions = {}): Promise<ShardedSafetensorsWriter> {
    const max = opts.maxShardSize ?? DEFAULT_MAX_SHARD_SIZE;
    if (!(max > 0)) throw new InvalidArgument(`maxShardSize must be positive, got ${max}`);
    const baseName = opts.baseName ?? "model";
    const metadata = opts.metadata === undefined ? { format: "pt" } : opts.metadata;
    const seen = new Set<string>();
    const size = (e: ShardPlanEntry): number => {
      if (e.shape === undefined) return e.sizeHint ?? 0;
      const n = tensorByteLength(e.dtype, e.shape);
      if (n === undefined) throw new InvalidArgument(`tensor ${JSON.stringify(e.name)}: ${e.dtype} [${e.shape.join(", ")}] is not a whole number of bytes`);
      return n;
    };
    // Split into atomic groups (consecutive entries sharing a group key), then pack groups greedily.
    const groups: ShardPlanEntry[][] = [];
    for (const e of entries) {
      if (seen.has(e.name)) throw new InvalidArgument(`duplicate tensor name ${JSON.stringify(e.name)}`);
      seen.add(e.name);
      const last = groups[groups.length - 1];
      if (last && e.group !== undefined && last[0]!.group === e.group) last.push(e);
      else groups.push([e]);
    }
    const packed: ShardPlanEntry[][] = [];
    let cur: ShardPlanEntry[] = [];
    let curSize = 0;
    for (const g of groups) {
      const gs = g.reduce((a, e) => a + size(e), 0);
      if (cur.length > 0 && curSize + gs > max) {
        packed.push(cur);
        cur = [];
        curSize = 0;
      }
      cur.push(...g);
      curSize += gs;
    }
    if (cur.length > 0 || packed.length === 0) packed.push(cur);
    const states: ShardState[] = packed.map((p, i) => ({
      file: shardFileName(i, packed.length, baseName),
      names: p.map((e) => e.name),
      allKnown: p.every((e) => e.shape !== undefined),
      remaining: p.length,
      writer: null,
      spool: null,
      finished: false,
    }));
    for (const s of states) {
      if (await pathExists(join(dir, s.file))) throw new FailedPrecondition(`${join(dir, s.file)} already exists`);
    }
    const w = new ShardedSafetensorsWriter(dir, states, [...entries], metadata, baseName);
    // Shards with no tensors at all (an empty plan) are written right away.
    for (const s of states) if (s.remaining === 0) await w.finishShard(s);
    return w;
  }

  /** Shard file names in order. */
  get files(): string[] {
    return this.shards.map((s) => s.file);
  }

  shardOf(name: string): string {
    const r = this.byName.get(name);
    if (!r) throw new InvalidArgument(`tensor ${JSON.stringify(name)} is not in the plan`);
    return r.shard.file;
  }

  /**
   * Writes one tensor. For an entry planned without a shape, `shape` defaults to [data.byteLength /
   * itemsize] (a 1-D tensor).
   */
  async write(name: string, data: Uint8Array, shape?: number[]): Promise<void> {
    if (this.closed) throw new InvalidArgument(`${this.dir}: sharded writer is closed`);
    const r = this.byName.get(name);
    if (!r) throw new InvalidArgument(`tensor ${JSON.stringify(name)} is not in the plan`);
    const { shard, entry } = r;
    if (this.sizes.has(name)) throw new InvalidArgument(`tensor ${JSON.stringify(name)} was already written`);
    let finalShape = entry.shape ?? shape;
    if (!finalShape) {
      const bits = tensorByteLength(entry.dtype, [1])!;
      finalShape = [data.byteLength / bits];
    }
    if (entry.shape && shape && shape.join(",") !== entry.shape.join(",")) {
      throw new InvalidArgument(`tensor ${JSON.stringify(name)}: shape [${shape.join(", ")}] differs from the plan [${entry.shape.join(", ")}]`);
    }
    const expected = tensorByteLength(entry.dtype, finalShape);
    if (expected !== data.byteLength) {
      throw new InvalidArgument(`tensor ${JSON.stringify(name)}: got ${data.byteLength} bytes, ${entry.dtype} [${finalShape.join(", ")}] needs ${expected}`);
    }
    if (shard.allKnown) {
      if (!shard.writer) shard.writer = await SafetensorsWriter.create(join(this.dir, shard.file), this.tensorPlans(shard), this.metadata);
      await shard.writer.write(name, data);
    } else {
      if (!shard.spool) {
        const path = tempSibling(join(this.dir, shard.file), "spool");
        shard.spool = { fh: await open(path, "wx+"), path, pos: 0, regions: new Map() };
      }
      const sp = shard.spool;
      let done = 0;
      while (done < data.byteLength) {
        const { bytesWritten } = await sp.fh.write(data, done, data.byteLength - done, sp.pos + done);
        done += bytesWritten;
      }
      sp.regions.set(name, { at: sp.pos, len: data.byteLength, shape: finalShape });
      sp.pos += data.byteLength;
    }
    this.sizes.set(name, data.byteLength);
    shard.remaining--;
    if (shard.remaining === 0) await this.finishShard(shard);
  }

  private tensorPlans(shard: ShardState): TensorPlan[] {
    return shard.names.map((n) => {
      const e = this.byName.get(n)!.entry;
      const shape = e.shape ?? shard.spool?.regions.get(n)?.shape;
      if (!shape) throw new InvalidArgument(`tensor ${JSON.stringify(n)} has no shape yet`);
      return { name: n, dtype: e.dtype, shape };
    });
  }

  private async finishShard(shard: ShardState): Promise<void> {
    if (!shard.writer) {
      shard.writer = await SafetensorsWriter.create(join(this.dir, shard.file), this.tensorPlans(shard), this.metadata);
    }
    if (shard.spool) {
      // Copy each spooled tensor into its final position, 8 MiB at a time.
      const sp = shard.spool;
      const chunk = Buffer.allocUnsafeSlow(8 << 20);
      for (const [name, reg] of sp.regions) {
        let done = 0;
        while (done < reg.len) {
          const want = Math.min(chunk.byteLength, reg.len - done);
          const { bytesRead } = await sp.fh.read(chunk, 0, want, reg.at + done);
          if (bytesRead === 0) throw new InvalidArgument(`${sp.path}: spool file truncated`);
          await shard.writer.writeChunk(name, chunk.subarray(0, bytesRead));
          done += bytesRead;
        }
      }
      await sp.fh.close();
      await rm(sp.path, { force: true });
      shard.spool = null;
    }
    await shard.writer.finish();
    shard.writer = null;
    shard.finished = true;
    this.finishedFiles.push(shard.file);
  }

  /**
   * Checks that every planned tensor was written and writes the index (when there is more than one
   * shard): `{"metadata": {"total_size": N}, "weight_map": {...}}`, json.dumps(indent=2, sort_keys=True).
   */
  async finish(): Promise<{ files: string[]; indexFile: string | null; totalSize: number }> {
    if (this.closed) throw new InvalidArgument(`${this.dir}: sharded writer is closed`);
    const missing = [...this.byName.keys()].filter((n) => !this.sizes.has(n));
    if (missing.length) throw new InvalidArgument(`${this.dir}: ${missing.length} planned tensor(s) not written, e.g. ${JSON.stringify(missing[0])}`);
    this.closed = true;
    const totalSize = [...this.sizes.values()].reduce((a, b) => a + b, 0);
    let indexFile: string | null = null;
    if (this.shards.length > 1) {
      indexFile = `${this.baseName}.safetensors.index.json`;
      const weightMap: Record<string, string> = {};
      for (const s of this.shards) for (const n of s.names) weightMap[n] = s.file;
      const index: PyJsonValue = { metadata: { total_size: totalSize }, weight_map: weightMap };
      const path = join(this.dir, indexFile);
      const tmp = tempSibling(path);
      const fh = await open(tmp, "wx");
      try {
        await fh.writeFile(pyJsonDumps(index, { indent: 2, sortKeys: true }) + "\n");
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, path);
      await fsyncDir(this.dir);
    }
    return { files: this.files, indexFile, totalSize };
  }

  /** Removes everything this writer created (finished shards, partial files, spools). */
  async abort(): Promise<void> {
    this.closed = true;
    for (const s of this.shards) {
      await s.writer?.abort();
      s.writer = null;
      if (s.spool) {
        await s.spool.fh.close().catch(() => undefined);
        await rm(s.spool.path, { force: true });
        s.spool = null;
      }
    }
    for (const f of this.finishedFiles) await rm(join(this.dir, f), { force: true });
  }
}
