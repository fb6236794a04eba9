/** Adapts the model runtime's tokenizer to what the data pipeline needs. */
import type { ModelTokenizer } from "../tokenizer.js";
import type { DataTokenizer } from "./types.js";

/**
 * `padId`: the model's pad_token_id (config.json) when it has one; otherwise padding uses EOS. It only
 * fills positions that carry no label, so its value never reaches the loss.
 */
export function dataTokenizer(tok: ModelTokenizer, padId?: number | null): DataTokenizer {
  return {
    encode: (text, addSpecialTokens) => tok.encode(text, { addSpecialTokens }),
    eosId: tok.eosTokenId ?? undefined,
    padId: padId ?? undefined,
    renderChat: tok.hasChatTemplate
      ? (messages, addGenerationPrompt) => tok.applyChatTemplate(messages, { addGenerationPrompt })
      : undefined,
  };
}
