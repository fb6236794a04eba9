import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";
import { InvalidArgument, NotFound } from "@qlora/core";
import { loadTokenizer, type ModelTokenizer } from "../src/index.js";
import { skipNoStories, storiesDir, storiesReference } from "./fixtures.js";

let cached: ModelTokenizer | null = null;
async function stories(): Promise<ModelTokenizer> {
  cached ??= await loadTokenizer(storiesDir);
  return cached;
}

test("stories260K: prompt ids and decoded reference text", { skip: skipNoStories }, async () => {
  const tok = await stories();
  const ref = storiesReference();
  assert.deepEqual(tok.encode(ref.greedy.prompt), ref.greedy.prompt_ids);
  assert.deepEqual(tok.encode(ref.cross_entropy.text), ref.cross_entropy.ids);
  // Without special tokens there is no BOS.
  assert.deepEqual(tok.encode(ref.greedy.prompt, { addSpecialTokens: false }), ref.greedy.prompt_ids.slice(1));
  assert.equal(tok.decode([...ref.greedy.prompt_ids, ...ref.greedy.new_ids]), ref.greedy.text);
  assert.equal(tok.bosTokenId, 1);
  assert.equal(tok.eosTokenId, 2);
  assert.equal(tok.vocabSize, 512);
  assert.ok(tok.isSpecial(1) && tok.isSpecial(2) && !tok.isSpecial(403));
  assert.equal(tok.decode([]), "");
  // Special tokens are kept on request; the legacy sentencepiece decoder strips only the leading
  // space of the whole text, so the space of "▁Once" after "<s>" shows (as in transformers).
  assert.equal(tok.decode([1, 403], { skipSpecialTokens: false }), "<s> Once");
});

test("stories260K: round trips, byte fallback and whitespace", { skip: skipNoStories }, async () => {
  const tok = await stories();
  const texts = [
    "Once upon a time, there was a little girl named Lily.",
    "héllo 日本 ok\nline2",
    "  two  leading spaces and trailing  ",
    "tabs\tand\nnew\n\nlines, emoji 😀 and ¿qué?",
    "x",
  ];
  for (const t of texts) {
    const ids = tok.encode(t);
    assert.equal(ids[0], 1, "BOS first");
    assert.equal(tok.decode(ids), t, JSON.stringify(t));
  }
  // "日" has no vocabulary piece: it is three byte tokens.
  const ids = tok.encode("日", { addSpecialTokens: false });
  assert.deepEqual(ids.map((i) => tok.idToToken(i)), ["▁", "<0xE6>", "<0x97>", "<0xA5>"]);
});

test("stories260K: long text encoded in chunks gives the same ids as one encode", { skip: skipNoStories }, async () => {
  const tok = await stories();
  const raw = new Tokenizer(
    JSON.parse(readFileSync(join(storiesDir, "tokenizer.json"), "utf8")),
    JSON.parse(readFileSync(join(storiesDir, "tokenizer_config.json"), "utf8")),
  );
  const sentences = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play  outside in the park with her dog, Max!",
    "One day 日本 she saw a big, red ball.\nIt was   too high.",
    "\"Can I have it?\" she asked. Mom said yes; 42 is the answer.",
  ];
  let long = "";
  for (let i = 0; i < 12; i++) long += sentences[i % sentences.length] + (i % 3 === 0 ? "\n" : " ");
  assert.ok(long.length > 600);
  const whole = raw.encode(long).ids;
  assert.deepEqual(tok.encode(long), whole);
  assert.equal(tok.decode(whole), long);
});

test("missing tokenizer is NotFound, broken JSON is InvalidArgument", async () => {
  const dir = mkdtempSync(join(tmpdir(), "qlora-tok-"));
  try {
    await assert.rejects(loadTokenizer(join(dir, "nope")), NotFound);
    writeFileSync(join(dir, "tokenizer.json"), "{not json");
    await assert.rejects(loadTokenizer(dir), InvalidArgument);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("chat template: rendered with bos/eos, encoded without extra specials", { skip: skipNoStories }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "qlora-chat-"));
  try {
    copyFileSync(join(storiesDir, "tokenizer.json"), join(dir, "tokenizer.json"));
    const config = JSON.parse(readFileSync(join(storiesDir, "tokenizer_config.json"), "utf8"));
    config.chat_template =
      "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n" +
      "{% elif m.role == 'assistant' %}Bot: {{ m.content }}{{ eos_token }}\n{% else %}" +
      "{{ raise_exception('unknown role ' + m.role) }}{% endif %}{% endfor %}" +
      "{% if add_generation_prompt %}Bot:{% endif %}";
    writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(config));
    const tok = await loadTokenizer(dir);
    assert.ok(tok.hasChatTemplate);
    const messages = [
      { role: "user", content: "Hi" },
      { role: "assistant", content: "Hello." },
      { role: "user", content: "Tell a story" },
    ];
    const text = tok.applyChatTemplate(messages);
    assert.equal(text, "<s>User: Hi\nBot: Hello.</s>\nUser: Tell a story\nBot:");
    assert.equal(tok.applyChatTemplate(messages, { addGenerationPrompt: false }), "<s>User: Hi\nBot: Hello.</s>\nUser: Tell a story\n");
    const ids = tok.encodeChat(messages);
    assert.equal(ids[0], 1);
    assert.notEqual(ids[1], 1, "BOS only once");
    assert.ok(ids.includes(2), "the template's eos_token is the EOS id");
    // Legacy sentencepiece: every text section after a special token gets a "▁" prefix, so the
    // decode shows a space after "<s>" and "</s>" (transformers with legacy=true does the same).
    assert.equal(tok.decode(ids, { skipSpecialTokens: false }), "<s> User: Hi\nBot: Hello.</s> \nUser: Tell a story\nBot:");
    assert.throws(() => tok.applyChatTemplate([{ role: "wizard", content: "x" }]), InvalidArgument);
    assert.throws(() => tok.applyChatTemplate([]), InvalidArgument);

    // The list form of chat_template picks "default".
    config.chat_template = [
      { name: "tool_use", template: "TOOLS" },
      { name: "default", template: "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}" },
    ];
    writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(config));
    assert.equal((await loadTokenizer(dir)).applyChatTemplate([{ role: "user", content: "a" }]), "[user]a");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("messages without a chat template: clear InvalidArgument", { skip: skipNoStories }, async () => {
  const tok = await stories();
  assert.equal(tok.hasChatTemplate, false);
  assert.throws(() => tok.applyChatTemplate([{ role: "user", content: "hi" }]), (e: unknown) => {
    assert.ok(e instanceof InvalidArgument);
    assert.match(e.message, /no chat_template/);
    return true;
  });
});
