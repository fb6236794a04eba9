/**
 * Test material that other workspaces' tests import as `@qlora/model/test-support` (libs/model's
 * package.json "exports"; it resolves to dist/test, which deployments leave out, so product code
 * must never import it): where stories260K is, and the story the fine-tuning tests train on.
 */
export { haveStories, skipNoStories, storiesDir } from "./fixtures.js";

/**
 * A short story in the style of stories260K's training data (TinyStories): new text to fine-tune
 * on, one example per line. Tests that assert a dataset size take a prefix with `storyText(n)`.
 */
export const STORY_LINES: readonly string[] = [
  "Tom had a red kite. He took it to the hill on a windy day.",
  "The kite went up and up. Tom laughed and ran with the string.",
  "A bird flew next to the kite. The bird sang a happy song.",
  "Then the wind stopped. The kite came down into a tall tree.",
  "Tom was sad. His friend Sue came with a long stick.",
  "Sue helped Tom get the kite out of the tree. Tom said thank you.",
  "They flew the kite together until the sun went down.",
  "At home, Tom told his mom about the bird and the tree.",
  "The next morning it rained. Tom and Sue stayed inside and drew pictures.",
  "Sue drew a big green frog. Tom drew his red kite in the blue sky.",
  "Mom put the pictures on the wall. She said they were very good.",
  "After lunch the rain stopped and a rainbow came out over the hill.",
  "Tom and Sue ran outside. The grass was wet and the air smelled sweet.",
  "They found a small puppy under a bush. The puppy was cold and scared.",
  "Sue held the puppy close. Tom gave it some of his bread.",
  "The puppy wagged its tail and licked Tom on the nose.",
  "They looked for the puppy's home. A little girl was crying by the gate.",
  "The puppy ran to the girl. She hugged it and smiled at Tom and Sue.",
  "The girl's name was Mia. She asked them to come and play tomorrow.",
  "That night Tom dreamed of kites, rainbows and a happy little puppy.",
  "In the morning he flew his kite again, and this time it did not fall.",
  "Sue and Mia came too, and the puppy barked at the kite all day long.",
];

/** The first `lines` lines of the story (all of them by default), joined with "\n". */
export function storyText(lines: number = STORY_LINES.length): string {
  if (!Number.isInteger(lines) || lines < 1 || lines > STORY_LINES.length) {
    throw new RangeError(`storyText: lines must be an integer in [1, ${STORY_LINES.length}], got ${lines}`);
  }
  return STORY_LINES.slice(0, lines).join("\n");
}
