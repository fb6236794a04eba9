// Copies the files a production container needs from a built, pruned checkout (cwd) into OUT,
// keeping the repository layout (workspace packages are symlinked from node_modules/@qlora/*, so
// they must stay at the same relative paths):
//   package.json, node_modules/                     (production dependencies only: run after
//                                                    `npm prune --omit=dev`)
//   <workspace>/package.json, <workspace>/dist/src/ (compiled JavaScript; dist/test is left out)
//   <workspace>/node_modules/                       (nested production deps, when npm made any)
//   <workspace>/build/Release/*.node                (the native addon; objects and Makefiles left out)
// In node_modules, node-gyp build folders (those with a config.gypi) keep only Release/*.node:
// object files, static libraries and Makefiles are not needed to load an addon (better-sqlite3's
// are about 20 MB).
// Fails when a workspace has no compiled output, so a broken build cannot produce an image that
// only fails at run time.
// Usage: node deploy/docker/collect-runtime.mjs OUT
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, sep } from "node:path";

const out = process.argv[2];
if (!out) {
  console.error("usage: collect-runtime.mjs OUT");
  process.exit(2);
}
const root = process.cwd();
// node-gyp output folders under node_modules (marked by build/config.gypi); symlinks (the
// workspace links in node_modules/@qlora) are not followed.
const gypBuildDirs = new Set();
const findGyp = (dir) => {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (!e.isDirectory()) continue;
    const p = join(dir, e.name);
    if (e.name === "build" && existsSync(join(p, "config.gypi"))) gypBuildDirs.add(p);
    else findGyp(p);
  }
};
/** Inside a node-gyp build folder keep only Release/ and the .node files in it. */
const keep = (src) => {
  for (const b of gypBuildDirs) {
    if (src === b) return true;
    if (!src.startsWith(b + sep)) continue;
    const rel = relative(b, src);
    return rel === "Release" || (dirname(rel) === "Release" && rel.endsWith(".node"));
  }
  return true;
};
const copy = (rel) => {
  const src = join(root, rel);
  if (!existsSync(src)) return false;
  // verbatimSymlinks: node_modules/@qlora/* are relative links to the workspaces; keep them as is.
  cpSync(src, join(out, rel), { recursive: true, verbatimSymlinks: true, filter: keep });
  return true;
};

const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
mkdirSync(out, { recursive: true });
if (existsSync(join(root, "node_modules"))) findGyp(join(root, "node_modules"));
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
