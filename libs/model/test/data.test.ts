/**
 * Training data: TextDataset blocking, jsonl record shapes and their loss masks, packing, truncation,
 * bad input, and the per-epoch order.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync, cpSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InvalidArgument } from "@qlora/core";
import { loadTokenizer, type ModelTokenizer } from "../src/tokenizer.js";
import {
  alpacaPrompt,
  buildDataset,
  collate,
  dataTokenizer,
  epochOrder,
  loadDataset,
  microBatch,
  microBatchesPerEpoch,
  type DataTokenizer,
  type TrainDataset,
} from "../src/data/index.js";
import { skipNoStories, storiesDir, storiesReference } from "./fixtures.js";

let cached: ModelTokenizer | undefined;
async function stories(): Promise<ModelTokenizer> {
  cached ??= await loadTokenizer(storiesDir);
  return cached;
}
async function storiesTok(): Promise<DataTokenizer> {
  return dataTokenizer(await stories());
}

function jsonl(...records: unknown[]): string {
  return records.map((r) => JSON.stringify(r)).join("\n") + "\n";
}

function targetIds(ds: TrainDataset, row: number): number[] {
  const r = ds.rows[row]!;
  const out: number[] = [];
  for (let t = 1; t < r.tokens.length; t++) if (r.targets[t]) out.push(r.tokens[t]!);
  return out;
}

async function rejects(p: () => unknown, pattern: RegExp): Promise<void> {
  await assert.rejects(
    async () => p(),
    (e: unknown) => {
      assert.ok(e instanceof InvalidArgument, `expected InvalidArgument, got ${String(e)}`);
      assert.match((e as Error).message, pattern);
      return true;
    },
  );
}

test("txt: TextDataset blocks of (block_size - 1) tokens + BOS, remainder dropped", { skip: skipNoStories }, async () => {
  const ref = storiesReference();
  // The reference text's tokens are known independently of this code: prompt ids + greedy ids.
  const ids = [...ref.greedy.prompt_ids.slice(1), ...ref.greedy.new_ids];
  assert.equal(ids.length, 68);
  const tok = await storiesTok();

  const ds = buildDataset(ref.greedy.text, { source: "story.txt", format: "txt" }, tok, { blockSize: 16 });
  // 68 tokens / 15 per block = 4 blocks, 8 left over.
  assert.equal(ds.rows.length, 4);
  assert.equal(ds.stats.remainderTokens, 8);
  assert.deepEqual(ds.kinds, ["text-blocks"]);
  for (let b = 0; b < 4; b++) {
    assert.deepEqual(Array.from(ds.rows[b]!.tokens), [1, ...ids.slice(15 * b, 15 * b + 15)]);
  }
  // Each block predicts its 15 content tokens (BOS is never a target).
  assert.equal(ds.stats.targetTokens, 4 * 15);

  const batch = collate([ds.rows[0]!, ds.rows[1]!], ds.padId);
  assert.equal(batch.seqLen, 16);
  assert.equal(batch.batchSize, 2);
  for (let t = 0; t < 15; t++) assert.equal(batch.labels[t], ds.rows[0]!.tokens[t + 1]);
  assert.equal(batch.labels[15], -100);
  assert.equal(batch.targetTokens, 30);
  assert.equal(batch.segments, undefined);

  // block 64: one block of 63 tokens, 5 left.
  const ds64 = buildDataset(ref.greedy.text, { source: "story.txt", format: "txt" }, tok, { blockSize: 64 });
  assert.equal(ds64.rows.length, 1);
  assert.equal(ds64.stats.remainderTokens, 5);
  assert.deepEqual(Array.from(ds64.rows[0]!.tokens), [1, ...ids.slice(0, 63)]);

  // Fewer tokens than one block: nothing to train on.
  await rejects(
    () => buildDataset(ref.greedy.text, { source: "story.txt", format: "txt" }, tok, { blockSize: 128 }),
    /no usable tokens: 68 tokens, fewer than one block of 127/,
  );
});

test("jsonl {text}: BOS + text + EOS, every token after BOS is a target", { skip: skipNoStories }, async () => {
  const ref = storiesReference();
  const tok = await storiesTok();
  const ds = buildDataset(jsonl({ text: ref.cross_entropy.text }), { source: "t.jsonl", format: "jsonl" }, tok, {
    blockSize: 64,
  });
  assert.deepEqual(ds.kinds, ["text"]);
  assert.deepEqual(Array.from(ds.rows[0]!.tokens), [...ref.cross_entropy.ids, 2]);
  assert.deepEqual(targetIds(ds, 0), [...ref.cross_entropy.ids.slice(1), 2]);
});

test("jsonl {prompt, completion}: loss only on the completion and EOS", { skip: skipNoStories }, async () => {
  const ref = storiesReference();
  const tok = await storiesTok();
  const ds = buildDataset(
    jsonl({ prompt: "Once upon a time", completion: ", there was a little girl named Lily." }),
    { source: "pc.jsonl", format: "jsonl" },
    tok,
    { blockSize: 64 },
  );
  assert.deepEqual(ds.kinds, ["prompt-completion"]);
  const row = ds.rows[0]!;
  // Prompt + completion tokenize to the reference ids; the prompt is the first 5 (with BOS).
  assert.deepEqual(Array.from(row.tokens), [...ref.cross_entropy.ids, 2]);
  assert.deepEqual(Array.from(row.targets.slice(0, 5)), [0, 0, 0, 0, 0]);
  assert.deepEqual(targetIds(ds, 0), [...ref.cross_entropy.ids.slice(5), 2]);
  const batch = collate([row], ds.padId);
  // Position 3 predicts the prompt's last token: no label; position 4 predicts the completion's first.
  assert.equal(batch.labels[3], -100);
  assert.equal(batch.labels[4], ref.cross_entropy.ids[5]);
  assert.equal(batch.targetTokens, ref.cross_entropy.ids.length - 5 + 1);
});

test("jsonl alpaca: fixed prompt format, loss only on the output", { skip: skipNoStories }, async () => {
  const tok = await stories();
  const dt = dataTokenizer(tok);
  assert.equal(
    alpacaPrompt("Say hi.", ""),
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n" +
      "### Instruction:\nSay hi.\n\n### Response:\n",
  );
  assert.equal(
    alpacaPrompt("Translate {input}", "cat $1"),
    "Below is an instruction that describes a task, paired with an input that provides further context. " +
      "Write a response that appropriately completes the request.\n\n" +
      "### Instruction:\nTranslate {input}\n\n### Input:\ncat $1\n\n### Response:\n",
  );
  const ds = buildDataset(
    jsonl(
      { instruction: "Tell a story.", input: "", output: "Lily saw a cat." },
      { instruction: "Name the girl.", input: "Once upon a time there was Lily.", output: "Lily" },
    ),
    { source: "a.jsonl", format: "jsonl" },
    dt,
    { blockSize: 256 },
  );
  assert.deepEqual(ds.kinds, ["alpaca"]);
  for (const [i, output, instr] of [
    [0, "Lily saw a cat.", "Tell a story."],
    [1, "Lily", "Name the girl."],
  ] as const) {
    const targets = targetIds(ds, i);
    assert.equal(targets.at(-1), 2, "EOS is trained");
    assert.equal(tok.decode(targets.slice(0, -1)), output);
    // The whole prompt (header included) is context only.
    const row = ds.rows[i]!;
    const firstTarget = row.targets.indexOf(1);
    const promptText = tok.decode(Array.from(row.tokens.slice(0, firstTarget)));
    assert.ok(promptText.endsWith("### Response:\n"), promptText);
    assert.ok(promptText.includes(instr));
  }
});

const CHATML =
  "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

async function chatTokenizer(): Promise<ModelTokenizer> {
  const dir = mkdtempSync(join(tmpdir(), "qlora-chat-"));
  mkdirSync(dir, { recursive: true });
  cpSync(join(storiesDir, "tokenizer.json"), join(dir, "tokenizer.json"));
  const cfg = JSON.parse(readFileSync(join(storiesDir, "tokenizer_config.json"), "utf8"));
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify({ ...cfg, chat_template: CHATML }));
  return loadTokenizer(dir);
}

test("jsonl chat: loss only on assistant turns, end-of-turn marker included", { skip: skipNoStories }, async () => {
  const tok = await chatTokenizer();
  const messages = [
    { role: "system", content: "You tell stories." },
    { role: "user", content: "Who is Lily?" },
    { role: "assistant", content: "Lily is a girl." },
    { role: "user", content: "What does she like?" },
    { role: "assistant", content: "She likes the park." },
  ];
  const ds = buildDataset(jsonl({ messages }), { source: "c.jsonl", format: "jsonl" }, dataTokenizer(tok), {
    blockSize: 512,
  });
  assert.deepEqual(ds.kinds, ["chat"]);
  const row = ds.rows[0]!;
  // The row is the rendered conversation, tokenized without added special tokens.
  const rendered = tok.applyChatTemplate(messages, { addGenerationPrompt: false });
  assert.deepEqual(Array.from(row.tokens), tok.encode(rendered, { addSpecialTokens: false }));
  // Collect maximal runs of targets and decode them.
  const spans: string[] = [];
  let t = 0;
  while (t < row.tokens.length) {
    if (!row.targets[t]) {
      t++;
      continue;
    }
    const s = t;
    while (t < row.tokens.length && row.targets[t]) t++;
    spans.push(tok.decodeRaw(Array.from(row.tokens.slice(s, t)), false));
  }
  assert.equal(spans.length, 2);
  assert.match(spans[0]!, /^\s?Lily is a girl\.<\|im_end\|>\n$/);
  assert.match(spans[1]!, /^\s?She likes the park\.<\|im_end\|>\n$/);

  // A conversation with no assistant turn has nothing to train on.
  await rejects(
    () =>
      buildDataset(jsonl({ messages: [{ role: "user", content: "hi" }] }), { source: "c.jsonl", format: "jsonl" }, dataTokenizer(tok), {
        blockSize: 64,
      }),
    /no usable tokens/,
  );
  // A model without a chat template cannot use chat records.
  await rejects(
    async () =>
      buildDataset(jsonl({ messages }), { source: "c.jsonl", format: "jsonl" }, await storiesTok(), { blockSize: 64 }),
    /c\.jsonl:1: chat records need a chat template/,
  );
});

test("packing: examples share rows with segment ids; no label crosses an example boundary", { skip: skipNoStories }, async () => {
  const tok = await storiesTok();
  const texts = ["Lily saw a cat.", "Tom ran fast.", "The sun was hot.", "A big dog."];
  const lens = texts.map((t) => tok.encode(t, true).length + 1); // + EOS
  const blockSize = lens[0]! + lens[1]! + 1; // the first two fit, the third does not
  const content = jsonl(...texts.map((text) => ({ text })));
  const packed = buildDataset(content, { source: "p.jsonl", format: "jsonl" }, tok, { blockSize, packing: true });
  const plain = buildDataset(content, { source: "p.jsonl", format: "jsonl" }, tok, { blockSize });
  assert.equal(plain.rows.length, 4);
  assert.ok(packed.packing);
  assert.ok(packed.rows.length < 4);
  const r0 = packed.rows[0]!;
  assert.equal(r0.tokens.length, lens[0]! + lens[1]!);
  assert.deepEqual(
    Array.from(r0.segments!),
    [...Array(lens[0]).fill(0), ...Array(lens[1]).fill(1)],
  );
  // Same tokens as the unpacked rows, concatenated.
  assert.deepEqual(Array.from(r0.tokens), [...plain.rows[0]!.tokens, ...plain.rows[1]!.tokens]);
  // Packing loses no targets: every example's own predictions survive, none is added.
  assert.equal(packed.stats.targetTokens, plain.stats.targetTokens);

  const batch = collate([packed.rows[0]!, packed.rows[packed.rows.length - 1]!], packed.padId);
  const T = batch.seqLen;
  // The last token of example 0 (EOS) would "predict" the BOS of example 1: no label there.
  assert.equal(batch.labels[lens[0]! - 1], -100);
  assert.equal(batch.labels[lens[0]! - 2], 2, "EOS of example 0 is predicted");
  assert.equal(batch.labels[lens[0]!], r0.tokens[lens[0]! + 1]);
  // Padding of the shorter second row gets a segment of its own.
  const r1 = packed.rows[packed.rows.length - 1]!;
  if (r1.tokens.length < T) {
    const lastSeg = r1.segments![r1.tokens.length - 1]!;
    assert.equal(batch.segments![T + r1.tokens.length], lastSeg + 1);
    assert.equal(batch.tokens[T + r1.tokens.length], packed.padId);
  }
  assert.notEqual(r1, r0);
  assert.equal(batch.targetTokens, countRowTargets(r0) + countRowTargets(r1));
});

function countRowTargets(r: { targets: Uint8Array; segments?: Int32Array }): number {
  let n = 0;
  for (let t = 1; t < r.targets.length; t++) if (r.targets[t] && (!r.segments || r.segments[t] === r.segments[t - 1])) n++;
  return n;
}

test("truncation: examples longer than the block are cut to block_size", { skip: skipNoStories }, async () => {
  const ref = storiesReference();
  const tok = await storiesTok();
  const ds = buildDataset(
    jsonl({ text: ref.greedy.text }, { text: "Lily." }),
    { source: "t.jsonl", format: "jsonl" },
    tok,
    { blockSize: 10 },
  );
  assert.equal(ds.stats.truncated, 1);
  assert.deepEqual(Array.from(ds.rows[0]!.tokens), [1, ...ref.greedy.prompt_ids.slice(1), ...ref.greedy.new_ids].slice(0, 10));
  assert.ok(ds.rows[1]!.tokens.length < 10);
  // A prompt that fills the whole block leaves nothing to learn: dropped, and if all are, rejected.
  const long = "Once upon a time ".repeat(10);
  const ds2 = buildDataset(
    jsonl({ prompt: long, completion: " Lily." }, { prompt: "Hi", completion: " Lily." }),
    { source: "pc.jsonl", format: "jsonl" },
    tok,
    { blockSize: 10 },
  );
  assert.equal(ds2.stats.dropped, 1);
  assert.equal(ds2.rows.length, 1);
  await rejects(
    () => buildDataset(jsonl({ prompt: long, completion: " Lily." }), { source: "pc.jsonl", format: "jsonl" }, tok, { blockSize: 10 }),
    /pc\.jsonl has no usable tokens/,
  );
});

test("bad input is InvalidArgument with the reason", { skip: skipNoStories }, async () => {
  const tok = await storiesTok();
  const build = (content: string | Uint8Array, source = "d.jsonl") =>
    buildDataset(content, { source, format: source.endsWith(".txt") ? "txt" : "jsonl" }, tok, { blockSize: 32 });
  await rejects(() => build("", "d.txt"), /d\.txt is empty/);
  await rejects(() => build("\n  \n", "d.jsonl"), /d\.jsonl is empty/);
  await rejects(
    () => build('{"text": "a"}\n\n{"text": "b"\n'),
    /^d\.jsonl:3: malformed JSON/,
  );
  await rejects(() => build('{"text": "a"}\n{"question": "q", "answer": "a"}\n'), /d\.jsonl:2: unknown record shape \(keys: question, answer\)/);
  await rejects(() => build("[1, 2]\n"), /d\.jsonl:1: unknown record shape: an array/);
  await rejects(() => build('"just a string"\n'), /d\.jsonl:1: unknown record shape: a string/);
  await rejects(() => build('{"text": 5}\n'), /d\.jsonl:1: "text" must be a string, got a number/);
  await rejects(() => build('{"prompt": "p", "completion": null}\n'), /d\.jsonl:1: "completion" is missing/);
  await rejects(() => build('{"messages": "hi"}\n'), /d\.jsonl:1: "messages" must be a non-empty array/);
  await rejects(() => build('{"messages": [{"role": "user"}]}\n'), /d\.jsonl:1: messages\[0\]: "content" is missing/);
  await rejects(() => build(new Uint8Array([0x7b, 0xff, 0xfe, 0x7d])), /not valid UTF-8/);
  await rejects(() => build("x", "d.txt"), /no usable tokens/);

  const dir = mkdtempSync(join(tmpdir(), "qlora-data-"));
  await rejects(() => loadDataset(join(dir, "nope.jsonl"), tok, { blockSize: 32 }), /does not exist/);
  writeFileSync(join(dir, "d.csv"), "a,b\n");
  await rejects(() => loadDataset(join(dir, "d.csv"), tok, { blockSize: 32 }), /unsupported file type "\.csv"/);
  await rejects(() => loadDataset(dir + "/", tok, { blockSize: 32 }), /unsupported file type/);
  writeFileSync(join(dir, "ok.jsonl"), jsonl({ text: "Lily saw a cat." }));
  const ok = await loadDataset(join(dir, "ok.jsonl"), tok, { blockSize: 32 });
  assert.equal(ok.rows.length, 1);
  assert.match(ok.sha256, /^[0-9a-f]{64}$/);
});

test("epoch order: a deterministic permutation per (seed, epoch); micro-batches cover each row once", () => {
  const rows = Array.from({ length: 11 }, (_, i) => ({
    tokens: Int32Array.from([1, 100 + i, 2 + (i % 3)]),
    targets: Uint8Array.from([0, 1, 1]),
  }));
  const ds: TrainDataset = {
    source: "x",
    format: "jsonl",
    kinds: ["text"],
    blockSize: 8,
    packing: false,
    padId: 0,
    rows,
    sha256: "",
    stats: { examples: 11, truncated: 0, dropped: 0, rows: 11, tokens: 33, targetTokens: 22 },
  };
  const o0 = epochOrder(ds, 42, 0);
  assert.deepEqual(o0, epochOrder(ds, 42, 0));
  assert.deepEqual([...o0].sort((a, b) => a - b), [...Array(11).keys()]);
  assert.notDeepEqual(o0, epochOrder(ds, 42, 1));
  assert.notDeepEqual(o0, epochOrder(ds, 43, 0));
  assert.equal(microBatchesPerEpoch(11, 4), 3);
  const seen: number[] = [];
  for (let j = 0; j < 3; j++) {
    const b = microBatch(ds, o0, j, 4);
    assert.equal(b.batchSize, j < 2 ? 4 : 3);
    for (let r = 0; r < b.batchSize; r++) seen.push(b.tokens[r * b.seqLen + 1]! - 100);
  }
  assert.deepEqual(seen, Array.from(o0));
  assert.throws(() => microBatch(ds, o0, 3, 4), RangeError);
});
