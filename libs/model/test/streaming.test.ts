import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InvalidArgument, NotFound } from "@qlora/core";
import {
  StopMatcher,
  SequenceState,
  loadTokenizer,
  parseEvalExamples,
  readEvalExamples,
  type ModelTokenizer,
} from "../src/index.js";
import { writeTinyByteLevelTokenizer, writeTinyTokenizer } from "./fixtures.js";

const dir = mkdtempSync(join(tmpdir(), "qlora-stream-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
writeTinyTokenizer(dir);
let tokP: Promise<ModelTokenizer> | null = null;
const tiny = () => (tokP ??= loadTokenizer(dir));

/** Stream `gen` after `ctx` and check the deltas against the full decode. */
function streamDeltas(tok: ModelTokenizer, ctx: number[], gen: number[]): string[] {
  const d = tok.createDetokenizer(ctx);
  const deltas = gen.map((id) => d.push(id));
  deltas.push(d.flush());
  const expected = tok.decode([...ctx, ...gen]).slice(tok.decode(ctx).length);
  assert.equal(deltas.join(""), expected, `ctx=${JSON.stringify(ctx)} gen=${JSON.stringify(gen)}`);
  assert.equal(d.text, expected);
  return deltas;
}

test("tiny tokenizer: BPE merges and byte fallback as expected", async () => {
  const tok = await tiny();
  const ids = tok.encode("the hi 日");
  assert.deepEqual(ids.map((i) => tok.idToToken(i)), ["<s>", "▁the", "▁hi", "▁", "<0xE6>", "<0x97>", "<0xA5>"]);
  assert.equal(tok.decode(ids), "the hi 日");
});

test("incremental detokenizer: deltas concatenate to the full decode", async () => {
  const tok = await tiny();
  const texts = ["the hi 日本 ab, c!", "€uro 😀 smile", "  spaced   out ", "héllo\nnext line", "ab"];
  for (const t of texts) {
    const ids = tok.encode(t);
    // As a completion after BOS only, and after a prompt prefix split at every point.
    streamDeltas(tok, [ids[0]!], ids.slice(1));
    for (let cut = 1; cut < ids.length; cut++) streamDeltas(tok, ids.slice(0, cut), ids.slice(cut));
  }
});

test("incremental detokenizer: a multibyte character comes out whole, once complete", async () => {
  const tok = await tiny();
  const ids = tok.encode("hi 😀!");
  const names = ids.map((i) => tok.idToToken(i));
  const first = names.indexOf("<0xF0>");
  assert.ok(first > 0, names.join(" "));
  const deltas = streamDeltas(tok, ids.slice(0, 2), ids.slice(2));
  // "▁" alone is complete text; the first three bytes of the emoji give nothing, the fourth
  // gives the whole character.
  const pieces = ids.slice(2).map((id, i) => [tok.idToToken(id), deltas[i]]);
  assert.deepEqual(pieces, [
    ["▁", " "],
    ["<0xF0>", ""],
    ["<0x9F>", ""],
    ["<0x98>", ""],
    ["<0x80>", "😀"],
    ["!", "!"],
  ]);
});

test("incremental detokenizer: unfinished bytes at the end flush as U+FFFD; specials give no text", async () => {
  const tok = await tiny();
  const bos = tok.encode("")[0]!;
  const e6 = tok.tokenToId("<0xE6>")!;
  const d = tok.createDetokenizer([bos]);
  assert.equal(d.push(tok.tokenToId("▁hi")!), "hi");
  assert.equal(d.push(e6), "");
  assert.equal(d.flush(), "\uFFFD");
  // A special token mid-stream: no text, and the next token keeps its leading space.
  const d2 = tok.createDetokenizer([bos, tok.tokenToId("▁hi")!]);
  assert.equal(d2.push(bos), "");
  assert.equal(d2.push(tok.tokenToId("▁the")!), " the");
});

test("byte-level BPE (OPT/GPT-2 style): round trips and streaming deltas", async () => {
  const d = mkdtempSync(join(tmpdir(), "qlora-bl-"));
  try {
    writeTinyByteLevelTokenizer(d);
    const tok = await loadTokenizer(d);
    for (const t of ["the cat", " leading space", "emoji 😀 and 日本語!", "a\n\nb"]) {
      const ids = tok.encode(t);
      assert.equal(ids[0], 0, "BOS (</s>) first");
      assert.equal(tok.decode(ids), t);
      for (let cut = 1; cut < ids.length; cut++) streamDeltas(tok, ids.slice(0, cut), ids.slice(cut));
    }
    // Multi-byte characters are single bytes here: nothing is emitted until the character completes.
    const ids = tok.encode("x 😀", { addSpecialTokens: false });
    const det = tok.createDetokenizer([0]);
    const deltas = ids.map((id) => det.push(id));
    assert.deepEqual(deltas, ["x", " ", "", "", "", "😀"]);
    assert.equal(deltas.join(""), "x 😀");
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test("stop matcher: split over deltas, earliest stop wins, text before it is kept", () => {
  const m = new StopMatcher(["END", "\n\n"]);
  const out: string[] = [];
  for (const d of ["Hello E", "N", "D of story"]) {
    const r = m.push(d);
    out.push(r.text);
    if (r.stopped) {
      assert.equal(r.stop, "END");
      break;
    }
  }
  assert.deepEqual(out, ["Hello ", "", ""]);

  const m2 = new StopMatcher(["END"]);
  assert.deepEqual(m2.push("aEN"), { text: "a", stopped: false });
  assert.deepEqual(m2.push("Z"), { text: "ENZ", stopped: false });
  assert.deepEqual(m2.push("xE"), { text: "x", stopped: false });
  assert.equal(m2.flush(), "E");

  const m3 = new StopMatcher(["b\n\n", "\n\n"]);
  const r3 = m3.push("ab\n\nc");
  assert.deepEqual(r3, { text: "a", stopped: true, stop: "b\n\n" });
  assert.deepEqual(m3.push("more"), { text: "", stopped: true });

  assert.deepEqual(new StopMatcher().push("anything"), { text: "anything", stopped: false });
  assert.throws(() => new StopMatcher([""]), InvalidArgument);
});

test("sequence state: max tokens, EOS, stop strings across tokens", async () => {
  const tok = await tiny();
  const prompt = tok.encode("hi");
  const gen = tok.encode("the ab the hi", { addSpecialTokens: false });

  // Length: exactly maxNewTokens tokens, the text of all of them.
  const s1 = new SequenceState(tok, prompt, { maxNewTokens: 3, eosTokenIds: [2] });
  const r1 = gen.slice(0, 3).map((id) => s1.accept(id));
  assert.deepEqual(r1.map((r) => r.finished), [false, false, true]);
  assert.equal(r1[2]!.finishReason, "length");
  assert.equal(s1.text, r1.map((r) => r.delta).join(""));
  assert.equal(s1.text, tok.decode([...prompt, ...gen.slice(0, 3)]).slice(tok.decode(prompt).length));
  assert.deepEqual(s1.accept(gen[3]!), { delta: "", finished: true, finishReason: "length" });
  assert.equal(s1.tokenIds.length, 3);

  // EOS: kept in tokenIds, produces no text, finish "stop".
  const s2 = new SequenceState(tok, prompt, { maxNewTokens: 10, eosTokenIds: [2] });
  s2.accept(gen[0]!);
  const r2 = s2.accept(2);
  assert.deepEqual(r2, { delta: "", finished: true, finishReason: "stop" });
  assert.deepEqual(s2.tokenIds, [gen[0], 2]);
  assert.equal(s2.text, " the");

  // Stop string spanning tokens (" the" + " hi" → "e h"): text cut before it.
  const s3 = new SequenceState(tok, prompt, { maxNewTokens: 10, stop: ["e h"] });
  const deltas: string[] = [];
  let last = null;
  for (const id of gen) {
    last = s3.accept(id);
    deltas.push(last.delta);
    if (last.finished) break;
  }
  assert.equal(last?.finishReason, "stop");
  assert.equal(s3.text, " the ab th");
  assert.equal(deltas.join(""), s3.text);

  // Context limit ends with "length" before maxNewTokens.
  const s4 = new SequenceState(tok, prompt, { maxNewTokens: 10, maxTotalTokens: prompt.length + 2 });
  assert.equal(s4.accept(gen[0]!).finished, false);
  assert.equal(s4.accept(gen[1]!).finishReason, "length");

  // Cancel.
  const s5 = new SequenceState(tok, prompt, { maxNewTokens: 10 });
  assert.equal(s5.cancel().finishReason, "cancelled");
  assert.equal(s5.accept(gen[0]!).finishReason, "cancelled");

  assert.throws(() => new SequenceState(tok, prompt, { maxNewTokens: 0 }), InvalidArgument);
  assert.throws(() => new SequenceState(tok, [], { maxNewTokens: 1 }), InvalidArgument);
  assert.throws(() => new SequenceState(tok, prompt, { maxNewTokens: 1, maxTotalTokens: prompt.length }), InvalidArgument);
});

test("sequence state: the context holds prompt + generated ids for the repetition penalty", async () => {
  const tok = await tiny();
  const prompt = tok.encode("hi");
  const s = new SequenceState(tok, prompt, { maxNewTokens: 100 });
  const added: number[] = [];
  for (let i = 0; i < 40; i++) {
    const id = 259 + (i % 20);
    added.push(id);
    s.accept(id);
  }
  assert.deepEqual(Array.from(s.contextIds), [...prompt, ...added]);
});

test("eval data: jsonl and txt, malformed lines reported with numbers", async () => {
  assert.deepEqual(parseEvalExamples('{"text": "a b"}\n\n{"text": "c", "x": 1}\r\n', "jsonl"), ["a b", "c"]);
  assert.deepEqual(parseEvalExamples("first line\n\n  \nsecond\r\n", "txt"), ["first line", "second"]);
  assert.throws(
    () => parseEvalExamples('{"text": "ok"}\n{"text": 3}\nnot json\n[1]\n', "jsonl", "f.jsonl"),
    (e: unknown) => e instanceof InvalidArgument && /f\.jsonl: line 2: "text" must be a string; line 3: not valid JSON.*; line 4: expected an object/.test(e.message),
  );
  assert.throws(() => parseEvalExamples("\n\n", "txt"), /no examples/);

  const d = mkdtempSync(join(tmpdir(), "qlora-data-"));
  try {
    writeFileSync(join(d, "a.jsonl"), '{"text": "hello"}\n');
    writeFileSync(join(d, "a.csv"), "x");
    assert.deepEqual(await readEvalExamples(join(d, "a.jsonl")), ["hello"]);
    await assert.rejects(readEvalExamples(join(d, "missing.txt")), NotFound);
    await assert.rejects(readEvalExamples(join(d, "a.csv")), InvalidArgument);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});
