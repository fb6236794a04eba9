/**
 * The demo's built-in training text: a few paragraphs written for this project (not taken from
 * anywhere), plain ASCII so that with the byte-level tokenizer one character is one token.
 *
 * The demo prompts with the opening words. The trainer cuts a .txt dataset into consecutive blocks
 * that start at the beginning of the file (BOS + text), so the opening is always seen at the same
 * positions it is prompted at: a freshly trained adapter continues it with the story's own words,
 * while the untrained base only babbles.
 */
export const DEMO_TEXT = `The lighthouse keeper of Gull Rock kept a ledger of every ship that passed. She wrote down the name, the hour and the colour of the sails, and on Sundays she read the whole list aloud to her cat.

Every morning at seven a small green boat went by. It had no name, so she called it the Pea. The Pea never stopped, but it rang its bell twice as it passed the rock.

One foggy night the bell rang three times. The keeper lit the great lamp and guided the Pea home. Since then, when the lamp turns over the sea, she rings a bell of her own, twice, for the boats she cannot see.
`;

/** The words the demo prompts both models with: the opening of DEMO_TEXT. */
export const DEMO_PROMPT = "The lighthouse keeper of Gull Rock";

/** A prompt for someone else's text: its first few words (at most `maxChars`, whole words). */
export function promptFromText(text: string, maxChars = 40): string {
  const words = text.trim().split(/\s+/);
  let out = "";
  for (const w of words.slice(0, 8)) {
    const next = out ? `${out} ${w}` : w;
    if (next.length > maxChars && out) break;
    out = next;
  }
  return out;
}
