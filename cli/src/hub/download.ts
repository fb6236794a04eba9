/**
 * Downloads a model from the Hugging Face hub (or anything serving the hub's URL layout, chosen by
 * HF_ENDPOINT) into a local cache, fetching only what this project reads: config.json,
 * generation_config.json, the safetensors weights (+ index) and the tokenizer files.
 *
 * - Listing: GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true → `sha` (the commit) and
 *   `siblings[]` ({rfilename, size, blobId, lfs: {sha256, size}}).
 * - Files: GET {endpoint}/{repo}/resolve/{rev}/{file}, following redirects by hand so that (1) the
 *   hub's own response, whose X-Linked-Etag/ETag carries the checksum, is seen before the CDN's,
 *   and (2) the token goes only to the hub's origin, never to the CDN it redirects to.
 * - Resumable: a file is written as `<name>.incomplete` in a staging directory that outlives the
 *   process; a retry (in this call, or the next run) asks for the rest with `Range: bytes=N-`.
 * - Checksummed: sha256 for LFS files (API `lfs.sha256`, else a 64-hex X-Linked-Etag/ETag), the
 *   git blob sha1 for small files (API `blobId`, else a 40-hex ETag). A mismatch discards the file.
 * - Atomic: the staging directory is renamed to `snapshots/<commit>` only when every file is
 *   complete and verified, so the cache never holds a partial model.
 *
 * Cache layout, under `cacheDir`:
 *   models--ORG--NAME/snapshots/<commit>/…        complete snapshots (+ .qlora-snapshot.json)
 *   models--ORG--NAME/refs/<revision>             the commit a branch/tag resolved to (offline use)
 *   models--ORG--NAME/.staging-<commit>/…         in progress (resume state)
 *   models--ORG--NAME/.lock-<commit>              the pid downloading it
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Cancelled, FailedPrecondition, InvalidArgument, QloraError, type ErrorCode } from "@qlora/core";
import { formatHfRef, type HfModelRef } from "./ref.js";

export const DEFAULT_ENDPOINT = "https://huggingface.co";
export const SNAPSHOT_FILE = ".qlora-snapshot.json";
const INDEX_FILE = "model.safetensors.index.json";
const MAX_REDIRECTS = 10;
const USER_AGENT = "qlora/0.1 (+hub download)";

/**
 * Besides the weights: what the model runtime and the quantizer read (they copy the tokenizer and
 * generation files along with a model; libs/formats' TOKENIZER_FILES). Kept here rather than
 * imported, because @qlora/formats loads the native addon and this module must not need it.
 */
export const HUB_SIDE_FILES = [
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
] as const;

export interface HubProgress {
  /** The file being transferred (or just finished). */
  file: string;
  filesDone: number;
  filesTotal: number;
  /** Bytes on disk for the selected files, resumed bytes included. */
  bytesDone: number;
  /** Sum of the listed sizes (0 when the server lists none). */
  bytesTotal: number;
}

export interface HubDownloadOptions {
  /** Cache root (see defaultHubCacheDir). */
  cacheDir: string;
  /** Default: $HF_ENDPOINT, else https://huggingface.co. */
  endpoint?: string;
  /** Default: $HF_TOKEN. Sent as `Authorization: Bearer …` to the endpoint's origin only. */
  token?: string;
  /** Where HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE are read (default process.env). */
  env?: NodeJS.ProcessEnv;
  signal?: AbortSignal;
  onProgress?: (p: HubProgress) => void;
  /** Notes for the user (e.g. "offline: using the cached snapshot"). */
  onNote?: (line: string) => void;
  /** Further attempts per file after an interrupted transfer or a 5xx/429 (default 3). */
  retries?: number;
  /** Delay before attempt k is k × this (default 500 ms). */
  retryDelayMs?: number;
}

export interface SnapshotFile {
  path: string;
  size: number;
  sha256?: string;
  /** git blob sha1 (small files). */
  gitSha1?: string;
}

export interface HubSnapshot {
  /** The local directory: a Hugging Face checkpoint directory. */
  dir: string;
  repo: string;
  revision: string;
  /** The commit the revision resolved to (the revision itself when the server gives no sha). */
  commit: string;
  files: SnapshotFile[];
  /** Nothing was downloaded: the snapshot was already complete in the cache. */
  fromCache: boolean;
  /** The endpoint could not be asked (or HF_HUB_OFFLINE): an earlier snapshot was used. */
  offline: boolean;
}

/** $QLORA_CACHE_DIR/hub, else $XDG_CACHE_HOME/qlora/hub, else ~/.cache/qlora/hub. */
export function defaultHubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.QLORA_CACHE_DIR) return join(env.QLORA_CACHE_DIR, "hub");
  return join(env.XDG_CACHE_HOME || join(homedir(), ".cache"), "qlora", "hub");
}

interface Sibling {
  rfilename: string;
  size?: number;
  blobId?: string;
  lfs?: { sha256?: string; size?: number };
}

interface RemoteFile {
  path: string;
  size?: number;
  sha256?: string;
  gitSha1?: string;
}

const HEX64 = /^[0-9a-f]{64}$/;
const HEX40 = /^[0-9a-f]{40}$/;
// Root-level file names only; anything else in a listing is ignored (or refused when an index
// points at it), so a hostile listing cannot write outside the snapshot directory.
const SAFE_FILE = /^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$/;

class HubError extends QloraError {
  constructor(
    code: ErrorCode,
    message: string,
    /** Worth another attempt (interrupted transfer, 5xx, 429). */
    readonly retryable = false,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

function isAbort(e: unknown, signal?: AbortSignal): boolean {
  return signal?.aborted === true || (e instanceof Error && e.name === "AbortError");
}

/** An ETag / X-Linked-Etag value without W/ and quotes, lowercased. */
function etagValue(h: string | null): string | undefined {
  if (!h) return undefined;
  return h.trim().replace(/^W\//i, "").replace(/^"|"$/g, "").toLowerCase();
}

/** The server's own explanation, when it sent one (the hub: X-Error-Message, or JSON {error}). */
async function serverMessage(res: Response): Promise<string> {
  const header = res.headers.get("x-error-message");
  let text = "";
  try {
    text = (await res.text()).slice(0, 2000);
  } catch {
    text = "";
  }
  let msg = header ?? "";
  if (!msg && text) {
    try {
      const j = JSON.parse(text) as { error?: unknown };
      if (typeof j.error === "string") msg = j.error;
    } catch {
      if (!/^\s*</.test(text)) msg = text.trim(); // not an HTML error page
    }
  }
  msg = msg.replace(/\s+/g, " ").trim();
  return msg ? `: ${msg.slice(0, 200)}` : "";
}

class Hub {
  readonly endpoint: URL;
  readonly token: string | undefined;
  readonly label: string;

  constructor(
    readonly ref: HfModelRef,
    readonly o: HubDownloadOptions,
  ) {
    const env = o.env ?? process.env;
    const raw = (o.endpoint ?? env.HF_ENDPOINT ?? DEFAULT_ENDPOINT).trim().replace(/\/+$/, "");
    let url: URL;
    try {
      url = new URL(raw);
    } catch {
      throw new InvalidArgument(`HF_ENDPOINT is not a URL: ${JSON.stringify(raw)}`);
    }
    if (url.protocol !== "https:" && url.protocol !== "http:") throw new InvalidArgument(`HF_ENDPOINT must be an http(s) URL, got ${JSON.stringify(raw)}`);
    this.endpoint = url;
    const token = (o.token ?? env.HF_TOKEN ?? "").trim();
    this.token = token || undefined;
    this.label = formatHfRef(ref);
  }

  url(path: string): URL {
    // The endpoint may carry a path prefix (a mirror under /hf): keep it.
    return new URL(this.endpoint.href.replace(/\/?$/, "/") + path.replace(/^\//, ""));
  }

  /**
   * GET with redirects followed by hand. Returns the final response and the first one (the hub's,
   * whose headers carry the checksum of LFS files). Authorization only goes to the endpoint's origin.
   */
  async get(url: URL, headers: Record<string, string>): Promise<{ res: Response; first: Response }> {
    let current = url;
    let first: Response | undefined;
    for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
      const h: Record<string, string> = { "user-agent": USER_AGENT, ...headers };
      if (this.token && current.origin === this.endpoint.origin) h.authorization = `Bearer ${this.token}`;
      let res: Response;
      try {
        res = await fetch(current, { headers: h, redirect: "manual", ...(this.o.signal ? { signal: this.o.signal } : {}) });
      } catch (e) {
        if (isAbort(e, this.o.signal)) throw new Cancelled(`${this.label}: download cancelled`);
        const cause = (e as { cause?: { message?: string; code?: string } }).cause;
        const why = cause?.code ?? cause?.message ?? (e instanceof Error ? e.message : String(e));
        throw new HubError("UNAVAILABLE", `cannot reach ${current.origin} (${why})`, true, { cause: e });
      }
      first ??= res;
      const location = res.headers.get("location");
      if (res.status >= 300 && res.status < 400 && location) {
        await res.body?.cancel().catch(() => {});
        current = new URL(location, current);
        if (current.protocol !== "https:" && current.protocol !== "http:") {
          throw new HubError("UNAVAILABLE", `${this.label}: redirected to an unsupported URL scheme (${current.protocol})`);
        }
        continue;
      }
      return { res, first };
    }
    throw new HubError("UNAVAILABLE", `${this.label}: more than ${MAX_REDIRECTS} redirects fetching ${url.pathname}`);
  }

  /** A typed error for an unexpected status, phrased for the user (what to do about it). */
  async statusError(res: Response, what: string): Promise<HubError> {
    const detail = await serverMessage(res);
    const code = res.headers.get("x-error-code") ?? "";
    const s = res.status;
    if (s === 401) {
      return this.token
        ? new HubError("UNAUTHENTICATED", `${this.label}: ${this.endpoint.origin} refused the token in HF_TOKEN (401)${detail}; check that it is valid and can read this repository`)
        : new HubError(
            "UNAUTHENTICATED",
            `${this.label}: ${this.endpoint.origin} answered 401 Unauthorized${detail}; the repository is private or gated (or does not exist): set HF_TOKEN to an access token that can read it`,
          );
    }
    if (s === 403) {
      return new HubError(
        "PERMISSION_DENIED",
        `${this.label}: access denied (403)${detail}; for a gated model, accept its terms at ${this.url(this.ref.repo).href} with the account HF_TOKEN belongs to`,
      );
    }
    if (s === 404) {
      const kind = code === "RevisionNotFound" ? `revision "${this.ref.revision}"` : code === "EntryNotFound" ? what : "repository or revision";
      return new HubError("NOT_FOUND", `${this.label}: ${kind} not found at ${this.endpoint.origin}${detail}`);
    }
    if (s === 429 || s >= 500) return new HubError("UNAVAILABLE", `${this.label}: ${this.endpoint.origin} answered ${s} for ${what}${detail}`, true);
    return new HubError("UNAVAILABLE", `${this.label}: unexpected HTTP ${s} for ${what}${detail}`);
  }

  async listing(): Promise<{ commit: string | undefined; siblings: Sibling[] }> {
    const rev = encodeURIComponent(this.ref.revision);
    const { res } = await this.get(this.url(`api/models/${this.ref.repo}/revision/${rev}?blobs=true`), { accept: "application/json" });
    if (!res.ok) throw await this.statusError(res, "the file listing");
    let body: unknown;
    try {
      body = await res.json();
    } catch (e) {
      throw new HubError("UNAVAILABLE", `${this.label}: the file listing from ${this.endpoint.origin} is not JSON`, false, { cause: e });
    }
    const b = body as { sha?: unknown; siblings?: unknown };
    if (!Array.isArray(b.siblings)) throw new HubError("UNAVAILABLE", `${this.label}: the file listing has no siblings[]`);
    const siblings: Sibling[] = [];
    for (const s of b.siblings as unknown[]) {
      const x = s as Sibling;
      if (typeof x?.rfilename !== "string") continue;
      siblings.push({
        rfilename: x.rfilename,
        ...(typeof x.size === "number" ? { size: x.size } : {}),
        ...(typeof x.blobId === "string" ? { blobId: x.blobId.toLowerCase() } : {}),
        ...(x.lfs && typeof x.lfs === "object" ? { lfs: x.lfs } : {}),
      });
    }
    const commit = typeof b.sha === "string" && HEX40.test(b.sha.toLowerCase()) ? b.sha.toLowerCase() : undefined;
    return { commit, siblings };
  }
}

function remoteFile(s: Sibling): RemoteFile {
  const lfsSha = s.lfs?.sha256?.toLowerCase();
  const size = s.lfs?.size ?? s.size;
  return {
    path: s.rfilename,
    ...(typeof size === "number" ? { size } : {}),
    ...(lfsSha && HEX64.test(lfsSha) ? { sha256: lfsSha } : {}),
    // blobId is the git sha1 of what git stores: for an LFS file that is the pointer, not the data.
    ...(!s.lfs && s.blobId && HEX40.test(s.blobId) ? { gitSha1: s.blobId } : {}),
  };
}

async function sizeOf(p: string): Promise<number | undefined> {
  try {
    return (await stat(p)).size;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw e;
  }
}

async function hashFile(p: string, algo: "sha256" | "sha1", prefix?: string): Promise<string> {
  const h = createHash(algo);
  if (prefix !== undefined) h.update(prefix);
  for await (const chunk of createReadStream(p)) h.update(chunk as Buffer);
  return h.digest("hex");
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** One download of a snapshot at a time (per cache): a lock file holding the pid. */
async function acquireLock(lockPath: string, label: string): Promise<() => Promise<void>> {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await open(lockPath, "wx");
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      return () => rm(lockPath, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      const pid = Number((await readFile(lockPath, "utf8").catch(() => "")).trim());
      if (pid > 0 && pid !== process.pid && pidAlive(pid)) {
        throw new FailedPrecondition(`${label}: another process (pid ${pid}) is downloading this snapshot; wait for it or remove ${lockPath}`);
      }
      await rm(lockPath, { force: true }); // left by a process that is gone
    }
  }
  throw new FailedPrecondition(`${label}: cannot take the download lock ${lockPath}`);
}

async function readSnapshot(dir: string): Promise<SnapshotFile[] | undefined> {
  try {
    const j = JSON.parse(await readFile(join(dir, SNAPSHOT_FILE), "utf8")) as { files?: SnapshotFile[] };
    return Array.isArray(j.files) ? j.files : undefined;
  } catch {
    return undefined;
  }
}

async function writeAtomic(path: string, data: string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, data);
  await rename(tmp, path);
}

/**
 * Resolves `ref` to a complete local snapshot, downloading what is missing. Errors are typed:
 * NOT_FOUND (repo/revision/file), UNAUTHENTICATED (401), PERMISSION_DENIED (403),
 * FAILED_PRECONDITION (no safetensors weights; checksum mismatch; another download running),
 * UNAVAILABLE (network, 5xx), CANCELLED (signal).
 */
export async function downloadHfModel(ref: HfModelRef, o: HubDownloadOptions): Promise<HubSnapshot> {
  const hub = new Hub(ref, o);
  const env = o.env ?? process.env;
  const repoDir = join(o.cacheDir, `models--${ref.repo.replace("/", "--")}`);
  const refFile = join(repoDir, "refs", encodeURIComponent(ref.revision));
  const snapshotDir = (commit: string) => join(repoDir, "snapshots", commit);

  const cached = async (commit: string, offline: boolean): Promise<HubSnapshot | undefined> => {
    const files = await readSnapshot(snapshotDir(commit));
    return files ? { dir: snapshotDir(commit), repo: ref.repo, revision: ref.revision, commit, files, fromCache: true, offline } : undefined;
  };
  const cachedByRef = async (): Promise<HubSnapshot | undefined> => {
    const commit = (await readFile(refFile, "utf8").catch(() => "")).trim();
    return commit && /^[A-Za-z0-9._%-]+$/.test(commit) ? cached(commit, true) : undefined;
  };

  // A commit sha names immutable content: a complete snapshot of it needs no request at all.
  if (HEX40.test(ref.revision)) {
    const hit = await cached(ref.revision, false);
    if (hit) return hit;
  }
  if (env.HF_HUB_OFFLINE === "1" || env.HF_HUB_OFFLINE === "true") {
    const hit = await cachedByRef();
    if (hit) return hit;
    throw new FailedPrecondition(`${hub.label}: HF_HUB_OFFLINE is set and the cache (${o.cacheDir}) has no snapshot of it`);
  }

  let listing: Awaited<ReturnType<Hub["listing"]>>;
  try {
    listing = await hub.listing();
  } catch (e) {
    // Unreachable hub (not a refusal): fall back to the snapshot this revision resolved to before.
    if (e instanceof HubError && e.code === "UNAVAILABLE" && e.retryable) {
      const hit = await cachedByRef();
      if (hit) {
        o.onNote?.(`${hub.label}: ${e.message}; using the cached snapshot ${hit.commit.slice(0, 12)}`);
        return hit;
      }
    }
    throw e;
  }
  const commit = listing.commit ?? encodeURIComponent(ref.revision);
  await mkdir(join(repoDir, "refs"), { recursive: true });
  const hit = await cached(commit, false);
  if (hit) {
    await writeAtomic(refFile, commit + "\n");
    return hit;
  }

  const byName = new Map<string, Sibling>();
  for (const s of listing.siblings) if (!s.rfilename.includes("/") && SAFE_FILE.test(s.rfilename)) byName.set(s.rfilename, s);
  if (!byName.has("config.json")) {
    throw new FailedPrecondition(`${hub.label} has no config.json at its root: not a transformers model repository`);
  }

  const staging = join(repoDir, `.staging-${commit}`);
  await mkdir(staging, { recursive: true });
  const release = await acquireLock(join(repoDir, `.lock-${commit}`), hub.label);
  try {
    const side = HUB_SIDE_FILES.filter((f) => byName.has(f)).map((f) => remoteFile(byName.get(f)!));
    const hasIndex = byName.has(INDEX_FILE);
    if (hasIndex) side.push(remoteFile(byName.get(INDEX_FILE)!));

    // Progress covers every selected file; the shards are known only once the index is read, so
    // the side files (small) go first and the totals grow once, before any weight is fetched.
    const progress = { filesDone: 0, filesTotal: side.length, bytesDone: 0, bytesTotal: 0 };
    const report = (file: string) => o.onProgress?.({ file, ...progress });
    const fetched: SnapshotFile[] = [];
    for (const f of side) progress.bytesTotal += f.size ?? 0;

    for (const f of side) fetched.push(await fetchFile(hub, f, staging, progress, report));

    let weights: RemoteFile[];
    if (hasIndex) {
      let map: Record<string, unknown>;
      try {
        map = (JSON.parse(await readFile(join(staging, INDEX_FILE), "utf8")) as { weight_map?: Record<string, unknown> }).weight_map ?? {};
      } catch (e) {
        throw new FailedPrecondition(`${hub.label}: ${INDEX_FILE} is not valid JSON`, { cause: e });
      }
      const shards = [...new Set(Object.values(map).filter((v): v is string => typeof v === "string"))].sort();
      if (shards.length === 0) throw new FailedPrecondition(`${hub.label}: ${INDEX_FILE} lists no shards`);
      weights = shards.map((name) => {
        const s = byName.get(name);
        if (!s) throw new FailedPrecondition(`${hub.label}: ${INDEX_FILE} names ${JSON.stringify(name)}, which the repository does not have at its root`);
        return remoteFile(s);
      });
    } else if (byName.has("model.safetensors")) {
      weights = [remoteFile(byName.get("model.safetensors")!)];
    } else {
      weights = [...byName.keys()].filter((n) => n.endsWith(".safetensors")).sort().map((n) => remoteFile(byName.get(n)!));
    }
    if (weights.length === 0) {
      const others = listing.siblings.map((s) => s.rfilename).filter((n) => /\.(bin|pt|pth|gguf|h5|msgpack)$/.test(n));
      throw new FailedPrecondition(
        `${hub.label} has no safetensors weights${others.length ? ` (it has ${others.slice(0, 4).join(", ")})` : ""}; only safetensors checkpoints are supported`,
      );
    }
    progress.filesTotal += weights.length;
    for (const f of weights) progress.bytesTotal += f.size ?? 0;
    for (const f of weights) fetched.push(await fetchFile(hub, f, staging, progress, report));

    await writeFile(
      join(staging, SNAPSHOT_FILE),
      JSON.stringify({ repo: ref.repo, revision: ref.revision, commit, endpoint: hub.endpoint.origin, downloadedAt: new Date().toISOString(), files: fetched }, null, 2) + "\n",
    );
    await mkdir(join(repoDir, "snapshots"), { recursive: true });
    try {
      await rename(staging, snapshotDir(commit));
    } catch (e) {
      // Completed meanwhile by another process (only possible around a stale lock): keep theirs.
      const code = (e as NodeJS.ErrnoException).code;
      if ((code !== "ENOTEMPTY" && code !== "EEXIST") || !(await readSnapshot(snapshotDir(commit)))) throw e;
      await rm(staging, { recursive: true, force: true });
    }
    await writeAtomic(refFile, commit + "\n");
    return { dir: snapshotDir(commit), repo: ref.repo, revision: ref.revision, commit, files: fetched, fromCache: false, offline: false };
  } finally {
    await release();
  }
}

/** Downloads (or resumes) one file into `staging`, verifies it, and renames it into place. */
async function fetchFile(
  hub: Hub,
  f: RemoteFile,
  staging: string,
  progress: { filesDone: number; bytesDone: number },
  report: (file: string) => void,
): Promise<SnapshotFile> {
  const final = join(staging, f.path);
  const part = `${final}.incomplete`;
  const retries = hub.o.retries ?? 3;
  const delay = hub.o.retryDelayMs ?? 500;
  const expect: RemoteFile = { ...f };

  const done = await sizeOf(final);
  if (done !== undefined) {
    // Only ever renamed into place after verification (an earlier, interrupted run).
    progress.bytesDone += done;
    progress.filesDone++;
    report(f.path);
    return { path: f.path, size: done, ...(expect.sha256 ? { sha256: expect.sha256 } : {}), ...(expect.gitSha1 ? { gitSha1: expect.gitSha1 } : {}) };
  }

  const base = progress.bytesDone;
  for (let attempt = 0; ; attempt++) {
    try {
      await transfer(hub, expect, part, (onDisk) => {
        progress.bytesDone = base + onDisk;
        report(f.path);
      });
      break;
    } catch (e) {
      if (e instanceof HubError && e.retryable && attempt < retries && !hub.o.signal?.aborted) {
        await sleep(delay * (attempt + 1), undefined, hub.o.signal ? { signal: hub.o.signal } : {}).catch(() => {});
        if (hub.o.signal?.aborted) throw new Cancelled(`${hub.label}: download cancelled`);
        continue;
      }
      if (e instanceof HubError && e.retryable) {
        throw new HubError(e.code, `${e.message} (after ${attempt + 1} attempts; run again to resume from the bytes already downloaded)`, false, { cause: e });
      }
      throw e;
    }
  }

  const size = (await sizeOf(part)) ?? 0;
  const mismatch = async (what: string): Promise<never> => {
    // A corrupt file must not be resumed from either: start over next time.
    await rm(part, { force: true });
    throw new FailedPrecondition(`${hub.label}: ${f.path} failed verification: ${what}; the download was discarded, nothing was cached`);
  };
  if (expect.size !== undefined && size !== expect.size) await mismatch(`size ${size} bytes, expected ${expect.size}`);
  if (expect.sha256) {
    const got = await hashFile(part, "sha256");
    if (got !== expect.sha256) await mismatch(`sha256 ${got}, expected ${expect.sha256}`);
  } else if (expect.gitSha1) {
    const got = await hashFile(part, "sha1", `blob ${size}\0`);
    if (got !== expect.gitSha1) await mismatch(`git blob sha1 ${got}, expected ${expect.gitSha1}`);
  }
  await rename(part, final);
  progress.bytesDone = base + size;
  progress.filesDone++;
  report(f.path);
  return { path: f.path, size, ...(expect.sha256 ? { sha256: expect.sha256 } : {}), ...(expect.gitSha1 ? { gitSha1: expect.gitSha1 } : {}) };
}

/**
 * One attempt at getting `part` complete: asks for the bytes after what is on disk, appends them.
 * Fills in `expect`'s checksum from the hub's headers when the listing had none. Throws a
 * retryable HubError when the transfer is cut short.
 */
async function transfer(hub: Hub, expect: RemoteFile, part: string, onBytes: (onDisk: number) => void): Promise<void> {
  let offset = (await sizeOf(part)) ?? 0;
  if (expect.size !== undefined && offset > expect.size) offset = 0; // not a prefix of this file
  if (expect.size !== undefined && offset === expect.size && offset > 0) return;
  const rev = encodeURIComponent(hub.ref.revision);
  const url = hub.url(`${hub.ref.repo}/resolve/${rev}/${encodeURIComponent(expect.path)}`);
  // identity: a Range applies to the bytes as sent, so they must be the file's own bytes.
  const headers: Record<string, string> = { "accept-encoding": "identity" };
  if (offset > 0) headers.range = `bytes=${offset}-`;
  const { res, first } = await hub.get(url, headers);

  // The hub's checksum: X-Linked-Etag on the redirect of an LFS file (the sha256), else the ETag
  // (the git blob sha1 of a small file). A CDN's own ETag (md5, …) is never used.
  const tag = etagValue(first.headers.get("x-linked-etag")) ?? etagValue(first.headers.get("etag"));
  if (!expect.sha256 && !expect.gitSha1 && tag) {
    if (HEX64.test(tag)) expect.sha256 = tag;
    else if (HEX40.test(tag)) expect.gitSha1 = tag;
  }
  if (expect.size === undefined) {
    const linked = Number(first.headers.get("x-linked-size") ?? NaN);
    if (Number.isSafeInteger(linked) && linked >= 0) expect.size = linked;
  }

  if (res.status === 416 && offset > 0) {
    // Nothing after `offset`: what is on disk is the whole file (verification decides).
    await res.body?.cancel().catch(() => {});
    if (expect.size === undefined) expect.size = offset;
    return;
  }
  let append = false;
  if (res.status === 206 && offset > 0) {
    const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers.get("content-range") ?? "");
    if (!m || Number(m[1]) !== offset) {
      await res.body?.cancel().catch(() => {});
      throw new HubError("UNAVAILABLE", `${hub.label}: ${expect.path}: the server answered a range request with a different range (${res.headers.get("content-range")})`, true);
    }
    if (expect.size === undefined && m[3] !== "*") expect.size = Number(m[3]);
    append = true;
  } else if (res.status === 200) {
    const len = Number(res.headers.get("content-length") ?? NaN);
    if (expect.size === undefined && Number.isSafeInteger(len)) expect.size = len;
    offset = 0; // the server ignored the range (or none was asked): start over
  } else {
    throw await hub.statusError(res, expect.path);
  }
  if (!res.body) throw new HubError("UNAVAILABLE", `${hub.label}: ${expect.path}: empty response`, true);

  const fh = await open(part, append ? "a" : "w");
  let onDisk = offset;
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      await fh.write(chunk);
      onDisk += chunk.byteLength;
      onBytes(onDisk);
    }
  } catch (e) {
    if (isAbort(e, hub.o.signal)) throw new Cancelled(`${hub.label}: download cancelled (${onDisk} bytes of ${expect.path} kept for resuming)`);
    throw new HubError("UNAVAILABLE", `${hub.label}: the transfer of ${expect.path} was interrupted after ${onDisk} bytes`, true, { cause: e });
  } finally {
    await fh.close();
  }
  if (expect.size !== undefined && onDisk < expect.size) {
    throw new HubError("UNAVAILABLE", `${hub.label}: the transfer of ${expect.path} ended after ${onDisk} of ${expect.size} bytes`, true);
  }
}

