/**
 * Tokenizer + chat template over a Hugging Face model directory (`tokenizer.json`,
 * `tokenizer_config.json`), built on `@huggingface/tokenizers` and `@huggingface/jinja`.
 *
 * What this adds on top of the library:
 * - ids as plain numbers, empty inputs handled (the library throws on an empty decode);
 * - special tokens placed once per encode even when long text is encoded in chunks (see `chunkable`);
 * - `add_bos_token` / `add_eos_token` from tokenizer_config.json honoured like LlamaTokenizerFast does;
 * - chat templates rendered with the tokenizer's own bos/eos strings, encoded without adding
 *   special tokens again (the template writes them, as transformers' apply_chat_template does).
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";
import { InvalidArgument, NotFound, errorMessage } from "@qlora/core";
import { IncrementalDetokenizer } from "./detokenizer.js";

export interface ChatMessage {
  role: string;
  content: string;
  [extra: string]: unknown;
}

export interface EncodeOptions {
  /** Add the post-processor's special tokens (BOS for Llama). Default true. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Drop special tokens (BOS/EOS/…) from the text. Default true. */
  skipSpecialTokens?: boolean;
}

export interface ChatTemplateOptions {
  /** Append the assistant turn header so the model answers. Default true. */
  addGenerationPrompt?: boolean;
  /** Extra variables for the template (tools, date_string, …). */
  extra?: Record<string, unknown>;
}

/** A token string from tokenizer_config.json: either plain or an AddedToken object. */
type ConfigToken = string | { content?: string } | null | undefined;

interface TokenizerConfigJson {
  bos_token?: ConfigToken;
  eos_token?: ConfigToken;
  unk_token?: ConfigToken;
  pad_token?: ConfigToken;
  add_bos_token?: boolean;
  add_eos_token?: boolean;
  clean_up_tokenization_spaces?: boolean;
  chat_template?: string | { name: string; template: string }[];
  [k: string]: unknown;
}

interface TokenizerJson {
  model?: { type?: string; vocab?: unknown };
  normalizer?: unknown;
  pre_tokenizer?: { type?: string; split?: boolean } | null;
  added_tokens?: { id: number; content: string; special?: boolean }[];
  [k: string]: unknown;
}

function tokenString(t: ConfigToken): string | null {
  if (t === null || t === undefined) return null;
  if (typeof t === "string") return t;
  return typeof t.content === "string" ? t.content : null;
}

/** Texts at least this long are split into chunks when the tokenizer allows it exactly. */
const CHUNK_THRESHOLD = 256;
/** Target chunk length in characters (BPE without a pre-tokenizer is super-linear in word length). */
const CHUNK_TARGET = 128;

export class ModelTokenizer {
  /** Largest token id the tokenizer knows + 1 (model vocab may be larger: padded embeddings). */
  readonly vocabSize: number;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  readonly chatTemplate: string | null;
  /** Whether `decode` applies clean_up_tokenization_spaces (tokenizer_config; default false). */
  readonly cleanUpSpaces: boolean;
  private readonly specialIds: Set<number>;
  private readonly addedContents: string[];
  /** Token ids that encode(…, special) puts before / after the text's own tokens. */
  private readonly specialPrefix: number[];
  private readonly specialSuffix: number[];
  /** Long text may be encoded in chunks split at single spaces (proven exact at load time). */
  private readonly chunkable: boolean;
  private compiledTemplate: Template | null = null;

  constructor(
    private readonly tok: Tokenizer,
    tokenizerJson: TokenizerJson,
    private readonly config: TokenizerConfigJson,
  ) {
    const added = tokenizerJson.added_tokens ?? [];
    this.specialIds = new Set(added.filter((t) => t.special).map((t) => t.id));
    this.addedContents = added.map((t) => t.content).filter((c) => c.length > 0);
    let maxId = -1;
    for (const [, id] of tok.get_vocab(true)) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;

    this.bosToken = tokenString(config.bos_token);
    this.eosToken = tokenString(config.eos_token);
    this.bosTokenId = this.bosToken === null ? null : (tok.token_to_id(this.bosToken) ?? null);
    this.eosTokenId = this.eosToken === null ? null : (tok.token_to_id(this.eosToken) ?? null);
    this.cleanUpSpaces = config.clean_up_tokenization_spaces ?? false;
    this.chatTemplate = pickChatTemplate(config.chat_template);

    // Where the post-processor puts its special tokens, learned once from a probe: for single
    // sequences every post-processor in use (Template/Bert/Roberta/ByteLevel) wraps the text's
    // tokens in a fixed prefix and suffix, independent of the text.
    const probe = "hello world";
    const withSpecial = tok.encode(probe, { add_special_tokens: true }).ids;
    const plain = tok.encode(probe, { add_special_tokens: false }).ids;
    const at = indexOfRun(withSpecial, plain);
    let prefix = at >= 0 ? withSpecial.slice(0, at) : [];
    let suffix = at >= 0 ? withSpecial.slice(at + plain.length) : [];
    // LlamaTokenizerFast rebuilds its post-processor from these flags; follow them when set.
    if (config.add_bos_token === true && this.bosTokenId !== null && prefix[0] !== this.bosTokenId) {
      prefix = [this.bosTokenId, ...prefix];
    } else if (config.add_bos_token === false && this.bosTokenId !== null && prefix[0] === this.bosTokenId) {
      prefix = prefix.slice(1);
    }
    if (config.add_eos_token === true && this.eosTokenId !== null && suffix[suffix.length - 1] !== this.eosTokenId) {
      suffix = [...suffix, this.eosTokenId];
    } else if (config.add_eos_token === false && this.eosTokenId !== null && suffix[suffix.length - 1] === this.eosTokenId) {
      suffix = suffix.slice(0, -1);
    }
    this.specialPrefix = prefix;
    this.specialSuffix = suffix;
    this.chunkable = at >= 0 && this.detectChunkable(tokenizerJson);
  }

  /**
   * Llama-2-style tokenizers (sentencepiece BPE with byte fallback, no pre-tokenizer) treat the
   * whole text as one word, which makes BPE slow on long text. Splitting at a single space that
   * sits between two non-space characters, and letting the normalizer's "▁" prefix stand in for
   * the dropped space, gives exactly the same ids when no vocabulary token can span the junction,
   * i.e. no token has "▁" right after a non-"▁" character. We check that on the vocabulary and
   * confirm the prefix behaviour with a probe; anything else is encoded whole.
   */
  private detectChunkable(json: TokenizerJson): boolean {
    if (json.model?.type !== "BPE") return false;
    const pre = json.pre_tokenizer;
    const wholeText = pre === null || pre === undefined || (pre.type === "Metaspace" && pre.split === false);
    if (!wholeText) return false;
    for (const [token] of this.tok.get_vocab(true)) {
      for (let i = token.indexOf("▁", 1); i > 0; i = token.indexOf("▁", i + 1)) {
        if (token[i - 1] !== "▁") return false;
      }
    }
    const joint: number[] = this.tok.encode("hello world", { add_special_tokens: false }).ids;
    const parts: number[] = [
      ...this.tok.encode("hello", { add_special_tokens: false }).ids,
      ...this.tok.encode("world", { add_special_tokens: false }).ids,
    ];
    return joint.length === parts.length && joint.every((v, i) => v === parts[i]);
  }

  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    const addSpecial = options.addSpecialTokens ?? true;
    const body = this.encodePlain(text);
    return addSpecial ? [...this.specialPrefix, ...body, ...this.specialSuffix] : body;
  }

  private encodePlain(text: string): number[] {
    if (text.length === 0) return [];
    if (!this.chunkable || text.length < CHUNK_THRESHOLD || this.addedContents.some((c) => text.includes(c))) {
      return this.tok.encode(text, { add_special_tokens: false }).ids;
    }
    const out: number[] = [];
    let start = 0;
    while (start < text.length) {
      let cut = -1;
      if (text.length - start > CHUNK_TARGET * 2) {
        // First splittable space at or after the target length.
        for (let i = start + CHUNK_TARGET; i < text.length - 1; i++) {
          if (text[i] === " " && !isSpace(text[i - 1]!) && !isSpace(text[i + 1]!)) {
            cut = i;
            break;
          }
        }
      }
      const end = cut < 0 ? text.length : cut;
      const ids = this.tok.encode(text.slice(start, end), { add_special_tokens: false }).ids;
      for (const id of ids) out.push(id);
      // Skip the space: the next chunk's normalizer prefix ("▁") stands for it.
      start = cut < 0 ? text.length : cut + 1;
    }
    return out;
  }

  decode(ids: ArrayLike<number>, options: DecodeOptions = {}): string {
    return this.decodeWith(ids, options.skipSpecialTokens ?? true, this.cleanUpSpaces);
  }

  /** Decode without clean-up (the incremental detokenizer needs prefix-stable text). */
  decodeRaw(ids: ArrayLike<number>, skipSpecialTokens = true): string {
    return this.decodeWith(ids, skipSpecialTokens, false);
  }

  private decodeWith(ids: ArrayLike<number>, skip: boolean, cleanUp: boolean): string {
    if (ids.length === 0) return "";
    return this.tok.decode(Array.from(ids), {
      skip_special_tokens: skip,
      clean_up_tokenization_spaces: cleanUp,
    });
  }

  /** Text of one token as stored in the vocabulary (e.g. "▁time", "<0x0A>"). */
  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }

  tokenToId(token: string): number | undefined {
    return this.tok.token_to_id(token);
  }

  get hasChatTemplate(): boolean {
    return this.chatTemplate !== null;
  }

  /** Render messages with the model's chat template (InvalidArgument when it has none). */
  applyChatTemplate(messages: ChatMessage[], options: ChatTemplateOptions = {}): string {
    if (this.chatTemplate === null) {
      throw new InvalidArgument("this model has no chat_template in tokenizer_config.json; send a plain prompt instead of messages");
    }
    validateMessages(messages);
    if (this.compiledTemplate === null) {
      try {
        this.compiledTemplate = new Template(this.chatTemplate);
      } catch (e) {
        throw new InvalidArgument(`chat_template does not parse: ${errorMessage(e)}`, { cause: e });
      }
    }
    try {
      return this.compiledTemplate.render({
        ...(options.extra ?? {}),
        messages,
        bos_token: this.bosToken ?? "",
        eos_token: this.eosToken ?? "",
        unk_token: tokenString(this.config.unk_token) ?? "",
        pad_token: tokenString(this.config.pad_token) ?? "",
        add_generation_prompt: options.addGenerationPrompt ?? true,
      });
    } catch (e) {
      // Templates signal bad conversations with raise_exception (e.g. roles must alternate).
      throw new InvalidArgument(`chat template rejected the messages: ${errorMessage(e)}`, { cause: e });
    }
  }

  /** Render + encode; the template writes its own special tokens, so none are added here. */
  encodeChat(messages: ChatMessage[], options: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  /** A streaming detokenizer that continues after `contextIds` (normally the prompt). */
  createDetokenizer(contextIds: ArrayLike<number> = []): IncrementalDetokenizer {
    return new IncrementalDetokenizer(this, contextIds);
  }
}

function isSpace(c: string): boolean {
  return c === " " || c === "\t" || c === "\n" || c === "\r";
}

function indexOfRun(hay: number[], needle: number[]): number {
  outer: for (let i = 0; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

function pickChatTemplate(t: TokenizerConfigJson["chat_template"]): string | null {
  if (typeof t === "string") return t;
  if (Array.isArray(t)) {
    // Multi-template configs (e.g. "default" + "tool_use"): plain chat uses "default".
    const named = t.find((x) => x && x.name === "default") ?? t[0];
    return named && typeof named.template === "string" ? named.template : null;
  }
  return null;
}

function validateMessages(messages: unknown): asserts messages is ChatMessage[] {
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new InvalidArgument("messages must be a non-empty array of {role, content}");
  }
  messages.forEach((m, i) => {
    if (typeof m !== "object" || m === null || typeof (m as ChatMessage).role !== "string" || typeof (m as ChatMessage).content !== "string") {
      throw new InvalidArgument(`messages[${i}] must be {role: string, content: string}`);
    }
  });
}

async function readJson(path: string, what: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NotFound(`${what} not found: ${path}`, { cause: e });
    throw e;
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new InvalidArgument(`${what} is not valid JSON (${path}): ${errorMessage(e)}`, { cause: e });
  }
}

/** Load `tokenizer.json` (+ optional `tokenizer_config.json`) from a model directory. */
export async function loadTokenizer(dir: string): Promise<ModelTokenizer> {
  const json = (await readJson(join(dir, "tokenizer.json"), "tokenizer.json")) as TokenizerJson;
  let config: TokenizerConfigJson = {};
  try {
    config = (await readJson(join(dir, "tokenizer_config.json"), "tokenizer_config.json")) as TokenizerConfigJson;
  } catch (e) {
    if (!(e instanceof NotFound)) throw e;
  }
  if (typeof json !== "object" || json === null || typeof json.model !== "object") {
    throw new InvalidArgument(`tokenizer.json has no model section: ${join(dir, "tokenizer.json")}`);
  }
  let tok: Tokenizer;
  try {
    tok = new Tokenizer(json, config);
  } catch (e) {
    throw new InvalidArgument(`tokenizer.json cannot be used: ${errorMessage(e)}`, { cause: e });
  }
  return new ModelTokenizer(tok, json, config);
}
