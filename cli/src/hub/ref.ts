/**
 * `hf://ORG/NAME[@REVISION]`: a model on the Hugging Face hub, as the command line names it.
 */
import { InvalidArgument } from "@qlora/core";

export interface HfModelRef {
  /** "ORG/NAME" */
  repo: string;
  /** A branch, tag or commit sha; "main" when the reference names none. */
  revision: string;
}

export const HF_SCHEME = "hf://";

export function isHfRef(s: string): boolean {
  return s.startsWith(HF_SCHEME);
}

// The hub's own rule for repository ids: letters, digits, "-", "_", "."; no leading/trailing
// "-"/"." and no "--" or ".." (those are reserved). Checked here so that a typo is a clear error
// before any request, and so a name can never escape the cache directory it is stored under.
const PART = /^(?![.-])(?!.*(?:--|\.\.))[A-Za-z0-9_.-]{1,96}(?<![.-])$/;

export function parseHfRef(s: string): HfModelRef {
  if (!isHfRef(s)) throw new InvalidArgument(`not a hub reference: ${JSON.stringify(s)} (expected hf://ORG/NAME[@REVISION])`);
  const body = s.slice(HF_SCHEME.length);
  const at = body.indexOf("@");
  const repo = at < 0 ? body : body.slice(0, at);
  const revision = at < 0 ? "main" : body.slice(at + 1);
  const parts = repo.split("/");
  if (parts.length !== 2 || !parts.every((p) => PART.test(p))) {
    throw new InvalidArgument(`malformed hub reference ${JSON.stringify(s)}: expected hf://ORG/NAME[@REVISION], e.g. hf://HuggingFaceTB/SmolLM2-135M`);
  }
  // Revisions are branch/tag names (which may contain "/", e.g. refs/pr/3) or commit shas; they
  // are sent percent-encoded, so only whitespace, control characters and ".." are refused.
  if (revision === "" || /[\s\u0000-\u001f\u007f]/.test(revision) || revision.split("/").includes("..")) {
    throw new InvalidArgument(`malformed revision in ${JSON.stringify(s)}: ${JSON.stringify(revision)}`);
  }
  return { repo, revision };
}

export function formatHfRef(r: HfModelRef): string {
  return `${HF_SCHEME}${r.repo}${r.revision === "main" ? "" : `@${r.revision}`}`;
}
