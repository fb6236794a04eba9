/**
 * Structured logs: one JSON object per line, `{"time","level","msg",…fields}`. Request-scoped
 * lines carry `request_id`, `trace_id` and `span_id` (see context.ts), so a log pipeline can
 * join them with traces. No dependencies; the sink is any writable (stderr by default).
 */
import { currentRequest, type RequestInfo } from "./context.js";

export type LogLevel = "debug" | "info" | "warn" | "error";
const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type LogFields = Record<string, unknown>;

export interface Logger {
  readonly level: LogLevel;
  log(level: LogLevel, msg: string, fields?: LogFields): void;
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line. */
  child(fields: LogFields): Logger;
}

export interface JsonLoggerOptions {
  /** Lines below this level are dropped (default: $QLORA_LOG_LEVEL or "warn"). */
  level?: LogLevel;
  /** Where lines go (default: process.stderr). */
  write?: (line: string) => void;
  /** Fields on every line (e.g. { service: "qlora" }). */
  fields?: LogFields;
  /** Add request_id/trace_id/span_id of the current request (default true). */
  requestFields?: boolean;
}

export function isLogLevel(s: unknown): s is LogLevel {
  return typeof s === "string" && s in ORDER;
}

export function requestLogFields(info: RequestInfo | undefined): LogFields {
  if (!info) return {};
  const f: LogFields = { request_id: info.requestId, trace_id: info.trace.traceId, span_id: info.trace.spanId };
  if (info.trace.parentSpanId) f.parent_span_id = info.trace.parentSpanId;
  if (info.principal) f.principal = info.principal.name;
  return f;
}

function serializeError(e: Error): LogFields {
  return { name: e.name, message: e.message, ...(e.stack ? { stack: e.stack } : {}) };
}

/** JSON.stringify that never throws (cycles, BigInt) and keeps Error details. */
export function safeJson(obj: unknown): string {
  const seen = new WeakSet<object>();
  return JSON.stringify(obj, (_k, v: unknown) => {
    if (typeof v === "bigint") return v.toString();
    if (v instanceof Error) return serializeError(v);
    if (v && typeof v === "object") {
      if (seen.has(v)) return "[circular]";
      seen.add(v);
    }
    return v;
  });
}

export function jsonLogger(options: JsonLoggerOptions = {}): Logger {
  const envLevel = process.env.QLORA_LOG_LEVEL;
  const level: LogLevel = options.level ?? (isLogLevel(envLevel) ? envLevel : "warn");
  const write = options.write ?? ((line: string) => void process.stderr.write(line));
  const requestFields = options.requestFields ?? true;
  const make = (base: LogFields): Logger => {
    const log = (lv: LogLevel, msg: string, fields?: LogFields) => {
      if (ORDER[lv] < ORDER[level]) return;
      const line = {
        time: new Date().toISOString(),
        level: lv,
        msg,
        ...base,
        ...(requestFields ? requestLogFields(currentRequest()) : {}),
        ...fields,
      };
      write(safeJson(line) + "\n");
    };
    return {
      level,
      log,
      debug: (m, f) => log("debug", m, f),
      info: (m, f) => log("info", m, f),
      warn: (m, f) => log("warn", m, f),
      error: (m, f) => log("error", m, f),
      child: (fields) => make({ ...base, ...fields }),
    };
  };
  return make(options.fields ?? {});
}
