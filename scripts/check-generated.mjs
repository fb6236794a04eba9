// Fails when libs/proto/src/gen is stale: regenerates into a temporary copy and compares.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, cpSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";

const root = join(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "..");
const gen = join(root, "libs/proto/src/gen");
const list = (dir) => {
  const out = [];
  const walk = (d) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      e.isDirectory() ? walk(p) : out.push(relative(dir, p));
    }
  };
  if (existsSync(dir)) walk(dir);
  return out.sort();
};

const work = mkdtempSync(join(tmpdir(), "qlora-gen-"));
try {
  cpSync(join(root, "proto"), join(work, "proto"), { recursive: true });
  cpSync(join(root, "buf.yaml"), join(work, "buf.yaml"));
  cpSync(join(root, "buf.gen.yaml"), join(work, "buf.gen.yaml"));
  const buf = join(root, "node_modules/.bin/buf");
  const env = { ...process.env, PATH: `${join(root, "node_modules/.bin")}:${process.env.PATH}` };
  for (const args of [["lint"], ["generate"]]) {
    const r = spawnSync(buf, args, { cwd: work, stdio: "inherit", env });
    if (r.status !== 0) {
      console.error(`gen:check: buf ${args[0]} failed`);
      process.exit(1);
    }
  }
  const fresh = join(work, "libs/proto/src/gen");
  const a = list(gen), b = list(fresh);
  const stale = a.length !== b.length || a.some((f, i) => f !== b[i] ||
    !readFileSync(join(gen, f)).equals(readFileSync(join(fresh, f))));
  if (stale) {
    console.error("gen:check: libs/proto/src/gen is stale; run `npm run gen` and commit the result");
    process.exit(1);
  }
  console.log(`gen:check: ${a.length} generated files are up to date`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
