/**
 * Loads the compiled addon (build/Release/qlora_kernels.node) once per thread. QLORA_KERNELS_ADDON names
 * another build of it instead: the CUDA-emulator build (scripts/build-emu.mjs) for the GPU tests on a CPU.
 */
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const addonPath = process.env.QLORA_KERNELS_ADDON || join(packageRoot, "build", "Release", "qlora_kernels.node");

function load(): any {
  if (!existsSync(addonPath)) {
    throw new Error(
      `qlora: the native kernels are not built (${addonPath} is missing); run \`npm run build:native\``,
    );
  }
  return createRequire(import.meta.url)(addonPath);
}

let addon: any;

/**
 * The raw addon, loaded on first use (so importing this package — e.g. for `qlora --help` —
 * never needs the native build). Use the typed wrappers in this package instead.
 */
export const native: any = new Proxy(
  {},
  {
    get(_target, prop) {
      addon ??= load();
      return addon[prop];
    },
    has(_target, prop) {
      addon ??= load();
      return prop in addon;
    },
  },
);
