/**
 * grpc.health.v1.Health: one serving status per fully-qualified service name, plus "" for the
 * server as a whole (what Kubernetes' gRPC probe and grpc_health_probe ask by default).
 *
 * Services flip their own entry through the HealthRegistry, e.g. NOT_SERVING while a model
 * loads; Watch streams see every change.
 */
import type { ServiceImpl } from "@connectrpc/connect";
import { NotFound } from "@qlora/core";
import { health } from "@qlora/proto";

export const ServingStatus = health.HealthCheckResponse_ServingStatus;
export type ServingStatus = health.HealthCheckResponse_ServingStatus;

/** Accepts the enum or its name, so callers need not import the generated enum. */
export type ServingStatusLike = ServingStatus | "SERVING" | "NOT_SERVING";

function toStatus(s: ServingStatusLike): ServingStatus {
  if (s === "SERVING") return ServingStatus.SERVING;
  if (s === "NOT_SERVING") return ServingStatus.NOT_SERVING;
  return s;
}

type Listener = () => void;

export class HealthRegistry {
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly listeners = new Set<Listener>();
  private shutDown = false;

  constructor() {
    this.statuses.set("", ServingStatus.SERVING);
  }

  /** Sets the status of `service` ("" is the whole server). Ignored after shutdown(). */
  set(service: string, status: ServingStatusLike): void {
    if (this.shutDown) return;
    const s = toStatus(status);
    if (this.statuses.get(service) === s) return;
    this.statuses.set(service, s);
    this.notify();
  }

  /** The status of `service`, or undefined when it was never registered. */
  get(service: string): ServingStatus | undefined {
    return this.statuses.get(service);
  }

  has(service: string): boolean {
    return this.statuses.has(service);
  }

  /** All registered services and their statuses. */
  list(): Map<string, ServingStatus> {
    return new Map(this.statuses);
  }

  get isShutDown(): boolean {
    return this.shutDown;
  }

  /**
   * Marks every service NOT_SERVING and freezes the registry, as a server does while it drains:
   * load balancers stop sending new work, and Watch streams end after reporting the change.
   */
  shutdown(): void {
    if (this.shutDown) return;
    for (const k of this.statuses.keys()) this.statuses.set(k, ServingStatus.NOT_SERVING);
    this.shutDown = true;
    this.notify();
  }

  /**
   * Status updates of one service: the current status first (SERVICE_UNKNOWN when it is not
   * registered), then each change. Intermediate changes between two reads are coalesced, as the
   * health protocol allows. Ends when `signal` aborts or after shutdown() was reported.
   */
  async *watch(service: string, signal: AbortSignal): AsyncGenerator<ServingStatus> {
    let wake: (() => void) | undefined;
    const listener = () => wake?.();
    const onAbort = () => wake?.();
    this.listeners.add(listener);
    signal.addEventListener("abort", onAbort);
    try {
      let last: ServingStatus | undefined;
      for (;;) {
        if (signal.aborted) return;
        const current = this.statuses.get(service) ?? ServingStatus.SERVICE_UNKNOWN;
        if (current !== last) {
          last = current;
          yield current;
          continue;
        }
        if (this.shutDown) return;
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
        wake = undefined;
      }
    } finally {
      this.listeners.delete(listener);
      signal.removeEventListener("abort", onAbort);
    }
  }

  private notify(): void {
    for (const l of [...this.listeners]) l();
  }
}

/** Handlers of grpc.health.v1.Health over a registry. */
export function healthImpl(registry: HealthRegistry): ServiceImpl<typeof health.Health> {
  return {
    check(req) {
      const status = registry.get(req.service);
      // The protocol asks for NOT_FOUND on Check of an unknown service (Watch reports SERVICE_UNKNOWN).
      if (status === undefined) throw new NotFound(`unknown service: "${req.service}"`);
      return { status };
    },
    list() {
      const statuses: Record<string, { status: ServingStatus }> = {};
      for (const [name, status] of registry.list()) statuses[name] = { status };
      return { statuses };
    },
    async *watch(req, ctx) {
      for await (const status of registry.watch(req.service, ctx.signal)) yield { status };
    },
  };
}
