/**
 * The fixed prompt format for alpaca records `{"instruction", "input", "output"}`: the Stanford Alpaca
 * layout, the de-facto standard for this record shape, so adapters trained here respond to prompts
 * written the usual way. The loss covers only `output` (plus EOS); the header text is never a target.
 */

const ALPACA_WITH_INPUT =
  "Below is an instruction that describes a task, paired with an input that provides further context. " +
  "Write a response that appropriately completes the request.\n\n" +
  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

const ALPACA_NO_INPUT =
  "Below is an instruction that describes a task. " +
  "Write a response that appropriately completes the request.\n\n" +
  "### Instruction:\n{instruction}\n\n### Response:\n";

/** The prompt part of an alpaca record (an empty or missing `input` uses the shorter header). */
export function alpacaPrompt(instruction: string, input: string | undefined): string {
  // One pass over the template with a replacer function: user text is inserted verbatim (no `$`
  // patterns), and an instruction that itself contains "{input}" is not substituted again.
  const hasInput = input !== undefined && input.trim() !== "";
  const template = hasInput ? ALPACA_WITH_INPUT : ALPACA_NO_INPUT;
  return template.replace(/\{(instruction|input)\}/g, (_m, key: string) =>
    key === "instruction" ? instruction : (input ?? ""),
  );
}
