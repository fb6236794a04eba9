/**
 * The operator's page: `GET /ui` (a static HTML+JS page, no data in it) polls `GET /ui/api/state`
 * (JSON: loaded bases and adapters, live requests, tokens/s, and trainer jobs with their loss
 * curves). With tokens configured the page asks for one (kept in the tab's sessionStorage) and
 * sends it as a bearer token; the state needs the permission "qlora.http.Operator/View".
 *
 * Trainer jobs come from qlora.v1.TrainerService: in process when the trainer is hosted by the
 * same server (ctx.transport), or from `trainerUrl`. Loss curves are the metrics events of
 * WatchJob, collected in the background for the most recent jobs.
 */
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { JobState, TrainerService, type Job } from "@qlora/proto";
import { jobResources, sendJson, visibleOnly, type HttpRoute, type Logger, type Principal, type ServerContext } from "@qlora/rpc";
import type { Catalog } from "./catalog.js";
import type { EngineObserver } from "./instrument.js";
import { UI_HTML } from "./ui-page.js";

/** Jobs whose loss curves are followed. */
const MAX_WATCHED = 20;
/** Points kept per curve (older ones are thinned to every other point). */
const MAX_POINTS = 1000;

const STATE_NAMES: Record<number, string> = {
  [JobState.QUEUED]: "queued",
  [JobState.RUNNING]: "running",
  [JobState.SUCCEEDED]: "succeeded",
  [JobState.FAILED]: "failed",
  [JobState.CANCELLED]: "cancelled",
};

interface Curve {
  points: [number, number][];
  evalPoints: [number, number][];
  ended: boolean;
}

export class TrainerView {
  private client: Client<typeof TrainerService> | null = null;
  private readonly curves = new Map<string, Curve>();
  private readonly abort = new AbortController();
  private lastError = "";

  constructor(private readonly log: Logger | null) {}

  /** Uses `transport` for TrainerService calls (null: no trainer to show). */
  connect(transport: Transport | null): void {
    this.client = transport ? createClient(TrainerService, transport) : null;
  }

  get available(): boolean {
    return this.client !== null;
  }

  stop(): void {
    this.abort.abort();
  }

  /** Starts collecting a job's loss curve; resolves when its stream ends (history replayed and done). */
  private follow(id: string): Promise<void> | undefined {
    if (this.curves.has(id) || !this.client) return undefined;
    const curve: Curve = { points: [], evalPoints: [], ended: false };
    this.curves.set(id, curve);
    const client = this.client;
    return (async () => {
      try {
        for await (const ev of client.watchJob({ id }, { signal: this.abort.signal })) {
          if (ev.event.case !== "metrics") continue;
          const m = ev.event.value;
          const push = (arr: [number, number][], p: [number, number]) => {
            const last = arr.at(-1);
            if (last && last[0] === p[0]) arr[arr.length - 1] = p;
            else arr.push(p);
            if (arr.length > MAX_POINTS) {
              const thinned = arr.filter((_, i) => i % 2 === 0 || i === arr.length - 1);
              arr.length = 0;
              arr.push(...thinned);
            }
          };
          if (Number.isFinite(m.loss)) push(curve.points, [m.step, m.loss]);
          if (m.evalLoss !== undefined && Number.isFinite(m.evalLoss)) push(curve.evalPoints, [m.step, m.evalLoss]);
        }
      } catch (e) {
        if (!this.abort.signal.aborted) this.log?.debug("ui: watching a job failed", { job: id, error: (e as Error).message });
      } finally {
        curve.ended = true;
      }
    })();
  }

  /** The recent jobs `caller` may see (all without auth), with their loss curves. */
  async jobs(caller?: Principal): Promise<unknown[] | null> {
    if (!this.client) return null;
    let list: Job[];
    try {
      list = visibleOnly(caller, (await this.client.listJobs({}, { signal: AbortSignal.timeout(3000) })).jobs, jobResources);
      this.lastError = "";
    } catch (e) {
      this.lastError = (e as Error).message;
      return null;
    }
    const ms = (t: Job["createdAt"]) => (t ? timestampMs(t) : 0);
    list.sort((a, b) => ms(b.createdAt) - ms(a.createdAt));
    const recent = list.slice(0, MAX_WATCHED);
    const keep = new Set(recent.map((j) => j.id));
    for (const id of [...this.curves.keys()]) if (!keep.has(id) && this.curves.get(id)!.ended) this.curves.delete(id);
    const started = recent.map((j) => this.follow(j.id)).filter((p): p is Promise<void> => p !== undefined);
    if (started.length) {
      // Finished jobs replay their history at once: show it in this answer already (bounded wait).
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(started), new Promise<void>((r) => (timer = setTimeout(r, 300)))]);
      clearTimeout(timer);
    }
    return recent.map((j) => {
      const m = j.lastMetrics;
      const c = this.curves.get(j.id);
      return {
        id: j.id,
        state: STATE_NAMES[j.state] ?? "unknown",
        baseModel: j.request?.baseModel ?? "",
        dataset: j.request?.dataset ?? "",
        outputAdapter: j.outputAdapter,
        createdAt: ms(j.createdAt),
        finishedAt: j.finishedAt ? ms(j.finishedAt) : null,
        error: j.error,
        step: m?.step ?? 0,
        totalSteps: m?.totalSteps ?? 0,
        loss: m ? m.loss : null,
        evalLoss: m?.evalLoss ?? null,
        tokensPerSecond: m?.tokensPerSecond ?? 0,
        losses: c?.points ?? [],
        evalLosses: c?.evalPoints ?? [],
      };
    });
  }

  get error(): string {
    return this.lastError;
  }
}

export interface UiDeps {
  catalog: Catalog;
  observer: EngineObserver;
  trainer: TrainerView;
  startedAt: number;
  ctx: () => ServerContext | null;
}

/** The trainer source: the server's own TrainerService in process, or a remote URL. */
export function trainerTransport(ctx: ServerContext, trainerUrl: string | undefined): Transport | null {
  if (trainerUrl) return createGrpcTransport({ baseUrl: trainerUrl });
  return ctx.services.includes(TrainerService.typeName) ? ctx.transport : null;
}

export function uiRoutes(deps: UiDeps): HttpRoute[] {
  const { catalog, observer, trainer } = deps;
  return [
    {
      method: "GET",
      path: "/ui/api/state",
      rpc: "qlora.http.Operator/View",
      async handler(_req, res, http) {
        const ctx = deps.ctx();
        // A token sees the models, adapters, requests and jobs it may use, as in the list RPCs.
        const caller = http.auth.principal;
        const [models, adapters] = await Promise.all([
          catalog.loadedModels().then((l) => visibleOnly(caller, l, (m) => ({ models: [m.name] }))),
          (observer.engineStarted ? catalog.residentAdapters() : Promise.resolve([])).then((l) =>
            visibleOnly(caller, l, (a) => ({ models: [a.model], adapters: [a.name] })),
          ),
        ]);
        const live = visibleOnly(caller, [...observer.live.values()], (r) => ({ models: [r.model], adapters: [r.adapter] }));
        let running = 0;
        let waiting = 0;
        for (const r of live) {
          if (r.firstTokenAt === null) waiting++;
          else running++;
        }
        const now = Date.now();
        const jobs = await trainer.jobs(caller);
        const health: Record<string, string> = {};
        if (ctx) for (const [k, v] of ctx.health.list()) health[k || "(server)"] = v === 1 ? "SERVING" : "NOT_SERVING";
        sendJson(res, 200, {
          time: now,
          uptimeS: Math.round((now - deps.startedAt) / 1000),
          services: ctx?.services ?? [],
          health,
          inference: {
            tokensPerSecond: observer.tokensPerSecond(),
            totalRequests: observer.totalRequests,
            totalTokens: observer.totalTokens,
            running,
            waiting,
            live: live.map((r) => ({
              id: r.id,
              model: r.model,
              adapter: r.adapter,
              ageMs: now - r.startedAt,
              tokens: r.tokens,
              tokensPerSecond: r.firstTokenAt && now > r.firstTokenAt ? (r.tokens - 1) / ((now - r.firstTokenAt) / 1000) : 0,
            })),
            models: models.map((m) => ({ name: m.name, quant: m.quant, residentBytes: m.residentBytes, modelType: m.modelType, maxContext: m.maxContext })),
            adapters: adapters.map((a) => ({
              name: a.name,
              model: a.model,
              quant: a.quant,
              rank: a.rank,
              residentBytes: a.residentBytes,
              refs: a.refs,
              unloading: a.unloading,
              lastUsedAt: a.lastUsedAt,
              loadMs: a.loadMs,
            })),
          },
          trainer: trainer.available ? { jobs: jobs ?? [], error: trainer.error || null } : null,
        });
      },
    },
    {
      method: "GET",
      path: "/ui",
      public: true,
      async handler(_req, res, ctx) {
        if (ctx.subpath !== "" && ctx.subpath !== "/") {
          sendJson(res, 404, { code: "not_found", message: `no such page: /ui${ctx.subpath}` });
          return;
        }
        res.writeHead(200, {
          "content-type": "text/html; charset=utf-8",
          "cache-control": "no-cache",
          "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
          "x-content-type-options": "nosniff",
          "referrer-policy": "no-referrer",
          "x-frame-options": "DENY",
        });
        res.end(UI_HTML);
      },
    },
  ];
}
