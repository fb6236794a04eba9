// Builds the addon with node-gyp, offline: Node's headers are taken from the installation
// that runs this script (never downloaded). Incremental: configure, then make.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const nodeDir = join(dirname(process.execPath), "..");
const common = ["--release"];
if (existsSync(join(nodeDir, "include", "node", "node_api.h"))) common.push(`--nodedir=${nodeDir}`);

const gyp = process.env.npm_config_node_gyp;
const run = (args) => {
  const [cmd, cmdArgs] = gyp ? [process.execPath, [gyp, ...args]] : ["node-gyp", args];
  const r = spawnSync(cmd, cmdArgs, { cwd: root, stdio: "inherit" });
  if (r.status !== 0) {
    console.error("qlora: building the native kernels failed (needs g++ >= 9, python3, make).");
    process.exit(r.status ?? 1);
  }
};
run(["configure", ...common]);
run(["build", ...common, "-j", "max"]);
