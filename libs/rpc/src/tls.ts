/**
 * TLS and mutual TLS for the server (and its clients), from PEM files as Kubernetes mounts them
 * (cert-manager Secrets: tls.crt, tls.key, ca.crt).
 *
 * - `tls: { certFile, keyFile }`: HTTPS/h2 with ALPN ("h2" for gRPC, "http/1.1" for curl and
 *   browsers) on the same single port.
 * - `clientCaFile`: mutual TLS; clients must present a certificate signed by that CA (the
 *   handshake fails otherwise). The verified subject is logged and audited with each request.
 * - The files are re-read when they change (checked every 30 s by default), so rotated
 *   certificates take effect without a restart; a broken rotation keeps the previous ones.
 *
 * Without TLS the server refuses to listen on anything but a loopback address unless
 * `allowInsecure` is set (behind a mesh or an ingress that terminates TLS).
 */
import { readFile, stat } from "node:fs/promises";
import type { SecureContextOptions, TLSSocket } from "node:tls";
import { InvalidArgument } from "@qlora/core";

export interface TlsFiles {
  /** PEM certificate chain of the server. */
  certFile: string;
  /** PEM private key of the server. */
  keyFile: string;
  /** PEM CA bundle that client certificates must chain to: enables mutual TLS. */
  clientCaFile?: string;
  /** With a client CA: refuse clients without a certificate (default true). */
  requireClientCert?: boolean;
  /** Re-read the files when they change, checked this often (default 30000 ms; 0: never). */
  reloadIntervalMs?: number;
}

export interface TlsPem {
  cert: string | Buffer;
  key: string | Buffer;
  clientCa?: string | Buffer;
  requireClientCert?: boolean;
}

export type TlsConfig = TlsFiles | TlsPem;

export function isTlsFiles(c: TlsConfig): c is TlsFiles {
  return "certFile" in c;
}

async function readPem(file: string, what: string): Promise<Buffer> {
  try {
    const b = await readFile(file);
    if (!b.includes("-----BEGIN ")) throw new Error("not a PEM file");
    return b;
  } catch (e) {
    throw new InvalidArgument(`cannot read the ${what} ${file}: ${(e as Error).message}`, { cause: e });
  }
}

export async function loadTlsPem(c: TlsConfig): Promise<TlsPem> {
  if (!isTlsFiles(c)) return c;
  return {
    cert: await readPem(c.certFile, "TLS certificate"),
    key: await readPem(c.keyFile, "TLS key"),
    ...(c.clientCaFile ? { clientCa: await readPem(c.clientCaFile, "client CA") } : {}),
    ...(c.requireClientCert !== undefined ? { requireClientCert: c.requireClientCert } : {}),
  };
}

/** node:tls server options for a PEM set (ALPN h2 + http/1.1, TLS 1.2+). */
export function secureOptions(pem: TlsPem): SecureContextOptions & {
  requestCert: boolean;
  rejectUnauthorized: boolean;
  ALPNProtocols: string[];
} {
  const mutual = pem.clientCa !== undefined;
  return {
    cert: pem.cert,
    key: pem.key,
    ...(mutual ? { ca: pem.clientCa } : {}),
    minVersion: "TLSv1.2",
    requestCert: mutual,
    rejectUnauthorized: mutual && pem.requireClientCert !== false,
    ALPNProtocols: ["h2", "http/1.1"],
  };
}

/** mtimes of the files, to notice rotations. */
export async function tlsFilesStamp(c: TlsFiles): Promise<string> {
  const files = [c.certFile, c.keyFile, ...(c.clientCaFile ? [c.clientCaFile] : [])];
  const st = await Promise.all(files.map((f) => stat(f).then((s) => `${s.mtimeMs}:${s.size}`, () => "missing")));
  return st.join("|");
}

export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "").toLowerCase();
  return h === "localhost" || h === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h) || /^::ffff:127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** Subject of the verified peer certificate ("CN=client,O=…"), or undefined. */
export function peerCertSubject(socket: TLSSocket): string | undefined {
  if (!socket.authorized) return undefined;
  const cert = socket.getPeerCertificate();
  if (!cert || !cert.subject) return undefined;
  return Object.entries(cert.subject)
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("+") : v}`)
    .join(",");
}

/**
 * Options for connect-node client transports (and node's https/http2) to reach a TLS server:
 * `createGrpcTransport({ baseUrl: "https://…", nodeOptions: await clientTlsOptions({...}) })`.
 */
export async function clientTlsOptions(f: { caFile?: string; certFile?: string; keyFile?: string; serverName?: string }): Promise<{
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  servername?: string;
}> {
  return {
    ...(f.caFile ? { ca: await readPem(f.caFile, "CA") } : {}),
    ...(f.certFile ? { cert: await readPem(f.certFile, "client certificate") } : {}),
    ...(f.keyFile ? { key: await readPem(f.keyFile, "client key") } : {}),
    ...(f.serverName ? { servername: f.serverName } : {}),
  };
}
