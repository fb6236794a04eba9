// Hugging Face hub access for the CLI (`--model hf://ORG/NAME[@REVISION]`).
export { parseHfRef, isHfRef, formatHfRef, HF_SCHEME, type HfModelRef } from "./ref.js";
export {
  downloadHfModel,
  defaultHubCacheDir,
  DEFAULT_ENDPOINT,
  HUB_SIDE_FILES,
  SNAPSHOT_FILE,
  type HubDownloadOptions,
  type HubProgress,
  type HubSnapshot,
  type SnapshotFile,
} from "./download.js";
