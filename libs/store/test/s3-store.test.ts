/**
 * S3Store against a real S3-compatible server (OpenStack Swift's s3api in CI: tests/support/start-s3.sh).
 * Without QLORA_TEST_S3_ENDPOINT the server tests are skipped with the reason; the validation and
 * configuration tests need no server and always run.
 */
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { DeleteObjectCommand, GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client, CreateMultipartUploadCommand, ListMultipartUploadsCommand } from "@aws-sdk/client-s3";
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, QloraError } from "@qlora/core";
import {
  ARTIFACT_KINDS,
  createStoreFromEnv,
  IntegrityError,
  LocalStore,
  MANIFEST_FILE,
  S3Store,
  s3OptionsFromEnv,
  verifyDir,
  writeManifestFor,
  type ArtifactKind,
  type ArtifactStore,
  type S3StoreOptions,
} from "../src/index.js";

const ENDPOINT = process.env.QLORA_TEST_S3_ENDPOINT;
const BUCKET = process.env.QLORA_TEST_S3_BUCKET || "qlora-test";
const CREDS = {
  accessKeyId: process.env.QLORA_TEST_S3_ACCESS_KEY_ID || "test:tester",
  secretAccessKey: process.env.QLORA_TEST_S3_SECRET_ACCESS_KEY || "testing",
};
const NO_SERVER =
  "no S3 server: set QLORA_TEST_S3_ENDPOINT (QLORA_TEST_S3_BUCKET, QLORA_TEST_S3_ACCESS_KEY_ID, QLORA_TEST_S3_SECRET_ACCESS_KEY) or run tests/support/start-s3.sh and source its env file";
// CI sets QLORA_TEST_REQUIRE_SERVERS=1: a missing server is then a failure, not a skip.
const SKIP = ENDPOINT || process.env.QLORA_TEST_REQUIRE_SERVERS === "1" ? false : NO_SERVER;
const MiB = 1024 * 1024;

const sha = (b: string | Uint8Array) => createHash("sha256").update(b).digest("hex");

function rawClient(): S3Client {
  return new S3Client({
    endpoint: ENDPOINT!,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: CREDS,
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
}

async function rawKeys(client: S3Client, prefix: string): Promise<string[]> {
  const out: string[] = [];
  let token: string | undefined;
  do {
    const r = await client.send(new ListObjectsV2Command({ Bucket: BUCKET, Prefix: prefix, ContinuationToken: token }));
    for (const o of r.Contents ?? []) out.push(o.Key!);
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return out.sort();
}

interface Ctx {
  prefix: string;
  raw: S3Client;
  /** A store on this test's prefix with its own cache directory (each call: another "replica"). */
  open(extra?: Partial<S3StoreOptions>): Promise<S3Store>;
}

/** Each test gets its own key prefix and cache directories, removed afterwards. */
async function withS3(fn: (c: Ctx) => Promise<void>): Promise<void> {
  if (!ENDPOINT) throw new Error(`QLORA_TEST_REQUIRE_SERVERS=1 but ${NO_SERVER}`);
  const prefix = `t-${Date.now().toString(36)}-${randomBytes(4).toString("hex")}`;
  const raw = rawClient();
  const dirs: string[] = [];
  const stores: S3Store[] = [];
  const ctx: Ctx = {
    prefix,
    raw,
    async open(extra = {}) {
      const cacheDir = await mkdtemp(join(tmpdir(), "qlora-s3cache-"));
      dirs.push(cacheDir);
      const s = new S3Store({ endpoint: ENDPOINT!, bucket: BUCKET, region: "us-east-1", forcePathStyle: true, credentials: CREDS, prefix, cacheDir, ...extra });
      stores.push(s);
      return s;
    },
  };
  try {
    await fn(ctx);
  } finally {
    for (const s of stores) s.close();
    for (const k of await rawKeys(raw, prefix + "/")) await raw.send(new DeleteObjectCommand({ Bucket: BUCKET, Key: k }));
    for (const d of dirs) await rm(d, { recursive: true, force: true });
    raw.destroy();
  }
}

async function readAll(r: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of r) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** Relative path → content of every file under dir (manifest.json included). */
async function snapshot(dir: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  const walk = async (abs: string, rel: string): Promise<void> => {
    for (const e of await readdir(abs, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(join(abs, e.name), r);
      else out.set(r, await readFile(join(abs, e.name)));
    }
  };
  await walk(dir, "");
  return out;
}

async function writeArtifact(s: ArtifactStore, kind: ArtifactKind, name: string, files: Record<string, string | Buffer>, opts: { overwrite?: boolean; meta?: Record<string, string> } = {}) {
  const w = await s.beginWrite(kind, name, { overwrite: opts.overwrite ?? false });
  for (const [p, data] of Object.entries(files)) await w.writeFile(p, data);
  return w.commit(opts.meta ? { meta: opts.meta } : {});
}

// ---------------------------------------------------------------------------------------------
// No server needed.

test("S3Store validates kinds, names and file paths with LocalStore's rules, before any request", async () => {
  const dir = await mkdtemp(join(tmpdir(), "qlora-s3val-"));
  try {
    // Port 9 (discard) on localhost: any request would fail with UNAVAILABLE, not InvalidArgument.
    const s3 = new S3Store({ endpoint: "http://127.0.0.1:9", bucket: "b", forcePathStyle: true, credentials: { accessKeyId: "x", secretAccessKey: "y" }, cacheDir: join(dir, "c"), prefix: "p" });
    const local = new LocalStore(join(dir, "l"));
    // LocalStore looks the artifact up before it checks a file path: give it one.
    await writeArtifact(local, "models", "m", { "x.txt": "x" });
    const badNames: unknown[] = ["", "..", "../x", "a/b", "/etc", "a..b", ".hidden", "-x", "a\\b", "a b", "a".repeat(129), "é", "x@y"];
    for (const store of [s3, local] as ArtifactStore[]) {
      for (const n of badNames) {
        const name = n as string;
        await assert.rejects(store.exists("models", name), InvalidArgument, `${store.backend} exists ${JSON.stringify(n)}`);
        await assert.rejects(store.stat("models", name), InvalidArgument);
        await assert.rejects(store.readManifest("models", name), InvalidArgument);
        await assert.rejects(store.localPath("models", name), InvalidArgument);
        await assert.rejects(store.openRead("models", name, "x"), InvalidArgument);
        await assert.rejects(store.delete("models", name), InvalidArgument);
        await assert.rejects(store.beginWrite("models", name), InvalidArgument);
        await assert.rejects(store.verify("models", name), InvalidArgument);
      }
      await assert.rejects(store.list("model" as ArtifactKind), InvalidArgument);
      await assert.rejects(store.exists("../models" as ArtifactKind, "m"), InvalidArgument);
      for (const p of ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", ".hidden"]) {
        await assert.rejects(store.openRead("models", "m", p), InvalidArgument, `${store.backend} openRead ${JSON.stringify(p)}`);
      }
    }
    s3.close();
    assert.throws(() => new S3Store({ bucket: "b", cacheDir: dir, prefix: "a/../b" }), InvalidArgument);
    assert.throws(() => new S3Store({ bucket: "", cacheDir: dir }), InvalidArgument);
    assert.throws(() => new S3Store({ bucket: "b", cacheDir: dir, partSize: 1024 }), InvalidArgument);
    assert.equal(new S3Store({ bucket: "b", cacheDir: dir, prefix: "/a/b/" }).prefix, "a/b");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("createStoreFromEnv: local by default, s3 on request, clear errors", () => {
  const local = createStoreFromEnv({ QLORA_DATA_DIR: "/tmp/x" });
  assert.ok(local instanceof LocalStore);
  assert.equal((local as LocalStore).root, "/tmp/x");
  assert.ok(createStoreFromEnv({ QLORA_STORE: "local" }, { dataDir: "/d" }) instanceof LocalStore);
  assert.throws(() => createStoreFromEnv({}), /QLORA_DATA_DIR/);
  assert.throws(() => createStoreFromEnv({ QLORA_STORE: "gcs", QLORA_DATA_DIR: "/x" }), /expected "local" or "s3"/);
  assert.throws(() => createStoreFromEnv({ QLORA_STORE: "s3" }), /QLORA_S3_BUCKET/);

  const s = createStoreFromEnv({
    QLORA_STORE: "s3",
    QLORA_S3_BUCKET: "bkt",
    QLORA_S3_ENDPOINT: "http://127.0.0.1:8080",
    QLORA_S3_PREFIX: "/team/qlora/",
    QLORA_DATA_DIR: "/data",
    AWS_ACCESS_KEY_ID: "id",
    AWS_SECRET_ACCESS_KEY: "secret",
  });
  assert.ok(s instanceof S3Store);
  assert.equal(s.backend, "s3");
  assert.equal((s as S3Store).bucket, "bkt");
  assert.equal((s as S3Store).prefix, "team/qlora");
  assert.equal((s as S3Store).cacheDir, "/data/s3-cache");
  (s as S3Store).close();

  const o = s3OptionsFromEnv({ QLORA_S3_BUCKET: "b", QLORA_S3_ENDPOINT: "http://h:1", AWS_REGION: "eu-west-1", QLORA_S3_PART_SIZE_MIB: "8", QLORA_S3_CONCURRENCY: "2" }, { dataDir: "/dd" });
  assert.equal(o.forcePathStyle, true, "path-style by default with an endpoint");
  assert.equal(o.region, "eu-west-1");
  assert.equal(o.partSize, 8 * MiB);
  assert.equal(o.concurrency, 2);
  assert.equal(o.cacheDir, "/dd/s3-cache");
  assert.equal(o.credentials, undefined, "no keys: the SDK's default chain");
  const aws = s3OptionsFromEnv({ QLORA_S3_BUCKET: "b", QLORA_S3_REGION: "us-west-2", AWS_REGION: "x", QLORA_S3_CACHE_DIR: "/c" });
  assert.equal(aws.forcePathStyle, false, "virtual-hosted style on AWS");
  assert.equal(aws.endpoint, undefined);
  assert.equal(aws.region, "us-west-2");
  assert.equal(aws.cacheDir, "/c");
  assert.equal(s3OptionsFromEnv({ QLORA_S3_BUCKET: "b", QLORA_S3_ENDPOINT: "http://h", QLORA_S3_FORCE_PATH_STYLE: "false" }).forcePathStyle, false);
  assert.throws(() => s3OptionsFromEnv({ QLORA_S3_BUCKET: "b", QLORA_S3_FORCE_PATH_STYLE: "maybe" }), /true or false/);
  assert.throws(() => s3OptionsFromEnv({ QLORA_S3_BUCKET: "b", QLORA_S3_ENDPOINT: "not a url" }), /not a URL/);
  assert.throws(() => s3OptionsFromEnv({ QLORA_S3_BUCKET: "b", AWS_ACCESS_KEY_ID: "only-id" }), /both/);
  assert.throws(() => s3OptionsFromEnv({ QLORA_S3_BUCKET: "b", QLORA_S3_PART_SIZE_MIB: "-1" }), /positive integer/);
});

// ---------------------------------------------------------------------------------------------
// Against the server.

test("round trip of a model directory: staged and streamed files, multipart, manifest, cache, openRead, verify", { skip: SKIP }, async () => {
  await withS3(async ({ open, raw, prefix }) => {
    const s = await open({ partSize: 5 * MiB, multipartThreshold: 5 * MiB });
    const big = randomBytes(5 * MiB + 123); // 2 parts
    const w = await s.beginWrite("models", "tiny-llama");
    assert.equal(await s.exists("models", "tiny-llama"), false);
    const f1 = await w.writeFile("config.json", '{"hidden_size": 8}');
    assert.equal(f1.sha256, sha('{"hidden_size": 8}'));
    const f2 = await w.writeFile("sub dir/tokenizer+v1.json", Readable.from([Buffer.from("tok"), Buffer.from("enizer")]));
    assert.deepEqual(f2, { path: "sub dir/tokenizer+v1.json", size: 9, sha256: sha("tokenizer") });
    // Tools write into the staging directory directly (the quantizer, the trainer), with their own manifest meta.
    await writeFile(join(w.dir, "model.safetensors"), big);
    await writeFile(join(w.dir, "empty.bin"), "");
    await writeFile(join(w.dir, MANIFEST_FILE), JSON.stringify({ version: 1, files: [], meta: { quantization: "nf4", source_model: "x" } }));
    assert.deepEqual(await s.list("models"), [], "nothing is visible before commit");
    const m = await w.commit({ meta: { source_model: "stories260K" } });
    assert.deepEqual(m.files.map((f) => f.path), ["config.json", "empty.bin", "model.safetensors", "sub dir/tokenizer+v1.json"]);
    assert.equal(m.files[2]!.sha256, sha(big));
    assert.equal(m.total_size, 18 + 0 + big.length + 9);
    assert.deepEqual(m.meta, { quantization: "nf4", source_model: "stories260K" });
    await assert.rejects(w.writeFile("x", "y"), FailedPrecondition, "the writer is spent");
    await w.abort(); // no-op after commit

    // The bucket: one generation of files, and the manifest.
    const loc = await s.locate("models", "tiny-llama");
    assert.match(loc.dataPrefix, new RegExp(`^${prefix}/models/tiny-llama/\\.g-[A-Za-z0-9_-]+/$`));
    assert.deepEqual(await rawKeys(raw, `${prefix}/`), [...loc.files.map((f) => f.key), `${prefix}/models/tiny-llama/${MANIFEST_FILE}`].sort());
    const stored = JSON.parse(
      await (await raw.send(new GetObjectCommand({ Bucket: BUCKET, Key: loc.manifestKey }))).Body!.transformToString(),
    ) as { generation: string; files: unknown[] };
    assert.equal(stored.generation, loc.generation);

    // Another replica (empty cache) sees it all.
    const r = await open();
    assert.deepEqual(await r.list("models"), ["tiny-llama"]);
    assert.equal(await r.exists("models", "tiny-llama"), true);
    const st = await r.stat("models", "tiny-llama");
    assert.equal(st.sizeBytes, m.total_size);
    assert.equal(st.hasManifest, true);
    assert.equal(st.meta.quantization, "nf4");
    assert.deepEqual(await r.readManifest("models", "tiny-llama"), m);
    const dir = await r.localPath("models", "tiny-llama");
    assert.ok(dir.startsWith(r.cacheDir));
    const files = await snapshot(dir);
    assert.deepEqual([...files.keys()].sort(), ["config.json", "empty.bin", MANIFEST_FILE, "model.safetensors", "sub dir/tokenizer+v1.json"]);
    assert.ok(files.get("model.safetensors")!.equals(big));
    assert.equal(files.get("sub dir/tokenizer+v1.json")!.toString(), "tokenizer");
    assert.equal((await verifyDir(dir)).ok, true, "the cached copy carries a manifest that verifies locally");
    // Cached: the same directory, not downloaded again.
    const before = (await stat(join(dir, "model.safetensors"))).mtimeMs;
    assert.equal(await r.localPath("models", "tiny-llama"), dir);
    assert.equal((await stat(join(dir, "model.safetensors"))).mtimeMs, before);
    // Parallel calls share one download.
    const r2 = await open();
    const [a, b] = await Promise.all([r2.localPath("models", "tiny-llama"), r2.localPath("models", "tiny-llama")]);
    assert.equal(a, b);

    assert.ok((await readAll(await r2.openRead("models", "tiny-llama", "model.safetensors"))).equals(big));
    const r3 = await open(); // no cache: streamed from the bucket
    assert.ok((await readAll(await r3.openRead("models", "tiny-llama", "model.safetensors"))).equals(big));
    assert.equal((await readAll(await r3.openRead("models", "tiny-llama", "sub dir/tokenizer+v1.json"))).toString(), "tokenizer");
    await assert.rejects(r3.openRead("models", "tiny-llama", "nope.json"), NotFound);
    await assert.rejects(r3.localPath("models", "other"), NotFound);
    await assert.rejects(r3.stat("adapters", "tiny-llama"), NotFound);
    assert.deepEqual(await r3.verify("models", "tiny-llama"), { ok: true, checked: 4, missing: [], mismatched: [], extra: [] });

    // The writer's staging directory became its cache entry (no download after a commit).
    assert.deepEqual(await readdir(join(s.cacheDir, ".staging")), []);
    assert.equal((await readdir(join(s.cacheDir, "models"))).length, 1);
  });
});

test("listing: committed names only, sorted, per kind and prefix, across pages", { skip: SKIP }, async () => {
  await withS3(async ({ open, raw, prefix }) => {
    const s = await open({ listPageSize: 2 });
    for (const n of ["b-model", "a-model", "c.model_1"]) await writeArtifact(s, "models", n, { "x.txt": n, "y/z.txt": "z" });
    await writeArtifact(s, "adapters", "a-model", { "adapter_config.json": "{}" });
    // A write in progress (or one that crashed before its manifest): uploaded files, no manifest.
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/models/half/.g-abc/x.txt`, Body: "partial" }));
    // An aborted writer leaves nothing in the bucket.
    const w = await s.beginWrite("models", "aborted");
    await w.writeFile("x.txt", "x");
    await w.abort();
    assert.deepEqual(await s.list("models"), ["a-model", "b-model", "c.model_1"]);
    assert.deepEqual(await s.list("adapters"), ["a-model"]);
    assert.deepEqual(await s.list("datasets"), []);
    assert.equal(await s.exists("models", "half"), false);
    await assert.rejects(s.localPath("models", "half"), NotFound);
    // Another prefix is another store.
    const other = new S3Store({ endpoint: ENDPOINT!, bucket: BUCKET, forcePathStyle: true, credentials: CREDS, prefix: `${prefix}-other`, cacheDir: s.cacheDir });
    assert.deepEqual(await other.list("models"), []);
    other.close();
    // A missing bucket is an error, not an empty store.
    const nob = new S3Store({ endpoint: ENDPOINT!, bucket: `no-such-bucket-${randomBytes(4).toString("hex")}`, forcePathStyle: true, credentials: CREDS, cacheDir: s.cacheDir });
    await assert.rejects(nob.list("models"), (e: unknown) => e instanceof FailedPrecondition && /does not exist/.test(e.message));
    await assert.rejects(nob.exists("models", "m"), FailedPrecondition);
    nob.close();
  });
});

test("overwrite: AlreadyExists without it; with it the new version replaces the old one whole, old objects and cache go", { skip: SKIP }, async () => {
  await withS3(async ({ open, raw, prefix }) => {
    const s = await open({ replacedGraceMs: 0 });
    await writeArtifact(s, "adapters", "ad", { "adapter_model.safetensors": "v1-weights", "adapter_config.json": "v1" });
    await assert.rejects(s.beginWrite("adapters", "ad"), AlreadyExists);
    // Two writers opened while the name was free: the second commit loses.
    const w1 = await s.beginWrite("adapters", "race");
    const w2 = await s.beginWrite("adapters", "race");
    await w1.writeFile("a.txt", "first");
    await w2.writeFile("a.txt", "second");
    await w1.commit();
    await assert.rejects(w2.commit(), AlreadyExists);
    await w2.abort();
    assert.equal((await readAll(await s.openRead("adapters", "race", "a.txt"))).toString(), "first");
    assert.equal((await rawKeys(raw, `${prefix}/adapters/race/`)).length, 2, "the loser's uploaded files were removed");

    const reader = await open();
    const v1dir = await reader.localPath("adapters", "ad");
    const oldLoc = await s.locate("adapters", "ad");
    const m2 = await writeArtifact(s, "adapters", "ad", { "adapter_model.safetensors": "v2-weights!", "extra.txt": "new" }, { overwrite: true, meta: { v: "2" } });
    assert.deepEqual(m2.files.map((f) => f.path), ["adapter_model.safetensors", "extra.txt"]);
    const newLoc = await s.locate("adapters", "ad");
    assert.notEqual(newLoc.generation, oldLoc.generation);
    assert.deepEqual(await rawKeys(raw, `${prefix}/adapters/ad/`), [...newLoc.files.map((f) => f.key), newLoc.manifestKey].sort(), "old generation deleted");
    const v2dir = await reader.localPath("adapters", "ad");
    assert.notEqual(v2dir, v1dir);
    const files = await snapshot(v2dir);
    assert.deepEqual([...files.keys()].sort(), ["adapter_model.safetensors", "extra.txt", MANIFEST_FILE]);
    assert.equal(files.get("adapter_model.safetensors")!.toString(), "v2-weights!");
    assert.equal((await reader.stat("adapters", "ad")).meta.v, "2");
    await assert.rejects(stat(v1dir), /ENOENT/, "the replaced version's cache entry is evicted");
    assert.deepEqual(await reader.list("adapters"), ["ad", "race"]);

    // With a grace period, the replaced version stays readable for a while, then goes.
    const graceful = await open({ replacedGraceMs: 400 });
    await writeArtifact(graceful, "adapters", "ad", { "v3.txt": "3" }, { overwrite: true });
    const v3 = await graceful.locate("adapters", "ad");
    const keysNow = await rawKeys(raw, `${prefix}/adapters/ad/`);
    for (const f of newLoc.files) assert.ok(keysNow.includes(f.key), "v2 is still there during the grace period");
    let left = keysNow.length;
    for (let i = 0; i < 50 && left > 2; i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = (await rawKeys(raw, `${prefix}/adapters/ad/`)).length;
    }
    assert.deepEqual(await rawKeys(raw, `${prefix}/adapters/ad/`), [v3.files[0]!.key, v3.manifestKey].sort(), "v2 deleted after the grace period");
  });
});

test("delete: the manifest goes first, then the files and the cached copy; NotFound afterwards", { skip: SKIP }, async () => {
  await withS3(async ({ open, raw, prefix }) => {
    const s = await open();
    await writeArtifact(s, "checkpoints", "job-1.checkpoint-10", { "adapter_model.safetensors": "w", "optimizer.pt": "o", "trainer_state.json": "{}" });
    await writeArtifact(s, "checkpoints", "job-1.checkpoint-20", { "adapter_model.safetensors": "w2" });
    const r = await open();
    const cached = await r.localPath("checkpoints", "job-1.checkpoint-10");
    await r.delete("checkpoints", "job-1.checkpoint-10");
    assert.deepEqual(await s.list("checkpoints"), ["job-1.checkpoint-20"]);
    assert.equal(await s.exists("checkpoints", "job-1.checkpoint-10"), false);
    assert.deepEqual(await rawKeys(raw, `${prefix}/checkpoints/job-1.checkpoint-10/`), []);
    await assert.rejects(stat(cached), /ENOENT/);
    await assert.rejects(r.delete("checkpoints", "job-1.checkpoint-10"), NotFound);
    await assert.rejects(s.localPath("checkpoints", "job-1.checkpoint-10"), NotFound);
    await assert.rejects(s.openRead("checkpoints", "job-1.checkpoint-10", "optimizer.pt"), NotFound);
    // A stale cache entry of another replica is not served once the artifact is gone.
    await s.delete("checkpoints", "job-1.checkpoint-20");
    await assert.rejects(s.localPath("checkpoints", "job-1.checkpoint-20"), NotFound);
    assert.deepEqual(await readdir(join(s.cacheDir, "checkpoints")), []);
    // The name can be written again.
    await writeArtifact(s, "checkpoints", "job-1.checkpoint-10", { "a.txt": "again" });
    assert.equal((await readAll(await r.openRead("checkpoints", "job-1.checkpoint-10", "a.txt"))).toString(), "again");
  });
});

test("concurrent readers during a write and an overwrite see nothing, v1 or v2 — never a mix or a partial artifact", { skip: SKIP }, async () => {
  await withS3(async ({ open }) => {
    // A short grace: the replaced version is deleted while the readers are still running.
    const writer = await open({ partSize: 5 * MiB, multipartThreshold: 5 * MiB, replacedGraceMs: 800 });
    const v1: Record<string, Buffer> = { "config.json": Buffer.from('{"v": 1}'), "model.safetensors": randomBytes(5 * MiB + 1), "tokenizer/t.json": Buffer.from("t1") };
    const v2: Record<string, Buffer> = { "config.json": Buffer.from('{"v": 2}'), "model.safetensors": randomBytes(5 * MiB + 7), "extra.json": Buffer.from("e2") };
    const versions = [v1, v2];
    const whichVersion = (files: Map<string, Buffer>): number => {
      const names = [...files.keys()].filter((k) => k !== MANIFEST_FILE).sort();
      for (let i = 0; i < versions.length; i++) {
        const want = versions[i]!;
        if (names.join("|") === Object.keys(want).sort().join("|") && names.every((n) => files.get(n)!.equals(want[n]!))) return i + 1;
      }
      return 0;
    };

    let phase: "writing-v1" | "overwriting" | "done" = "writing-v1";
    const seen = { absentWhileWriting: 0, v1: 0, v2: 0, duringUpload: 0 };
    let uploading = false;
    const problems: string[] = [];
    const readerLoop = async (rd: S3Store, k: number) => {
      let everSeen = false;
      while (phase !== "done") {
        const wasUploading = uploading;
        const names = await rd.list("models");
        if (!names.includes("m")) {
          if (everSeen) problems.push(`reader ${k}: the artifact vanished during an overwrite`);
          seen.absentWhileWriting++;
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        everSeen = true;
        try {
          if (k < 2) {
            // Reader 0 keeps its cache; reader 1 downloads every time (a cold replica).
            if (k === 1) await rd.clearCache();
            const dir = await rd.localPath("models", "m");
            const v = whichVersion(await snapshot(dir));
            if (v === 0) problems.push(`reader ${k}: a partial or mixed artifact in ${dir}`);
            else seen[v === 1 ? "v1" : "v2"]++;
          } else {
            // Reader 2 streams single files from the bucket (no cache): each is whole and of one version.
            const m = await rd.readManifest("models", "m");
            const mv = versions.findIndex((want) => m.files.map((f) => f.path).join("|") === Object.keys(want).sort().join("|"));
            if (mv < 0) problems.push(`reader ${k}: a manifest of neither version`);
            for (const f of m.files) {
              const got = await (async () => readAll(await rd.openRead("models", "m", f.path)))().catch((e: unknown) => {
                // The file left with its version between the manifest read and this one (not an error).
                if (e instanceof NotFound) return undefined;
                throw e;
              });
              if (got && !versions.some((want) => want[f.path]?.equals(got))) problems.push(`reader ${k}: ${f.path} matches no version`);
            }
          }
        } catch (e) {
          problems.push(`reader ${k}: ${(e as Error).message}`);
          continue;
        }
        if (wasUploading && uploading) seen.duringUpload++;
      }
    };
    const readers = [await open(), await open(), await open()];
    const loops = readers.map((rd, k) => readerLoop(rd, k));
    const write = async (files: Record<string, Buffer>, overwrite: boolean) => {
      const w = await writer.beginWrite("models", "m", { overwrite });
      for (const [p, b] of Object.entries(files)) await w.writeFile(p, b);
      uploading = true;
      try {
        await w.commit();
      } finally {
        uploading = false;
      }
    };
    try {
      await write(v1, false);
      await new Promise((r) => setTimeout(r, 200));
      phase = "overwriting";
      await write(v2, true);
      await new Promise((r) => setTimeout(r, 1500));
    } finally {
      phase = "done";
      await Promise.all(loops);
    }
    assert.deepEqual(problems, []);
    assert.ok(seen.absentWhileWriting > 0 && seen.v1 > 0 && seen.v2 > 0, `observations: ${JSON.stringify(seen)}`);
    assert.ok(seen.duringUpload > 0, `readers ran while the writer was uploading: ${JSON.stringify(seen)}`);
  });
});

test("integrity: a corrupted, truncated or missing object is detected on download and by verify; a tampered manifest cannot escape", { skip: SKIP }, async () => {
  await withS3(async ({ open, raw, prefix }) => {
    const s = await open();
    await writeArtifact(s, "models", "m", { "a.bin": "aaaaaaaaaa", "b.bin": "bbbbbbbbbb", "c.bin": "cccccccccc" });
    const loc = await s.locate("models", "m");
    const key = (p: string) => loc.files.find((f) => f.path === p)!.key;
    // Behind the store's back: same size, different bytes; a truncated object; a missing one.
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: key("a.bin"), Body: "aaaaaXaaaa" }));
    const r = await open();
    await assert.rejects(r.localPath("models", "m"), (e: unknown) => {
      assert.ok(e instanceof IntegrityError, String(e));
      assert.equal(e.details.path, "a.bin");
      assert.equal(e.details.expectedSha256, sha("aaaaaaaaaa"));
      assert.equal(e.details.actualSha256, sha("aaaaaXaaaa"));
      return true;
    });
    assert.deepEqual(await readdir(r.cacheDir).then((d) => d.filter((x) => !x.startsWith("."))), [], "no cache entry for a corrupt artifact");
    assert.deepEqual(await readdir(join(r.cacheDir, ".tmp")), [], "the partial download is removed");
    await assert.rejects(readAll(await r.openRead("models", "m", "a.bin")), IntegrityError, "openRead's stream fails at its end");
    assert.equal((await readAll(await r.openRead("models", "m", "b.bin"))).toString(), "bbbbbbbbbb");
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: key("b.bin"), Body: "bbbb" }));
    await raw.send(new DeleteObjectCommand({ Bucket: BUCKET, Key: key("c.bin") }));
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${loc.dataPrefix}stray.bin`, Body: "?" }));
    const v = await r.verify("models", "m");
    assert.equal(v.ok, false);
    assert.equal(v.checked, 0);
    assert.deepEqual(v.missing, ["c.bin"]);
    assert.deepEqual(v.mismatched.map((x) => [x.path, x.actualSize]), [["a.bin", 10], ["b.bin", 4]]);
    assert.deepEqual(v.extra, ["stray.bin"]);
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: key("a.bin"), Body: "aaaaaaaaaa" }));
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: key("b.bin"), Body: "bbbbbbbbbb" }));
    await assert.rejects(r.localPath("models", "m"), (e: unknown) => e instanceof IntegrityError && /missing: c\.bin/.test(e.message));
    await assert.rejects(r.openRead("models", "m", "c.bin"), (e: unknown) => e instanceof IntegrityError && /missing/.test(e.message));

    // A manifest edited to point outside the artifact (or the cache) is refused before any file is written.
    const evil = {
      version: 1,
      created_at: "",
      total_size: 1,
      generation: loc.generation,
      files: [{ path: "../../../../escape.txt", size: 1, sha256: sha("x") }],
      meta: {},
    };
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/models/evil/${MANIFEST_FILE}`, Body: JSON.stringify(evil) }));
    await assert.rejects(r.localPath("models", "evil"), IntegrityError);
    await assert.rejects(stat(join(r.cacheDir, "..", "escape.txt")), /ENOENT/);
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/models/junk/${MANIFEST_FILE}`, Body: "{not json" }));
    await assert.rejects(r.readManifest("models", "junk"), InvalidArgument);
  });
});

test("a LocalStore artifact copied into the bucket as is (no generation) is readable", { skip: SKIP }, async () => {
  await withS3(async ({ open, raw, prefix }) => {
    const dir = await mkdtemp(join(tmpdir(), "qlora-flat-"));
    try {
      await mkdir(join(dir, "sub"));
      await writeFile(join(dir, "config.json"), "{}");
      await writeFile(join(dir, "sub", "w.bin"), "weights");
      await writeManifestFor(dir, { origin: "local" });
      for (const p of ["config.json", "sub/w.bin", MANIFEST_FILE]) {
        await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/models/flat/${p}`, Body: await readFile(join(dir, ...p.split("/"))) }));
      }
      const s = await open();
      assert.deepEqual(await s.list("models"), ["flat"]);
      assert.equal((await s.stat("models", "flat")).meta.origin, "local");
      const local = await s.localPath("models", "flat");
      assert.equal((await readFile(join(local, "sub", "w.bin"), "utf8")), "weights");
      assert.equal((await s.verify("models", "flat")).ok, true);
      // Overwriting it moves it to the generation layout and removes the flat files.
      const w = await open({ replacedGraceMs: 0 });
      await writeArtifact(w, "models", "flat", { "config.json": "{2}" }, { overwrite: true });
      const loc = await s.locate("models", "flat");
      assert.deepEqual(await rawKeys(raw, `${prefix}/models/flat/`), [loc.files[0]!.key, loc.manifestKey].sort());
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

test("cleanup removes orphaned generations and stale multipart uploads, keeps the current version", { skip: SKIP }, async () => {
  await withS3(async ({ open, raw, prefix }) => {
    const s = await open();
    await writeArtifact(s, "datasets", "d", { "train.jsonl": '{"text": "hi"}\n' });
    const loc = await s.locate("datasets", "d");
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/datasets/d/.g-orphan/train.jsonl`, Body: "x" }));
    await raw.send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}/datasets/crashed/.g-x/a`, Body: "x" }));
    const up = await raw.send(new CreateMultipartUploadCommand({ Bucket: BUCKET, Key: `${prefix}/datasets/crashed/.g-y/big` }));
    // A replaced version whose deletion was still pending when its process exited.
    const quitter = await open({ replacedGraceMs: 3600_000 });
    await writeArtifact(quitter, "models", "replaced", { "a.txt": "v1" });
    const before = await quitter.locate("models", "replaced");
    await writeArtifact(quitter, "models", "replaced", { "a.txt": "v2" }, { overwrite: true });
    quitter.close();
    const after = await s.locate("models", "replaced");
    assert.ok((await rawKeys(raw, `${prefix}/`)).includes(before.files[0]!.key));
    assert.equal(await s.cleanup(3600_000), 0, "nothing is old enough");
    await new Promise((r) => setTimeout(r, 1100)); // object times have one-second resolution
    const removed = await s.cleanup(0);
    assert.ok(removed >= 4, `removed ${removed}`);
    assert.deepEqual(
      await rawKeys(raw, `${prefix}/`),
      [...loc.files.map((f) => f.key), loc.manifestKey, ...after.files.map((f) => f.key), after.manifestKey].sort(),
    );
    const ups = await raw.send(new ListMultipartUploadsCommand({ Bucket: BUCKET, Prefix: `${prefix}/` }));
    assert.ok(!(ups.Uploads ?? []).some((u) => u.UploadId === up.UploadId), "the stale upload was aborted");
    assert.equal((await s.verify("datasets", "d")).ok, true);
  });
});

test("errors from the server are typed: bad credentials", { skip: SKIP }, async () => {
  if (!ENDPOINT) throw new Error(`QLORA_TEST_REQUIRE_SERVERS=1 but ${NO_SERVER}`);
  const dir = await mkdtemp(join(tmpdir(), "qlora-s3cred-"));
  const s = new S3Store({ endpoint: ENDPOINT!, bucket: BUCKET, forcePathStyle: true, credentials: { accessKeyId: "test:tester", secretAccessKey: "wrong" }, cacheDir: dir });
  try {
    await assert.rejects(s.list("models"), (e: unknown) => e instanceof QloraError && ["UNAUTHENTICATED", "PERMISSION_DENIED"].includes(e.code));
  } finally {
    s.close();
    await rm(dir, { recursive: true, force: true });
  }
});

// Every kind round-trips (keys per kind are separate).
test("every artifact kind has its own namespace", { skip: SKIP }, async () => {
  await withS3(async ({ open }) => {
    const s = await open();
    for (const k of ARTIFACT_KINDS) await writeArtifact(s, k, "same", { "k.txt": k });
    for (const k of ARTIFACT_KINDS) {
      assert.deepEqual(await s.list(k), ["same"]);
      assert.equal((await readAll(await s.openRead(k, "same", "k.txt"))).toString(), k);
    }
  });
});
