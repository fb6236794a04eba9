/**
 * Store selection from the environment (docs/store.md, "Configuration"): the embedded local
 * directory by default, or an S3-compatible bucket.
 */
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InvalidArgument } from "@qlora/core";
import { S3Store, type S3StoreOptions } from "./s3-store.js";
import { LocalStore, type ArtifactStore } from "./store.js";

export type Env = Record<string, string | undefined>;

const MiB = 1024 * 1024;

function bool(env: Env, key: string, dflt: boolean): boolean {
  const v = env[key]?.trim().toLowerCase();
  if (v === undefined || v === "") return dflt;
  if (["1", "true", "yes", "on"].includes(v)) return true;
  if (["0", "false", "no", "off"].includes(v)) return false;
  throw new InvalidArgument(`${key}=${JSON.stringify(env[key])}: expected true or false`);
}

function int(env: Env, key: string): number | undefined {
  const v = env[key]?.trim();
  if (v === undefined || v === "") return undefined;
  if (!/^[0-9]+$/.test(v)) throw new InvalidArgument(`${key}=${JSON.stringify(env[key])}: expected a positive integer`);
  return Number(v);
}

function nonEmpty(env: Env, key: string): string | undefined {
  const v = env[key]?.trim();
  return v ? v : undefined;
}

/**
 * S3Store options from the environment:
 * - QLORA_S3_BUCKET (required), QLORA_S3_ENDPOINT (empty: AWS), QLORA_S3_REGION (else AWS_REGION,
 *   AWS_DEFAULT_REGION, "us-east-1"), QLORA_S3_FORCE_PATH_STYLE (default: true when an endpoint is
 *   set), QLORA_S3_PREFIX;
 * - credentials: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN) when set, else the
 *   SDK's default chain (shared config/profile, web identity such as IRSA, instance metadata);
 * - QLORA_S3_CACHE_DIR (default `<data dir>/s3-cache`, the data dir being `dataDir`, QLORA_DATA_DIR or
 *   `<tmp>/qlora`), QLORA_S3_PART_SIZE_MIB, QLORA_S3_CONCURRENCY.
 */
export function s3OptionsFromEnv(env: Env = process.env, opts: { dataDir?: string } = {}): S3StoreOptions {
  const bucket = nonEmpty(env, "QLORA_S3_BUCKET");
  if (!bucket) throw new InvalidArgument("QLORA_STORE=s3 needs QLORA_S3_BUCKET");
  const endpoint = nonEmpty(env, "QLORA_S3_ENDPOINT");
  if (endpoint) {
    let u: URL;
    try {
      u = new URL(endpoint);
    } catch {
      throw new InvalidArgument(`QLORA_S3_ENDPOINT=${JSON.stringify(endpoint)} is not a URL`);
    }
    if (u.protocol !== "http:" && u.protocol !== "https:") throw new InvalidArgument(`QLORA_S3_ENDPOINT must be an http(s) URL, not ${JSON.stringify(endpoint)}`);
  }
  const dataDir = opts.dataDir ?? nonEmpty(env, "QLORA_DATA_DIR") ?? join(tmpdir(), "qlora");
  const o: S3StoreOptions = {
    bucket,
    prefix: env.QLORA_S3_PREFIX ?? "",
    cacheDir: nonEmpty(env, "QLORA_S3_CACHE_DIR") ?? join(dataDir, "s3-cache"),
    region: nonEmpty(env, "QLORA_S3_REGION") ?? nonEmpty(env, "AWS_REGION") ?? nonEmpty(env, "AWS_DEFAULT_REGION") ?? "us-east-1",
    forcePathStyle: bool(env, "QLORA_S3_FORCE_PATH_STYLE", endpoint !== undefined),
  };
  if (endpoint) o.endpoint = endpoint;
  const id = nonEmpty(env, "AWS_ACCESS_KEY_ID");
  const secret = nonEmpty(env, "AWS_SECRET_ACCESS_KEY");
  if (id && secret) {
    o.credentials = { accessKeyId: id, secretAccessKey: secret };
    const token = nonEmpty(env, "AWS_SESSION_TOKEN");
    if (token) o.credentials.sessionToken = token;
  } else if (id || secret) {
    throw new InvalidArgument("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither");
  }
  const part = int(env, "QLORA_S3_PART_SIZE_MIB");
  if (part !== undefined) o.partSize = part * MiB;
  const conc = int(env, "QLORA_S3_CONCURRENCY");
  if (conc !== undefined) o.concurrency = conc;
  return o;
}

/**
 * The artifact store the environment asks for: QLORA_STORE=local (default; the directory
 * `opts.dataDir` or QLORA_DATA_DIR) or QLORA_STORE=s3 (see s3OptionsFromEnv; the data directory,
 * when given, holds the S3 cache).
 */
export function createStoreFromEnv(env: Env = process.env, opts: { dataDir?: string } = {}): ArtifactStore {
  const kind = (env.QLORA_STORE ?? "").trim().toLowerCase() || "local";
  if (kind === "local") {
    const dir = opts.dataDir ?? nonEmpty(env, "QLORA_DATA_DIR");
    if (!dir) throw new InvalidArgument("the local artifact store needs a directory: set QLORA_DATA_DIR (or QLORA_STORE=s3)");
    return new LocalStore(dir);
  }
  if (kind === "s3") return new S3Store(s3OptionsFromEnv(env, opts));
  throw new InvalidArgument(`QLORA_STORE=${JSON.stringify(env.QLORA_STORE)}: expected "local" or "s3"`);
}
