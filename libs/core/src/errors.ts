/**
 * Typed errors: libraries throw these, and each edge maps them once — the RPC layer to
 * gRPC status codes (libs/rpc), the CLI to one line and an exit code.
 */
export type ErrorCode =
  | "INVALID_ARGUMENT"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "FAILED_PRECONDITION"
  | "RESOURCE_EXHAUSTED"
  | "PERMISSION_DENIED"
  | "UNAUTHENTICATED"
  | "CANCELLED"
  | "DEADLINE_EXCEEDED"
  | "UNAVAILABLE"
  | "INTERNAL";

export class QloraError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = new.target.name;
  }
}

export class InvalidArgument extends QloraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("INVALID_ARGUMENT", message, options);
  }
}

export class NotFound extends QloraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("NOT_FOUND", message, options);
  }
}

export class AlreadyExists extends QloraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("ALREADY_EXISTS", message, options);
  }
}

export class FailedPrecondition extends QloraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("FAILED_PRECONDITION", message, options);
  }
}

export class ResourceExhausted extends QloraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("RESOURCE_EXHAUSTED", message, options);
  }
}

export class Cancelled extends QloraError {
  constructor(message = "cancelled", options?: { cause?: unknown }) {
    super("CANCELLED", message, options);
  }
}

export function isQloraError(e: unknown): e is QloraError {
  return e instanceof QloraError;
}

/** The message of any thrown value. */
export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
