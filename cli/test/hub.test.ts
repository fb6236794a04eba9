/**
 * hf:// downloads against a local server in the hub's URL layout: the API listing, /resolve/ with
 * small files served directly (ETag = git blob sha1) and LFS files redirected to a CDN on another
 * origin (X-Linked-Etag = sha256, X-Linked-Size), Range requests, an auth-requiring mode, and
 * failure injection (a transfer cut short, corrupted bytes).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { AddressInfo } from "node:net";
import { isQloraError } from "@qlora/core";
import { defaultHubCacheDir, downloadHfModel, parseHfRef, SNAPSHOT_FILE, type HubDownloadOptions, type HubProgress } from "../src/hub/index.js";

interface RepoFile {
  path: string;
  data: Buffer;
  lfs: boolean;
}

interface LoggedRequest {
  server: "hub" | "cdn";
  path: string;
  range?: string;
  authorization?: string;
}

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");
const gitSha1 = (b: Buffer) => createHash("sha1").update(`blob ${b.length}\0`).update(b).digest("hex");

/** A fake hub + CDN pair. Everything is configurable per test through the public fields. */
class FakeHub {
  readonly repos = new Map<string, { sha: string; files: RepoFile[] }>();
  /** Repository renamed: requests for the key are redirected (relative Location) to the value. */
  readonly renamed = new Map<string, string>();
  readonly log: LoggedRequest[] = [];
  /** When set, the API and /resolve/ answer 401 without `Authorization: Bearer <token>`. */
  token: string | undefined;
  /** The listing carries sizes, blobId and lfs.sha256 (the real hub with ?blobs=true); off: names only. */
  listBlobs = true;
  /** Cut the next transfer of this file after this many bytes (connection destroyed). */
  cut: { path: string; afterBytes: number; times: number } | undefined;
  /** Answer Range requests with the whole file (200), as some servers and proxies do. */
  ignoreRange = false;
  /** Serve these bytes instead of the real ones (same length), keeping the advertised checksums. */
  readonly tampered = new Map<string, Buffer>();
  hub!: Server;
  cdn!: Server;
  hubUrl = "";
  cdnUrl = "";

  async start(): Promise<void> {
    this.hub = createServer((req, res) => void this.onHub(req, res));
    this.cdn = createServer((req, res) => this.onCdn(req, res));
    for (const s of [this.hub, this.cdn]) await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
    this.hubUrl = `http://127.0.0.1:${(this.hub.address() as AddressInfo).port}`;
    this.cdnUrl = `http://127.0.0.1:${(this.cdn.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    for (const s of [this.hub, this.cdn]) {
      s.closeAllConnections();
      await new Promise<void>((r) => s.close(() => r()));
    }
  }

  addRepo(repo: string, files: RepoFile[]): string {
    const sha = createHash("sha1").update(repo + files.map((f) => sha256(f.data)).join()).digest("hex");
    this.repos.set(repo, { sha, files });
    return sha;
  }

  private logReq(server: "hub" | "cdn", req: IncomingMessage): void {
    this.log.push({
      server,
      path: req.url ?? "",
      ...(req.headers.range ? { range: req.headers.range } : {}),
      ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}),
    });
  }

  private findFile(sha: string): RepoFile | undefined {
    for (const r of this.repos.values()) for (const f of r.files) if (sha256(f.data) === sha) return f;
    return undefined;
  }

  private async onHub(req: IncomingMessage, res: ServerResponse): Promise<void> {
    this.logReq("hub", req);
    const url = new URL(req.url ?? "/", this.hubUrl);
    const api = /^\/api\/models\/([^/]+\/[^/]+)\/revision\/([^/]+)$/.exec(url.pathname);
    const resolve = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    const repoName = api?.[1] ?? resolve?.[1];
    if (repoName && this.renamed.has(repoName)) {
      res.writeHead(307, { location: url.pathname.replace(repoName, this.renamed.get(repoName)!) + url.search });
      return void res.end();
    }
    if (this.token && req.headers.authorization !== `Bearer ${this.token}`) {
      res.writeHead(401, { "content-type": "application/json", "x-error-code": "GatedRepo" });
      return void res.end(JSON.stringify({ error: "Access to this model is restricted. You must be authenticated." }));
    }
    const repo = repoName ? this.repos.get(repoName) : undefined;
    if (!repo) {
      res.writeHead(404, { "content-type": "application/json", "x-error-code": "RepoNotFound" });
      return void res.end(JSON.stringify({ error: "Repository not found" }));
    }
    const rev = decodeURIComponent((api ?? resolve)![2]!);
    if (rev !== "main" && rev !== repo.sha) {
      res.writeHead(404, { "content-type": "application/json", "x-error-code": "RevisionNotFound" });
      return void res.end(JSON.stringify({ error: `Invalid rev id: ${rev}` }));
    }
    if (api) {
      const siblings = repo.files.map((f) =>
        this.listBlobs
          ? {
              rfilename: f.path,
              size: f.data.length,
              blobId: f.lfs ? "0".repeat(40) : gitSha1(f.data),
              ...(f.lfs ? { lfs: { sha256: sha256(f.data), size: f.data.length, pointerSize: 134 } } : {}),
            }
          : { rfilename: f.path },
      );
      res.writeHead(200, { "content-type": "application/json" });
      return void res.end(JSON.stringify({ id: repoName, sha: repo.sha, siblings }));
    }
    const file = repo.files.find((f) => f.path === decodeURIComponent(resolve![3]!));
    if (!file) {
      res.writeHead(404, { "x-error-code": "EntryNotFound" });
      return void res.end();
    }
    if (file.lfs) {
      res.writeHead(302, {
        location: `${this.cdnUrl}/lfs/${sha256(file.data)}?X-Amz-Signature=abc`,
        "x-linked-etag": `"${sha256(file.data)}"`,
        "x-linked-size": String(file.data.length),
        etag: `W/"${gitSha1(Buffer.from("pointer"))}"`,
      });
      return void res.end();
    }
    this.serveBytes(req, res, file, { etag: `"${gitSha1(file.data)}"` });
  }

  private onCdn(req: IncomingMessage, res: ServerResponse): void {
    this.logReq("cdn", req);
    const m = /^\/lfs\/([0-9a-f]{64})/.exec(req.url ?? "");
    const file = m ? this.findFile(m[1]!) : undefined;
    if (!file) {
      res.writeHead(404);
      return void res.end();
    }
    // A CDN's own ETag (an md5) must not be taken for the checksum.
    this.serveBytes(req, res, file, { etag: `"${createHash("md5").update(file.data).digest("hex")}"` });
  }

  private serveBytes(req: IncomingMessage, res: ServerResponse, file: RepoFile, headers: Record<string, string>): void {
    const data = this.tampered.get(file.path) ?? file.data;
    let start = 0;
    const range = this.ignoreRange ? null : /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    if (range) {
      start = Number(range[1]);
      if (start >= data.length) {
        res.writeHead(416, { "content-range": `bytes */${data.length}` });
        return void res.end();
      }
      res.writeHead(206, { ...headers, "content-length": String(data.length - start), "content-range": `bytes ${start}-${data.length - 1}/${data.length}` });
    } else {
      res.writeHead(200, { ...headers, "content-length": String(data.length) });
    }
    const body = data.subarray(start);
    if (this.cut && this.cut.path === file.path && this.cut.times > 0) {
      this.cut.times--;
      res.write(body.subarray(0, this.cut.afterBytes), () => setTimeout(() => res.socket?.destroy(), 20));
      return;
    }
    res.end(body);
  }
}

/** A small "checkpoint": config + tokenizer as plain files, two weight shards + index as LFS files, and things to skip. */
function sampleRepo(): RepoFile[] {
  const index = { metadata: { total_size: 3 }, weight_map: { "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors" } };
  return [
    { path: ".gitattributes", data: Buffer.from("*.safetensors filter=lfs\n"), lfs: false },
    { path: "README.md", data: Buffer.from("# a model\n"), lfs: false },
    { path: "config.json", data: Buffer.from(JSON.stringify({ model_type: "llama" })), lfs: false },
    { path: "generation_config.json", data: Buffer.from("{}"), lfs: false },
    { path: "tokenizer.json", data: Buffer.from(JSON.stringify({ version: "1.0", pad: "x".repeat(5000) })), lfs: false },
    { path: "tokenizer_config.json", data: Buffer.from("{}"), lfs: false },
    { path: "model.safetensors.index.json", data: Buffer.from(JSON.stringify(index)), lfs: false },
    { path: "model-00001-of-00002.safetensors", data: randomBytes(1_500_000), lfs: true },
    { path: "model-00002-of-00002.safetensors", data: randomBytes(700_000), lfs: true },
    { path: "pytorch_model.bin", data: randomBytes(1000), lfs: true },
    { path: "onnx/model.safetensors", data: randomBytes(1000), lfs: true },
  ];
}

const EXPECTED_FILES = [
  "config.json",
  "generation_config.json",
  "model-00001-of-00002.safetensors",
  "model-00002-of-00002.safetensors",
  "model.safetensors.index.json",
  "tokenizer.json",
  "tokenizer_config.json",
];

async function withHub(f: (hub: FakeHub, cacheDir: string) => Promise<void>): Promise<void> {
  const hub = new FakeHub();
  await hub.start();
  const cacheDir = mkdtempSync(join(tmpdir(), "qlora-hub-"));
  try {
    await f(hub, cacheDir);
  } finally {
    await hub.stop();
    rmSync(cacheDir, { recursive: true, force: true });
  }
}

function opts(hub: FakeHub, cacheDir: string, extra: Partial<HubDownloadOptions> = {}): HubDownloadOptions {
  return { cacheDir, env: { HF_ENDPOINT: hub.hubUrl }, retryDelayMs: 10, ...extra };
}

function listFilesIn(dir: string): string[] {
  return readdirSync(dir).filter((n) => n !== SNAPSHOT_FILE).sort();
}

async function rejectsWith(p: Promise<unknown>, code: string, pattern: RegExp): Promise<Error> {
  try {
    await p;
  } catch (e) {
    assert.ok(isQloraError(e), `expected a typed error, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, pattern);
    return e;
  }
  assert.fail(`expected ${code}`);
}

test("hf:// references parse, and malformed ones are refused", () => {
  assert.deepEqual(parseHfRef("hf://HuggingFaceTB/SmolLM2-135M"), { repo: "HuggingFaceTB/SmolLM2-135M", revision: "main" });
  assert.deepEqual(parseHfRef("hf://org/name@refs/pr/3"), { repo: "org/name", revision: "refs/pr/3" });
  assert.deepEqual(parseHfRef("hf://org/name@0123456789abcdef0123456789abcdef01234567").revision, "0123456789abcdef0123456789abcdef01234567");
  for (const bad of ["hf://name", "hf://a/b/c", "hf://../x", "hf://org/..", "hf://org/na me", "hf://org/name@", "hf://org/name@a b", "hf://org/--x", "org/name"]) {
    assert.throws(() => parseHfRef(bad), /malformed|not a hub reference/, bad);
  }
  assert.equal(defaultHubCacheDir({ QLORA_CACHE_DIR: "/c" }), "/c/hub");
  assert.equal(defaultHubCacheDir({ XDG_CACHE_HOME: "/x" }), "/x/qlora/hub");
});

test("downloads only what the runtime reads, verified, into a snapshot; the second time from the cache", async () => {
  await withHub(async (hub, cacheDir) => {
    const files = sampleRepo();
    const sha = hub.addRepo("org/tiny", files);
    const progress: HubProgress[] = [];
    const snap = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir, { onProgress: (p) => progress.push(p) }));
    assert.equal(snap.commit, sha);
    assert.equal(snap.fromCache, false);
    assert.equal(snap.dir, join(cacheDir, "models--org--tiny", "snapshots", sha));
    assert.deepEqual(listFilesIn(snap.dir), EXPECTED_FILES);
    for (const name of EXPECTED_FILES) {
      assert.deepEqual(readFileSync(join(snap.dir, name)), files.find((f) => f.path === name)!.data, name);
    }
    // The big files were checked by sha256, the small ones by git blob sha1.
    const shard = snap.files.find((f) => f.path === "model-00001-of-00002.safetensors")!;
    assert.equal(shard.sha256, sha256(files[7]!.data));
    assert.equal(snap.files.find((f) => f.path === "config.json")!.gitSha1, gitSha1(files[2]!.data));
    // Progress ends at the total of the selected files.
    const last = progress.at(-1)!;
    const total = EXPECTED_FILES.reduce((a, n) => a + files.find((f) => f.path === n)!.data.length, 0);
    assert.deepEqual([last.filesDone, last.filesTotal, last.bytesDone, last.bytesTotal], [7, 7, total, total]);
    assert.ok(progress.length > 7, "progress while bytes arrive");
    // Nothing but the snapshot, its ref and no staging/lock leftovers.
    assert.deepEqual(readdirSync(join(cacheDir, "models--org--tiny")).sort(), ["refs", "snapshots"]);
    assert.equal(readFileSync(join(cacheDir, "models--org--tiny", "refs", "main"), "utf8").trim(), sha);
    // Skipped files were never requested.
    assert.ok(!hub.log.some((r) => /pytorch_model|onnx|README|gitattributes/.test(r.path)));

    // Again: one listing request, no file transfer.
    hub.log.length = 0;
    const again = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir));
    assert.equal(again.fromCache, true);
    assert.equal(again.dir, snap.dir);
    assert.deepEqual(hub.log.map((r) => r.path), [`/api/models/org/tiny/revision/main?blobs=true`]);
    // By commit sha: no request at all.
    hub.log.length = 0;
    assert.equal((await downloadHfModel(parseHfRef(`hf://org/tiny@${sha}`), opts(hub, cacheDir))).dir, snap.dir);
    assert.equal(hub.log.length, 0);
    // The hub unreachable: the revision's last snapshot, flagged offline.
    await hub.stop();
    const notes: string[] = [];
    const offline = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir, { retries: 0, onNote: (n) => notes.push(n) }));
    assert.equal(offline.offline, true);
    assert.equal(offline.dir, snap.dir);
    assert.match(notes.join("\n"), /cannot reach .*using the cached snapshot/);
    await hub.start(); // for withHub's stop()
  });
});

test("an interrupted transfer resumes with a Range request, in the same call and in the next run", async () => {
  await withHub(async (hub, cacheDir) => {
    const files = sampleRepo();
    hub.addRepo("org/tiny", files);
    const shard = files[7]!;
    const cdnPath = `/lfs/${sha256(shard.data)}?X-Amz-Signature=abc`;

    // Cut once: the retry inside the call asks for the rest.
    hub.cut = { path: shard.path, afterBytes: 600_000, times: 1 };
    const snap = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir));
    assert.deepEqual(readFileSync(join(snap.dir, shard.path)), shard.data);
    const shardRequests = hub.log.filter((r) => r.server === "cdn" && r.path === cdnPath);
    assert.deepEqual(shardRequests.map((r) => r.range), [undefined, "bytes=600000-"]);
    rmSync(join(cacheDir, "models--org--tiny"), { recursive: true });

    // Cut with no retries left: the error says how to continue, the partial file stays, and the
    // next run asks only for the rest.
    hub.log.length = 0;
    hub.cut = { path: shard.path, afterBytes: 250_000, times: 1 };
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir, { retries: 0 })), "UNAVAILABLE", /interrupted after 250000 bytes.*run again to resume/);
    const staging = readdirSync(join(cacheDir, "models--org--tiny")).find((n) => n.startsWith(".staging-"))!;
    assert.ok(staging, "staging directory kept for resuming");
    assert.equal(statSync(join(cacheDir, "models--org--tiny", staging, `${shard.path}.incomplete`)).size, 250_000);
    assert.ok(!existsSync(join(cacheDir, "models--org--tiny", "snapshots")), "no snapshot from a partial download");
    hub.log.length = 0;
    const resumed = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir));
    assert.deepEqual(readFileSync(join(resumed.dir, shard.path)), shard.data);
    assert.deepEqual(hub.log.filter((r) => r.path === cdnPath).map((r) => r.range), ["bytes=250000-"]);
    // Files completed in the first run were not fetched again.
    assert.ok(!hub.log.some((r) => r.path.endsWith("/config.json")));

    // A server that ignores Range: the partial file is replaced by the whole one, not appended to.
    rmSync(join(cacheDir, "models--org--tiny"), { recursive: true });
    hub.ignoreRange = true;
    hub.log.length = 0;
    hub.cut = { path: shard.path, afterBytes: 300_000, times: 1 };
    const whole = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir));
    assert.deepEqual(readFileSync(join(whole.dir, shard.path)), shard.data);
    assert.deepEqual(hub.log.filter((r) => r.path === cdnPath).map((r) => r.range), [undefined, "bytes=300000-"]);
  });
});

test("a checksum mismatch is a clear error and nothing is cached", async () => {
  await withHub(async (hub, cacheDir) => {
    const files = sampleRepo();
    hub.addRepo("org/tiny", files);
    const shard = files[8]!;
    const bad = Buffer.from(shard.data);
    bad[1234] = bad[1234]! ^ 0xff;
    hub.tampered.set(shard.path, bad);
    const e = await rejectsWith(downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir)), "FAILED_PRECONDITION", /model-00002-of-00002\.safetensors failed verification: sha256 [0-9a-f]{64}, expected/);
    assert.match(e.message, /nothing was cached/);
    const repoDir = join(cacheDir, "models--org--tiny");
    assert.ok(!existsSync(join(repoDir, "snapshots")));
    assert.ok(!existsSync(join(repoDir, "refs", "main")));
    const staging = readdirSync(repoDir).find((n) => n.startsWith(".staging-"))!;
    assert.ok(!readdirSync(join(repoDir, staging)).some((n) => n.startsWith("model-00002")), "the corrupt bytes are gone, not resumable");
    // Fixed upstream: the next run completes.
    hub.tampered.clear();
    const snap = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir));
    assert.deepEqual(readFileSync(join(snap.dir, shard.path)), shard.data);
  });
});

test("without the listing's hashes, checksums come from the hub's X-Linked-Etag / ETag (not the CDN's)", async () => {
  await withHub(async (hub, cacheDir) => {
    hub.listBlobs = false;
    const files = sampleRepo();
    hub.addRepo("org/tiny", files);
    const snap = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir));
    assert.equal(snap.files.find((f) => f.path === "model-00001-of-00002.safetensors")!.sha256, sha256(files[7]!.data));
    assert.equal(snap.files.find((f) => f.path === "tokenizer.json")!.gitSha1, gitSha1(files[4]!.data));
    rmSync(join(cacheDir, "models--org--tiny"), { recursive: true });
    // A small file whose bytes do not match its ETag's git sha1.
    const tok = Buffer.from(files[4]!.data);
    tok[10] = 0x41 ^ tok[10]!;
    hub.tampered.set("tokenizer.json", tok);
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir)), "FAILED_PRECONDITION", /tokenizer\.json failed verification: git blob sha1/);
  });
});

test("401 without a token is a clear error; HF_TOKEN is sent to the hub, never to the CDN; redirects are followed", async () => {
  await withHub(async (hub, cacheDir) => {
    hub.addRepo("org/private", sampleRepo());
    hub.token = "hf_secret";
    const e = await rejectsWith(downloadHfModel(parseHfRef("hf://org/private"), opts(hub, cacheDir)), "UNAUTHENTICATED", /401 Unauthorized.*restricted.*set HF_TOKEN/);
    assert.doesNotMatch(e.message, /hf_secret/);
    await rejectsWith(
      downloadHfModel(parseHfRef("hf://org/private"), opts(hub, cacheDir, { env: { HF_ENDPOINT: hub.hubUrl, HF_TOKEN: "wrong" } })),
      "UNAUTHENTICATED",
      /refused the token in HF_TOKEN/,
    );
    assert.ok(!existsSync(join(cacheDir, "models--org--private", "snapshots")));

    // Renamed repository: the hub redirects (relative Location) on its own origin, the token follows.
    hub.renamed.set("old/name", "org/private");
    hub.log.length = 0;
    const snap = await downloadHfModel(parseHfRef("hf://old/name"), opts(hub, cacheDir, { env: { HF_ENDPOINT: hub.hubUrl + "/", HF_TOKEN: "hf_secret" } }));
    assert.deepEqual(listFilesIn(snap.dir), EXPECTED_FILES);
    const hubReqs = hub.log.filter((r) => r.server === "hub");
    const cdnReqs = hub.log.filter((r) => r.server === "cdn");
    assert.ok(hubReqs.some((r) => r.path.startsWith("/old/name/")) && hubReqs.some((r) => r.path.startsWith("/org/private/")));
    assert.ok(hubReqs.every((r) => r.authorization === "Bearer hf_secret"));
    assert.equal(cdnReqs.length, 2);
    assert.ok(cdnReqs.every((r) => r.authorization === undefined), "the token must not leak to the CDN");
  });
});

test("unknown repositories and revisions, repositories without safetensors, and a bad endpoint", async () => {
  await withHub(async (hub, cacheDir) => {
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/nope"), opts(hub, cacheDir)), "NOT_FOUND", /hf:\/\/org\/nope: repository or revision not found.*Repository not found/);
    hub.addRepo("org/tiny", sampleRepo());
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/tiny@v9"), opts(hub, cacheDir)), "NOT_FOUND", /revision "v9" not found/);
    hub.addRepo("org/bin", [
      { path: "config.json", data: Buffer.from("{}"), lfs: false },
      { path: "pytorch_model.bin", data: randomBytes(100), lfs: true },
    ]);
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/bin"), opts(hub, cacheDir)), "FAILED_PRECONDITION", /no safetensors weights \(it has pytorch_model\.bin\)/);
    hub.addRepo("org/data", [{ path: "train.csv", data: Buffer.from("a,b"), lfs: false }]);
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/data"), opts(hub, cacheDir)), "FAILED_PRECONDITION", /no config\.json/);
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir, { env: { HF_ENDPOINT: "ftp://x" } })), "INVALID_ARGUMENT", /HF_ENDPOINT/);
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir, { env: { HF_ENDPOINT: hub.hubUrl, HF_HUB_OFFLINE: "1" } })), "FAILED_PRECONDITION", /HF_HUB_OFFLINE/);
    // A lock held by a live process.
    const repoDir = join(cacheDir, "models--org--tiny");
    const sha = hub.repos.get("org/tiny")!.sha;
    mkdirSync(repoDir, { recursive: true });
    writeFileSync(join(repoDir, `.lock-${sha}`), `${process.ppid}\n`);
    await rejectsWith(downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir)), "FAILED_PRECONDITION", /another process \(pid \d+\) is downloading/);
    // A stale lock (dead pid) is taken over.
    writeFileSync(join(repoDir, `.lock-${sha}`), "999999999\n");
    assert.deepEqual(listFilesIn((await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir))).dir), EXPECTED_FILES);
  });
});

test("cancelling keeps the partial file for the next run", async () => {
  await withHub(async (hub, cacheDir) => {
    const files = sampleRepo();
    hub.addRepo("org/tiny", files);
    const ac = new AbortController();
    let seen = 0;
    await rejectsWith(
      downloadHfModel(
        parseHfRef("hf://org/tiny"),
        opts(hub, cacheDir, {
          signal: ac.signal,
          onProgress: (p) => {
            if (p.file === files[7]!.path && p.bytesDone > (seen ||= p.bytesDone)) ac.abort();
          },
        }),
      ),
      "CANCELLED",
      /cancelled/,
    );
    const repoDir = join(cacheDir, "models--org--tiny");
    const staging = readdirSync(repoDir).find((n) => n.startsWith(".staging-"))!;
    const part = join(repoDir, staging, `${files[7]!.path}.incomplete`);
    const kept = statSync(part).size;
    assert.ok(kept > 0 && kept < files[7]!.data.length, `partial ${kept}`);
    assert.ok(!existsSync(join(repoDir, `.lock-${hub.repos.get("org/tiny")!.sha}`)), "lock released");
    hub.log.length = 0;
    const snap = await downloadHfModel(parseHfRef("hf://org/tiny"), opts(hub, cacheDir));
    assert.deepEqual(readFileSync(join(snap.dir, files[7]!.path)), files[7]!.data);
    assert.ok(hub.log.some((r) => r.range === `bytes=${kept}-`));
  });
});

/** The demo needs the engine's training API (native backward) and the training loop. */
async function trainingMissing(): Promise<string | false> {
  const kernels = (await import("@qlora/kernels")) as unknown as { NativeModel?: { prototype?: Record<string, unknown> } };
  const model = (await import("@qlora/model")) as Record<string, unknown>;
  if (typeof kernels.NativeModel?.prototype?.["trainForwardBackward"] !== "function") return "the native engine has no training API yet (NativeModel.trainForwardBackward)";
  if (typeof model["train"] !== "function") return "@qlora/model does not export the training loop yet";
  return false;
}

test("qlora demo --model hf://…: downloads (HF_ENDPOINT, HF_TOKEN, QLORA_CACHE_DIR) and runs the pipeline on it", { skip: await trainingMissing() }, async () => {
  const { writeDemoModel } = await import("../src/demo/tiny-model.js");
  await withHub(async (hub, cacheDir) => {
    const modelDir = join(cacheDir, "source");
    await writeDemoModel(modelDir);
    const files = readdirSync(modelDir).map((f) => ({ path: f, data: readFileSync(join(modelDir, f)), lfs: f.endsWith(".safetensors") }));
    files.push({ path: "pytorch_model.bin", data: randomBytes(64), lfs: true });
    const sha = hub.addRepo("org/tiny-demo", files);
    hub.token = "hf_demo";
    const dataDir = join(cacheDir, "data");
    const { spawn } = await import("node:child_process");
    const main = join(fileURLToPath(new URL("../src/main.js", import.meta.url)));
    const r = await new Promise<{ code: number | null; stdout: string; stderr: string }>((done, fail) => {
      const p = spawn(process.execPath, [main, "demo", "--model", "hf://org/tiny-demo", "--steps", "2", "--max-new-tokens", "8", "--data-dir", dataDir, "--json"], {
        env: { ...process.env, HF_ENDPOINT: hub.hubUrl, HF_TOKEN: "hf_demo", QLORA_CACHE_DIR: join(cacheDir, "cache"), QLORA_DEBUG: "1" },
      });
      let stdout = "";
      let stderr = "";
      p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
      p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
      p.on("error", fail);
      p.on("close", (code) => done({ code, stdout, stderr }));
    });
    assert.equal(r.code, 0, r.stderr);
    const events = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown> & { event: string });
    const plan = events.find((e) => e.event === "plan") as unknown as { model: { kind: string; spec: string } };
    assert.deepEqual([plan.model.kind, plan.model.spec], ["hub", "hf://org/tiny-demo"]);
    const downloads = events.filter((e) => e.event === "download");
    assert.ok(downloads.length > 0);
    const snapshot = join(cacheDir, "cache", "hub", "models--org--tiny-demo", "snapshots", sha);
    assert.ok(events.some((e) => e.event === "note" && String(e.message).includes(`Downloaded hf://org/tiny-demo (commit ${sha.slice(0, 12)}) in ${snapshot}`)));
    assert.ok(existsSync(join(snapshot, "model.safetensors")));
    // The model went through the services under the repository's name.
    const uploaded = events.find((e) => e.event === "uploaded" && e.kind === "model")!;
    assert.equal(uploaded.name, "tiny-demo");
    assert.equal(uploaded.files, readdirSync(modelDir).length);
    const result = events.at(-1)! as unknown as { event: string; nf4Model: string; losses: unknown[]; adapterGeneration: { completionTokens: number } };
    assert.equal(result.event, "result");
    assert.equal(result.nf4Model, "tiny-demo-nf4");
    assert.equal(result.losses.length, 2);
    assert.equal(result.adapterGeneration.completionTokens, 8);
    // Every hub request carried the token; the CDN got none, and the .bin was never fetched.
    assert.ok(hub.log.filter((q) => q.server === "hub").every((q) => q.authorization === "Bearer hf_demo"));
    assert.ok(hub.log.filter((q) => q.server === "cdn").every((q) => q.authorization === undefined));
    assert.ok(!hub.log.some((q) => q.path.includes("pytorch_model")));
  });
});
