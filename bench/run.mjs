// `npm run bench`: runs every bench/*.bench.mjs in turn; each prints its own table.
// BENCH_FILTER=substring runs only matching files. Figures go to BENCHMARKS.md by hand,
// with the command, the machine and the date.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";

const dir = new URL(".", import.meta.url).pathname;
const filter = process.env.BENCH_FILTER;
const files = readdirSync(dir).filter((f) => f.endsWith(".bench.mjs") && (!filter || f.includes(filter))).sort();
console.log(`machine: ${cpus()[0]?.model ?? "?"} x${cpus().length}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}`);
console.log(`date: ${new Date().toISOString()}`);
let failed = 0;
for (const f of files) {
  console.log(`\n## ${f}`);
  const r = spawnSync(process.execPath, [join(dir, f)], { stdio: "inherit" });
  if (r.status !== 0) failed++;
}
process.exit(failed ? 1 : 0);
