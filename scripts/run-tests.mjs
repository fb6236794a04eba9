// Runs every compiled test file (dist/test/**/*.test.js of each workspace) with node's test runner.
// QLORA_TEST_FILTER=substring limits the run to matching files.
import { spawnSync } from "node:child_process";
import { readdirSync, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

const root = join(new URL(".", import.meta.url).pathname, "..");
const { workspaces } = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const files = [];
const walk = (d) => {
  for (const e of readdirSync(d, { withFileTypes: true })) {
    const p = join(d, e.name);
    if (e.isDirectory()) walk(p);
    else if (e.name.endsWith(".test.js")) files.push(p);
  }
};
for (const w of [...workspaces, "tests/unit"]) {
  const d = join(root, w, "dist", "test");
  if (existsSync(d)) walk(d);
}
// Plain-ESM tests that need no build step (deploy manifests, Dockerfiles).
const deployTests = join(root, "tests", "deploy");
if (existsSync(deployTests)) {
  for (const e of readdirSync(deployTests)) if (e.endsWith(".test.mjs")) files.push(join(deployTests, e));
}
const filter = process.env.QLORA_TEST_FILTER;
const selected = files.sort().filter((f) => !filter || f.includes(filter));
if (selected.length === 0) {
  console.error("run-tests: no test files found (did the TypeScript build run?)");
  process.exit(1);
}
const r = spawnSync(process.execPath, ["--test", "--test-reporter=spec", ...selected], {
  stdio: "inherit",
  cwd: root,
});
process.exit(r.status ?? 1);
