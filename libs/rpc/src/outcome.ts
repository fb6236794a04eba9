/**
 * How an RPC ended, for the interceptors that record it (access log, audit log): calls `next` and
 * reports the outcome exactly once — `null` for success, else the error — when a unary response
 * is ready, or when a server stream ends (a client gone mid-stream counts as CANCELLED).
 */
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

type Next = Parameters<Interceptor>[0];
type Req = Parameters<Next>[0];
type Res = Awaited<ReturnType<Next>>;

export async function nextWithOutcome(next: Next, req: Req, onOutcome: (error: unknown) => void): Promise<Res> {
  let reported = false;
  const report = (e: unknown) => {
    if (reported) return;
    reported = true;
    onOutcome(e);
  };
  let res: Res;
  try {
    res = await next(req);
  } catch (e) {
    report(e);
    throw e;
  }
  if (!res.stream) {
    report(null);
    return res;
  }
  const out = res.message;
  return {
    ...res,
    message: (async function* () {
      let error: unknown = null;
      try {
        yield* out;
      } catch (e) {
        error = e;
        throw e;
      } finally {
        report(error ?? (req.signal.aborted ? new ConnectError("cancelled", Code.Canceled) : null));
      }
    })(),
  };
}
