import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound } from "@qlora/core";
import { LocalStore, MANIFEST_FILE, resolveUnder, validateName, validateRelativePath, writeManifestFor } from "../src/index.js";

const sha = (b: string | Uint8Array) => createHash("sha256").update(b).digest("hex");

async function withStore(fn: (s: LocalStore, root: string) => Promise<void>): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), "qlora-store-"));
  try {
    await fn(new LocalStore(root), root);
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

test("validateName accepts good names and rejects escapes", () => {
  for (const ok of ["a", "stories260K", "Llama-3.2-1B", "x_y.z", "0", "a".repeat(128)]) assert.equal(validateName(ok), ok);
  const bad: unknown[] = ["", "..", "../x", "a/..", "a/b", "/etc", "/abs/path", "a..b", ".hidden", "-x", "a\\b", "a b", "a".repeat(129), "é", 5, null];
  for (const b of bad) assert.throws(() => validateName(b), InvalidArgument, `should reject ${JSON.stringify(b)}`);
});

test("validateRelativePath and resolveUnder keep paths inside", () => {
  assert.equal(validateRelativePath("config.json"), "config.json");
  assert.equal(validateRelativePath("ckpt-1/adapter_model.safetensors"), "ckpt-1/adapter_model.safetensors");
  for (const b of ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", ".hidden", "a/\0"]) {
    assert.throws(() => validateRelativePath(b), InvalidArgument, b);
  }
  assert.equal(resolveUnder("/srv/data", "models", "m"), "/srv/data/models/m");
  assert.throws(() => resolveUnder("/srv/data", "models", "../../etc"), InvalidArgument);
  assert.throws(() => resolveUnder("/srv/data", "/etc"), InvalidArgument);
  assert.throws(() => resolveUnder("/srv/data", "."), InvalidArgument);
});

test("write, commit, list, stat, manifest, verify", async () => {
  await withStore(async (s) => {
    const w = await s.beginWrite("models", "m1");
    const f1 = await w.writeFile("config.json", '{"a": 1}');
    assert.equal(f1.sha256, sha('{"a": 1}'));
    await w.writeFile("sub/data.bin", Readable.from([Buffer.from("hello "), Buffer.from("world")]));
    await writeFile(join(w.dir, "direct.txt"), "written by a tool");
    // Not visible until commit.
    assert.deepEqual(await s.list("models"), []);
    assert.equal(await s.exists("models", "m1"), false);
    const m = await w.commit({ meta: { source_model: "orig" } });
    assert.deepEqual(
      m.files.map((f) => f.path),
      ["config.json", "direct.txt", "sub/data.bin"],
    );
    assert.equal(m.files[2]!.sha256, sha("hello world"));
    assert.equal(m.total_size, 8 + 17 + 11);
    assert.deepEqual(await s.list("models"), ["m1"]);
    const st = await s.stat("models", "m1");
    assert.equal(st.sizeBytes, 36);
    assert.equal(st.meta.source_model, "orig");
    assert.equal(st.hasManifest, true);
    const onDisk = JSON.parse(await readFile(join(await s.localPath("models", "m1"), MANIFEST_FILE), "utf8"));
    assert.equal(onDisk.files[1].sha256, sha("written by a tool"));
    assert.deepEqual((await s.verify("models", "m1")).ok, true);
    const chunks: Buffer[] = [];
    for await (const c of await s.openRead("models", "m1", "sub/data.bin")) chunks.push(c as Buffer);
    assert.equal(Buffer.concat(chunks).toString(), "hello world");
    // Tampering is detected.
    await writeFile(join(await s.localPath("models", "m1"), "direct.txt"), "changed!");
    const v = await s.verify("models", "m1");
    assert.equal(v.ok, false);
    assert.deepEqual(v.mismatched.map((x) => x.path), ["direct.txt"]);
    await writeFile(join(await s.localPath("models", "m1"), "extra"), "x");
    assert.deepEqual((await s.verify("models", "m1")).extra, ["extra"]);
    // The writer is spent.
    await assert.rejects(w.writeFile("x", "y"), FailedPrecondition);
    await w.abort(); // no-op after commit
    assert.equal(await s.exists("models", "m1"), true);
  });
});

test("abort leaves nothing; listing ignores staging and junk", async () => {
  await withStore(async (s, root) => {
    const w = await s.beginWrite("adapters", "a1");
    await w.writeFile("adapter_config.json", "{}");
    await mkdir(join(root, "adapters", ".half-written"), { recursive: true });
    await mkdir(join(root, "adapters", "bad name"), { recursive: true });
    assert.deepEqual(await s.list("adapters"), []);
    await w.abort();
    assert.deepEqual(await readdir(join(root, ".staging")), []);
    assert.equal(await s.exists("adapters", "a1"), false);
    await assert.rejects(w.commit(), FailedPrecondition);
  });
});

test("overwrite semantics and concurrent writers", async () => {
  await withStore(async (s) => {
    const w1 = await s.beginWrite("datasets", "d");
    await w1.writeFile("old.txt", "old");
    await w1.commit();
    await assert.rejects(s.beginWrite("datasets", "d"), AlreadyExists);
    const w2 = await s.beginWrite("datasets", "d", { overwrite: true });
    await w2.writeFile("new.txt", "new");
    assert.deepEqual((await s.stat("datasets", "d")).files.map((f) => f.path), ["old.txt"]);
    await w2.commit();
    const st = await s.stat("datasets", "d");
    assert.deepEqual(st.files.map((f) => f.path), ["new.txt"]);
    assert.deepEqual(await readdir(await s.localPath("datasets", "d")), [MANIFEST_FILE, "new.txt"].sort());

    // Two writers for a new name: the first commit wins, the second gets AlreadyExists and stays abortable.
    const a = await s.beginWrite("datasets", "race");
    const b = await s.beginWrite("datasets", "race");
    await a.writeFile("f", "a");
    await b.writeFile("f", "b");
    await a.commit();
    await assert.rejects(b.commit(), AlreadyExists);
    await b.abort();
    const chunks: Buffer[] = [];
    for await (const c of await s.openRead("datasets", "race", "f")) chunks.push(c as Buffer);
    assert.equal(Buffer.concat(chunks).toString(), "a");
  });
});

test("delete, not found, and escaping names", async () => {
  await withStore(async (s) => {
    await assert.rejects(s.delete("models", "nope"), NotFound);
    await assert.rejects(s.stat("models", "nope"), NotFound);
    await assert.rejects(s.localPath("models", "nope"), NotFound);
    const w = await s.beginWrite("checkpoints", "c");
    await w.writeFile("a", "1");
    await w.commit();
    await assert.rejects(s.openRead("checkpoints", "c", "../c/a"), InvalidArgument);
    await assert.rejects(s.openRead("checkpoints", "c", "missing"), NotFound);
    await assert.rejects(w.writeFile("../../x", "1"), FailedPrecondition);
    await s.delete("checkpoints", "c");
    assert.deepEqual(await s.list("checkpoints"), []);
    for (const bad of ["..", "../x", "a/b", "/etc", ""]) {
      await assert.rejects(s.exists("models", bad), InvalidArgument);
      await assert.rejects(s.beginWrite("models", bad), InvalidArgument);
      await assert.rejects(s.delete("models", bad), InvalidArgument);
    }
    await assert.rejects(s.list("secrets" as never), InvalidArgument);
    const w2 = await s.beginWrite("models", "m");
    await assert.rejects(w2.writeFile("../escape", "x"), InvalidArgument);
    await assert.rejects(w2.writeFile("/abs", "x"), InvalidArgument);
    await assert.rejects(w2.writeFile(MANIFEST_FILE, "x"), InvalidArgument);
    await w2.abort();
  });
});

test("commit keeps meta of a manifest a tool already wrote in the staging dir", async () => {
  await withStore(async (s) => {
    const w = await s.beginWrite("models", "q");
    await writeFile(join(w.dir, "config.json"), "{}");
    await writeManifestFor(w.dir, { source_model: "base", tool: "quantizer" });
    await writeFile(join(w.dir, "late.txt"), "added after the tool's manifest");
    const m = await w.commit({ meta: { tool: "store" } });
    assert.deepEqual(m.meta, { source_model: "base", tool: "store" });
    assert.deepEqual(m.files.map((f) => f.path), ["config.json", "late.txt"]);
    assert.equal((await s.verify("models", "q")).ok, true);
  });
});
