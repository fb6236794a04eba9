/**
 * Validation of artifact names and of file paths inside an artifact. Every name a client sends goes
 * through validateName before it touches a path, and every resolved path is checked to stay under
 * its root (defence in depth against `..`, absolute paths and separators).
 */
import { InvalidArgument } from "@qlora/core";
import { isAbsolute, relative, resolve, sep } from "node:path";

export const ARTIFACT_KINDS = ["models", "datasets", "adapters", "checkpoints"] as const;
export type ArtifactKind = (typeof ARTIFACT_KINDS)[number];

/** Letters, digits, `.`, `_`, `-`; starts with a letter or digit; 1..128 characters; no `..`. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function isValidName(name: unknown): name is string {
  return typeof name === "string" && NAME_RE.test(name) && !name.includes("..");
}

/** Throws InvalidArgument (naming what was wrong) unless `name` is a valid artifact name. */
export function validateName(name: unknown, what = "name"): string {
  if (typeof name !== "string") throw new InvalidArgument(`${what} must be a string`);
  if (name.length === 0) throw new InvalidArgument(`${what} is empty`);
  if (name.length > 128) throw new InvalidArgument(`${what} is longer than 128 characters`);
  if (name.includes("/") || name.includes("\\")) throw new InvalidArgument(`${what} ${JSON.stringify(name)} must not contain path separators`);
  if (name.includes("..")) throw new InvalidArgument(`${what} ${JSON.stringify(name)} must not contain ".."`);
  if (!NAME_RE.test(name)) {
    throw new InvalidArgument(`${what} ${JSON.stringify(name)} is invalid: use letters, digits, ".", "_" and "-", starting with a letter or digit`);
  }
  return name;
}

export function validateKind(kind: unknown): ArtifactKind {
  if (typeof kind !== "string" || !(ARTIFACT_KINDS as readonly string[]).includes(kind)) {
    throw new InvalidArgument(`unknown artifact kind ${JSON.stringify(kind)} (one of ${ARTIFACT_KINDS.join(", ")})`);
  }
  return kind as ArtifactKind;
}

/**
 * A relative file path inside an artifact (e.g. "config.json", "checkpoint-100/adapter_model.safetensors"):
 * segments separated by "/", each a valid-looking file name (no empty, ".", ".." segments, no
 * backslashes, no NUL, not absolute). Returns the normalized path.
 */
export function validateRelativePath(p: unknown, what = "path"): string {
  if (typeof p !== "string" || p.length === 0) throw new InvalidArgument(`${what} must be a non-empty string`);
  if (p.length > 1024) throw new InvalidArgument(`${what} is too long`);
  if (p.startsWith("/") || isAbsolute(p)) throw new InvalidArgument(`${what} ${JSON.stringify(p)} must be relative`);
  if (p.includes("\\") || p.includes("\0")) throw new InvalidArgument(`${what} ${JSON.stringify(p)} contains a forbidden character`);
  const segs = p.split("/");
  for (const s of segs) {
    if (s === "" || s === "." || s === "..") throw new InvalidArgument(`${what} ${JSON.stringify(p)} has an empty, "." or ".." segment`);
    if (!/^[A-Za-z0-9_][A-Za-z0-9._ +@=,-]{0,254}$/.test(s)) throw new InvalidArgument(`${what} ${JSON.stringify(p)}: segment ${JSON.stringify(s)} is not an allowed file name`);
  }
  return segs.join("/");
}

/** Joins `parts` onto `root` and throws unless the result stays strictly under root. */
export function resolveUnder(root: string, ...parts: string[]): string {
  const absRoot = resolve(root);
  const p = resolve(absRoot, ...parts);
  const rel = relative(absRoot, p);
  if (rel === "" || rel.startsWith("..") || isAbsolute(rel) || rel.split(sep).includes("..")) {
    throw new InvalidArgument(`path ${JSON.stringify(parts.join("/"))} escapes the store`);
  }
  return p;
}
