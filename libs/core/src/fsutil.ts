/**
 * File-system helpers for atomic output: temp names, fsync of files and directories, rename into place.
 */
import { open, rename, rm, stat } from "node:fs/promises";
import { randomBytes } from "node:crypto";
import { basename, dirname, join } from "node:path";

/** A sibling temp name for `target` (same directory, so the final rename stays on one file system). */
export function tempSibling(target: string, tag = "tmp"): string {
  return join(dirname(target), `.${basename(target)}.${tag}-${process.pid}-${randomBytes(4).toString("hex")}`);
}

/** fsync a directory so that a rename inside it survives a crash. */
export async function fsyncDir(dir: string): Promise<void> {
  let fh;
  try {
    fh = await open(dir, "r");
    await fh.sync();
  } catch (e) {
    // Some file systems refuse fsync on directories (EINVAL/EISDIR/EPERM); the rename is still atomic.
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== "EINVAL" && code !== "EISDIR" && code !== "EPERM" && code !== "EBADF") throw e;
  } finally {
    await fh?.close();
  }
}

/** Writes a new file (fails if it exists) and fsyncs it. */
export async function writeFileSynced(path: string, data: string | Uint8Array): Promise<void> {
  const fh = await open(path, "wx");
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsync one file by path. */
export async function fsyncFile(path: string): Promise<void> {
  const fh = await open(path, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export async function pathExists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw e;
  }
}

/**
 * Moves the finished directory `staged` to `target`. Without `overwrite` it fails when target exists
 * (rename(2) refuses a non-empty target directory, so a concurrent writer cannot be clobbered).
 * With `overwrite`, the old target is first renamed aside and deleted after the new one is in place:
 * readers see either the old or the new directory, never a mix (there is a short window where the
 * name is absent, because Node offers no RENAME_EXCHANGE).
 */
export async function renameDirIntoPlace(
  staged: string,
  target: string,
  overwrite: boolean,
  onExists: () => Error,
): Promise<void> {
  let aside: string | undefined;
  if (await pathExists(target)) {
    if (!overwrite) throw onExists();
    aside = tempSibling(target, "old");
    await rename(target, aside);
  }
  try {
    await rename(staged, target);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (aside) await rename(aside, target).catch(() => undefined);
    if (code === "ENOTEMPTY" || code === "EEXIST") throw onExists();
    throw e;
  }
  await fsyncDir(dirname(target));
  if (aside) await rm(aside, { recursive: true, force: true });
}
