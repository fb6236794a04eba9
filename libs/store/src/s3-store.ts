/**
 * S3Store: the ArtifactStore on any S3-compatible object store (AWS S3, Swift's s3api, Ceph RGW,
 * MinIO, ...), through `@aws-sdk/client-s3`. See docs/store.md ("The S3 backend").
 *
 * Layout under `<prefix>/` in the bucket:
 *   <kind>/<name>/manifest.json              the commit record, written LAST
 *   <kind>/<name>/.g-<generation>/<path>     the files of one write (a fresh generation per commit)
 *
 * - An artifact exists iff its manifest object exists. Files are uploaded first (multipart above a
 *   threshold, Content-MD5 on every request so the server checks what it received), then one PUT of
 *   the manifest publishes them: a single-object PUT is atomic in S3, so a reader sees the old
 *   manifest or the new one, never a half-written artifact. Because each commit writes its files
 *   under a new generation, overwriting never touches the files an existing manifest points to;
 *   the old generation is deleted after the new manifest is in place.
 * - Every file's sha256 is in the manifest (computed while uploading, from the bytes sent) and is
 *   checked on every download: `localPath` (into a local cache), `openRead` (the stream errors at
 *   its end) and `verify`.
 * - `localPath` materialises the artifact into `<cacheDir>/<kind>/<name>@<manifest sha>/`:
 *   downloaded into a temp directory, verified, fsynced, then renamed into place, so a cache entry
 *   is complete or absent. A replaced version's entry is evicted when the new one is cached.
 * - delete removes the manifest first (the artifact vanishes atomically), then its files.
 * - Manifests without a `generation` (a LocalStore directory copied into the bucket as is, e.g. with
 *   `aws s3 sync`) are read with their files directly under `<kind>/<name>/`.
 */
import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readdir, rename, rm, stat, type FileHandle } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Readable, Transform, pipeline } from "node:stream";
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
  type _Object,
  type S3ClientConfig,
} from "@aws-sdk/client-s3";
import { AlreadyExists, FailedPrecondition, fsyncDir, fsyncFile, InvalidArgument, NotFound, pathExists, QloraError } from "@qlora/core";
import { ARTIFACT_KINDS, resolveUnder, validateKind, validateName, validateRelativePath, type ArtifactKind } from "./names.js";
import { listFiles, MANIFEST_FILE, parseManifest, type Manifest, type ManifestFile, type VerifyResult } from "./manifest.js";
import { StagingWriter, type ArtifactStat, type ArtifactStore, type ArtifactWriter, type WriteOptions } from "./store.js";

const MiB = 1024 * 1024;
/** S3's limits: parts of at least 5 MiB (except the last), at most 10,000 parts per upload. */
const MIN_PART = 5 * MiB;
const MAX_PARTS = 10_000;
const GEN_DIR = ".g-";
const GEN_RE = /^[A-Za-z0-9_-]{1,64}$/;

export interface S3StoreOptions {
  bucket: string;
  /** Key prefix for everything the store writes ("" = the bucket's root); "/"-separated segments. */
  prefix?: string;
  /** Local directory for staging (beginWrite) and the localPath cache; created on demand. */
  cacheDir: string;
  /** A ready client; when given, the connection options below are ignored. */
  client?: S3Client;
  /** URL of an S3-compatible endpoint; omit for AWS S3. */
  endpoint?: string;
  /** Default "us-east-1". */
  region?: string;
  /** Path-style URLs (`endpoint/bucket/key`), which most S3-compatible stores need. */
  forcePathStyle?: boolean;
  /** Omit to use the SDK's default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, web identity, ...). */
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** Multipart part size in bytes (at least 5 MiB; raised when a file would need over 10,000 parts). Default 16 MiB. */
  partSize?: number;
  /** Files larger than this are uploaded in parts. Default: partSize. */
  multipartThreshold?: number;
  /** Parallel requests per upload or download (and the number of part buffers in memory). Default 4. */
  concurrency?: number;
  /**
   * Publish a new (not overwriting) artifact with `If-None-Match: *`, so two writers racing for a
   * name cannot both win. "auto" (default) uses it and falls back to check-then-put on servers that
   * answer 501 (OpenStack Swift); "never" always checks then puts.
   */
  conditionalWrites?: "auto" | "never";
  /** Keys per listing request (1..1000). Default 1000. */
  listPageSize?: number;
  /**
   * After an overwrite, how long the replaced version's objects stay readable before this store
   * deletes them, so readers that started on the old manifest finish (a server may cut off a
   * download whose object is deleted). 0 deletes at once. If the process exits first, cleanup()
   * collects them. Default 60 s.
   */
  replacedGraceMs?: number;
}

/** The bytes of an artifact do not match its manifest (corrupt or tampered object, or a broken manifest). */
export class IntegrityError extends QloraError {
  constructor(
    message: string,
    readonly details: { kind: ArtifactKind; name: string; path?: string; expectedSha256?: string; actualSha256?: string; expectedSize?: number; actualSize?: number },
  ) {
    super("INTERNAL", message);
  }
}

/** Where an artifact's objects are (see locate()). */
export interface S3Location {
  manifestKey: string;
  /** The generation of the current manifest; null for a manifest without one (files directly under the name). */
  generation: string | null;
  /** Prefix of the file objects ("…/<name>/.g-<generation>/"). */
  dataPrefix: string;
  files: { path: string; key: string; size: number; sha256: string }[];
}

interface LoadedManifest {
  manifest: Manifest;
  generation: string | null;
  /** The manifest object's exact bytes, and their sha256 (names the cache entry). */
  bytes: Buffer;
  sha256: string;
}

/** A counting semaphore: bounds parallel requests and the part buffers they hold. */
export class Semaphore {
  private waiters: (() => void)[] = [];
  constructor(private free: number) {}
  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((r) => this.waiters.push(r));
  }
  release(): void {
    const w = this.waiters.shift();
    if (w) w();
    else this.free++;
  }
}

/** Runs `fn` over `items` with at most `n` in flight; rejects with the first error (after all settle). */
async function forEachLimit<T>(items: readonly T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed: { e: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const item = items[next++]!;
      try {
        await fn(item);
      } catch (e) {
        failed ??= { e };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(n, items.length)) }, worker));
  if (failed) throw failed.e;
}

const sha256Hex = (b: Uint8Array | string): string => createHash("sha256").update(b).digest("hex");
const md5Base64 = (b: Uint8Array): string => createHash("md5").update(b).digest("base64");

interface S3ErrorShape {
  name?: string;
  message?: string;
  code?: string;
  $metadata?: { httpStatusCode?: number };
}

function statusOf(e: unknown): number | undefined {
  return (e as S3ErrorShape | null)?.$metadata?.httpStatusCode;
}

function isNoSuchKey(e: unknown): boolean {
  const name = (e as S3ErrorShape | null)?.name;
  if (name === "NoSuchKey" || name === "NotFound") return true;
  return statusOf(e) === 404 && name !== "NoSuchBucket" && name !== "NoSuchUpload";
}

/** S3 and network errors → typed errors (UNAVAILABLE for what a retry may fix). */
function translate(e: unknown, what: string): Error {
  if (e instanceof QloraError) return e;
  const err = (e ?? {}) as S3ErrorShape;
  const status = statusOf(e);
  const name = err.name ?? "Error";
  const msg = `${what}: ${name}${status ? ` (HTTP ${status})` : ""}${err.message && err.message !== name ? `: ${err.message}` : ""}`;
  if (name === "NoSuchBucket") return new FailedPrecondition(msg, { cause: e });
  if (status === 401 || name === "InvalidAccessKeyId" || name === "SignatureDoesNotMatch" || name === "CredentialsProviderError") {
    return new QloraError("UNAUTHENTICATED", msg, { cause: e });
  }
  if (status === 403 || name === "AccessDenied") return new QloraError("PERMISSION_DENIED", msg, { cause: e });
  if (status === undefined || status >= 500 || status === 429 || status === 408) return new QloraError("UNAVAILABLE", msg, { cause: e });
  return new QloraError("INTERNAL", msg, { cause: e });
}

/** Structural check of a path read from a manifest: relative, no empty/./.. segment, no backslash/NUL. */
function checkManifestPath(p: string, kind: ArtifactKind, name: string): string {
  const segs = p.split("/");
  if (
    p.length === 0 ||
    p.length > 1024 ||
    p.includes("\\") ||
    p.includes("\0") ||
    p === MANIFEST_FILE ||
    segs.some((s) => s === "" || s === "." || s === "..")
  ) {
    throw new IntegrityError(`${kind} ${JSON.stringify(name)}: the manifest lists an invalid file path ${JSON.stringify(p)}`, { kind, name, path: p });
  }
  return p;
}

async function readExactly(fh: FileHandle, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(length);
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, got, length - got, offset + got);
    if (bytesRead === 0) throw new FailedPrecondition(`file shrank while it was being uploaded (read ${got} of ${length} bytes at ${offset})`);
    got += bytesRead;
  }
  return buf;
}



/** Normalises a key prefix: trims slashes; refuses empty, "." and ".." segments. */
export function normalizeS3Prefix(prefix: string | undefined): string {
  const p = (prefix ?? "").replace(/^\/+|\/+$/g, "");
  if (p === "") return "";
  for (const s of p.split("/")) {
    if (s === "" || s === "." || s === ".." || s.includes("\\") || s.includes("\0")) {
      throw new InvalidArgument(`S3 prefix ${JSON.stringify(prefix)} has an empty, "." or ".." segment`);
    }
  }
  return p;
}

export class S3Store implements ArtifactStore {
  readonly backend = "s3";
  readonly bucket: string;
  /** Normalised key prefix ("" or "a/b"). */
  readonly prefix: string;
  readonly cacheDir: string;
  readonly client: S3Client;
  readonly partSize: number;
  readonly multipartThreshold: number;
  readonly concurrency: number;
  private readonly listPageSize: number;
  private conditional: boolean;
  private readonly ownsClient: boolean;
  private bucketChecked: Promise<void> | undefined;
  private readonly inflight = new Map<string, Promise<string>>();
  readonly replacedGraceMs: number;
  private readonly pendingDeletes = new Set<NodeJS.Timeout>();

  constructor(opts: S3StoreOptions) {
    if (typeof opts.bucket !== "string" || opts.bucket.length === 0) throw new InvalidArgument("S3 bucket must be a non-empty string");
    if (typeof opts.cacheDir !== "string" || opts.cacheDir.length === 0) throw new InvalidArgument("S3 cacheDir must be a non-empty path");
    this.bucket = opts.bucket;
    this.prefix = normalizeS3Prefix(opts.prefix);
    this.cacheDir = opts.cacheDir;
    const partSize = opts.partSize ?? 16 * MiB;
    if (!Number.isSafeInteger(partSize) || partSize < MIN_PART) throw new InvalidArgument(`partSize must be an integer of at least ${MIN_PART} bytes`);
    this.partSize = partSize;
    this.multipartThreshold = opts.multipartThreshold ?? partSize;
    if (!Number.isSafeInteger(this.multipartThreshold) || this.multipartThreshold < 0) throw new InvalidArgument("multipartThreshold must be a non-negative integer");
    this.concurrency = opts.concurrency ?? 4;
    if (!Number.isInteger(this.concurrency) || this.concurrency < 1 || this.concurrency > 64) throw new InvalidArgument("concurrency must be 1..64");
    this.listPageSize = opts.listPageSize ?? 1000;
    if (!Number.isInteger(this.listPageSize) || this.listPageSize < 1 || this.listPageSize > 1000) throw new InvalidArgument("listPageSize must be 1..1000");
    this.conditional = (opts.conditionalWrites ?? "auto") === "auto";
    this.replacedGraceMs = opts.replacedGraceMs ?? 60_000;
    if (!Number.isSafeInteger(this.replacedGraceMs) || this.replacedGraceMs < 0) throw new InvalidArgument("replacedGraceMs must be a non-negative integer");
    if (opts.client) {
      this.client = opts.client;
      this.ownsClient = false;
    } else {
      const cfg: S3ClientConfig = {
        region: opts.region ?? "us-east-1",
        forcePathStyle: opts.forcePathStyle ?? false,
        // S3-compatible servers reject the SDK's default CRC32 checksum headers on some requests;
        // integrity is covered by Content-MD5 on uploads and sha256 on downloads.
        requestChecksumCalculation: "WHEN_REQUIRED",
        responseChecksumValidation: "WHEN_REQUIRED",
      };
      if (opts.endpoint) cfg.endpoint = opts.endpoint;
      if (opts.credentials) cfg.credentials = opts.credentials;
      this.client = new S3Client(cfg);
      this.ownsClient = true;
    }
  }

  // ---- keys ----

  private base(kind: ArtifactKind, name: string): string {
    return `${this.prefix ? this.prefix + "/" : ""}${kind}/${name}/`;
  }

  private kindPrefix(kind: ArtifactKind): string {
    return `${this.prefix ? this.prefix + "/" : ""}${kind}/`;
  }

  private manifestKey(kind: ArtifactKind, name: string): string {
    return this.base(kind, name) + MANIFEST_FILE;
  }

  private dataPrefix(kind: ArtifactKind, name: string, generation: string | null): string {
    return generation === null ? this.base(kind, name) : `${this.base(kind, name)}${GEN_DIR}${generation}/`;
  }

  private checkArgs(kind: ArtifactKind, name: string): void {
    validateKind(kind);
    validateName(name);
  }

  // ---- S3 plumbing ----

  private async send<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw translate(e, what);
    }
  }

  /** Once per store: the bucket exists (so a missing bucket is an error, not "no artifacts"). */
  private ensureBucket(): Promise<void> {
    this.bucketChecked ??= this.client.send(new HeadBucketCommand({ Bucket: this.bucket })).then(
      () => undefined,
      (e: unknown) => {
        this.bucketChecked = undefined;
        if (statusOf(e) === 404) throw new FailedPrecondition(`S3 bucket ${JSON.stringify(this.bucket)} does not exist`, { cause: e });
        throw translate(e, `S3 bucket ${JSON.stringify(this.bucket)}`);
      },
    );
    return this.bucketChecked;
  }

  private async getBytes(key: string): Promise<Buffer | undefined> {
    try {
      const r = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key }));
      return Buffer.from(await r.Body!.transformToByteArray());
    } catch (e) {
      if (isNoSuchKey(e)) return undefined;
      throw translate(e, `GET ${key}`);
    }
  }

  private async getStream(key: string): Promise<Readable | undefined> {
    try {
      const r = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key }));
      return r.Body as Readable;
    } catch (e) {
      if (isNoSuchKey(e)) return undefined;
      throw translate(e, `GET ${key}`);
    }
  }

  /** Every object under `prefix` (all pages). */
  private async listObjects(prefix: string): Promise<_Object[]> {
    const out: _Object[] = [];
    let token: string | undefined;
    do {
      const r = await this.send(`LIST ${prefix}`, () =>
        this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, MaxKeys: this.listPageSize, ContinuationToken: token })),
      );
      for (const o of r.Contents ?? []) if (o.Key) out.push(o);
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
    return out;
  }

  private async deleteKeys(keys: readonly string[]): Promise<void> {
    // One request per key: portable (GCS has no multi-object delete; Swift's wants Content-MD5).
    await forEachLimit(keys, Math.max(this.concurrency, 8), async (Key) => {
      await this.send(`DELETE ${Key}`, () => this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key })));
    });
  }

  private async loadManifest(kind: ArtifactKind, name: string): Promise<LoadedManifest | undefined> {
    await this.ensureBucket();
    const key = this.manifestKey(kind, name);
    const bytes = await this.getBytes(key);
    if (!bytes) return undefined;
    const text = bytes.toString("utf8");
    const manifest = parseManifest(text, `s3://${this.bucket}/${key}`);
    const raw = JSON.parse(text) as { generation?: unknown };
    let generation: string | null = null;
    if (raw.generation !== undefined) {
      if (typeof raw.generation !== "string" || !GEN_RE.test(raw.generation)) {
        throw new IntegrityError(`${kind} ${JSON.stringify(name)}: the manifest has an invalid generation`, { kind, name });
      }
      generation = raw.generation;
    }
    const seen = new Set<string>();
    for (const f of manifest.files) {
      checkManifestPath(f.path, kind, name);
      if (seen.has(f.path)) throw new IntegrityError(`${kind} ${JSON.stringify(name)}: the manifest lists ${JSON.stringify(f.path)} twice`, { kind, name, path: f.path });
      seen.add(f.path);
    }
    return { manifest, generation, bytes, sha256: sha256Hex(bytes) };
  }

  private async requireManifest(kind: ArtifactKind, name: string): Promise<LoadedManifest> {
    const m = await this.loadManifest(kind, name);
    if (!m) throw new NotFound(`${kind.replace(/s$/, "")} ${JSON.stringify(name)} not found`);
    return m;
  }

  // ---- cache ----

  private cacheEntry(kind: ArtifactKind, name: string, manifestSha: string): string {
    return resolveUnder(this.cacheDir, kind, `${name}@${manifestSha.slice(0, 16)}`);
  }

  /** Removes cached versions of an artifact other than `keep` (a directory name). */
  private async evictCached(kind: ArtifactKind, name: string, keep?: string): Promise<void> {
    const dir = resolveUnder(this.cacheDir, kind);
    let entries: string[];
    try {
      entries = await readdir(dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
      throw e;
    }
    // Names never contain "@", so "<name>@" matches this artifact's entries only.
    for (const e of entries) if (e.startsWith(`${name}@`) && e !== keep) await rm(join(dir, e), { recursive: true, force: true });
  }

  private async tempDir(label: string, sub: ".staging" | ".tmp"): Promise<string> {
    const parent = resolveUnder(this.cacheDir, sub);
    await mkdir(parent, { recursive: true });
    const d = resolveUnder(parent, `${label}.${process.pid}.${randomBytes(6).toString("hex")}`);
    await mkdir(d);
    return d;
  }

  /**
   * Downloads one object into `dest`, hashing as it streams; IntegrityError on a size or sha256
   * mismatch; undefined when the object is missing.
   */
  private async downloadTo(key: string, dest: string, f: ManifestFile, kind: ArtifactKind, name: string): Promise<"ok" | "missing"> {
    const body = await this.getStream(key);
    if (!body) return "missing";
    await mkdir(dirname(dest), { recursive: true });
    const h = createHash("sha256");
    let size = 0;
    const fh = await open(dest, "w");
    try {
      for await (const chunk of body as AsyncIterable<Buffer>) {
        size += chunk.byteLength;
        if (size > f.size) break;
        h.update(chunk);
        let off = 0;
        while (off < chunk.byteLength) off += (await fh.write(chunk, off, chunk.byteLength - off)).bytesWritten;
      }
      await fh.sync();
    } finally {
      body.destroy();
      await fh.close();
    }
    const sha = size > f.size ? "" : h.digest("hex");
    if (size !== f.size || sha !== f.sha256) {
      throw new IntegrityError(
        `${kind} ${JSON.stringify(name)}: ${f.path} does not match its manifest (` +
          (size !== f.size ? `size ${size > f.size ? `over ${f.size}` : size}, expected ${f.size}` : `sha256 ${sha}, expected ${f.sha256}`) +
          `): the object is corrupt`,
        { kind, name, path: f.path, expectedSha256: f.sha256, actualSha256: sha, expectedSize: f.size, actualSize: size },
      );
    }
    return "ok";
  }

  private async materialise(kind: ArtifactKind, name: string, m: LoadedManifest): Promise<string | "replaced"> {
    const target = this.cacheEntry(kind, name, m.sha256);
    if (await pathExists(join(target, MANIFEST_FILE))) return target;
    const tmp = await this.tempDir(`${kind}.${name}`, ".tmp");
    try {
      let replaced = false;
      const prefix = this.dataPrefix(kind, name, m.generation);
      try {
        await forEachLimit(m.manifest.files, this.concurrency, async (f) => {
          if (replaced) return;
          const dest = resolveUnder(tmp, ...f.path.split("/"));
          if ((await this.downloadTo(prefix + f.path, dest, f, kind, name)) === "missing") replaced = true;
        });
      } catch (e) {
        // A download cut off because its version was replaced and deleted meanwhile: start over
        // from the new manifest. Otherwise (same manifest) the error stands.
        if (e instanceof IntegrityError) throw e;
        const now = await this.loadManifest(kind, name).catch(() => undefined);
        if (now?.sha256 !== m.sha256) return "replaced";
        throw translate(e, `download of ${kind} ${JSON.stringify(name)}`);
      }
      if (replaced) {
        // A file of this manifest is gone: replaced or deleted meanwhile (the caller re-reads the
        // manifest), or the artifact is broken (the manifest did not change).
        const now = await this.loadManifest(kind, name);
        if (now && now.sha256 === m.sha256) {
          const missing: string[] = [];
          for (const f of m.manifest.files) if (!(await this.headExists(prefix + f.path))) missing.push(f.path);
          throw new IntegrityError(`${kind} ${JSON.stringify(name)}: files listed in its manifest are missing: ${missing.join(", ")}`, { kind, name, path: missing[0] });
        }
        return "replaced";
      }
      const fh = await open(join(tmp, MANIFEST_FILE), "w");
      try {
        await fh.writeFile(m.bytes);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsyncFile(tmp);
      await mkdir(dirname(target), { recursive: true });
      try {
        await rename(tmp, target);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        // Another process (or call) cached the same version first: use theirs.
        if (code !== "ENOTEMPTY" && code !== "EEXIST") throw e;
      }
      await fsyncDir(dirname(target));
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
    await this.evictCached(kind, name, `${name}@${m.sha256.slice(0, 16)}`);
    return target;
  }

  private async headExists(key: string): Promise<boolean> {
    try {
      await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }));
      return true;
    } catch (e) {
      if (isNoSuchKey(e)) return false;
      throw translate(e, `HEAD ${key}`);
    }
  }

  // ---- ArtifactStore ----

  async exists(kind: ArtifactKind, name: string): Promise<boolean> {
    this.checkArgs(kind, name);
    await this.ensureBucket();
    return this.headExists(this.manifestKey(kind, name));
  }

  async list(kind: ArtifactKind): Promise<string[]> {
    validateKind(kind);
    await this.ensureBucket();
    const prefix = this.kindPrefix(kind);
    const names: string[] = [];
    for (const o of await this.listObjects(prefix)) {
      const rest = o.Key!.slice(prefix.length);
      const slash = rest.indexOf("/");
      // Only "<name>/manifest.json" marks a committed artifact; generations without one are writes
      // in progress (or left by a crashed writer) and never listed.
      if (slash > 0 && rest.slice(slash + 1) === MANIFEST_FILE) {
        const n = rest.slice(0, slash);
        try {
          names.push(validateName(n));
        } catch {
          // not one of ours
        }
      }
    }
    return names.sort();
  }

  async stat(kind: ArtifactKind, name: string): Promise<ArtifactStat> {
    this.checkArgs(kind, name);
    const { manifest: m } = await this.requireManifest(kind, name);
    return { kind, name, sizeBytes: m.total_size, files: m.files, createdAt: m.created_at, meta: m.meta, hasManifest: true };
  }

  async readManifest(kind: ArtifactKind, name: string): Promise<Manifest> {
    this.checkArgs(kind, name);
    return (await this.requireManifest(kind, name)).manifest;
  }

  /** Where the current version of an artifact lives in the bucket (operations, tests). */
  async locate(kind: ArtifactKind, name: string): Promise<S3Location> {
    this.checkArgs(kind, name);
    const m = await this.requireManifest(kind, name);
    const dataPrefix = this.dataPrefix(kind, name, m.generation);
    return {
      manifestKey: this.manifestKey(kind, name),
      generation: m.generation,
      dataPrefix,
      files: m.manifest.files.map((f) => ({ path: f.path, key: dataPrefix + f.path, size: f.size, sha256: f.sha256 })),
    };
  }

  async localPath(kind: ArtifactKind, name: string): Promise<string> {
    this.checkArgs(kind, name);
    for (let attempt = 0; attempt < 5; attempt++) {
      const m = await this.loadManifest(kind, name);
      if (!m) {
        await this.evictCached(kind, name);
        throw new NotFound(`${kind.replace(/s$/, "")} ${JSON.stringify(name)} not found`);
      }
      const key = `${kind}/${name}@${m.sha256}`;
      let p = this.inflight.get(key);
      if (!p) {
        p = this.materialise(kind, name, m).finally(() => this.inflight.delete(key));
        this.inflight.set(key, p);
      }
      const r = await p;
      if (r !== "replaced") return r;
    }
    throw new QloraError("UNAVAILABLE", `${kind} ${JSON.stringify(name)} kept changing while it was being downloaded; try again`);
  }

  async openRead(kind: ArtifactKind, name: string, path: string): Promise<Readable> {
    this.checkArgs(kind, name);
    const rel = validateRelativePath(path);
    for (let attempt = 0; attempt < 5; attempt++) {
      const m = await this.requireManifest(kind, name);
      const f = m.manifest.files.find((x) => x.path === rel);
      if (!f) throw new NotFound(`${kind} ${JSON.stringify(name)} has no file ${JSON.stringify(rel)}`);
      // A cached copy of this version was verified when it was cached.
      const cached = this.cacheEntry(kind, name, m.sha256);
      if (await pathExists(join(cached, MANIFEST_FILE))) {
        try {
          return await new Promise<Readable>((resolve, reject) => {
            const s = createReadStream(resolveUnder(cached, ...rel.split("/")));
            s.once("open", () => resolve(s)).once("error", reject);
          });
        } catch {
          // evicted meanwhile: read from the bucket
        }
      }
      const body = await this.getStream(this.dataPrefix(kind, name, m.generation) + rel);
      if (!body) {
        // Replaced or deleted meanwhile (re-read the manifest), or lost (the manifest is unchanged).
        const now = await this.loadManifest(kind, name);
        if (now && now.sha256 === m.sha256) {
          throw new IntegrityError(`${kind} ${JSON.stringify(name)}: ${rel} is listed in its manifest but missing`, { kind, name, path: rel });
        }
        continue;
      }
      return verifyingStream(body, f, kind, name);
    }
    throw new QloraError("UNAVAILABLE", `${kind} ${JSON.stringify(name)} kept changing while it was being read; try again`);
  }

  async delete(kind: ArtifactKind, name: string): Promise<void> {
    this.checkArgs(kind, name);
    const m = await this.requireManifest(kind, name);
    // The manifest goes first: the artifact vanishes from list/exists at once, and nothing can read
    // a half-deleted artifact (readers holding the old manifest find its files gone and re-read it).
    await this.send(`DELETE ${this.manifestKey(kind, name)}`, () =>
      this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.manifestKey(kind, name) })),
    );
    await this.deleteVersion(kind, name, m);
    await this.evictCached(kind, name);
  }

  /** Deletes the file objects of one version (never another generation a concurrent writer may be filling). */
  private async deleteVersion(kind: ArtifactKind, name: string, m: LoadedManifest): Promise<void> {
    const prefix = this.dataPrefix(kind, name, m.generation);
    if (m.generation !== null) {
      await this.deleteKeys((await this.listObjects(prefix)).map((o) => o.Key!));
    } else {
      await this.deleteKeys(m.manifest.files.map((f) => prefix + f.path));
    }
  }

  async beginWrite(kind: ArtifactKind, name: string, opts: WriteOptions = {}): Promise<ArtifactWriter> {
    this.checkArgs(kind, name);
    await this.ensureBucket();
    if (!opts.overwrite && (await this.headExists(this.manifestKey(kind, name)))) {
      throw new AlreadyExists(`${kind.replace(/s$/, "")} ${JSON.stringify(name)} already exists`);
    }
    const dir = await this.tempDir(`${kind}.${name}`, ".staging");
    return new S3Writer(this, kind, name, dir, opts.overwrite ?? false);
  }

  async verify(kind: ArtifactKind, name: string): Promise<VerifyResult> {
    this.checkArgs(kind, name);
    const m = await this.requireManifest(kind, name);
    const prefix = this.dataPrefix(kind, name, m.generation);
    const present = new Set(
      (await this.listObjects(prefix))
        .map((o) => o.Key!.slice(prefix.length))
        .filter((k) => (m.generation !== null ? true : k !== MANIFEST_FILE && !k.startsWith(GEN_DIR))),
    );
    const res: VerifyResult = { ok: true, checked: 0, missing: [], mismatched: [], extra: [] };
    await forEachLimit(m.manifest.files, this.concurrency, async (f) => {
      const had = present.delete(f.path);
      const body = had ? await this.getStream(prefix + f.path) : undefined;
      if (!body) {
        res.missing.push(f.path);
        return;
      }
      const h = createHash("sha256");
      let size = 0;
      for await (const chunk of body as AsyncIterable<Buffer>) {
        size += chunk.byteLength;
        h.update(chunk);
      }
      const sha = h.digest("hex");
      if (sha !== f.sha256 || size !== f.size) {
        res.mismatched.push({ path: f.path, expectedSha256: f.sha256, actualSha256: sha, expectedSize: f.size, actualSize: size });
      } else res.checked++;
    });
    res.missing.sort();
    res.mismatched.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
    res.extra = [...present].sort();
    res.ok = res.missing.length === 0 && res.mismatched.length === 0 && res.extra.length === 0;
    return res;
  }

  /**
   * Garbage collection. Removes generations that no manifest points to: replaced versions (left by
   * a process that exited within the grace period, or that lost an overwrite race) once the current
   * manifest is older than `maxAgeMs`, and writes that crashed before publishing once all their
   * objects are older than that. Aborts multipart uploads started before that, and removes local
   * staging/temp directories older than that. Returns the number of objects, uploads and
   * directories removed. Run it now and then from one place (it is safe to run from several).
   */
  async cleanup(maxAgeMs = 24 * 3600 * 1000): Promise<number> {
    await this.ensureBucket();
    const cutoff = Date.now() - maxAgeMs;
    let removed = 0;
    for (const kind of ARTIFACT_KINDS) {
      const kp = this.kindPrefix(kind);
      // name → generation → { keys, newest }; name → when its manifest was written (server clock)
      const byName = new Map<string, Map<string, { keys: string[]; newest: number }>>();
      const published = new Map<string, number>();
      for (const o of await this.listObjects(kp)) {
        const parts = o.Key!.slice(kp.length).split("/");
        if (parts.length === 2 && parts[1] === MANIFEST_FILE) published.set(parts[0]!, o.LastModified?.getTime() ?? Date.now());
        if (parts.length < 3 || !parts[1]!.startsWith(GEN_DIR)) continue;
        const gens = byName.get(parts[0]!) ?? new Map<string, { keys: string[]; newest: number }>();
        byName.set(parts[0]!, gens);
        const g = gens.get(parts[1]!) ?? { keys: [], newest: 0 };
        gens.set(parts[1]!, g);
        g.keys.push(o.Key!);
        g.newest = Math.max(g.newest, o.LastModified?.getTime() ?? Date.now());
      }
      for (const [name, gens] of byName) {
        let current: string | null = null;
        try {
          const m = await this.loadManifest(kind, name);
          current = m?.generation ?? null;
        } catch {
          continue; // an unreadable manifest: leave everything for a human
        }
        const at = published.get(name);
        for (const [gdir, g] of gens) {
          if (gdir === `${GEN_DIR}${current}`) continue;
          // Replaced by the current manifest (written before it): garbage once the manifest is older
          // than the grace. Otherwise a write in progress, or one that crashed: once it is idle that long.
          const superseded = at !== undefined && g.newest <= at;
          if ((superseded ? at : g.newest) > cutoff) continue;
          await this.deleteKeys(g.keys);
          removed += g.keys.length;
        }
      }
    }
    let keyMarker: string | undefined;
    let uploadMarker: string | undefined;
    const root = this.prefix ? this.prefix + "/" : "";
    for (;;) {
      const r = await this.send("LIST multipart uploads", () =>
        this.client.send(new ListMultipartUploadsCommand({ Bucket: this.bucket, Prefix: root, KeyMarker: keyMarker, UploadIdMarker: uploadMarker })),
      );
      for (const u of r.Uploads ?? []) {
        if (!u.Key || !u.UploadId || (u.Initiated?.getTime() ?? Date.now()) > cutoff) continue;
        await this.send(`ABORT ${u.Key}`, () => this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: u.Key, UploadId: u.UploadId })));
        removed++;
      }
      if (!r.IsTruncated) break;
      keyMarker = r.NextKeyMarker;
      uploadMarker = r.NextUploadIdMarker;
    }
    for (const sub of [".staging", ".tmp"]) {
      const d = join(this.cacheDir, sub);
      if (!(await pathExists(d))) continue;
      for (const e of await readdir(d)) {
        const p = join(d, e);
        if ((await stat(p)).mtimeMs < cutoff) {
          await rm(p, { recursive: true, force: true });
          removed++;
        }
      }
    }
    return removed;
  }

  /** Removes the whole local cache (not the staging directories of open writers). */
  async clearCache(): Promise<void> {
    for (const kind of ARTIFACT_KINDS) await rm(join(this.cacheDir, kind), { recursive: true, force: true });
  }

  /**
   * Releases the client's sockets (only a client the store created). Replaced versions still in
   * their grace period are left for cleanup().
   */
  close(): void {
    for (const t of this.pendingDeletes) clearTimeout(t);
    this.pendingDeletes.clear();
    if (this.ownsClient) this.client.destroy();
  }

  // ---- used by S3Writer ----

  /** @internal Uploads one local file to `key`; returns its size and the sha256 of the bytes sent. */
  async uploadFile(abs: string, key: string, slots: Semaphore): Promise<{ size: number; sha256: string }> {
    const fh = await open(abs, "r");
    try {
      const size = (await fh.stat()).size;
      if (size <= this.multipartThreshold) {
        await slots.acquire();
        try {
          const buf = await readExactly(fh, 0, size);
          await this.send(`PUT ${key}`, () =>
            this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: buf, ContentLength: size, ContentMD5: md5Base64(buf) })),
          );
          return { size, sha256: sha256Hex(buf) };
        } finally {
          slots.release();
        }
      }
      let partSize = this.partSize;
      if (Math.ceil(size / partSize) > MAX_PARTS) partSize = Math.ceil(size / MAX_PARTS / MiB) * MiB;
      const { UploadId } = await this.send(`CREATE multipart ${key}`, () =>
        this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: key })),
      );
      if (!UploadId) throw new QloraError("INTERNAL", `CREATE multipart ${key}: no upload id in the answer`);
      const h = createHash("sha256");
      const parts: Promise<{ PartNumber: number; ETag: string }>[] = [];
      let failed = false;
      try {
        for (let off = 0, n = 1; off < size && !failed; off += partSize, n++) {
          const len = Math.min(partSize, size - off);
          await slots.acquire();
          let buf: Buffer;
          try {
            buf = await readExactly(fh, off, len);
          } catch (e) {
            slots.release();
            throw e;
          }
          h.update(buf); // parts are read in order, so the hash is of the file as uploaded
          const PartNumber = n;
          const body = buf;
          const p = this.send(`PUT part ${PartNumber} of ${key}`, () =>
            this.client.send(new UploadPartCommand({ Bucket: this.bucket, Key: key, UploadId, PartNumber, Body: body, ContentLength: len, ContentMD5: md5Base64(body) })),
          )
            .then((r) => {
              if (!r.ETag) throw new QloraError("INTERNAL", `PUT part ${PartNumber} of ${key}: no ETag in the answer`);
              return { PartNumber, ETag: r.ETag };
            })
            .finally(() => slots.release());
          p.catch(() => {
            failed = true;
          });
          parts.push(p);
        }
        const done = await Promise.all(parts);
        await this.send(`COMPLETE multipart ${key}`, () =>
          this.client.send(new CompleteMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId, MultipartUpload: { Parts: done } })),
        );
        return { size, sha256: h.digest("hex") };
      } catch (e) {
        await Promise.allSettled(parts);
        await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId })).catch(() => undefined);
        throw e;
      }
    } finally {
      await fh.close();
    }
  }

  /** @internal Publishes a new version: files already uploaded under `generation`. */
  async publish(
    kind: ArtifactKind,
    name: string,
    generation: string,
    manifest: Manifest,
    overwrite: boolean,
  ): Promise<{ bytes: Buffer; sha256: string }> {
    const key = this.manifestKey(kind, name);
    const bytes = Buffer.from(JSON.stringify({ ...manifest, generation }, null, 2) + "\n");
    const put = (ifNoneMatch: boolean) =>
      this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Body: bytes,
          ContentLength: bytes.byteLength,
          ContentMD5: md5Base64(bytes),
          ContentType: "application/json",
          ...(ifNoneMatch ? { IfNoneMatch: "*" } : {}),
        }),
      );
    const taken = () => new AlreadyExists(`${kind.replace(/s$/, "")} ${JSON.stringify(name)} already exists`);
    if (overwrite) {
      const old = await this.loadManifest(kind, name).catch(() => undefined);
      try {
        await put(false);
      } catch (e) {
        await this.unlessPublished(kind, name, generation, e, key);
      }
      if (old && old.generation !== generation) {
        // Best effort: a leftover generation is garbage that cleanup() collects.
        if (this.replacedGraceMs === 0) {
          await this.deleteVersion(kind, name, old).catch(() => undefined);
        } else {
          const t = setTimeout(() => {
            this.pendingDeletes.delete(t);
            void this.deleteVersion(kind, name, old).catch(() => undefined);
          }, this.replacedGraceMs);
          t.unref();
          this.pendingDeletes.add(t);
        }
      }
      await this.evictCached(kind, name);
    } else {
      let done = false;
      if (this.conditional) {
        try {
          await put(true);
          done = true;
        } catch (e) {
          const status = statusOf(e);
          if (status === 412 || (e as S3ErrorShape).name === "PreconditionFailed") throw taken();
          if (status === 501 || (e as S3ErrorShape).name === "NotImplemented") {
            this.conditional = false;
          } else {
            await this.unlessPublished(kind, name, generation, e, key);
            done = true;
          }
        }
      }
      if (!done) {
        // Check, then put: a writer that published between the two would be replaced (the server
        // cannot do conditional writes).
        if (await this.headExists(key)) throw taken();
        try {
          await put(false);
        } catch (e) {
          await this.unlessPublished(kind, name, generation, e, key);
        }
      }
    }
    return { bytes, sha256: sha256Hex(bytes) };
  }

  /**
   * A manifest PUT failed: if the answer was lost but the write was applied (the manifest now names
   * this generation), the publish succeeded; otherwise rethrows (translated).
   */
  private async unlessPublished(kind: ArtifactKind, name: string, generation: string, e: unknown, key: string): Promise<void> {
    const now = await this.loadManifest(kind, name).catch(() => undefined);
    if (now?.generation === generation) return;
    throw translate(e, `PUT ${key}`);
  }

  /** @internal Deletes what a failed commit uploaded. */
  async discardGeneration(kind: ArtifactKind, name: string, generation: string): Promise<void> {
    await this.deleteKeys((await this.listObjects(this.dataPrefix(kind, name, generation))).map((o) => o.Key!));
  }

  /** @internal Keys of one generation's files. */
  dataKey(kind: ArtifactKind, name: string, generation: string, path: string): string {
    return this.dataPrefix(kind, name, generation) + path;
  }

  /** @internal Moves a committed staging directory into the cache as the current version. */
  async adoptIntoCache(kind: ArtifactKind, name: string, dir: string, manifestBytes: Buffer, manifestSha: string): Promise<void> {
    const fh = await open(join(dir, MANIFEST_FILE), "w");
    try {
      await fh.writeFile(manifestBytes);
      await fh.sync();
    } finally {
      await fh.close();
    }
    const target = this.cacheEntry(kind, name, manifestSha);
    await mkdir(dirname(target), { recursive: true });
    await rename(dir, target);
    await this.evictCached(kind, name, `${name}@${manifestSha.slice(0, 16)}`);
  }

  /** @internal */
  newSemaphore(): Semaphore {
    return new Semaphore(this.concurrency);
  }
}

/** Passes `body` through, and fails the stream at its end unless its size and sha256 match `f`. */
function verifyingStream(body: Readable, f: ManifestFile, kind: ArtifactKind, name: string): Readable {
  const h = createHash("sha256");
  let size = 0;
  const t = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      size += chunk.byteLength;
      if (size > f.size) {
        cb(new IntegrityError(`${kind} ${JSON.stringify(name)}: ${f.path} is larger than its manifest says (${f.size} bytes)`, { kind, name, path: f.path, expectedSize: f.size }));
        return;
      }
      h.update(chunk);
      cb(null, chunk);
    },
    flush(cb) {
      const sha = h.digest("hex");
      if (size !== f.size || sha !== f.sha256) {
        cb(
          new IntegrityError(`${kind} ${JSON.stringify(name)}: ${f.path} does not match its manifest (sha256 ${sha}, expected ${f.sha256}): the object is corrupt`, {
            kind,
            name,
            path: f.path,
            expectedSha256: f.sha256,
            actualSha256: sha,
            expectedSize: f.size,
            actualSize: size,
          }),
        );
        return;
      }
      cb();
    },
  });
  pipeline(body, t, () => undefined);
  return t;
}

class S3Writer extends StagingWriter {
  constructor(
    private readonly store: S3Store,
    kind: ArtifactKind,
    name: string,
    dir: string,
    private readonly overwrite: boolean,
  ) {
    super(kind, name, dir, false);
  }

  async commit(opts: { meta?: Record<string, string> } = {}): Promise<Manifest> {
    this.requireOpen();
    this.state = "committing";
    const generation = `${Date.now().toString(36)}-${randomBytes(6).toString("hex")}`;
    let uploaded = false;
    let published = false;
    try {
      const meta = await this.stagedMeta();
      const paths = await listFiles(this.dir);
      for (const p of paths) checkManifestPath(p, this.kind, this.name);
      const files: ManifestFile[] = new Array(paths.length);
      const slots = this.store.newSemaphore();
      uploaded = true;
      await forEachLimit(
        paths.map((p, i) => [p, i] as const),
        this.store.concurrency,
        async ([p, i]) => {
          const r = await this.store.uploadFile(join(this.dir, ...p.split("/")), this.store.dataKey(this.kind, this.name, generation, p), slots);
          files[i] = { path: p, size: r.size, sha256: r.sha256 };
        },
      );
      const manifest: Manifest = {
        version: 1,
        created_at: new Date().toISOString(),
        total_size: files.reduce((a, f) => a + f.size, 0),
        files,
        meta: { ...meta, ...(opts.meta ?? {}) },
      };
      const { bytes, sha256 } = await this.store.publish(this.kind, this.name, generation, manifest, this.overwrite);
      published = true;
      this.state = "committed";
      // The staged files are exactly what was uploaded: they become the cached copy.
      await this.store.adoptIntoCache(this.kind, this.name, this.dir, bytes, sha256).catch(() => rm(this.dir, { recursive: true, force: true }));
      return manifest;
    } catch (e) {
      if (published) throw e;
      if (uploaded) await this.store.discardGeneration(this.kind, this.name, generation).catch(() => undefined);
      this.state = "open";
      throw e;
    }
  }
}
