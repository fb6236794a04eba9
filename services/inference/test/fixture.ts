/**
 * Shared material for the service tests: a temporary LocalStore holding the real stories260K
 * checkpoint (from ../shared/models; tests skip with a reason when it is absent), seeded random
 * PEFT adapters written with libs/formats' PEFT writer, and a running server with a Connect
 * client and a @grpc/grpc-js generic client.
 */
import { existsSync } from "node:fs";
import http from "node:http";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import { createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { writePeftAdapter, type ModelFamily } from "@qlora/formats";
import { InferenceService } from "@qlora/proto";
import { grpcServiceDefinition, startServer, type RunningServer } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { inferenceService, type InferenceServiceOptions, type InferenceServiceRegistration } from "../src/index.js";

const here = dirname(fileURLToPath(import.meta.url));
/** Repository root (this file runs from services/inference/dist/test). */
export const repoRoot = resolve(here, "../../../..");
export const storiesDir: string = process.env.QLORA_STORIES_DIR ?? resolve(repoRoot, "../shared/models/stories260K");
export const skipNoStories: string | false = existsSync(join(storiesDir, "model.safetensors"))
  ? false
  : `stories260K not found at ${storiesDir}`;
export const MODEL = "stories260K";

/** stories260K's linear shapes [out, in] by module suffix. */
export const STORIES_SHAPES: Record<string, [number, number]> = {
  "self_attn.q_proj": [64, 64],
  "self_attn.k_proj": [32, 64],
  "self_attn.v_proj": [32, 64],
  "self_attn.o_proj": [64, 64],
  "mlp.gate_proj": [172, 64],
  "mlp.up_proj": [172, 64],
  "mlp.down_proj": [64, 172],
};

/** A small deterministic PRNG (mulberry32) so adapters are reproducible from their seed. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface AdapterSpec {
  seed: number;
  rank?: number;
  alpha?: number;
  /** Module suffixes, default all seven linears ("all-linear"). */
  targets?: string[];
  layers?: number;
  base?: string | null;
  /** Overrides shapes (to build adapters for another base). */
  shapes?: Record<string, [number, number]>;
  family?: ModelFamily;
  /** Uniform range of B's entries: 0.1 changes greedy output while the text stays text-like. */
  bScale?: number;
}

export class TestStore {
  private constructor(
    readonly root: string,
    readonly store: LocalStore,
  ) {}

  static async create(): Promise<TestStore> {
    const root = await mkdtemp(join(tmpdir(), "qlora-inference-test-"));
    const store = new LocalStore(root);
    const w = await store.beginWrite("models", MODEL);
    for (const f of await readdir(storiesDir)) await w.writeFile(f, await readFile(join(storiesDir, f)));
    await w.commit();
    return new TestStore(root, store);
  }

  /** Writes a random PEFT adapter into the store and returns its name. */
  async addAdapter(name: string, spec: AdapterSpec, opts: { overwrite?: boolean } = {}): Promise<string> {
    const r = spec.rank ?? 4;
    const rand = rng(spec.seed);
    const shapes = spec.shapes ?? STORIES_SHAPES;
    const targets = spec.targets ?? Object.keys(STORIES_SHAPES);
    const bScale = spec.bScale ?? 0.1;
    const tensors = new Map<string, { a: Float32Array; b: Float32Array }>();
    for (let layer = 0; layer < (spec.layers ?? 5); layer++) {
      for (const t of targets) {
        const [out, inp] = shapes[t]!;
        const bound = 1 / Math.sqrt(inp); // PEFT's kaiming_uniform(a=√5) range for lora_A
        const a = Float32Array.from({ length: r * inp }, () => (rand() * 2 - 1) * bound);
        const b = Float32Array.from({ length: out * r }, () => (rand() * 2 - 1) * bScale);
        tensors.set(`layers.${layer}.${t}`, { a, b });
      }
    }
    const staging = await mkdtemp(join(tmpdir(), "qlora-adapter-"));
    const dir = join(staging, name);
    try {
      await writePeftAdapter(dir, {
        config: {
          r,
          loraAlpha: spec.alpha ?? 2 * r,
          targetModules: targets.map((t) => t.split(".").at(-1)!),
          baseModelNameOrPath: spec.base === undefined ? MODEL : spec.base,
        },
        family: spec.family ?? "llama",
        tensors,
      });
      const w = await this.store.beginWrite("adapters", name, { overwrite: opts.overwrite ?? false });
      for (const f of await readdir(dir)) await w.writeFile(f, await readFile(join(dir, f)));
      await w.commit({ meta: { job_id: `job-${name}` } });
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
    return name;
  }

  async adapterDir(name: string): Promise<string> {
    return this.store.localPath("adapters", name);
  }

  async modelDir(): Promise<string> {
    return this.store.localPath("models", MODEL);
  }

  async dispose(): Promise<void> {
    await rm(this.root, { recursive: true, force: true });
  }
}

export interface Running {
  server: RunningServer;
  reg: InferenceServiceRegistration;
  client: Client<typeof InferenceService>;
  close(): Promise<void>;
}

export async function startInference(
  ts: TestStore,
  options: Partial<InferenceServiceOptions> = {},
  transport: "connect" | "grpc" = "connect",
): Promise<Running> {
  const reg = inferenceService({ store: ts.store, maxBatch: 8, maxQueue: 32, threads: 1, ...options });
  const server = await startServer({ services: [reg], gracePeriodMs: 500 });
  const t =
    transport === "connect"
      ? // No keep-alive: idle sockets would hold server.close() until its grace period ends.
        createConnectTransport({ baseUrl: server.url, httpVersion: "1.1", nodeOptions: { agent: new http.Agent({ keepAlive: false }) } })
      : createGrpcTransport({ baseUrl: server.url });
  const client = createClient(InferenceService, t);
  return { server, reg, client, close: () => server.close() };
}

/** A @grpc/grpc-js client built from the service descriptor (no generated grpc-js stubs). */
export function grpcClient(address: string): grpc.Client & Record<string, (...args: unknown[]) => unknown> {
  const Ctor = grpc.makeGenericClientConstructor(grpcServiceDefinition(InferenceService) as grpc.ServiceDefinition, "InferenceService");
  return new Ctor(address, grpc.credentials.createInsecure()) as unknown as grpc.Client & Record<string, (...args: unknown[]) => unknown>;
}

/** Polls `cond` until true (or fails after `ms`). */
export async function waitFor(cond: () => boolean | Promise<boolean>, ms = 5000, what = "condition"): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
