/** Shared by the stories260K end-to-end tests: the story to fine-tune on, store setup, skip reasons. */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { LIBS_MODEL_REFERENCE_ENGINE, LIBS_MODEL_TRAIN } from "./fixtures/reference-runner-paths.js";
import { addFullModel, datasetUpload, STORIES, type Harness } from "./helpers.js";

export const STORY = [
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
].join("\n");


export const haveStories = existsSync(path.join(STORIES, "model.safetensors"));
// The modules the reference runner loads (libs/model's build output).
const haveReference = existsSync(fileURLToPath(LIBS_MODEL_TRAIN)) && existsSync(fileURLToPath(LIBS_MODEL_REFERENCE_ENGINE));
export const skipReference = !haveStories
  ? `stories260K not found at ${STORIES}`
  : !haveReference
    ? "libs/model's build output (training loop, reference engine) is missing"
    : false;
export const REFERENCE_RUNNER = new URL("./fixtures/reference-runner.js", import.meta.url);

/** stories260K as "stories" and the story as dataset "kite" (16 lines). */
export async function setupStories(h: Harness): Promise<void> {
  await addFullModel(h.store, "stories");
  const ds = (await h.client.uploadDataset(datasetUpload("kite", "kite.txt", STORY))).dataset!;
  assert.equal(ds.examples, 16n);
}
