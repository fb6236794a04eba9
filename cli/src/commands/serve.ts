import { mkdir } from "node:fs/promises";
import path from "node:path";
import { FailedPrecondition } from "@qlora/core";
import { startServer, type ServiceRegistration } from "@qlora/rpc";
import { LocalStore } from "@qlora/store";
import { defineCommand, UsageError } from "../command.js";
import { writeJsonLine } from "../output.js";
import { availableServices, SERVICES } from "../services.js";

export const serve = defineCommand({
  name: "serve",
  summary: "Run the gRPC services (quantizer, trainer, inference) on one port",
  usage: "qlora serve [--services NAME,…] [--port N] [--host H] --data-dir DIR",
  description: [
    "Starts the named services in this process on one port that speaks gRPC, gRPC-Web and Connect,",
    "over HTTP/2 without TLS (h2c, what gRPC clients use) and HTTP/1.1 (browsers, curl). Every server",
    "also answers grpc.health.v1.Health and gRPC server reflection. Artifacts (models, datasets,",
    "adapters) live in the data directory. Stops gracefully on SIGTERM or Ctrl-C.",
    "",
    `Services: ${Object.keys(SERVICES).join(", ")} (available in this build: ${availableServices().join(", ")}).`,
  ].join("\n"),
  options: {
    services: { type: "string", value: "NAME,…", multiple: true, description: "Services to start", default: "all available" },
    port: { type: "string", short: "p", value: "N", description: "TCP port (0 picks a free one)", default: "50051" },
    host: { type: "string", value: "H", description: "Interface to bind (0.0.0.0 to expose)", default: "127.0.0.1" },
    "data-dir": { type: "string", value: "DIR", description: "Artifact store directory (created if missing)", default: "$QLORA_DATA_DIR" },
  },
  async run({ args, io, json, signal }) {
    const port = args.int("port", { min: 0, max: 65535 }) ?? 50051;
    const host = args.string("host") ?? "127.0.0.1";
    const dataDirArg = args.string("data-dir") ?? io.env.QLORA_DATA_DIR;
    if (!dataDirArg) throw new UsageError("--data-dir is required (or set QLORA_DATA_DIR)");
    const dataDir = path.resolve(io.cwd, dataDirArg);

    const requested = args.list("services");
    const names = requested.length ? [...new Set(requested)] : availableServices();
    for (const name of names) {
      const entry = SERVICES[name];
      if (!entry) throw new UsageError(`unknown service "${name}" (known: ${Object.keys(SERVICES).join(", ")})`);
      if (typeof entry !== "function") throw new FailedPrecondition(`service "${name}" is not available: ${entry.unavailable}`);
    }

    await mkdir(dataDir, { recursive: true });
    const store = new LocalStore(dataDir);
    const registrations: ServiceRegistration[] = [];
    for (const name of names) {
      const factory = SERVICES[name];
      if (typeof factory === "function") registrations.push(await factory({ store, dataDir }));
    }

    const server = await startServer({ host, port, services: registrations });
    const qualified = registrations.map((r) => r.service.typeName);
    if (json) {
      writeJsonLine(io, { event: "listening", url: server.url, host: server.host, port: server.port, services: qualified, dataDir });
    } else {
      io.stdout.write(`qlora serve: listening on ${server.url} (gRPC, gRPC-Web, Connect; h2c and HTTP/1.1) services: ${names.join(", ")} data: ${dataDir}\n`);
    }

    await new Promise<void>((resolve) => {
      if (signal.aborted) resolve();
      else signal.addEventListener("abort", () => resolve(), { once: true });
    });
    await server.close();
    if (json) writeJsonLine(io, { event: "stopped" });
    else io.stdout.write("qlora serve: stopped\n");
    return 0;
  },
});
