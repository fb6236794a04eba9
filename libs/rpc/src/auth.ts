/**
 * Bearer-token authentication, per-token permissions and quotas.
 *
 * Tokens come from a JSON file (a mounted Kubernetes Secret, say; `qlora serve --auth-tokens FILE`):
 *
 * ```json
 * {
 *   "tokens": [
 *     { "name": "team-a", "sha256": "<hex sha256 of the token>",
 *       "rpcs": ["qlora.v1.InferenceService/*"], "adapters": ["team-a-*"], "models": ["*"], "datasets": [],
 *       "quota": { "maxConcurrent": 4, "tokensPerMinute": 20000 } },
 *     { "name": "ops", "token": "a-long-random-secret", "rpcs": ["*"] }
 *   ],
 *   "public": ["grpc.health.v1.Health/*", "grpc.reflection.*"]
 * }
 * ```
 *
 * - A token is given as `sha256` (hex of its UTF-8 bytes; keeps the secret out of the file) or
 *   as `token` (at least 16 characters). Presented tokens are hashed and compared with every
 *   entry with `crypto.timingSafeEqual`, always all of them, so timing tells nothing about
 *   which prefix or which entry matched.
 * - `rpcs` (required): globs over "package.Service/Method" (`*` any run of characters, `?` one).
 *   HTTP routes are named the same way (the OpenAI API needs "qlora.v1.InferenceService/Generate").
 * - `adapters`, `models`, `datasets` (default ["*"]): globs over the names a request uses (see
 *   RESOURCE_RULES). A token restricted to some models must name the model in its requests.
 * - `quota.maxConcurrent`: calls in flight at once; `quota.tokensPerMinute`: prompt + completion
 *   tokens in a sliding minute (checked when a call starts, counted when it ends).
 * - `public` (default: health, reflection and the KServe liveness/readiness calls): callable
 *   without a token.
 *
 * Outcomes: no or unknown token → UNAUTHENTICATED; an RPC, adapter, model or dataset the token
 * does not allow → PERMISSION_DENIED; over a quota → RESOURCE_EXHAUSTED.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { Code, ConnectError, type ContextValues, type Interceptor } from "@connectrpc/connect";
import { InvalidArgument } from "@qlora/core";
import { requestInfoKey, type RequestInfo } from "./context.js";

export interface TokenQuota {
  maxConcurrent?: number;
  tokensPerMinute?: number;
}

export interface TokenEntry {
  name: string;
  /** sha256 of the token (32 bytes). */
  hash: Buffer;
  rpcs: string[];
  adapters: string[];
  models: string[];
  datasets: string[];
  quota: TokenQuota;
}

export interface AuthConfig {
  tokens: TokenEntry[];
  /** RPC/route names callable without a token (globs). */
  public: string[];
}

export const DEFAULT_PUBLIC = [
  "grpc.health.v1.Health/*",
  "grpc.reflection.v1.ServerReflection/*",
  "grpc.reflection.v1alpha.ServerReflection/*",
  "inference.GRPCInferenceService/ServerLive",
  "inference.GRPCInferenceService/ServerReady",
  "inference.GRPCInferenceService/ModelReady",
];

const MIN_TOKEN_LENGTH = 16;

export function globToRegExp(glob: string): RegExp {
  const re = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${re}$`, "s");
}

export function globMatch(globs: readonly string[], name: string): boolean {
  return globs.some((g) => globToRegExp(g).test(name));
}

export function hashToken(token: string): Buffer {
  return createHash("sha256").update(token, "utf8").digest();
}

function stringList(v: unknown, what: string, dflt: string[] | undefined): string[] {
  if (v === undefined) {
    if (dflt) return dflt;
    throw new InvalidArgument(`${what} is required (a list of globs; ["*"] allows everything)`);
  }
  if (!Array.isArray(v) || !v.every((x) => typeof x === "string" && x.length > 0 && x.length <= 512)) {
    throw new InvalidArgument(`${what} must be a list of non-empty strings`);
  }
  return [...v] as string[];
}

function positiveInt(v: unknown, what: string): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) throw new InvalidArgument(`${what} must be a positive integer`);
  return v;
}

/** Validates a token file's JSON (messages name the entry, never the secret). */
export function parseAuthConfig(json: unknown, source = "token file"): AuthConfig {
  if (!json || typeof json !== "object" || Array.isArray(json)) throw new InvalidArgument(`${source}: expected a JSON object with "tokens"`);
  const o = json as Record<string, unknown>;
  if (!Array.isArray(o.tokens)) throw new InvalidArgument(`${source}: "tokens" must be a list`);
  const names = new Set<string>();
  const hashes = new Set<string>();
  const tokens = o.tokens.map((t: unknown, i: number): TokenEntry => {
    if (!t || typeof t !== "object") throw new InvalidArgument(`${source}: tokens[${i}] must be an object`);
    const e = t as Record<string, unknown>;
    const name = typeof e.name === "string" && e.name ? e.name : `token-${i}`;
    const where = `${source}: token "${name}"`;
    if (names.has(name)) throw new InvalidArgument(`${where}: duplicate name`);
    names.add(name);
    let hash: Buffer;
    if (typeof e.sha256 === "string" && e.token === undefined) {
      if (!/^[0-9a-fA-F]{64}$/.test(e.sha256)) throw new InvalidArgument(`${where}: sha256 must be 64 hex digits`);
      hash = Buffer.from(e.sha256, "hex");
    } else if (typeof e.token === "string" && e.sha256 === undefined) {
      if (e.token.length < MIN_TOKEN_LENGTH) throw new InvalidArgument(`${where}: a token must have at least ${MIN_TOKEN_LENGTH} characters`);
      hash = hashToken(e.token);
    } else {
      throw new InvalidArgument(`${where}: set exactly one of "token" and "sha256"`);
    }
    const hex = hash.toString("hex");
    if (hashes.has(hex)) throw new InvalidArgument(`${where}: the same token appears twice`);
    hashes.add(hex);
    const q = (e.quota ?? {}) as Record<string, unknown>;
    if (typeof q !== "object") throw new InvalidArgument(`${where}: quota must be an object`);
    return {
      name,
      hash,
      rpcs: stringList(e.rpcs, `${where}: rpcs`, undefined),
      adapters: stringList(e.adapters, `${where}: adapters`, ["*"]),
      models: stringList(e.models, `${where}: models`, ["*"]),
      datasets: stringList(e.datasets, `${where}: datasets`, ["*"]),
      quota: {
        maxConcurrent: positiveInt(q.maxConcurrent, `${where}: quota.maxConcurrent`),
        tokensPerMinute: positiveInt(q.tokensPerMinute, `${where}: quota.tokensPerMinute`),
      },
    };
  });
  return { tokens, public: stringList(o.public, `${source}: public`, DEFAULT_PUBLIC) };
}

export async function loadAuthConfig(file: string): Promise<AuthConfig> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    throw new InvalidArgument(`cannot read the token file ${file}: ${(e as Error).message}`, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new InvalidArgument(`the token file ${file} is not valid JSON: ${(e as Error).message}`);
  }
  return parseAuthConfig(json, file);
}

export type ResourceKind = "adapter" | "model" | "dataset";

/** Quota bookkeeping of one token (kept across reloads, by name). */
class QuotaState {
  inFlight = 0;
  /** [time ms, tokens] of the last minute. */
  private readonly window: [number, number][] = [];
  private total = 0;

  used(now: number): number {
    while (this.window.length > 0 && this.window[0]![0] <= now - 60_000) this.total -= this.window.shift()![1];
    return this.total;
  }
  /** Milliseconds until the oldest entry leaves the window. */
  retryAfterMs(now: number): number {
    return this.window.length ? Math.max(0, this.window[0]![0] + 60_000 - now) : 0;
  }
  record(now: number, tokens: number): void {
    if (tokens <= 0) return;
    this.window.push([now, tokens]);
    this.total += tokens;
  }
}

export class Principal {
  constructor(
    readonly entry: TokenEntry,
    private readonly quota: QuotaState,
  ) {}

  get name(): string {
    return this.entry.name;
  }

  canCall(rpc: string): boolean {
    return globMatch(this.entry.rpcs, rpc);
  }

  allowed(kind: ResourceKind, name: string): boolean {
    const globs = kind === "adapter" ? this.entry.adapters : kind === "model" ? this.entry.models : this.entry.datasets;
    return globMatch(globs, name);
  }

  /** Throws PERMISSION_DENIED unless the token may use `name` ("" = unnamed: allowed only for unrestricted tokens). */
  checkResource(kind: ResourceKind, name: string): void {
    const globs = kind === "adapter" ? this.entry.adapters : kind === "model" ? this.entry.models : this.entry.datasets;
    if (name === "") {
      if (kind === "model" && !globs.includes("*")) {
        throw new ConnectError(`token "${this.name}" is limited to some models: name the model`, Code.PermissionDenied);
      }
      return;
    }
    if (!globMatch(globs, name)) {
      throw new ConnectError(`token "${this.name}" may not use ${kind} "${name}"`, Code.PermissionDenied);
    }
  }

  /** Throws RESOURCE_EXHAUSTED when the token used its tokens of the last minute. */
  checkTokenQuota(now = Date.now()): void {
    const limit = this.entry.quota.tokensPerMinute;
    if (limit === undefined) return;
    const used = this.quota.used(now);
    if (used >= limit) {
      const s = Math.ceil(this.quota.retryAfterMs(now) / 1000);
      throw new ConnectError(
        `token "${this.name}" used ${used} tokens in the last minute (quota ${limit}); retry in ${s} s`,
        Code.ResourceExhausted,
        { "retry-after": String(s) },
      );
    }
  }

  recordTokens(n: number, now = Date.now()): void {
    if (Number.isFinite(n) && n > 0) this.quota.record(now, Math.round(n));
  }

  /** Takes a concurrency slot (RESOURCE_EXHAUSTED when none is free); call the result once to give it back. */
  acquire(): () => void {
    const max = this.entry.quota.maxConcurrent;
    if (max !== undefined && this.quota.inFlight >= max) {
      throw new ConnectError(`token "${this.name}" already has ${this.quota.inFlight} calls in flight (quota ${max})`, Code.ResourceExhausted);
    }
    this.quota.inFlight++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.quota.inFlight--;
    };
  }

  get inFlight(): number {
    return this.quota.inFlight;
  }
}

export interface AuthenticatorOptions {
  /** Re-read the file when its mtime changes, checked at most this often (default 5000 ms; 0: never). */
  reloadIntervalMs?: number;
  /** Told when a reload fails (the previous tokens stay in force). */
  onReloadError?: (e: unknown) => void;
}

export class Authenticator {
  private config: AuthConfig;
  private readonly quotas = new Map<string, QuotaState>();
  private readonly publicRe: RegExp[];
  private mtimeMs = 0;
  private lastCheck = 0;
  private reloading: Promise<void> | null = null;

  private constructor(
    config: AuthConfig,
    private readonly file: string | null,
    private readonly options: AuthenticatorOptions,
  ) {
    this.config = config;
    this.publicRe = [];
    this.setConfig(config);
  }

  static fromConfig(config: AuthConfig): Authenticator {
    return new Authenticator(config, null, {});
  }

  static async fromFile(file: string, options: AuthenticatorOptions = {}): Promise<Authenticator> {
    const a = new Authenticator(await loadAuthConfig(file), file, options);
    a.mtimeMs = (await stat(file)).mtimeMs;
    a.lastCheck = Date.now();
    return a;
  }

  private setConfig(config: AuthConfig): void {
    this.config = config;
    this.publicRe.length = 0;
    this.publicRe.push(...config.public.map(globToRegExp));
  }

  get tokenNames(): string[] {
    return this.config.tokens.map((t) => t.name);
  }

  /** Re-reads the token file now (a bad file keeps the previous tokens and throws). */
  async reload(): Promise<void> {
    if (!this.file) return;
    const st = await stat(this.file);
    const config = await loadAuthConfig(this.file);
    this.mtimeMs = st.mtimeMs;
    this.setConfig(config);
  }

  /** Cheap, rate-limited mtime check; reloads in the background (Secrets are swapped, not edited). */
  private maybeReload(): void {
    const every = this.options.reloadIntervalMs ?? 5000;
    if (!this.file || every <= 0 || this.reloading) return;
    const now = Date.now();
    if (now - this.lastCheck < every) return;
    this.lastCheck = now;
    this.reloading = (async () => {
      try {
        const st = await stat(this.file!);
        if (st.mtimeMs !== this.mtimeMs) await this.reload();
      } catch (e) {
        this.options.onReloadError?.(e);
      } finally {
        this.reloading = null;
      }
    })();
  }

  isPublic(rpc: string): boolean {
    return this.publicRe.some((r) => r.test(rpc));
  }

  /** The principal for an `authorization` header value, or undefined (constant time over all tokens). */
  authenticate(authorization: string | null | undefined): Principal | undefined {
    this.maybeReload();
    if (!authorization) return undefined;
    const m = /^\s*Bearer\s+(\S+)\s*$/i.exec(authorization);
    if (!m) return undefined;
    const presented = hashToken(m[1]!);
    let found: TokenEntry | undefined;
    for (const t of this.config.tokens) {
      // Every entry is compared, match or not.
      if (timingSafeEqual(presented, t.hash) && !found) found = t;
    }
    if (!found) return undefined;
    let q = this.quotas.get(found.name);
    if (!q) this.quotas.set(found.name, (q = new QuotaState()));
    return new Principal(found, q);
  }
}

/** The caller's permissions as seen by a handler; everything is allowed when auth is off. */
export interface RequestAuth {
  readonly principal?: Principal;
  /** Throws PERMISSION_DENIED unless the caller may use the named resource. */
  checkResource(kind: ResourceKind, name: string): void;
  /** Throws RESOURCE_EXHAUSTED when the caller is over its tokens-per-minute quota. */
  checkTokenQuota(): void;
  /** Counts tokens (prompt + completion) against the caller's quota. */
  recordTokens(n: number): void;
}

export const OPEN_AUTH: RequestAuth = {
  checkResource() {},
  checkTokenQuota() {},
  recordTokens() {},
};

export function requestAuthOf(p: Principal | undefined): RequestAuth {
  if (!p) return OPEN_AUTH;
  return {
    principal: p,
    checkResource: (k, n) => p.checkResource(k, n),
    checkTokenQuota: () => p.checkTokenQuota(),
    recordTokens: (n) => p.recordTokens(n),
  };
}

// ---- what each RPC touches -------------------------------------------------------------------

export interface Resources {
  adapters?: string[];
  models?: string[];
  datasets?: string[];
  jobs?: string[];
}

type Msg = Record<string, unknown>;
const s = (v: unknown): string => (typeof v === "string" ? v : "");
/** "BASE:ADAPTER" model ids (OpenAI, KServe) → the base and the adapter. */
function baseAndAdapter(id: string): Resources {
  const i = id.indexOf(":");
  return i < 0 ? { models: [id] } : { models: [id.slice(0, i)], adapters: [id.slice(i + 1)] };
}

/**
 * The named resources of a request message, per RPC (for client streams: the first message).
 * Used for permission checks and the audit log.
 */
export const RESOURCE_RULES: Record<string, (m: Msg) => Resources> = {
  "qlora.v1.InferenceService/Generate": (m) => ({ models: [s(m.model)], adapters: [s(m.adapter)] }),
  "qlora.v1.InferenceService/GenerateStream": (m) => ({ models: [s(m.model)], adapters: [s(m.adapter)] }),
  "qlora.v1.InferenceService/Score": (m) => ({ models: [s(m.model)], adapters: [s(m.adapter)] }),
  "qlora.v1.InferenceService/LoadAdapter": (m) => ({ adapters: [s(m.name)], models: [s(m.model)] }),
  "qlora.v1.InferenceService/UnloadAdapter": (m) => ({ adapters: [s(m.name)] }),
  "qlora.v1.InferenceService/LoadModel": (m) => ({ models: [s(m.name)] }),
  "qlora.v1.TrainerService/CreateJob": (m) => ({
    models: [s(m.baseModel)],
    datasets: [s(m.dataset), s(m.evalDataset)],
    adapters: [s(m.outputAdapter)],
  }),
  "qlora.v1.TrainerService/GetJob": (m) => ({ jobs: [s(m.id)] }),
  "qlora.v1.TrainerService/CancelJob": (m) => ({ jobs: [s(m.id)] }),
  "qlora.v1.TrainerService/WatchJob": (m) => ({ jobs: [s(m.id)] }),
  "qlora.v1.TrainerService/ListCheckpoints": (m) => ({ jobs: [s(m.jobId)] }),
  "qlora.v1.TrainerService/UploadDataset": (m) => ({ datasets: [s(m.name)] }),
  "qlora.v1.TrainerService/DeleteDataset": (m) => ({ datasets: [s(m.name)] }),
  "qlora.v1.QuantizerService/Quantize": (m) => ({ models: [s(m.sourceModel), s(m.outputModel)] }),
  "qlora.v1.QuantizerService/GetModel": (m) => ({ models: [s(m.name)] }),
  "qlora.v1.QuantizerService/DeleteModel": (m) => ({ models: [s(m.name)] }),
  "qlora.v1.QuantizerService/UploadModel": (m) => ({ models: [s(m.name)] }),
  "inference.GRPCInferenceService/ModelInfer": (m) => baseAndAdapter(s(m.modelName)),
  "inference.GRPCInferenceService/ModelReady": (m) => baseAndAdapter(s(m.name)),
  "inference.GRPCInferenceService/ModelMetadata": (m) => baseAndAdapter(s(m.name)),
};

export function resourcesOf(rpc: string, message: unknown): Resources | undefined {
  const rule = RESOURCE_RULES[rpc];
  if (!rule || !message || typeof message !== "object") return undefined;
  return rule(message as Msg);
}

/** RPCs that fall back to a default model when none is named: a token limited to some models must name one. */
const DEFAULT_MODEL_RPCS = new Set([
  "qlora.v1.InferenceService/Generate",
  "qlora.v1.InferenceService/GenerateStream",
  "qlora.v1.InferenceService/Score",
]);

/** Checks what `p` may use in a request (empty names are skipped, except a defaulted model). */
export function checkResources(p: Principal, rpc: string, r: Resources | undefined): void {
  if (!r) return;
  for (const a of r.adapters ?? []) if (a) p.checkResource("adapter", a);
  for (const d of r.datasets ?? []) if (d) p.checkResource("dataset", d);
  for (const m of r.models ?? []) if (m || DEFAULT_MODEL_RPCS.has(rpc)) p.checkResource("model", m);
}

// ---- what a caller may see -------------------------------------------------------------------
//
// List and Get RPCs show a token only the items it may use: an item is visible when every name it
// carries (its model, adapter, dataset; for a job, what its CreateJob request named) matches the
// token's globs, the same predicate the request checks apply (empty names are skipped: they
// restrict nothing). Without auth (no principal) everything is visible.

const VISIBLE_KINDS = [
  ["adapters", "adapter"],
  ["models", "model"],
  ["datasets", "dataset"],
] as const;

/**
 * What a training job names, for visibility: what its CreateJob request named (base model,
 * datasets, output adapter), by the rule CreateJob is checked with: a token sees the jobs it could
 * have created. `job` is a qlora.v1.Job (or anything with its `request`).
 */
export function jobResources(job: { request?: unknown }): Resources {
  return resourcesOf("qlora.v1.TrainerService/CreateJob", job.request) ?? {};
}

/** Whether `p` may see an item naming these resources (always, when auth is off). */
export function maySee(p: Principal | undefined, r: Resources): boolean {
  if (!p) return true;
  for (const [key, kind] of VISIBLE_KINDS) {
    for (const name of r[key] ?? []) if (name && !p.allowed(kind, name)) return false;
  }
  return true;
}

/**
 * A Get of an item the token may not see. PERMISSION_DENIED like the request checks (which
 * refuse a name before looking it up); the auth interceptor records it as a refusal.
 */
export class NotVisibleError extends ConnectError {
  constructor(p: Principal, what: string, r: Resources) {
    const outside: string[] = [];
    for (const [key, kind] of VISIBLE_KINDS) {
      for (const name of r[key] ?? []) if (name && !p.allowed(kind, name)) outside.push(`${kind} "${name}"`);
    }
    super(`token "${p.name}" may not see ${what}: it uses ${outside.join(", ")}`, Code.PermissionDenied);
    notVisibleErrors.add(this);
  }

  // ConnectError's own hasInstance accepts any ConnectError (it matches by name across copies of
  // the library), which would make every error look like this one: recognise our instances only.
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && notVisibleErrors.has(v);
  }
}
const notVisibleErrors = new WeakSet<object>();

/** The authenticated caller of an RPC handler or HTTP route (undefined when auth is off or the call is public). */
export function callerOf(source: { values: ContextValues } | RequestInfo | undefined): Principal | undefined {
  const info = source && "values" in source ? source.values.get(requestInfoKey) : source;
  const p = info?.principal;
  return p instanceof Principal ? p : undefined;
}

/** The items of a list the caller may see (all of them when auth is off). */
export function visibleOnly<T>(p: Principal | undefined, items: readonly T[], resourcesOfItem: (item: T) => Resources): T[] {
  return p ? items.filter((item) => maySee(p, resourcesOfItem(item))) : [...items];
}

/** Throws PERMISSION_DENIED (NotVisibleError) unless the caller may see the item. */
export function checkVisible(p: Principal | undefined, what: string, r: Resources): void {
  if (p && !maySee(p, r)) throw new NotVisibleError(p, what, r);
}

/** `usage.totalTokens` (or prompt + completion) of a response message, 0 when it has none. */
export function usageTokensOf(message: unknown): number {
  const u = (message as { usage?: { totalTokens?: unknown; promptTokens?: unknown; completionTokens?: unknown } } | null)?.usage;
  if (!u || typeof u !== "object") return 0;
  if (typeof u.totalTokens === "number" && u.totalTokens > 0) return u.totalTokens;
  const p = typeof u.promptTokens === "number" ? u.promptTokens : 0;
  const c = typeof u.completionTokens === "number" ? u.completionTokens : 0;
  return p + c;
}

export interface AuthEvents {
  /** A refused call (for metrics and the audit log). */
  onRefused?(info: { rpc: string; reason: "unauthenticated" | "permission_denied" | "resource_exhausted"; principal?: string; message: string }): void;
}

function refusalReason(code: Code): "unauthenticated" | "permission_denied" | "resource_exhausted" | null {
  return code === Code.Unauthenticated ? "unauthenticated" : code === Code.PermissionDenied ? "permission_denied" : code === Code.ResourceExhausted ? "resource_exhausted" : null;
}

/**
 * Server interceptor enforcing tokens, permissions and quotas on every RPC that is not public.
 * The principal is stored on the request info (requestInfoKey) for logs and handlers.
 */
export function authInterceptor(auth: Authenticator, events: AuthEvents = {}): Interceptor {
  return (next) => async (req) => {
    const rpc = `${req.service.typeName}/${req.method.name}`;
    if (auth.isPublic(rpc)) return next(req);
    const info = req.contextValues.get(requestInfoKey);
    let principal: Principal | undefined;
    const refuse = (e: ConnectError): never => {
      const reason = refusalReason(e.code);
      if (reason) events.onRefused?.({ rpc, reason, principal: principal?.name, message: e.rawMessage });
      throw e;
    };
    principal = auth.authenticate(req.header.get("authorization"));
    if (!principal) refuse(new ConnectError("missing or invalid bearer token (send authorization: Bearer <token>)", Code.Unauthenticated));
    const p = principal!;
    if (info) info.principal = p;
    if (!p.canCall(rpc)) refuse(new ConnectError(`token "${p.name}" may not call ${rpc}`, Code.PermissionDenied));
    try {
      p.checkTokenQuota();
    } catch (e) {
      refuse(e as ConnectError);
    }
    let release: () => void = () => {};
    try {
      release = p.acquire();
    } catch (e) {
      refuse(e as ConnectError);
    }

    let request = req;
    if (!req.stream) {
      try {
        checkResources(p, rpc, resourcesOf(rpc, req.message));
      } catch (e) {
        release();
        refuse(e as ConnectError);
      }
    } else {
      // Streamed requests (server streams carry their one message this way too): check the first.
      const source = req.message;
      async function* checked() {
        let first = true;
        for await (const m of source) {
          if (first) {
            first = false;
            try {
              checkResources(p, rpc, resourcesOf(rpc, m));
            } catch (e) {
              refuse(e as ConnectError);
            }
          }
          yield m;
        }
      }
      request = { ...req, message: checked() };
    }

    // A handler that finds the caller may not see what it asked for (NotVisibleError) refused the
    // call as surely as the checks above: it is reported the same way.
    const reportHidden = (e: unknown) => {
      if (e instanceof NotVisibleError) events.onRefused?.({ rpc, reason: "permission_denied", principal: p.name, message: e.rawMessage });
    };
    let res;
    try {
      res = await next(request);
    } catch (e) {
      release();
      reportHidden(e);
      throw e;
    }
    if (!res.stream) {
      p.recordTokens(usageTokensOf(res.message));
      release();
      return res;
    }
    const out = res.message;
    async function* counted() {
      try {
        for await (const m of out) {
          p.recordTokens(usageTokensOf(m));
          yield m;
        }
      } catch (e) {
        reportHidden(e);
        throw e;
      } finally {
        release();
      }
    }
    return { ...res, message: counted() };
  };
}
