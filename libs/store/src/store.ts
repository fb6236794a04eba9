/**
 * The artifact store: named artifacts (models, datasets, adapters, checkpoints), each a directory of
 * files with a manifest. Requests name artifacts, never host paths. `LocalStore` keeps them under one
 * root directory; the interface is shaped so that an S3-compatible backend can implement it (see
 * docs/store.md): data goes in through a staging directory or streams, and comes out through streams
 * or through `localPath`, which for a remote backend is a local cache it fills on demand.
 */
import { createReadStream } from "node:fs";
import { mkdir, open, readdir, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { createHash, randomBytes } from "node:crypto";
import type { Readable } from "node:stream";
import { AlreadyExists, FailedPrecondition, fsyncDir, fsyncFile, InvalidArgument, NotFound, pathExists } from "@qlora/core";
import { ARTIFACT_KINDS, isValidName, resolveUnder, validateKind, validateName, validateRelativePath, type ArtifactKind } from "./names.js";
import {
  buildManifest,
  listFiles,
  MANIFEST_FILE,
  readManifestFile,
  sha256File,
  verifyDir,
  writeManifest,
  type Manifest,
  type ManifestFile,
  type VerifyResult,
} from "./manifest.js";

export interface ArtifactStat {
  kind: ArtifactKind;
  name: string;
  sizeBytes: number;
  /** From the manifest; a directory without one (placed by hand) lists sizes only, sha256 "". */
  files: ManifestFile[];
  /** The manifest's created_at (ISO 8601), or the directory's mtime when there is no manifest. */
  createdAt: string;
  meta: Record<string, string>;
  hasManifest: boolean;
}

export interface WriteOptions {
  /** Replace an existing artifact of the same name at commit (atomically). Default false. */
  overwrite?: boolean;
}

/** Data accepted by ArtifactWriter.writeFile: bytes, text, or a stream of chunks (uploads). */
export type FileData = Uint8Array | string | AsyncIterable<Uint8Array> | Readable;

/**
 * An artifact being written. Nothing is visible under its name until commit(); abort() (or a crash)
 * leaves nothing but a staging directory that list() never shows.
 */
export interface ArtifactWriter {
  readonly kind: ArtifactKind;
  readonly name: string;
  /**
   * A local, initially empty staging directory that tools may write into directly (the quantizer,
   * the trainer). For a remote backend this is a local temp directory uploaded by commit().
   */
  readonly dir: string;
  /** Writes one file (relative path, validated) into the staging directory; returns its size and sha256. */
  writeFile(path: string, data: FileData): Promise<ManifestFile>;
  /**
   * Writes manifest.json (size + sha256 of every staged file; `meta` merged over the meta of a
   * manifest.json already in the staging directory), fsyncs, and makes the artifact visible
   * atomically, replacing an existing one only if the writer was opened with overwrite.
   */
  commit(opts?: { meta?: Record<string, string> }): Promise<Manifest>;
  /** Discards the staging directory. Safe after a failed commit; a no-op after a successful one. */
  abort(): Promise<void>;
}

export interface ArtifactStore {
  /** "local", later e.g. "s3". */
  readonly backend: string;
  exists(kind: ArtifactKind, name: string): Promise<boolean>;
  /** Names of committed artifacts of a kind, sorted (never staging or half-written ones). */
  list(kind: ArtifactKind): Promise<string[]>;
  stat(kind: ArtifactKind, name: string): Promise<ArtifactStat>;
  readManifest(kind: ArtifactKind, name: string): Promise<Manifest>;
  /**
   * A readable local directory holding the artifact, for the engine (which maps files). Callers must
   * not modify it. Local backend: the artifact's own directory. Remote backend: a cache directory
   * filled (and verified) on first use.
   */
  localPath(kind: ArtifactKind, name: string): Promise<string>;
  /** A stream of one file of an artifact (downloads, uploads to other stores). */
  openRead(kind: ArtifactKind, name: string, path: string): Promise<Readable>;
  /** Removes an artifact (NotFound when absent); it disappears from list() atomically. */
  delete(kind: ArtifactKind, name: string): Promise<void>;
  /** Starts writing an artifact; AlreadyExists unless overwrite when the name is taken. */
  beginWrite(kind: ArtifactKind, name: string, opts?: WriteOptions): Promise<ArtifactWriter>;
  /** Re-hashes an artifact's files against its manifest. */
  verify(kind: ArtifactKind, name: string): Promise<VerifyResult>;
}

const STAGING = ".staging";
const TRASH = ".trash";

/**
 * Writes one file of an artifact being staged (creating its directories) and returns its size and
 * sha256, hashed while writing. Sequential writes keep memory at one chunk and apply back-pressure to
 * the source. `sync`: fsync before returning (the local store publishes the staged files themselves;
 * the S3 store only uploads them).
 */
export async function writeStagedFile(
  abs: string,
  data: FileData,
  opts: { sync: boolean },
): Promise<{ size: number; sha256: string }> {
  await mkdir(dirname(abs), { recursive: true });
  const h = createHash("sha256");
  let size = 0;
  const fh = await open(abs, "w");
  try {
    const chunks: AsyncIterable<Uint8Array | string> | Iterable<Uint8Array | string> =
      typeof data === "string" || data instanceof Uint8Array ? [data] : (data as AsyncIterable<Uint8Array | string>);
    for await (const chunk of chunks) {
      const buf = typeof chunk === "string" ? Buffer.from(chunk) : chunk;
      h.update(buf);
      size += buf.byteLength;
      let off = 0;
      while (off < buf.byteLength) off += (await fh.write(buf, off, buf.byteLength - off)).bytesWritten;
    }
    if (opts.sync) await fh.sync();
  } finally {
    await fh.close();
  }
  return { size, sha256: h.digest("hex") };
}



/** Artifacts under `root/<kind>/<name>/`; staging under `root/.staging/`, deletions via `root/.trash/`. */
export class LocalStore implements ArtifactStore {
  readonly backend = "local";
  readonly root: string;

  constructor(root: string) {
    if (typeof root !== "string" || root.length === 0) throw new InvalidArgument("store root must be a non-empty path");
    this.root = root;
  }

  private async ensureLayout(): Promise<void> {
    await mkdir(this.root, { recursive: true });
    for (const k of ARTIFACT_KINDS) await mkdir(join(this.root, k), { recursive: true });
    await mkdir(join(this.root, STAGING), { recursive: true });
    await mkdir(join(this.root, TRASH), { recursive: true });
  }

  /** The directory of an artifact (validated; it may not exist). */
  pathOf(kind: ArtifactKind, name: string): string {
    validateKind(kind);
    validateName(name);
    return resolveUnder(this.root, kind, name);
  }

  async exists(kind: ArtifactKind, name: string): Promise<boolean> {
    const p = this.pathOf(kind, name);
    try {
      return (await stat(p)).isDirectory();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
      throw e;
    }
  }

  private async requireDir(kind: ArtifactKind, name: string): Promise<string> {
    const p = this.pathOf(kind, name);
    if (!(await this.exists(kind, name))) throw new NotFound(`${kind.replace(/s$/, "")} ${JSON.stringify(name)} not found`);
    return p;
  }

  async list(kind: ArtifactKind): Promise<string[]> {
    validateKind(kind);
    let entries;
    try {
      entries = await readdir(resolveUnder(this.root, kind), { withFileTypes: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw e;
    }
    // Valid names only: staging/temp entries start with "." and never qualify.
    return entries.filter((e) => e.isDirectory() && isValidName(e.name)).map((e) => e.name).sort();
  }

  async stat(kind: ArtifactKind, name: string): Promise<ArtifactStat> {
    const dir = await this.requireDir(kind, name);
    try {
      const m = await readManifestFile(dir);
      return { kind, name, sizeBytes: m.total_size, files: m.files, createdAt: m.created_at, meta: m.meta, hasManifest: true };
    } catch (e) {
      if (!(e instanceof NotFound)) throw e;
    }
    const files: ManifestFile[] = [];
    for (const p of await listFiles(dir)) files.push({ path: p, size: (await stat(join(dir, ...p.split("/")))).size, sha256: "" });
    const st = await stat(dir);
    return {
      kind,
      name,
      sizeBytes: files.reduce((a, f) => a + f.size, 0),
      files,
      createdAt: st.mtime.toISOString(),
      meta: {},
      hasManifest: false,
    };
  }

  async readManifest(kind: ArtifactKind, name: string): Promise<Manifest> {
    return readManifestFile(await this.requireDir(kind, name));
  }

  async localPath(kind: ArtifactKind, name: string): Promise<string> {
    return this.requireDir(kind, name);
  }

  async openRead(kind: ArtifactKind, name: string, path: string): Promise<Readable> {
    const dir = await this.requireDir(kind, name);
    const rel = validateRelativePath(path);
    const abs = resolveUnder(dir, ...rel.split("/"));
    let st;
    try {
      st = await stat(abs);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`${kind} ${JSON.stringify(name)} has no file ${JSON.stringify(rel)}`);
      throw e;
    }
    if (!st.isFile()) throw new NotFound(`${kind} ${JSON.stringify(name)} has no file ${JSON.stringify(rel)}`);
    return createReadStream(abs);
  }

  async delete(kind: ArtifactKind, name: string): Promise<void> {
    const dir = await this.requireDir(kind, name);
    await this.ensureLayout();
    // Rename first so the artifact vanishes atomically, then remove the files at leisure.
    const trash = resolveUnder(this.root, TRASH, `${kind}.${name}.${randomBytes(4).toString("hex")}`);
    try {
      await rename(dir, trash);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`${kind.replace(/s$/, "")} ${JSON.stringify(name)} not found`);
      throw e;
    }
    await fsyncDir(dirname(dir));
    await rm(trash, { recursive: true, force: true });
  }

  async beginWrite(kind: ArtifactKind, name: string, opts: WriteOptions = {}): Promise<ArtifactWriter> {
    const target = this.pathOf(kind, name);
    if (!opts.overwrite && (await this.exists(kind, name))) {
      throw new AlreadyExists(`${kind.replace(/s$/, "")} ${JSON.stringify(name)} already exists`);
    }
    await this.ensureLayout();
    const staging = resolveUnder(this.root, STAGING, `${kind}.${name}.${process.pid}.${randomBytes(6).toString("hex")}`);
    await mkdir(staging);
    return new LocalWriter(this.root, kind, name, staging, target, opts.overwrite ?? false);
  }

  async verify(kind: ArtifactKind, name: string): Promise<VerifyResult> {
    return verifyDir(await this.requireDir(kind, name));
  }

  /** Removes staging directories older than `maxAgeMs` (left by crashed writers) and any trash. */
  async cleanup(maxAgeMs = 24 * 3600 * 1000): Promise<number> {
    let removed = 0;
    for (const sub of [STAGING, TRASH]) {
      const d = join(this.root, sub);
      if (!(await pathExists(d))) continue;
      for (const e of await readdir(d)) {
        const p = join(d, e);
        const st = await stat(p);
        if (sub === TRASH || Date.now() - st.mtimeMs > maxAgeMs) {
          await rm(p, { recursive: true, force: true });
          removed++;
        }
      }
    }
    return removed;
  }
}

/**
 * What both stores' writers share: the staging directory the tools write into, the file writes
 * into it, the open → committed / aborted states, and the user metadata of a manifest a tool wrote
 * there itself. `syncFiles`: fsync each file as it is written (the local store publishes the staged
 * files themselves; the S3 store only uploads them, so a crash just loses the staging directory).
 */
export abstract class StagingWriter implements ArtifactWriter {
  protected state: "open" | "committing" | "committed" | "aborted" = "open";

  constructor(
    readonly kind: ArtifactKind,
    readonly name: string,
    readonly dir: string,
    private readonly syncFiles: boolean,
  ) {}

  abstract commit(opts?: { meta?: Record<string, string> }): Promise<Manifest>;

  protected requireOpen(): void {
    if (this.state !== "open") throw new FailedPrecondition(`write of ${this.kind} ${JSON.stringify(this.name)} is already ${this.state}`);
  }

  async writeFile(path: string, data: FileData): Promise<ManifestFile> {
    this.requireOpen();
    const rel = validateRelativePath(path);
    if (rel === MANIFEST_FILE) throw new InvalidArgument(`${MANIFEST_FILE} is written by commit()`);
    return { path: rel, ...(await writeStagedFile(resolveUnder(this.dir, ...rel.split("/")), data, { sync: this.syncFiles })) };
  }

  /** The `meta` of a manifest.json a tool wrote into the staging directory; {} when there is none or it is unreadable. */
  protected async stagedMeta(): Promise<Record<string, string>> {
    try {
      return (await readManifestFile(this.dir)).meta;
    } catch (e) {
      if (e instanceof NotFound || e instanceof InvalidArgument) return {};
      throw e;
    }
  }

  async abort(): Promise<void> {
    if (this.state === "committed") return;
    if (this.state === "committing") throw new FailedPrecondition(`write of ${this.kind} ${JSON.stringify(this.name)} is being committed`);
    this.state = "aborted";
    await rm(this.dir, { recursive: true, force: true });
  }
}

class LocalWriter extends StagingWriter {
  constructor(
    private readonly root: string,
    kind: ArtifactKind,
    name: string,
    dir: string,
    private readonly target: string,
    private readonly overwrite: boolean,
  ) {
    super(kind, name, dir, true);
  }

  async commit(opts: { meta?: Record<string, string> } = {}): Promise<Manifest> {
    this.requireOpen();
    const m = await buildManifest(this.dir, { ...(await this.stagedMeta()), ...(opts.meta ?? {}) });
    // Durability: every file the tools wrote into the staging directory, then the directories.
    for (const f of m.files) await fsyncFile(join(this.dir, ...f.path.split("/")));
    await writeManifest(this.dir, m);
    await fsyncDir(this.dir);
    const exists_ = await pathExists(this.target);
    let aside: string | undefined;
    if (exists_) {
      if (!this.overwrite) throw new AlreadyExists(`${this.kind.replace(/s$/, "")} ${JSON.stringify(this.name)} already exists`);
      aside = resolveUnder(this.root, TRASH, `${this.kind}.${this.name}.${randomBytes(4).toString("hex")}`);
      await rename(this.target, aside);
    }
    try {
      await rename(this.dir, this.target);
    } catch (e) {
      if (aside) await rename(aside, this.target).catch(() => undefined);
      const code = (e as NodeJS.ErrnoException).code;
      // rename(2) refuses a non-empty target: another writer committed first.
      if (code === "ENOTEMPTY" || code === "EEXIST") {
        throw new AlreadyExists(`${this.kind.replace(/s$/, "")} ${JSON.stringify(this.name)} already exists`);
      }
      throw e;
    }
    this.state = "committed";
    await fsyncDir(dirname(this.target));
    if (aside) await rm(aside, { recursive: true, force: true });
    return m;
  }
}
