// Copies the files a production container needs from a built, pruned checkout (cwd) into OUT,
// keeping the repository layout (workspace packages are symlinked from node_modules/@qlora/*, so
// they must stay at the same relative paths):
//   package.json, node_modules/                     (production dependencies only: run after
//                                                    `npm prune --omit=dev`)
//   <workspace>/package.json, <workspace>/dist/src/ (compiled JavaScript; dist/test is left out)
//   <workspace>/node_modules/                       (nested production deps, when npm made any)
//   <workspace>/build/Release/*.node                (the native addon; objects and Makefiles left out)
// Fails when a workspace has no compiled output, so a broken build cannot produce an image that
// only fails at run time.
// Usage: node deploy/docker/collect-runtime.mjs OUT
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

const out = process.argv[2];
if (!out) {
  console.error("usage: collect-runtime.mjs OUT");
  process.exit(2);
}
const root = process.cwd();
const copy = (rel) => {
  const src = join(root, rel);
  if (!existsSync(src)) return false;
  // verbatimSymlinks: node_modules/@qlora/* are relative links to the workspaces; keep them as is.
  cpSync(src, join(out, rel), { recursive: true, verbatimSymlinks: true });
  return true;
};

const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
mkdirSync(out, { recursive: true });
copy("package.json");
if (!copy("node_modules")) throw new Error("node_modules is missing: run npm ci first");

const missing = [];
for (const ws of pkg.workspaces ?? []) {
  copy(join(ws, "package.json"));
  if (!copy(join(ws, "dist", "src"))) missing.push(ws);
  copy(join(ws, "node_modules"));
  const release = join(ws, "build", "Release");
  if (existsSync(join(root, release))) {
    for (const f of readdirSync(join(root, release))) if (f.endsWith(".node")) copy(join(release, f));
  }
}
if (missing.length) throw new Error(`no compiled output (dist/src) in: ${missing.join(", ")}`);
console.log(`collect-runtime: ${pkg.workspaces.length} workspaces copied to ${out}`);
