/** Shared by the stories260K end-to-end tests: the story to fine-tune on, store setup, skip reasons. */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { storyText } from "@qlora/model/test-support";
import { LIBS_MODEL_REFERENCE_ENGINE, LIBS_MODEL_TRAIN } from "./fixtures/reference-runner-paths.js";
import { addFullModel, datasetUpload, STORIES, type Harness } from "./helpers.js";

/** The shared story's first 16 lines (setupStories asserts the dataset has 16 examples). */
export const STORY = storyText(16);


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
