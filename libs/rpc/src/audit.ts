/**
 * The audit log: one JSON line per security-relevant action, appended to a file
 * (`qlora serve --audit-log FILE`) or handed to a function.
 *
 * Recorded: every call of an RPC that changes what the server holds or serves (adapter loads and
 * unloads, model loads, job creation and cancellation, dataset and model uploads and deletions,
 * quantization), with who (token name, client certificate, peer), what (the named adapters,
 * models, datasets, jobs) and the outcome (status code); and every refused call (unauthenticated,
 * permission denied, over quota). Services can add their own events with `ctx.audit.record()`.
 */
import { createWriteStream, type WriteStream } from "node:fs";
import { ConnectError, type Interceptor } from "@connectrpc/connect";
import { requestInfoKey, type RequestInfo } from "./context.js";
import { codeName } from "./http-routes.js";
import { safeJson } from "./log.js";
import { nextWithOutcome } from "./outcome.js";
import { resourcesOf, type Resources } from "./auth.js";

export interface AuditEvent {
  /** "rpc" for audited calls, "refused" for refusals, or a service's own event name. */
  event: string;
  rpc?: string;
  outcome?: string;
  message?: string;
  resources?: Resources;
  [field: string]: unknown;
}

/** RPCs whose every call is audited. */
export const AUDITED_RPCS = new Set([
  "qlora.v1.InferenceService/LoadAdapter",
  "qlora.v1.InferenceService/UnloadAdapter",
  "qlora.v1.InferenceService/LoadModel",
  "qlora.v1.TrainerService/CreateJob",
  "qlora.v1.TrainerService/CancelJob",
  "qlora.v1.TrainerService/UploadDataset",
  "qlora.v1.TrainerService/DeleteDataset",
  "qlora.v1.QuantizerService/Quantize",
  "qlora.v1.QuantizerService/UploadModel",
  "qlora.v1.QuantizerService/DeleteModel",
]);

export class AuditLog {
  private stream: WriteStream | null = null;

  private constructor(private readonly sink: (line: string) => void) {}

  /** Appends to `file` (created if missing, mode 0600). */
  static toFile(file: string): AuditLog {
    const stream = createWriteStream(file, { flags: "a", mode: 0o600 });
    // A failing audit sink is reported once on stderr; the server keeps serving.
    stream.once("error", (e) => process.stderr.write(`[audit] cannot write ${file}: ${e.message}\n`));
    const log = new AuditLog((line) => void stream.write(line));
    log.stream = stream;
    return log;
  }

  static toFunction(write: (line: string) => void): AuditLog {
    return new AuditLog(write);
  }

  /** Records one event, with the request's ids and caller when given. */
  record(event: AuditEvent, info?: RequestInfo): void {
    const line: Record<string, unknown> = { time: new Date().toISOString(), ...event };
    if (info) {
      line.request_id = info.requestId;
      line.trace_id = info.trace.traceId;
      line.peer = info.peer;
      if (info.principal) line.principal = info.principal.name;
      if (info.clientCertSubject) line.client_cert = info.clientCertSubject;
    }
    this.sink(safeJson(line) + "\n");
  }

  async close(): Promise<void> {
    const s = this.stream;
    if (!s) return;
    this.stream = null;
    await new Promise<void>((resolve) => s.end(() => resolve()));
  }
}

function clean(r: Resources | undefined): Resources | undefined {
  if (!r) return undefined;
  const out: Resources = {};
  for (const k of ["adapters", "models", "datasets", "jobs"] as const) {
    const v = r[k]?.filter((x) => x);
    if (v && v.length) out[k] = v;
  }
  return out;
}

/** Server interceptor recording every call of an AUDITED_RPCS method, with its outcome. */
export function auditInterceptor(audit: AuditLog, audited: ReadonlySet<string> = AUDITED_RPCS): Interceptor {
  return (next) => async (req) => {
    const rpc = `${req.service.typeName}/${req.method.name}`;
    if (!audited.has(rpc)) return next(req);
    const info = req.contextValues.get(requestInfoKey);
    let resources: Resources | undefined;
    let request = req;
    if (!req.stream) {
      resources = clean(resourcesOf(rpc, req.message));
    } else {
      const source = req.message;
      request = {
        ...req,
        message: (async function* () {
          let first = true;
          for await (const m of source) {
            if (first) resources = clean(resourcesOf(rpc, m));
            first = false;
            yield m;
          }
        })(),
      };
    }
    return nextWithOutcome(next, request, (e) => {
      const ce = e === null ? null : ConnectError.from(e);
      audit.record(
        { event: "rpc", rpc, outcome: ce ? codeName(ce.code) : "ok", ...(ce ? { message: ce.rawMessage } : {}), ...(resources ? { resources } : {}) },
        info,
      );
    });
  };
}
