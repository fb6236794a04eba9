/**
 * manifest.json: the integrity record of an artifact directory — size and sha256 of every file.
 * Written last (after the files are complete and fsynced), so its presence marks a finished artifact.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { lstat, open, readdir, readFile, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";

export const MANIFEST_FILE = "manifest.json";

export interface ManifestFile {
  /** Relative to the artifact root, "/"-separated. */
  path: string;
  size: number;
  /** Lowercase hex. */
  sha256: string;
}

export interface Manifest {
  version: 1;
  /** ISO 8601 time the manifest was written. */
  created_at: string;
  /** Sum of the files' sizes. */
  total_size: number;
  /** Sorted by path; manifest.json itself is not listed. */
  files: ManifestFile[];
  /** Free-form string metadata (e.g. source_model of a quantized model). */
  meta: Record<string, string>;
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest("hex");
}

/**
 * Relative paths of the regular files under `dir` (recursive, sorted, "/"-separated), excluding the
 * top-level manifest.json. Symlinks are refused: an artifact must not point outside itself.
 */
export async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (abs: string, rel: string): Promise<void> => {
    for (const e of await readdir(abs, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isSymbolicLink()) throw new FailedPrecondition(`${join(abs, e.name)}: symbolic links are not allowed in an artifact`);
      if (e.isDirectory()) await walk(join(abs, e.name), r);
      else if (e.isFile()) {
        if (r !== MANIFEST_FILE) out.push(r);
      } else throw new FailedPrecondition(`${join(abs, e.name)}: not a regular file`);
    }
  };
  await walk(dir, "");
  return out.sort();
}

/** Hashes every file under `dir`. */
export async function buildManifest(dir: string, meta: Record<string, string> = {}): Promise<Manifest> {
  const files: ManifestFile[] = [];
  for (const p of await listFiles(dir)) {
    const abs = join(dir, ...p.split("/"));
    const st = await lstat(abs);
    files.push({ path: p, size: st.size, sha256: await sha256File(abs) });
  }
  return {
    version: 1,
    created_at: new Date().toISOString(),
    total_size: files.reduce((a, f) => a + f.size, 0),
    files,
    meta: { ...meta },
  };
}

/** Writes `dir/manifest.json` atomically (temp + fsync + rename). */
export async function writeManifest(dir: string, m: Manifest): Promise<void> {
  const path = join(dir, MANIFEST_FILE);
  const tmp = join(dir, `.${MANIFEST_FILE}.tmp-${randomBytes(4).toString("hex")}`);
  const fh = await open(tmp, "wx");
  try {
    await fh.writeFile(JSON.stringify(m, null, 2) + "\n");
    await fh.sync();
  } catch (e) {
    await fh.close();
    await rm(tmp, { force: true });
    throw e;
  }
  await fh.close();
  await rename(tmp, path);
}

/** Builds and writes the manifest of `dir`; returns it. */
export async function writeManifestFor(dir: string, meta: Record<string, string> = {}): Promise<Manifest> {
  const m = await buildManifest(dir, meta);
  await writeManifest(dir, m);
  return m;
}

/** Parses and validates `dir/manifest.json` (NotFound when absent). */
export async function readManifestFile(dir: string): Promise<Manifest> {
  const path = join(dir, MANIFEST_FILE);
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`${path}: no manifest`, { cause: e });
    throw e;
  }
  return parseManifest(text, path);
}

/**
 * Parses and validates the text of a manifest.json (InvalidArgument naming `where` when it is not a
 * version 1 manifest). Unknown top-level fields are ignored; `meta` keeps string values only.
 */
export function parseManifest(text: string, where = MANIFEST_FILE): Manifest {
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch {
    throw new InvalidArgument(`${where}: not valid JSON`);
  }
  const o = m as Partial<Manifest> | null;
  if (
    !o ||
    typeof o !== "object" ||
    o.version !== 1 ||
    !Array.isArray(o.files) ||
    !o.files.every(
      (f) =>
        f &&
        typeof f.path === "string" &&
        Number.isSafeInteger(f.size) &&
        typeof f.sha256 === "string" &&
        /^[0-9a-f]{64}$/.test(f.sha256),
    )
  ) {
    throw new InvalidArgument(`${where}: not a version 1 manifest`);
  }
  const meta: Record<string, string> = {};
  if (o.meta && typeof o.meta === "object") for (const [k, v] of Object.entries(o.meta)) if (typeof v === "string") meta[k] = v;
  return {
    version: 1,
    created_at: typeof o.created_at === "string" ? o.created_at : "",
    total_size: o.files.reduce((a, f) => a + f.size, 0),
    files: o.files.map((f) => ({ path: f.path, size: f.size, sha256: f.sha256 })),
    meta,
  };
}

export interface VerifyResult {
  ok: boolean;
  /** Files whose size and sha256 matched. */
  checked: number;
  missing: string[];
  mismatched: { path: string; expectedSha256: string; actualSha256: string; expectedSize: number; actualSize: number }[];
  /** Files present on disk but not in the manifest. */
  extra: string[];
}

/** Re-hashes every file of `dir` against its manifest. */
export async function verifyDir(dir: string, m?: Manifest): Promise<VerifyResult> {
  const manifest = m ?? (await readManifestFile(dir));
  const onDisk = new Set(await listFiles(dir));
  const res: VerifyResult = { ok: true, checked: 0, missing: [], mismatched: [], extra: [] };
  for (const f of manifest.files) {
    if (!onDisk.has(f.path)) {
      res.missing.push(f.path);
      continue;
    }
    onDisk.delete(f.path);
    const abs = join(dir, ...f.path.split("/"));
    const size = (await lstat(abs)).size;
    const sha = await sha256File(abs);
    if (sha !== f.sha256 || size !== f.size) {
      res.mismatched.push({ path: f.path, expectedSha256: f.sha256, actualSha256: sha, expectedSize: f.size, actualSize: size });
    } else res.checked++;
  }
  res.extra = [...onDisk].sort();
  res.ok = res.missing.length === 0 && res.mismatched.length === 0 && res.extra.length === 0;
  return res;
}
