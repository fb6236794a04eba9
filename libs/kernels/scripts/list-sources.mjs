// Prints the C++ sources of the addon for binding.gyp: every csrc/**/*.cpp.
import { readdirSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = [];
const walk = (rel) => {
  for (const e of readdirSync(join(root, rel), { withFileTypes: true })) {
    const p = `${rel}/${e.name}`;
    if (e.isDirectory()) walk(p);
    else if (e.name.endsWith(".cpp")) out.push(p);
  }
};
walk("csrc");
console.log(out.sort().join(" "));
