/**
 * The services `qlora serve` can host, by name: ONE table. A service package exports a
 * function returning a ServiceRegistration; adding it here is one line. Entries that are not
 * implemented yet say why, so `--services trainer` fails with a clear message instead of an
 * unknown-name error.
 */
import type { ServiceRegistration } from "@qlora/rpc";
import type { ArtifactStore } from "@qlora/store";
import type { JobStore } from "@qlora/trainer";

export interface ServeContext {
  store: ArtifactStore;
  /** Absolute data directory (the store's root). */
  dataDir: string;
  /** The trainer's replica identity (PostgreSQL job store); undefined: its own per-data-dir id. */
  replicaId?: string | undefined;
  /** The configured job store (PostgreSQL); undefined: the trainer's embedded SQLite. */
  openJobStore?: () => Promise<JobStore | undefined>;
  /** --device as resolved (inference loads its bases there); undefined: cpu. */
  device?: "cpu" | "cuda";
  /** --device as asked (the services use the resolved `device`). */
  config?: { device: "auto" | "cpu" | "cuda" };
  /** --decode-matmul: the inference service's decode-step NF4 matmul (undefined: exact). */
  decodeMatmul?: "exact" | "int8" | undefined;
  /** --embeddings: the inference service's token embeddings / lm_head (undefined: as stored). */
  embeddings?: "stored" | "nf4" | undefined;
  /** --max-adapter-rank / --max-adapter-bytes (undefined: the services' defaults). */
  adapterLimits?: { maxRank?: number | undefined; maxBytes?: number | undefined };
}

export type ServiceFactory = (ctx: ServeContext) => ServiceRegistration | Promise<ServiceRegistration>;

export const SERVICES: Record<string, ServiceFactory | { unavailable: string }> = {
  // Imported on demand: service packages load native code that other commands do not need.
  quantizer: async ({ store }) => (await import("@qlora/quantizer")).quantizerService(store),
  trainer: async ({ store, dataDir, replicaId, openJobStore, adapterLimits, device }) => {
    // Jobs train on the server's resolved device (a job may still ask for DEVICE_CPU).
    const { trainerService } = await import("@qlora/trainer");
    const jobStore = await openJobStore?.();
    const maxLoraRank = adapterLimits?.maxRank;
    return trainerService({
      store,
      dataDir,
      device: device ?? "cpu",
      ...(jobStore ? { jobStore } : {}),
      ...(replicaId ? { replicaId } : {}),
      ...(maxLoraRank ? { maxLoraRank } : {}),
    });
  },
  inference: async ({ store, device, adapterLimits, decodeMatmul, embeddings }) =>
    (await import("@qlora/inference")).inferenceService({
      store,
      device: device ?? "cpu",
      ...(decodeMatmul ? { decodeMatmul } : {}),
      ...(embeddings ? { embeddings } : {}),
      ...(adapterLimits?.maxRank ? { maxAdapterRank: adapterLimits.maxRank } : {}),
      ...(adapterLimits?.maxBytes ? { maxAdapterBytes: adapterLimits.maxBytes } : {}),
    }),
};

export function availableServices(): string[] {
  return Object.entries(SERVICES)
    .filter(([, f]) => typeof f === "function")
    .map(([name]) => name);
}
