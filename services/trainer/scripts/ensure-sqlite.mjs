// Makes sure better-sqlite3's native binding loads, building it from source offline when it does
// not. Needed because npm may skip dependencies' install scripts (npm 11 `allowScripts`), and
// because better-sqlite3's own fallback downloads a prebuilt binary, which fails without network.
// Node's headers come from the running installation (--nodedir), never from the network, as in
// libs/kernels/scripts/build.mjs. Run from the repository root's prepare script, before the build.
//
//   node services/trainer/scripts/ensure-sqlite.mjs            check, rebuild if needed
//   QLORA_SQLITE_DIR=/path/to/better-sqlite3 node …            operate on another copy (testing)
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);
const pkgDir = process.env.QLORA_SQLITE_DIR ?? dirname(require.resolve("better-sqlite3/package.json"));

function loads() {
  // A child process: a binding that failed to load cannot be unloaded from this one.
  const probe = `const D = require(${JSON.stringify(pkgDir)}); const db = new D(":memory:"); db.prepare("select 1").get(); db.close();`;
  return spawnSync(process.execPath, ["-e", probe], { stdio: "ignore" }).status === 0;
}

if (loads()) process.exit(0);

console.error(`qlora: better-sqlite3's native binding is missing or broken; building it from source in ${pkgDir}`);
const nodeDir = join(dirname(process.execPath), "..");
const args = ["rebuild", "--release"];
if (existsSync(join(nodeDir, "include", "node", "node_api.h"))) args.push(`--nodedir=${nodeDir}`);

// node-gyp: npm's own (set for lifecycle scripts), else the one bundled with npm next to node, else PATH.
const candidates = [
  process.env.npm_config_node_gyp,
  join(nodeDir, "lib", "node_modules", "npm", "node_modules", "node-gyp", "bin", "node-gyp.js"),
].filter((p) => p && existsSync(p));
const [cmd, cmdArgs] = candidates.length ? [process.execPath, [candidates[0], ...args]] : ["node-gyp", args];
const r = spawnSync(cmd, cmdArgs, { cwd: pkgDir, stdio: "inherit" });
if (r.status !== 0 || !loads()) {
  console.error("qlora: building better-sqlite3 failed (needs g++, python3, make).");
  process.exit(r.status || 1);
}
console.error("qlora: better-sqlite3 built");
