#!/usr/bin/env node
// grpc.health.v1.Health/Check over HTTP/2 cleartext with prior knowledge: the same request the
// kubelet's native gRPC probe sends, with no dependencies (hand-encoded protobuf).
// Usage: node tests/deploy/grpc-health.mjs HOST:PORT [SERVICE] [--wait SECONDS]
// Prints the status; exit 0 when SERVING, 1 otherwise (NOT_SERVING, unknown service, no answer).
import http2 from "node:http2";

const STATUS = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

export function check(authority, service = "", timeoutMs = 3000) {
  return new Promise((resolve, reject) => {
    const client = http2.connect(`http://${authority}`);
    const timer = setTimeout(() => (client.destroy(), reject(new Error("timeout"))), timeoutMs);
    client.on("error", (e) => (clearTimeout(timer), reject(e)));
    const name = Buffer.from(service, "utf8");
    // HealthCheckRequest { string service = 1; } (names are < 128 bytes: one-byte length).
    const msg = name.length ? Buffer.concat([Buffer.from([0x0a, name.length]), name]) : Buffer.alloc(0);
    const frame = Buffer.alloc(5 + msg.length);
    frame.writeUInt32BE(msg.length, 1);
    msg.copy(frame, 5);
    const req = client.request({
      ":method": "POST",
      ":path": "/grpc.health.v1.Health/Check",
      "content-type": "application/grpc",
      te: "trailers",
    });
    const chunks = [];
    let trailers = {};
    req.on("data", (c) => chunks.push(c));
    req.on("trailers", (t) => (trailers = t));
    req.on("error", (e) => (clearTimeout(timer), client.close(), reject(e)));
    req.on("end", () => {
      clearTimeout(timer);
      client.close();
      const grpcStatus = Number(trailers["grpc-status"] ?? -1);
      if (grpcStatus === 5) return resolve("SERVICE_UNKNOWN"); // NOT_FOUND: never registered
      if (grpcStatus !== 0) return reject(new Error(`grpc-status ${grpcStatus}: ${trailers["grpc-message"] ?? ""}`));
      const body = Buffer.concat(chunks).subarray(5);
      // HealthCheckResponse { ServingStatus status = 1; }: absent field = 0 (UNKNOWN).
      resolve(STATUS[body.length >= 2 && body[0] === 0x08 ? body[1] : 0] ?? "UNKNOWN");
    });
    req.end(frame);
  });
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const args = process.argv.slice(2);
  const waitAt = args.indexOf("--wait");
  const waitS = waitAt >= 0 ? Number(args.splice(waitAt, 2)[1]) : 0;
  const [authority, service = ""] = args;
  if (!authority) {
    console.error("usage: grpc-health.mjs HOST:PORT [SERVICE] [--wait SECONDS]");
    process.exit(2);
  }
  const deadline = Date.now() + waitS * 1000;
  for (;;) {
    let result;
    try {
      result = await check(authority, service);
    } catch (e) {
      result = `error: ${e.message}`;
    }
    if (result === "SERVING" || Date.now() >= deadline) {
      console.log(`${service || "(server)"}: ${result}`);
      process.exit(result === "SERVING" ? 0 : 1);
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}
