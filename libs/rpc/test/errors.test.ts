import { test } from "node:test";
import assert from "node:assert/strict";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  AlreadyExists,
  Cancelled,
  FailedPrecondition,
  InvalidArgument,
  NotFound,
  QloraError,
  ResourceExhausted,
  type ErrorCode,
} from "@qlora/core";
import { fromConnectError, toConnectError } from "../src/index.js";

test("each QloraError maps to its gRPC code and keeps its message", () => {
  const cases: [QloraError, Code][] = [
    [new InvalidArgument("bad"), Code.InvalidArgument],
    [new NotFound("bad"), Code.NotFound],
    [new AlreadyExists("bad"), Code.AlreadyExists],
    [new FailedPrecondition("bad"), Code.FailedPrecondition],
    [new ResourceExhausted("bad"), Code.ResourceExhausted],
    [new Cancelled("bad"), Code.Canceled],
    [new QloraError("PERMISSION_DENIED", "bad"), Code.PermissionDenied],
    [new QloraError("UNAUTHENTICATED", "bad"), Code.Unauthenticated],
    [new QloraError("DEADLINE_EXCEEDED", "bad"), Code.DeadlineExceeded],
    [new QloraError("UNAVAILABLE", "bad"), Code.Unavailable],
    [new QloraError("INTERNAL", "bad"), Code.Internal],
  ];
  for (const [err, code] of cases) {
    const ce = toConnectError(err, () => assert.fail("typed errors are not reported as internal"));
    assert.equal(ce.code, code, err.code);
    assert.equal(ce.rawMessage, "bad");
    assert.equal(ce.cause, err);
  }
});

test("unknown errors become INTERNAL with a reference and nothing of the original message", () => {
  const reports: [unknown, string][] = [];
  const original = new TypeError("cannot read x of undefined at /srv/secret/path.js");
  const ce = toConnectError(original, (e, ref) => reports.push([e, ref]));
  assert.equal(ce.code, Code.Internal);
  assert.equal(reports.length, 1);
  assert.equal(reports[0]![0], original);
  assert.equal(ce.rawMessage, `internal error (ref ${reports[0]![1]})`);
  assert.doesNotMatch(ce.message, /secret|undefined/);
  // Non-Error values too.
  assert.equal(toConnectError("a string", () => {}).code, Code.Internal);
});

test("ConnectErrors pass through; AbortErrors become CANCELLED", () => {
  const ce = new ConnectError("x", Code.Unimplemented);
  assert.equal(toConnectError(ce), ce);
  const ctrl = new AbortController();
  ctrl.abort();
  let abortError: unknown;
  try {
    ctrl.signal.throwIfAborted();
  } catch (e) {
    abortError = e;
  }
  assert.equal(toConnectError(abortError, () => assert.fail()).code, Code.Canceled);
});

test("fromConnectError turns a remote status back into the typed error code", () => {
  const codes: ErrorCode[] = ["INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "CANCELLED"];
  for (const code of codes) {
    const back = fromConnectError(toConnectError(new QloraError(code, "why")));
    assert.equal(back.code, code);
    assert.equal(back.message, "why");
  }
  assert.equal(fromConnectError(new ConnectError("x", Code.DataLoss)).code, "INTERNAL");
  assert.equal(fromConnectError(new Error("net down")).code, "INTERNAL");
});
