/**
 * The demo's built-in training text: a few paragraphs written for this project (not taken from
 * anywhere), plain ASCII so that with the byte-level tokenizer one character is one token.
 *
 * The demo prompts with the opening words. The trainer cuts a .txt dataset into consecutive blocks
 * that start at the beginning of the file (BOS + text), so the opening is always seen at the same
 * positions it is prompted at: a freshly trained adapter continues it with the story's own words,
 * while the untrained base only babbles.
 */
export const DEMO_TEXT = `The lighthouse keeper of Gull Rock kept a ledger of every ship that passed. She wrote the name, the hour and the colour of the sails, and at the end of each week she read the whole list aloud to the cat.

In the spring a small green boat came by every morning at seven. It carried no name on its bow, so the keeper called it the Pea. The Pea never stopped and never waved, but it always rang its bell twice when it passed the rock.

One foggy day the bell rang three times. The keeper climbed the stairs, lit the great lamp and watched the water. Out of the grey came the Pea, slowly, with a broken mast and a fisherman who had lost his way.

She guided him in with the light and gave him tea and bread. He told her that the bell meant thank you, and that three rings meant please. After that the keeper wrote a new line in her ledger: the Pea, seven o'clock, green sails, a friend.

Every evening since, when the lamp turns over the sea, the keeper rings a bell of her own, twice, for the boats she cannot see.
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
