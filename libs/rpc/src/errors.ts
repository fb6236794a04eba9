/**
 * The one place where library errors become RPC status codes.
 *
 * Handlers just throw (`throw new NotFound("model x")`); the interceptor below turns every
 * thrown value into a ConnectError with the right code. Errors we did not anticipate become
 * INTERNAL with a generic message and a reference, so stack traces, host paths or other
 * internals never reach a client; the full error goes to the server log under that reference.
 */
import { randomBytes } from "node:crypto";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { QloraError, type ErrorCode } from "@qlora/core";

/** QloraError code → gRPC status. A Record so that a new ErrorCode fails to compile here. */
const TO_CODE: Record<ErrorCode, Code> = {
  INVALID_ARGUMENT: Code.InvalidArgument,
  NOT_FOUND: Code.NotFound,
  ALREADY_EXISTS: Code.AlreadyExists,
  FAILED_PRECONDITION: Code.FailedPrecondition,
  RESOURCE_EXHAUSTED: Code.ResourceExhausted,
  PERMISSION_DENIED: Code.PermissionDenied,
  UNAUTHENTICATED: Code.Unauthenticated,
  CANCELLED: Code.Canceled,
  DEADLINE_EXCEEDED: Code.DeadlineExceeded,
  UNAVAILABLE: Code.Unavailable,
  INTERNAL: Code.Internal,
};

/** gRPC status → QloraError code, for clients (the CLI) that turn remote failures back into typed errors. */
const FROM_CODE: Partial<Record<Code, ErrorCode>> = Object.fromEntries(
  Object.entries(TO_CODE).map(([k, v]) => [v, k as ErrorCode]),
);

export function codeOf(code: ErrorCode): Code {
  return TO_CODE[code];
}

/** Called for every error that is reported to a client as a generic INTERNAL. */
export type InternalErrorReporter = (error: unknown, ref: string) => void;

export const defaultInternalErrorReporter: InternalErrorReporter = (error, ref) => {
  const detail = error instanceof Error ? (error.stack ?? error.message) : String(error);
  process.stderr.write(`[rpc] internal error ${ref}: ${detail}\n`);
};

function isAbortError(e: unknown): boolean {
  return (
    e instanceof Error && (e.name === "AbortError" || (e as { code?: unknown }).code === "ABORT_ERR")
  );
}

/**
 * Any thrown value → ConnectError.
 * - ConnectError: unchanged (connect's own protocol errors, or a handler that chose a code).
 * - QloraError: its code and message (these messages are written for users).
 * - an AbortError: CANCELLED (the client went away or the server is shutting down).
 * - anything else: INTERNAL "internal error (ref …)", reported in full to `report`.
 */
export function toConnectError(
  error: unknown,
  report: InternalErrorReporter = defaultInternalErrorReporter,
): ConnectError {
  if (error instanceof ConnectError) return error;
  if (error instanceof QloraError) {
    return new ConnectError(error.message, TO_CODE[error.code], undefined, undefined, error);
  }
  if (isAbortError(error)) {
    return new ConnectError("cancelled", Code.Canceled, undefined, undefined, error);
  }
  const ref = randomBytes(4).toString("hex");
  report(error, ref);
  return new ConnectError(`internal error (ref ${ref})`, Code.Internal, undefined, undefined, error);
}

/** A ConnectError (from a client call) → QloraError, keeping the server's message. */
export function fromConnectError(error: unknown): QloraError {
  if (error instanceof QloraError) return error;
  const ce = ConnectError.from(error);
  const code = FROM_CODE[ce.code] ?? "INTERNAL";
  return new QloraError(code, ce.rawMessage, { cause: error });
}

async function* mapStreamErrors<T>(
  source: AsyncIterable<T>,
  report: InternalErrorReporter,
): AsyncGenerator<T> {
  try {
    yield* source;
  } catch (e) {
    throw toConnectError(e, report);
  }
}

/**
 * Server interceptor applying toConnectError to unary results and to errors thrown while a
 * response stream is being produced (server-streaming handlers fail mid-stream, after
 * `next()` has already returned).
 */
export function errorMappingInterceptor(
  report: InternalErrorReporter = defaultInternalErrorReporter,
): Interceptor {
  return (next) => async (req) => {
    let res;
    try {
      res = await next(req);
    } catch (e) {
      throw toConnectError(e, report);
    }
    if (!res.stream) return res;
    return { ...res, message: mapStreamErrors(res.message, report) };
  };
}
