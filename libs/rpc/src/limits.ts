/**
 * Limits on request contents, checked before a handler runs (INVALID_ARGUMENT beyond them).
 * Whole messages are bounded by `readMaxBytes` (64 MiB, for upload chunks); these bound what
 * one field may ask of the engine: prompt and message sizes, new tokens, stop strings, texts to
 * score, LoRA rank, names. The handlers' own checks (the model's context, store name rules,
 * upload totals) still apply; these are the outer fence, the same for every protocol.
 */
import { type Interceptor } from "@connectrpc/connect";
import { InvalidArgument } from "@qlora/core";

export interface InputLimits {
  /** Characters of a prompt, or of all chat messages together (default 1 Mi). */
  maxPromptChars: number;
  /** Chat messages in one request (default 512). */
  maxMessages: number;
  /** max_new_tokens (default 32768; the model's context is checked later). */
  maxNewTokens: number;
  /** Stop strings (default 16) and the length of each (default 256). */
  maxStopStrings: number;
  maxStopChars: number;
  /** Texts in one Score request (default 256) and their characters together (default 8 Mi). */
  maxScoreTexts: number;
  maxScoreChars: number;
  /** LoRA rank of a training job (default 1024). */
  maxLoraRank: number;
  /** Target modules listed in a LoRA config (default 64). */
  maxTargetModules: number;
  /** Any artifact or job name field (default 256 characters). */
  maxNameChars: number;
}

export const DEFAULT_INPUT_LIMITS: InputLimits = {
  maxPromptChars: 1 << 20,
  maxMessages: 512,
  maxNewTokens: 32768,
  maxStopStrings: 16,
  maxStopChars: 256,
  maxScoreTexts: 256,
  maxScoreChars: 8 << 20,
  maxLoraRank: 1024,
  maxTargetModules: 64,
  maxNameChars: 256,
};

type Msg = Record<string, unknown>;

function str(m: Msg, k: string): string {
  const v = m[k];
  return typeof v === "string" ? v : "";
}

function checkName(l: InputLimits, field: string, v: string): void {
  if (v.length > l.maxNameChars) throw new InvalidArgument(`${field} is ${v.length} characters long; the limit is ${l.maxNameChars}`);
}

function checkGenerate(l: InputLimits, m: Msg): void {
  const prompt = str(m, "prompt");
  const messages = Array.isArray(m.messages) ? (m.messages as Msg[]) : [];
  if (messages.length > l.maxMessages) throw new InvalidArgument(`${messages.length} messages; the limit is ${l.maxMessages}`);
  const chars = prompt.length + messages.reduce((n, x) => n + str(x, "content").length + str(x, "role").length, 0);
  if (chars > l.maxPromptChars) throw new InvalidArgument(`the prompt has ${chars} characters; the limit is ${l.maxPromptChars}`);
  const maxNew = typeof m.maxNewTokens === "number" ? m.maxNewTokens : 0;
  if (maxNew > l.maxNewTokens) throw new InvalidArgument(`max_new_tokens ${maxNew} is above the limit of ${l.maxNewTokens}`);
  const stop = Array.isArray(m.stop) ? (m.stop as unknown[]) : [];
  if (stop.length > l.maxStopStrings) throw new InvalidArgument(`${stop.length} stop strings; the limit is ${l.maxStopStrings}`);
  for (const s of stop) {
    if (typeof s === "string" && s.length > l.maxStopChars) throw new InvalidArgument(`a stop string has ${s.length} characters; the limit is ${l.maxStopChars}`);
  }
  checkName(l, "model", str(m, "model"));
  checkName(l, "adapter", str(m, "adapter"));
}

const RULES: Record<string, (l: InputLimits, m: Msg) => void> = {
  "qlora.v1.InferenceService/Generate": checkGenerate,
  "qlora.v1.InferenceService/GenerateStream": checkGenerate,
  "qlora.v1.InferenceService/Score": (l, m) => {
    const texts = Array.isArray(m.texts) ? (m.texts as unknown[]) : [];
    if (texts.length > l.maxScoreTexts) throw new InvalidArgument(`${texts.length} texts; the limit is ${l.maxScoreTexts}`);
    const chars = texts.reduce<number>((n, t) => n + (typeof t === "string" ? t.length : 0), 0);
    if (chars > l.maxScoreChars) throw new InvalidArgument(`the texts have ${chars} characters; the limit is ${l.maxScoreChars}`);
    checkName(l, "model", str(m, "model"));
    checkName(l, "adapter", str(m, "adapter"));
  },
  "qlora.v1.InferenceService/LoadAdapter": (l, m) => {
    checkName(l, "name", str(m, "name"));
    checkName(l, "model", str(m, "model"));
  },
  "qlora.v1.TrainerService/CreateJob": (l, m) => {
    const lora = (m.lora ?? {}) as Msg;
    const rank = typeof lora.rank === "number" ? lora.rank : 0;
    if (rank > l.maxLoraRank) throw new InvalidArgument(`lora.rank ${rank} is above the limit of ${l.maxLoraRank}`);
    const targets = Array.isArray(lora.targetModules) ? (lora.targetModules as unknown[]) : [];
    if (targets.length > l.maxTargetModules) throw new InvalidArgument(`${targets.length} target modules; the limit is ${l.maxTargetModules}`);
    for (const f of ["baseModel", "dataset", "evalDataset", "outputAdapter"]) checkName(l, f, str(m, f));
  },
};

/** Server interceptor applying `limits` to the requests it knows (unary and server-streaming ones). */
export function limitsInterceptor(limits: Partial<InputLimits> = {}): Interceptor {
  const l: InputLimits = { ...DEFAULT_INPUT_LIMITS, ...limits };
  return (next) => async (req) => {
    const rule = RULES[`${req.service.typeName}/${req.method.name}`];
    if (!rule) return next(req);
    if (!req.stream) {
      rule(l, req.message as unknown as Msg);
      return next(req);
    }
    const source = req.message;
    return next({
      ...req,
      message: (async function* () {
        for await (const m of source) {
          rule(l, m as unknown as Msg);
          yield m;
        }
      })(),
    });
  };
}
