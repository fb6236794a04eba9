// CUDA build configuration, shared by scripts/build.mjs (which compiles csrc/cuda/*.cu), binding.gyp
// (which links the result) and test/cuda.test.ts (which fails when nvcc exists but the addon has no CUDA).
//
//   findNvcc()   nvcc from $CUDA_HOME/bin, /usr/local/cuda/bin, then $PATH; null when QLORA_CUDA=0
//   CLI: node scripts/cuda-config.mjs gyp-defines | gyp-libraries   (for binding.gyp; read the state
//        file build.mjs wrote, so a plain `node-gyp rebuild` without build.mjs links no CUDA)
import { existsSync, readFileSync } from "node:fs";
import { delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const root = join(dirname(fileURLToPath(import.meta.url)), "..");
export const cudaBuildDir = join(root, "build", "cuda");
export const stateFile = join(cudaBuildDir, "state.json");

// sm_80 (A100) and sm_90 (H100/H200) machine code, plus compute_90 PTX for newer GPUs to JIT.
export const gencode = [
  "-gencode=arch=compute_80,code=sm_80",
  "-gencode=arch=compute_90,code=sm_90",
  "-gencode=arch=compute_90,code=compute_90",
];
export const nvccFlags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fno-math-errno", ...gencode];

export function findNvcc(env = process.env) {
  if (env.QLORA_CUDA === "0") return null;
  const candidates = [];
  if (env.CUDA_HOME) candidates.push(join(env.CUDA_HOME, "bin", "nvcc"));
  candidates.push("/usr/local/cuda/bin/nvcc");
  for (const d of (env.PATH ?? "").split(delimiter)) if (d) candidates.push(join(d, "nvcc"));
  return candidates.find((p) => existsSync(p)) ?? null;
}

// The toolkit's static runtime next to nvcc (lib64 or targets/<arch>/lib).
export function cudartStatic(nvcc) {
  const home = dirname(dirname(nvcc));
  for (const d of ["lib64", "lib", join("targets", "x86_64-linux", "lib"), join("targets", "sbsa-linux", "lib")]) {
    const p = join(home, d, "libcudart_static.a");
    if (existsSync(p)) return p;
  }
  return null;
}

export function readState() {
  try {
    return JSON.parse(readFileSync(stateFile, "utf8"));
  } catch {
    return { enabled: false };
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const s = readState();
  const mode = process.argv[2];
  if (mode === "gyp-defines") {
    if (s.enabled) console.log("QLORA_WITH_CUDA");
  } else if (mode === "gyp-libraries") {
    // the static runtime: the addon still loads where no CUDA driver or library is installed
    if (s.enabled) console.log([s.library, s.cudart, "-ldl", "-lrt", "-lpthread"].join(" "));
  } else {
    console.log(JSON.stringify({ nvcc: findNvcc(), state: s }));
  }
}
