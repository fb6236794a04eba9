import { mkdir } from "node:fs/promises";
import { FailedPrecondition } from "@qlora/core";
import { securityOptions, startServer, type ServiceRegistration } from "@qlora/rpc";
import { createStoreFromEnv } from "@qlora/store";
import { defineCommand, UsageError } from "../command.js";
import { checkJobStoreInUse, describeStores, openJobStore, resolveDevice, serverConfigFromEnv } from "../config.js";
import { writeJsonLine } from "../output.js";
import { availableServices, SERVICES } from "../services.js";

export const serve = defineCommand({
  name: "serve",
  summary: "Run the gRPC services (quantizer, trainer, inference) on one port",
  usage: "qlora serve [--services NAME,…] [--port N] [--host H] --data-dir DIR [--store local|s3] [--job-store sqlite|postgres] [--device auto|cpu|cuda] [--replica-id ID]",
  description: [
    "Starts the named services in this process on one port that speaks gRPC, gRPC-Web and Connect,",
    "over HTTP/2 without TLS (h2c, what gRPC clients use) and HTTP/1.1 (browsers, curl). Every server",
    "also answers grpc.health.v1.Health and gRPC server reflection. Artifacts (models, datasets,",
    "adapters) live in the data directory, or in S3 (QLORA_STORE=s3, QLORA_S3_*); trainer jobs in SQLite in",
    "the data directory, or in PostgreSQL (QLORA_JOB_STORE=postgres, QLORA_DATABASE_URL). Flags win over the",
    "environment (docs/integration.md, \"Server configuration\"). Stops gracefully on SIGTERM or Ctrl-C.",
    "",
    `Services: ${Object.keys(SERVICES).join(", ")} (available in this build: ${availableServices().join(", ")}).`,
  ].join("\n"),
  options: {
    services: { type: "string", value: "NAME,…", multiple: true, description: "Services to start", default: "all available" },
    port: { type: "string", short: "p", value: "N", description: "TCP port (0 picks a free one)", default: "50051" },
    host: { type: "string", value: "H", description: "Interface to bind (0.0.0.0 to expose)", default: "127.0.0.1" },
    "data-dir": { type: "string", value: "DIR", description: "Data directory: local store, caches, work files (created if missing)", default: "$QLORA_DATA_DIR" },
    store: { type: "string", value: "KIND", description: "Artifact store: local (the data dir) or s3 (QLORA_S3_*)", default: "$QLORA_STORE or local" },
    "job-store": { type: "string", value: "KIND", description: "Trainer job store: sqlite (the data dir) or postgres (QLORA_DATABASE_URL)", default: "$QLORA_JOB_STORE or sqlite" },
    device: { type: "string", value: "D", description: "auto, cpu or cuda (cuda fails unless this build and machine have it)", default: "$QLORA_DEVICE or auto" },
    "replica-id": { type: "string", value: "ID", description: "This replica's id in a shared job store", default: "$QLORA_REPLICA_ID, else the host name with postgres" },
    "decode-matmul": { type: "string", value: "M", description: "Inference decode-step NF4 matmul: exact, or int8 activations (faster, ~1% error per output)", default: "$QLORA_DECODE_MATMUL or exact" },
    embeddings: { type: "string", value: "E", description: "Inference token embeddings / lm_head: stored (as in the file) or nf4 (smaller, slightly less accurate)", default: "$QLORA_EMBEDDINGS or stored" },
    "tls-cert": { type: "string", value: "FILE", description: "PEM certificate chain: serve TLS (with --tls-key; docs/security.md)" },
    "tls-key": { type: "string", value: "FILE", description: "PEM private key of --tls-cert" },
    "tls-client-ca": { type: "string", value: "FILE", description: "PEM CA bundle: require client certificates it signed (mutual TLS)" },
    "allow-insecure": { type: "boolean", description: "Allow plaintext on a non-loopback --host (a mesh or proxy encrypts)" },
    "auth-tokens": { type: "string", value: "FILE", description: "JSON bearer tokens with permissions and quotas (docs/security.md)" },
    "audit-log": { type: "string", value: "FILE", description: "Append audit events (JSON lines) to FILE" },
    "log-level": { type: "string", value: "L", description: "JSON logs on stderr: debug, info (one line per call), warn, error", default: "info" },
    "max-adapter-rank": { type: "string", value: "N", description: "Refuse adapters (inference) and jobs (trainer) of a larger LoRA rank", default: "$QLORA_MAX_ADAPTER_RANK or 256" },
    "max-adapter-bytes": { type: "string", value: "SIZE", description: "Refuse to load adapters whose weights file is larger (e.g. 512MiB)", default: "$QLORA_MAX_ADAPTER_BYTES or 1GiB" },
  },
  async run({ args, io, json, signal }) {
    const config = serverConfigFromEnv(
      {
        host: args.string("host"),
        port: args.string("port"),
        dataDir: args.string("data-dir"),
        services: args.list("services"),
        store: args.string("store"),
        jobStore: args.string("job-store"),
        device: args.string("device"),
        replicaId: args.string("replica-id"),
        decodeMatmul: args.string("decode-matmul"),
        embeddings: args.string("embeddings"),
        maxAdapterRank: args.string("max-adapter-rank"),
        maxAdapterBytes: args.string("max-adapter-bytes"),
      },
      io.env,
      { cwd: io.cwd },
    );
    const { host, port, dataDir } = config;

    const names = config.services.length ? config.services : availableServices();
    for (const name of names) {
      const entry = SERVICES[name];
      if (!entry) throw new UsageError(`unknown service "${name}" (known: ${Object.keys(SERVICES).join(", ")})`);
      if (typeof entry !== "function") throw new FailedPrecondition(`service "${name}" is not available: ${entry.unavailable}`);
    }

    const device = await resolveDevice(config.device);
    await mkdir(dataDir, { recursive: true });
    const store = createStoreFromEnv(config.store.env, { dataDir });
    // ServeContext plus what the trainer needs from the configuration (see cli/src/config.ts).
    const ctx = {
      store,
      dataDir,
      config,
      device,
      replicaId: config.replicaId,
      decodeMatmul: config.decodeMatmul,
      embeddings: config.embeddings,
      adapterLimits: config.adapterLimits,
      openJobStore: () => openJobStore(config.jobStore),
    };
    const registrations: ServiceRegistration[] = [];
    for (const name of names) {
      const factory = SERVICES[name];
      if (typeof factory === "function") registrations.push(await factory(ctx));
    }
    checkJobStoreInUse(config, registrations);

    const security = await securityOptions({
      tlsCert: args.string("tls-cert"),
      tlsKey: args.string("tls-key"),
      tlsClientCa: args.string("tls-client-ca"),
      allowInsecure: args.bool("allow-insecure"),
      authTokens: args.string("auth-tokens"),
      auditLog: args.string("audit-log"),
      logLevel: args.string("log-level"),
    });
    const server = await startServer({ host, port, services: registrations, ...security });
    const qualified = registrations.map((r) => r.service.typeName);
    const stores = describeStores(config);
    const replicaId = config.replicaId ?? null;
    if (json) {
      writeJsonLine(io, { event: "listening", url: server.url, host: server.host, port: server.port, services: qualified, dataDir, ...stores, device, replicaId });
    } else {
      const extra = `store: ${stores.store}${stores.jobStore ? ` jobs: ${stores.jobStore}` : ""} device: ${device}${replicaId ? ` replica: ${replicaId}` : ""}`;
      io.stdout.write(`qlora serve: listening on ${server.url} (gRPC, gRPC-Web, Connect; ${server.tls ? "TLS" : "h2c"} and HTTP/1.1) services: ${names.join(", ")} data: ${dataDir} ${extra}\n`);
    }

    await new Promise<void>((resolve) => {
      if (signal.aborted) resolve();
      else signal.addEventListener("abort", () => resolve(), { once: true });
    });
    await server.close();
    await security.dispose();
    if (json) writeJsonLine(io, { event: "stopped" });
    else io.stdout.write("qlora serve: stopped\n");
    return 0;
  },
});
