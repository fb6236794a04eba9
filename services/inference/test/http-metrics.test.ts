/**
 * Prometheus /metrics of a running inference server: the text parses strictly, and the counters,
 * histograms and gauges move under a mixed load (gRPC, Connect, OpenAI HTTP; base and adapters;
 * an adapter budget small enough to force evictions).
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { parsePrometheusText, sampleValue, type PromFamily } from "@qlora/rpc";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { InferenceService } from "@qlora/proto";
import { MODEL, TestStore, skipNoStories, startInference, type Running } from "./fixture.js";

let ts: TestStore;
let svc: Running;

async function scrape(): Promise<Map<string, PromFamily>> {
  const r = await fetch(`${svc.server.url}/metrics`);
  assert.equal(r.status, 200);
  assert.match(r.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  return parsePrometheusText(await r.text());
}

/** Sum of a sample over every label set matching `labels`. */
function sum(f: Map<string, PromFamily>, name: string, labels: Record<string, string> = {}): number {
  let total = 0;
  for (const fam of f.values()) {
    for (const s of fam.samples) if (s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)) total += s.value;
  }
  return total;
}

before(async () => {
  if (skipNoStories) return;
  ts = await TestStore.create();
  for (let i = 1; i <= 3; i++) await ts.addAdapter(`ad${i}`, { seed: 10 + i });
  // Measure one adapter, then serve with a budget that holds just one of them.
  const probe = await startInference(ts);
  const size = Number((await probe.client.loadAdapter({ name: "ad1", model: MODEL })).adapter!.residentBytes);
  await probe.close();
  assert.ok(size > 0);
  svc = await startInference(ts, { adapterBudgetBytes: Math.floor(size * 1.5) });
});

after(async () => {
  if (skipNoStories) return;
  await svc.close();
  await ts.dispose();
});

test("the exposition parses and counters move under load", { skip: skipNoStories }, async () => {
  const before = await scrape();
  for (const fam of [
    "qlora_rpc_requests_total",
    "qlora_rpc_request_duration_seconds",
    "qlora_inference_time_to_first_token_seconds",
    "qlora_inference_tokens_per_second",
    "qlora_inference_queue_depth",
    "qlora_inference_batch_size",
    "qlora_adapter_cache_hits_total",
    "qlora_adapter_cache_misses_total",
    "qlora_adapter_cache_evictions_total",
    "qlora_adapter_load_seconds",
    "qlora_training_jobs",
    "qlora_training_tokens_per_second",
    "qlora_training_loss",
    "process_resident_memory_bytes",
  ]) {
    assert.ok(before.has(fam), `family ${fam} is exposed`);
  }
  assert.equal(before.get("qlora_rpc_request_duration_seconds")!.type, "histogram");
  assert.ok(sampleValue(before, "process_resident_memory_bytes") > 10 * 1024 * 1024);

  // Load: sequential adapter switches (misses, evictions), then concurrent mixed requests.
  const grpc = createClient(InferenceService, createGrpcTransport({ baseUrl: svc.server.url }));
  let tokens = 0;
  for (const adapter of ["ad1", "ad2", "ad3", "ad1", "ad1"]) {
    const r = await grpc.generate({ model: MODEL, adapter, prompt: "Once upon a time", maxNewTokens: 8 });
    tokens += r.usage!.completionTokens;
  }
  const jobs: Promise<number>[] = [];
  for (let i = 0; i < 6; i++) {
    jobs.push(
      (async () => {
        let n = 0;
        // Long enough that the concurrent requests surely overlap in the running batch.
        for await (const m of svc.client.generateStream({ model: MODEL, adapter: i % 2 ? "ad1" : "", prompt: `Story ${i}`, maxNewTokens: 200 })) n += m.tokenIds.length;
        return n;
      })(),
    );
    jobs.push(
      fetch(`${svc.server.url}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: MODEL, prompt: `Tale ${i}`, max_tokens: 12, temperature: 0 }),
      }).then(async (r) => ((await r.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens),
    );
  }
  for (const n of await Promise.all(jobs)) tokens += n;
  await assert.rejects(grpc.generate({ model: "missing", prompt: "x" }));

  const afterLoad = await scrape();
  const d = (name: string, labels: Record<string, string> = {}) => sum(afterLoad, name, labels) - sum(before, name, labels);
  const rpc = { service: "qlora.v1.InferenceService" };
  assert.equal(d("qlora_rpc_requests_total", { ...rpc, method: "Generate", code: "ok" }), 5);
  assert.equal(d("qlora_rpc_requests_total", { ...rpc, method: "GenerateStream", code: "ok" }), 6);
  assert.equal(d("qlora_rpc_requests_total", { ...rpc, method: "Generate", code: "not_found" }), 1);
  assert.equal(d("qlora_rpc_request_duration_seconds_count", { ...rpc, method: "GenerateStream" }), 6);
  assert.equal(sum(afterLoad, "qlora_rpc_in_flight", { ...rpc, method: "GenerateStream" }), 0);
  assert.equal(d("qlora_http_requests_total", { route: "/v1/completions", status: "200" }), 6);
  // Every generation, whatever door it came through, is observed once.
  assert.equal(d("qlora_inference_requests_total", { model: MODEL }), 17);
  assert.equal(d("qlora_inference_generated_tokens_total", { model: MODEL }), tokens);
  assert.equal(d("qlora_inference_time_to_first_token_seconds_count", { model: MODEL }), 17);
  assert.ok(d("qlora_inference_time_to_first_token_seconds_sum", { model: MODEL }) > 0);
  // Decode speed needs two tokens and a measurable interval (timings are whole milliseconds).
  assert.ok(d("qlora_inference_tokens_per_second_count", { model: MODEL }) > 0);
  assert.ok(d("qlora_inference_steps_total") > 0);
  assert.ok(sampleValue(afterLoad, "qlora_inference_batch_size_max") >= 2, "concurrent requests were batched");
  assert.equal(sampleValue(afterLoad, "qlora_inference_queue_depth"), 0);
  // ad1, ad2, ad3 each loaded, ad1 again after its eviction: at least 4 misses, 2 evictions.
  assert.ok(d("qlora_adapter_cache_misses_total") >= 4, `misses ${d("qlora_adapter_cache_misses_total")}`);
  assert.ok(d("qlora_adapter_cache_evictions_total") >= 2, `evictions ${d("qlora_adapter_cache_evictions_total")}`);
  assert.ok(d("qlora_adapter_cache_hits_total") >= 1, "ad1 used twice in a row hits");
  assert.ok(d("qlora_adapter_load_seconds_count") >= 1);
  assert.ok(sampleValue(afterLoad, "qlora_adapter_resident_bytes") > 0);
  assert.ok(sampleValue(afterLoad, "qlora_model_resident_bytes", { model: MODEL, quant: "nf4" }) > 0);

  // A scrape is itself counted, and the next one moves the counter.
  const again = await scrape();
  assert.ok(sum(again, "qlora_http_requests_total", { route: "/metrics" }) > sum(afterLoad, "qlora_http_requests_total", { route: "/metrics" }));
});
