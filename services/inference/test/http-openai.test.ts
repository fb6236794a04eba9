/**
 * The OpenAI HTTP API, driven by the unmodified official `openai` npm client pointed at the
 * server (baseURL http://127.0.0.1:PORT/v1): a streamed chat completion from an adapter, plain
 * and streamed completions, the models list, error mapping, and tokens/permissions/quotas.
 * Outputs are compared token for token with the gRPC-side Generate of the same request.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import OpenAI from "openai";
import { Authenticator, hashToken, startServer, type RunningServer } from "@qlora/rpc";
import { inferenceService } from "../src/index.js";
import { MODEL, TestStore, skipNoStories, startInference, storiesDir, type Running } from "./fixture.js";

/** stories260K has no chat template: this copy gets a tiny one. */
const CHAT_MODEL = "stories-chat";
const CHAT_TEMPLATE =
  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

async function addChatModel(ts: TestStore): Promise<void> {
  const w = await ts.store.beginWrite("models", CHAT_MODEL);
  for (const f of await readdir(storiesDir)) {
    let data = await readFile(join(storiesDir, f));
    if (f === "tokenizer_config.json") {
      const cfg = JSON.parse(data.toString("utf8")) as Record<string, unknown>;
      cfg.chat_template = CHAT_TEMPLATE;
      data = Buffer.from(JSON.stringify(cfg, null, 2));
    }
    await w.writeFile(f, data);
  }
  await w.commit();
}

let ts: TestStore;
let svc: Running;
let openai: OpenAI;

before(async () => {
  if (skipNoStories) return;
  ts = await TestStore.create();
  await addChatModel(ts);
  await ts.addAdapter("ad1", { seed: 11 });
  await ts.addAdapter("chat-ad", { seed: 21, base: CHAT_MODEL });
  svc = await startInference(ts);
  openai = new OpenAI({ baseURL: `${svc.server.url}/v1`, apiKey: "not-checked-here", maxRetries: 0 });
});

after(async () => {
  if (skipNoStories) return;
  await svc.close();
  await ts.dispose();
});

const MESSAGES = [
  { role: "system" as const, content: "You tell short stories." },
  { role: "user" as const, content: "Tell me about a cat" },
];

test("GET /v1/models lists every base and every adapter on its base", { skip: skipNoStories }, async () => {
  const ids: string[] = [];
  for await (const m of openai.models.list()) ids.push(m.id);
  assert.deepEqual(ids.sort(), [MODEL, `${MODEL}:ad1`, CHAT_MODEL, `${CHAT_MODEL}:chat-ad`].sort());
  const one = await openai.models.retrieve(`${CHAT_MODEL}:chat-ad`);
  assert.equal(one.id, `${CHAT_MODEL}:chat-ad`);
  assert.equal(one.owned_by, "qlora");
  await assert.rejects(openai.models.retrieve("nope"), (e: unknown) => e instanceof OpenAI.NotFoundError);
});

test("a streamed chat completion from an adapter equals the gRPC Generate of the same request", { skip: skipNoStories }, async () => {
  const stream = await openai.chat.completions.create({
    model: `${CHAT_MODEL}:chat-ad`,
    messages: MESSAGES,
    max_tokens: 24,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let chunks = 0;
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | undefined | null;
  let role: string | undefined;
  const ids = new Set<string>();
  for await (const chunk of stream) {
    ids.add(chunk.id);
    assert.equal(chunk.object, "chat.completion.chunk");
    assert.equal(chunk.model, `${CHAT_MODEL}:chat-ad`);
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices[0];
    if (!c) continue;
    role ??= c.delta.role;
    if (c.delta.content) {
      text += c.delta.content;
      chunks++;
    }
    if (c.finish_reason) finish = c.finish_reason;
  }
  assert.equal(ids.size, 1, "one id for the whole stream");
  assert.equal(role, "assistant");
  assert.ok(chunks > 3, `streamed in pieces (${chunks} content chunks)`);
  assert.equal(finish, "length");
  assert.equal(usage?.completion_tokens, 24);

  const want = await svc.client.generate({ model: CHAT_MODEL, adapter: "chat-ad", messages: MESSAGES, maxNewTokens: 24 });
  assert.equal(text, want.text);
  assert.equal(usage?.prompt_tokens, want.usage!.promptTokens);
  const base = await svc.client.generate({ model: CHAT_MODEL, messages: MESSAGES, maxNewTokens: 24 });
  assert.notEqual(base.text, text, "the adapter changes the answer (else this test proves little)");

  // The same request without streaming gives the same message.
  const whole = await openai.chat.completions.create({ model: `${CHAT_MODEL}:chat-ad`, messages: MESSAGES, max_tokens: 24, temperature: 0 });
  assert.equal(whole.object, "chat.completion");
  assert.equal(whole.choices[0]!.message.role, "assistant");
  assert.equal(whole.choices[0]!.message.content, want.text);
  assert.equal(whole.choices[0]!.finish_reason, "length");
  assert.deepEqual(whole.usage, { prompt_tokens: want.usage!.promptTokens, completion_tokens: 24, total_tokens: want.usage!.promptTokens + 24 });
});

test("completions: plain and streamed, on a base and on BASE:ADAPTER", { skip: skipNoStories }, async () => {
  for (const [model, adapter] of [[MODEL, ""], [MODEL, "ad1"]] as const) {
    const id = adapter ? `${model}:${adapter}` : model;
    const want = await svc.client.generate({ model, adapter, prompt: "Once upon a time", maxNewTokens: 16 });
    const got = await openai.completions.create({ model: id, prompt: "Once upon a time", max_tokens: 16, temperature: 0 });
    assert.equal(got.object, "text_completion");
    assert.equal(got.model, id);
    assert.equal(got.choices[0]!.text, want.text, id);
    assert.equal(got.usage?.completion_tokens, 16);

    const stream = await openai.completions.create({ model: id, prompt: "Once upon a time", max_tokens: 16, temperature: 0, stream: true });
    let text = "";
    let finish: string | null = null;
    for await (const c of stream) {
      text += c.choices[0]?.text ?? "";
      finish = c.choices[0]?.finish_reason ?? finish;
    }
    assert.equal(text, want.text, `${id} streamed`);
    assert.equal(finish, "length");
  }
  // An adapter named alone runs on its own base (as vLLM serves LoRAs by name).
  const alone = await openai.completions.create({ model: "ad1", prompt: "Once upon a time", max_tokens: 8, temperature: 0 });
  const want = await svc.client.generate({ model: MODEL, adapter: "ad1", prompt: "Once upon a time", maxNewTokens: 8 });
  assert.equal(alone.choices[0]!.text, want.text);
  // Seeded sampling is reproducible through the API.
  const a = await openai.completions.create({ model: MODEL, prompt: "The dog", max_tokens: 12, temperature: 0.9, seed: 7 });
  const b = await openai.completions.create({ model: MODEL, prompt: "The dog", max_tokens: 12, temperature: 0.9, seed: 7 });
  assert.equal(a.choices[0]!.text, b.choices[0]!.text);
});

test("errors are OpenAI error objects with the right HTTP status", { skip: skipNoStories }, async () => {
  const expect = async (p: Promise<unknown>, status: number, re: RegExp, type?: string) => {
    await assert.rejects(p, (e: unknown) => {
      assert.ok(e instanceof OpenAI.APIError, String(e));
      assert.equal(e.status, status, e.message);
      assert.match(e.message, re);
      if (type) assert.equal(e.type, type);
      return true;
    });
  };
  await expect(openai.chat.completions.create({ model: "nope", messages: MESSAGES }), 404, /not in the store/, "not_found_error");
  await expect(openai.chat.completions.create({ model: `${MODEL}:nope`, messages: MESSAGES }), 404, /adapter nope/);
  await expect(openai.chat.completions.create({ model: MODEL, messages: MESSAGES, max_tokens: 4 }), 400, /chat template/, "invalid_request_error");
  await expect(openai.chat.completions.create({ model: CHAT_MODEL, messages: [] }), 400, /messages/);
  await expect(openai.completions.create({ model: MODEL, prompt: "x", temperature: 3 }), 400, /temperature/);
  await expect(openai.completions.create({ model: MODEL, prompt: "x", n: 2 }), 400, /n must be 1/);
  await expect(openai.completions.create({ model: MODEL, prompt: "x", max_tokens: 100000 }), 400, /max_tokens/);
  await expect(openai.completions.create({ model: MODEL, prompt: "x", max_tokens: 600 }), 400, /at most/);
  await expect(openai.completions.create({ model: "bad name!", prompt: "x" }), 400, /not a valid name/);
  // A stream that fails before its first token still gets a real status, not a 200 with an error inside.
  await expect(openai.completions.create({ model: MODEL, prompt: "x", max_tokens: 600, stream: true }), 400, /at most/);
  // Wrong content type and oversize bodies (plain fetch: the client would not send them).
  const url = `${svc.server.url}/v1/completions`;
  const r1 = await fetch(url, { method: "POST", headers: { "content-type": "application/xml" }, body: "<x/>" });
  assert.equal(r1.status, 415);
  const r2 = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: MODEL, prompt: "x".repeat(5 << 20) }) });
  assert.equal(r2.status, 413);
  assert.equal(((await r2.json()) as { error: { type: string } }).error.type, "invalid_request_error");
  const r3 = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: "{not json" });
  assert.equal(r3.status, 400);
});

describe("with bearer tokens: permissions and quotas through the OpenAI API", { skip: skipNoStories }, () => {
  let server: RunningServer;
  const TOKENS = { alice: "alice-token-0123456789", bob: "bob-token-0123456789ab", tiny: "tiny-quota-token-0123" };
  const client = (key: string) => new OpenAI({ baseURL: `${server.url}/v1`, apiKey: key, maxRetries: 0 });

  before(async () => {
    const auth = Authenticator.fromConfig({
      tokens: [
        { name: "alice", hash: hashToken(TOKENS.alice), rpcs: ["qlora.v1.InferenceService/*"], adapters: ["chat-*"], models: ["*"], datasets: [], quota: {} },
        { name: "bob", hash: hashToken(TOKENS.bob), rpcs: ["qlora.v1.InferenceService/ListAdapters"], adapters: ["*"], models: ["*"], datasets: [], quota: {} },
        { name: "tiny", hash: hashToken(TOKENS.tiny), rpcs: ["*"], adapters: ["*"], models: [MODEL], datasets: [], quota: { tokensPerMinute: 20 } },
      ],
      public: [],
    });
    server = await startServer({ services: [inferenceService({ store: ts.store, threads: 1 })], auth, gracePeriodMs: 500 });
  });
  after(async () => {
    await server?.close();
  });

  test("no token → 401, another service's token → 403, an adapter not granted → 403", async () => {
    await assert.rejects(client("wrong-token-xxxxxxxxxxxx").completions.create({ model: MODEL, prompt: "x", max_tokens: 2 }), (e: unknown) => e instanceof OpenAI.AuthenticationError);
    await assert.rejects(client(TOKENS.bob).completions.create({ model: MODEL, prompt: "x", max_tokens: 2 }), (e: unknown) => e instanceof OpenAI.PermissionDeniedError);
    await assert.rejects(
      client(TOKENS.alice).completions.create({ model: `${MODEL}:ad1`, prompt: "x", max_tokens: 2 }),
      (e: unknown) => e instanceof OpenAI.PermissionDeniedError && /adapter "ad1"/.test(e.message),
    );
    const ok = await client(TOKENS.alice).chat.completions.create({ model: `${CHAT_MODEL}:chat-ad`, messages: MESSAGES, max_tokens: 3, temperature: 0 });
    assert.equal(ok.usage?.completion_tokens, 3);
    // The models list shows what a token may use.
    const ids: string[] = [];
    for await (const m of client(TOKENS.alice).models.list()) ids.push(m.id);
    assert.deepEqual(ids.sort(), [MODEL, CHAT_MODEL, `${CHAT_MODEL}:chat-ad`].sort());
  });

  test("tokens per minute: the call after the quota is used gets 429", async () => {
    const c = client(TOKENS.tiny);
    await assert.rejects(c.completions.create({ model: CHAT_MODEL, prompt: "x", max_tokens: 2 }), (e: unknown) => e instanceof OpenAI.PermissionDeniedError);
    const first = await c.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 20, temperature: 0 });
    assert.ok(first.usage!.total_tokens >= 20);
    await assert.rejects(
      c.completions.create({ model: MODEL, prompt: "x", max_tokens: 2 }),
      (e: unknown) => e instanceof OpenAI.RateLimitError && /quota 20/.test(e.message) && Number(e.headers?.get("retry-after")) > 0,
    );
  });
});
