import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { QloraError } from "@qlora/core";
import { receiveUpload, validateUploadPath, type UploadMessage } from "../src/index.js";
import { dirStaging, tempDir } from "./fixture.js";

async function* stream(msgs: UploadMessage[]): AsyncGenerator<UploadMessage> {
  for (const m of msgs) yield m;
}
const msg = (p: string, data: string | Uint8Array, last = true, extra: Partial<UploadMessage> = {}, sha256 = ""): UploadMessage => ({
  name: "",
  overwrite: false,
  ...extra,
  chunk: { path: p, data: typeof data === "string" ? Buffer.from(data) : data, last, sha256 },
});
const sha = (s: string) => createHash("sha256").update(s).digest("hex");

function isCode(code: string, pattern?: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof QloraError, `expected a QloraError, got ${String(e)}`);
    assert.equal(e.code, code);
    if (pattern) assert.match(e.message, pattern);
    return true;
  };
}

describe("validateUploadPath", () => {
  test("accepts relative POSIX paths", () => {
    for (const p of ["config.json", "a/b/c.safetensors", ".hidden", "a..b"]) assert.equal(validateUploadPath(p), p);
  });
  test("rejects escaping, absolute and odd paths", () => {
    for (const p of ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "C:/x", "c:x", "a\\b", "x\u0000y", "..", "."]) {
      assert.throws(() => validateUploadPath(p), isCode("INVALID_ARGUMENT"), JSON.stringify(p));
    }
  });
});

describe("receiveUpload", () => {
  test("writes files (chunked, nested, interleaved), checks sha256, commits", async () => {
    const root = await tempDir();
    const log: string[] = [];
    const res = await receiveUpload(
      stream([
        msg("config.json", "{}", true, { name: "m1" }),
        msg("w/model.bin", "abc", false),
        msg("tok.json", "[1]", false),
        msg("w/model.bin", "def", true, {}, sha("abcdef").toUpperCase()),
        msg("tok.json", "", true),
      ]),
      { begin: dirStaging(root, log) },
    );
    assert.equal(res.name, "m1");
    assert.equal(res.totalBytes, 2 + 6 + 3);
    assert.deepEqual(res.files, [
      { path: "config.json", sizeBytes: 2, sha256: sha("{}") },
      { path: "tok.json", sizeBytes: 3, sha256: sha("[1]") },
      { path: "w/model.bin", sizeBytes: 6, sha256: sha("abcdef") },
    ]);
    assert.equal(await readFile(path.join(root, "m1", "w", "model.bin"), "utf8"), "abcdef");
    assert.deepEqual(log, ["commit m1"]);
  });

  const failures: [string, UploadMessage[], string, RegExp, { maxTotalBytes?: number; maxFiles?: number }?][] = [
    ["no name", [msg("a", "x")], "INVALID_ARGUMENT", /must set name/],
    ["escaping path", [msg("../a", "x", true, { name: "m" })], "INVALID_ARGUMENT", /invalid file path/],
    ["absolute path", [msg("/tmp/a", "x", true, { name: "m" })], "INVALID_ARGUMENT", /absolute/],
    ["sha mismatch", [msg("a", "x", true, { name: "m" }, sha("y"))], "INVALID_ARGUMENT", /sha256 mismatch/],
    ["file never completed", [msg("a", "x", false, { name: "m" })], "INVALID_ARGUMENT", /no 'last' chunk/],
    ["file sent twice", [msg("a", "x", true, { name: "m" }), msg("a", "y")], "INVALID_ARGUMENT", /sent twice/],
    ["file vs directory", [msg("a", "x", true, { name: "m" }), msg("a/b", "y")], "INVALID_ARGUMENT", /conflicts/],
    ["no files", [{ name: "m", overwrite: false }], "INVALID_ARGUMENT", /no files/],
    ["too large", [msg("a", "12345", false, { name: "m" }), msg("a", "678901", true)], "RESOURCE_EXHAUSTED", /larger than/, { maxTotalBytes: 10 }],
    ["too many files", [msg("a", "1", true, { name: "m" }), msg("b", "2")], "RESOURCE_EXHAUSTED", /more than 1 files/, { maxFiles: 1 }],
  ];
  for (const [what, msgs, code, pattern, limits] of failures) {
    test(`${what} → ${code}, staging discarded`, async () => {
      const root = await tempDir();
      const log: string[] = [];
      await assert.rejects(receiveUpload(stream(msgs), { begin: dirStaging(root, log), ...limits }), isCode(code, pattern));
      assert.equal(log.includes("commit m"), false);
      assert.deepEqual(await readdir(root), [], "nothing left in the store");
    });
  }

  test("existing artifact without overwrite → ALREADY_EXISTS (from the store); with overwrite → replaced", async () => {
    const root = await tempDir();
    const begin = dirStaging(root);
    await receiveUpload(stream([msg("a", "1", true, { name: "m" })]), { begin });
    await assert.rejects(receiveUpload(stream([msg("a", "2", true, { name: "m" })]), { begin }), isCode("ALREADY_EXISTS"));
    await receiveUpload(stream([msg("a", "3", true, { name: "m", overwrite: true })]), { begin });
    assert.equal(await readFile(path.join(root, "m", "a"), "utf8"), "3");
  });

  test("validate() and checkPath() failures abort; a failing input stream aborts", async () => {
    const root = await tempDir();
    const log: string[] = [];
    const begin = dirStaging(root, log);
    await assert.rejects(
      receiveUpload(stream([msg("a", "1", true, { name: "m" })]), {
        begin,
        validate: async (dir, files) => {
          assert.deepEqual(await readdir(dir), ["a"]);
          assert.equal(files.length, 1);
          throw new QloraError("FAILED_PRECONDITION", "not a checkpoint");
        },
      }),
      isCode("FAILED_PRECONDITION"),
    );
    await assert.rejects(
      receiveUpload(stream([msg("a.exe", "1", true, { name: "m" })]), {
        begin,
        checkPath: (p) => {
          if (!p.endsWith(".txt")) throw new QloraError("INVALID_ARGUMENT", "only .txt");
        },
      }),
      isCode("INVALID_ARGUMENT", /only \.txt/),
    );
    async function* broken(): AsyncGenerator<UploadMessage> {
      yield msg("a", "1", false, { name: "m" });
      throw new Error("client went away");
    }
    await assert.rejects(receiveUpload(broken(), { begin }), /client went away/);
    assert.deepEqual(log, ["abort m", "abort m", "abort m"]);
    assert.deepEqual(await readdir(root), []);
  });
});
