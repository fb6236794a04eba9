/**
 * The operator page /ui rendered by headless Chromium against a live server: loaded base,
 * resident adapters, request and tokens/s figures, and trainer jobs with loss curves (a
 * TrainerService hosted by the same server, as `qlora serve` does; here a stand-in that follows
 * the proto contract). Skipped when Chromium is not installed (`apt-get install -y chromium`).
 * The screenshot is kept at $QLORA_UI_SCREENSHOT (default: the test's temp dir) for a human look.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { InferenceService, JobState, TrainerService } from "@qlora/proto";
import { defineService, jsonLogger, startServer, type RunningServer } from "@qlora/rpc";
import { inferenceService } from "../src/index.js";
import { UI_HTML } from "../src/http/ui-page.js";
import { MODEL, TestStore, skipNoStories } from "./fixture.js";

function findChromium(): string | null {
  for (const c of ["chromium", "chromium-browser", "google-chrome"]) {
    try {
      execFileSync("which", [c], { stdio: "ignore" });
      return c;
    } catch {
      // next
    }
  }
  return null;
}
const chromium = findChromium();
const skip = skipNoStories || (chromium ? false : "chromium is not installed");

const now = Date.now();
const lossAt = (step: number) => 4 * Math.exp(-step / 15) + 1;
const JOBS = [
  { id: "job-ui-done", state: JobState.SUCCEEDED, steps: 40, total: 40, base: MODEL, adapter: "ad-trained", created: now - 60_000 },
  { id: "job-ui-running", state: JobState.RUNNING, steps: 12, total: 50, base: MODEL, adapter: "ad-next", created: now - 10_000 },
];

/** A TrainerService stand-in: ListJobs and WatchJob (history, then open while "running"). */
const fakeTrainer = defineService(TrainerService, {
  listJobs: () => ({
    jobs: JOBS.map((j) => ({
      id: j.id,
      state: j.state,
      request: { baseModel: j.base, dataset: "tiny-stories" },
      createdAt: timestampFromMs(j.created),
      outputAdapter: j.adapter,
      lastMetrics: { step: j.steps, totalSteps: j.total, loss: lossAt(j.steps), tokensPerSecond: 812, learningRate: 2e-4 },
    })),
  }),
  async *watchJob(req, ctx) {
    const j = JOBS.find((x) => x.id === req.id)!;
    for (let s = 1; s <= j.steps; s++) {
      yield { time: timestampFromMs(j.created + s * 100), event: { case: "metrics", value: { step: s, totalSteps: j.total, loss: lossAt(s), tokensPerSecond: 800, ...(s % 10 === 0 ? { evalLoss: lossAt(s) + 0.2 } : {}) } } };
    }
    if (j.state === JobState.RUNNING) {
      await new Promise<void>((resolve) => ctx.signal.addEventListener("abort", () => resolve(), { once: true }));
    }
  },
});

let ts: TestStore;
let server: RunningServer;
let work: string;

before(async () => {
  if (skip) return;
  ts = await TestStore.create();
  await ts.addAdapter("ad1", { seed: 11 });
  await ts.addAdapter("ad2", { seed: 12 });
  work = await mkdtemp(join(tmpdir(), "qlora-ui-"));
  server = await startServer({
    services: [inferenceService({ store: ts.store, threads: 1 }), fakeTrainer],
    gracePeriodMs: 300,
    log: jsonLogger({ level: "error" }),
  });
});

after(async () => {
  if (skip) return;
  await server.close();
  await ts.dispose();
  if (!process.env.QLORA_UI_SCREENSHOT) await rm(work, { recursive: true, force: true });
});

test("the page is self-contained and its script parses", () => {
  const script = /<script>([\s\S]*)<\/script>/.exec(UI_HTML)?.[1];
  assert.ok(script && script.length > 1000);
  assert.doesNotThrow(() => new Function(script), "the inline script is valid JavaScript");
  assert.doesNotMatch(UI_HTML, /<script[^>]+src=|<link[^>]+href=|https?:\/\/(?!www\.w3\.org\/2000\/svg")/, "no external resources (the CSP allows none)");
});

function runChromium(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      chromium!,
      ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", `--user-data-dir=${join(work, "profile")}`, ...args],
      { timeout: 60_000, maxBuffer: 16 << 20 },
      (err, stdout) => (err ? reject(err) : resolve(stdout)),
    );
  });
}

test("the page renders live figures, models, adapters and loss curves in headless Chromium", { skip, timeout: 90_000 }, async () => {
  const client = createClient(InferenceService, createConnectTransport({ baseUrl: server.url, httpVersion: "2" }));
  for (const adapter of ["", "ad1", "ad2", "ad1"]) await client.generate({ model: MODEL, adapter, prompt: "Once upon a time", maxNewTokens: 24 });
  // Keep generating while the browser looks, so the live figures have something to show.
  let stop = false;
  const load = (async () => {
    let i = 0;
    while (!stop) {
      for await (const _ of client.generateStream({ model: MODEL, adapter: i++ % 2 ? "ad1" : "", prompt: "The little dog", maxNewTokens: 200 })) void _;
    }
  })();
  try {
    // The state endpoint itself: what the page renders.
    const state = (await (await fetch(`${server.url}/ui/api/state`)).json()) as {
      inference: { tokensPerSecond: number; totalRequests: number; models: { name: string }[]; adapters: { name: string }[] };
      trainer: { jobs: { id: string; losses: [number, number][] }[] } | null;
    };
    assert.ok(state.inference.totalRequests >= 4);
    assert.deepEqual(state.inference.models.map((m) => m.name), [MODEL]);
    assert.deepEqual(state.inference.adapters.map((a) => a.name).sort(), ["ad1", "ad2"]);
    assert.deepEqual(state.trainer?.jobs.map((j) => j.id).sort(), ["job-ui-done", "job-ui-running"]);

    const url = `${server.url}/ui`;
    const dom = await runChromium(["--virtual-time-budget=4000", "--dump-dom", url]);
    const text = (id: string) => new RegExp(`id="${id}"[^>]*>([^<]*)<`).exec(dom)?.[1];
    assert.match(text("status") ?? "", /^live · /, "the page fetched the state");
    assert.ok(Number(text("tps")) > 0, `tokens/s on the page: ${text("tps")}`);
    assert.ok(Number(text("requests")) >= 4, `requests on the page: ${text("requests")}`);
    assert.match(dom, new RegExp(`<td>${MODEL}</td><td>nf4</td>`));
    assert.match(dom, /<td>ad1<\/td>/);
    assert.match(dom, /<td>ad2<\/td>/);
    assert.match(dom, /job-ui-done<\/strong><span class="state-succeeded">succeeded<\/span>/);
    assert.match(dom, /job-ui-running<\/strong><span class="state-running">running<\/span>/);
    const curves = [...dom.matchAll(/<polyline class="loss" points="([^"]+)"/g)].map((m) => m[1]!.split(" ").length);
    assert.deepEqual(curves.sort((a, b) => a - b), [12, 40], "one loss curve per job, one point per logged step");
    assert.match(dom, /<polyline class="eval" points="/);

    const shot = process.env.QLORA_UI_SCREENSHOT ?? join(work, "ui.png");
    await runChromium(["--virtual-time-budget=4000", "--window-size=1400,1000", "--hide-scrollbars", `--screenshot=${shot}`, url]);
    assert.ok((await stat(shot)).size > 20_000, "a real screenshot was written");
  } finally {
    stop = true;
    await load;
  }
});
