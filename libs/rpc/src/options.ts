/**
 * The security and logging options of a server from command-line style settings (what
 * `qlora serve --tls-cert … --auth-tokens … --audit-log …` passes), validated in one place.
 */
import { InvalidArgument } from "@qlora/core";
import { AuditLog } from "./audit.js";
import { Authenticator } from "./auth.js";
import { isLogLevel, jsonLogger } from "./log.js";
import type { StartServerOptions } from "./server.js";

export interface SecuritySettings {
  /** PEM certificate chain file (with tlsKey: serve TLS). */
  tlsCert?: string | undefined;
  tlsKey?: string | undefined;
  /** PEM CA bundle: require client certificates signed by it (mutual TLS). */
  tlsClientCa?: string | undefined;
  /** Allow plaintext on a non-loopback address. */
  allowInsecure?: boolean | undefined;
  /** JSON token file (see auth.ts). */
  authTokens?: string | undefined;
  /** Append audit events (JSON lines) to this file. */
  auditLog?: string | undefined;
  /** debug | info | warn | error (default info: access lines). */
  logLevel?: string | undefined;
}

export type SecurityOptions = Pick<StartServerOptions, "tls" | "allowInsecure" | "auth" | "audit" | "log"> & {
  /** Flushes and closes the audit log (call after the server closed). */
  dispose(): Promise<void>;
};

export async function securityOptions(s: SecuritySettings): Promise<SecurityOptions> {
  if (!!s.tlsCert !== !!s.tlsKey) throw new InvalidArgument("--tls-cert and --tls-key go together");
  if (s.tlsClientCa && !s.tlsCert) throw new InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)");
  const level = s.logLevel ?? "info";
  if (!isLogLevel(level)) throw new InvalidArgument(`--log-level must be debug, info, warn or error, got ${JSON.stringify(level)}`);
  const log = jsonLogger({ level });
  const auth = s.authTokens
    ? await Authenticator.fromFile(s.authTokens, {
        onReloadError: (e) => log.warn("the token file could not be reloaded; the previous tokens stay in force", { error: (e as Error).message }),
      })
    : undefined;
  const audit = s.auditLog ? AuditLog.toFile(s.auditLog) : undefined;
  return {
    ...(s.tlsCert && s.tlsKey ? { tls: { certFile: s.tlsCert, keyFile: s.tlsKey, ...(s.tlsClientCa ? { clientCaFile: s.tlsClientCa } : {}) } } : {}),
    ...(s.allowInsecure ? { allowInsecure: true } : {}),
    ...(auth ? { auth } : {}),
    ...(audit ? { audit } : {}),
    log,
    dispose: async () => {
      await audit?.close();
    },
  };
}
