/**
 * Errors of the coded-error bindings (csrc/napi/coded_args.h: the engine and training) carry a status
 * `code`; the TS wrappers map them once, here, to the @qlora/core error classes. Internal: not
 * exported from the package index.
 */
import { FailedPrecondition, InvalidArgument, NotFound, QloraError, ResourceExhausted } from "@qlora/core";

/** Rethrows a native error as its @qlora/core class (by `code`); anything else unchanged. */
export function rethrowNative(e: unknown): never {
  if (e instanceof QloraError || !(e instanceof Error)) throw e;
  const code = (e as Error & { code?: string }).code;
  switch (code) {
    case "INVALID_ARGUMENT":
      throw new InvalidArgument(e.message, { cause: e });
    case "NOT_FOUND":
      throw new NotFound(e.message, { cause: e });
    case "RESOURCE_EXHAUSTED":
      throw new ResourceExhausted(e.message, { cause: e });
    case "FAILED_PRECONDITION":
      throw new FailedPrecondition(e.message, { cause: e });
    default:
      throw e;
  }
}
