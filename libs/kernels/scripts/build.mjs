// Builds the addon with node-gyp, offline: Node's headers are taken from the installation
// that runs this script (never downloaded). Incremental: configure, then make.
//
// CUDA (docs/cuda.md): when nvcc is found (scripts/cuda-config.mjs; QLORA_CUDA=0 disables), every
// csrc/cuda/*.cu is compiled by nvcc into build/cuda/*.o — skipped when the object is newer than its
// source, the headers it can include and the flags — archived into build/cuda/libqlora_cuda.a, and
// the addon is linked with it and libcudart_static (QLORA_WITH_CUDA). A failing nvcc compile fails
// the build. Without nvcc the addon builds exactly as before.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, join } from "node:path";
import { cudaBuildDir, cudartStatic, findNvcc, nvccFlags, root, stateFile } from "./cuda-config.mjs";

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

const mtime = (p) => statSync(p).mtimeMs;
const listDir = (d, ext) =>
  existsSync(d) ? readdirSync(d).filter((f) => f.endsWith(ext)).map((f) => join(d, f)) : [];

async function buildCuda(nvcc) {
  const t0 = Date.now();
  const cudaDir = join(root, "csrc", "cuda");
  const sources = listDir(cudaDir, ".cu").sort();
  if (sources.length === 0) throw new Error("no csrc/cuda/*.cu sources");
  const cudart = cudartStatic(nvcc);
  if (!cudart) throw new Error(`libcudart_static.a not found next to ${nvcc}`);
  mkdirSync(cudaBuildDir, { recursive: true });
  // any header the .cu files can include (csrc/cuda/*.cuh|h, csrc/cpu/*.h, csrc/model/*.h) invalidates every object
  const headers = [...listDir(cudaDir, ".cuh"), ...listDir(cudaDir, ".h"), ...listDir(join(root, "csrc", "cpu"), ".h"),
    ...listDir(join(root, "csrc", "model"), ".h")];  // cuda/model_cuda.h includes model/model.h
  const newestHeader = Math.max(0, ...headers.map(mtime));
  const flags = [...nvccFlags, `-I${join(root, "csrc")}`];
  const flagsFile = join(cudaBuildDir, "flags.txt");
  const flagsKey = `${nvcc}\n${flags.join(" ")}`;
  const flagsSame = existsSync(flagsFile) && readFileSync(flagsFile, "utf8") === flagsKey;
  const jobs = sources
    .map((src) => ({ src, obj: join(cudaBuildDir, src.slice(cudaDir.length + 1).replace(/\.cu$/, ".o")) }))
    .filter(({ src, obj }) => !flagsSame || !existsSync(obj) || mtime(obj) < Math.max(mtime(src), newestHeader));
  // nvcc is slow and single-threaded per file: one process per core
  const compile = ({ src, obj }) =>
    new Promise((resolve, reject) => {
      const p = spawn(nvcc, [...flags, "-c", src, "-o", obj], { cwd: root, stdio: "inherit" });
      p.on("error", reject);
      p.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`nvcc failed on ${src} (exit ${code})`))));
    });
  const queue = [...jobs];
  const workers = Array.from({ length: Math.max(1, Math.min(availableParallelism(), queue.length)) }, async () => {
    while (queue.length) await compile(queue.shift());
  });
  try {
    await Promise.all(workers);
  } catch (e) {
    for (const { obj } of jobs) rmSync(obj, { force: true });  // never keep a half-built set
    throw e;
  }
  writeFileSync(flagsFile, flagsKey);
  const library = join(cudaBuildDir, "libqlora_cuda.a");
  const objects = sources.map((s) => join(cudaBuildDir, s.slice(cudaDir.length + 1).replace(/\.cu$/, ".o")));
  const stale = !existsSync(library) || jobs.length > 0 || objects.some((o) => mtime(o) > mtime(library));
  if (stale) {
    rmSync(library, { force: true });
    const r = spawnSync("ar", ["rcs", library, ...objects], { stdio: "inherit" });
    if (r.status !== 0) throw new Error("ar failed");
    // gyp does not make the addon depend on `libraries`: drop the linked addon so make relinks it
    for (const p of ["build/Release/qlora_kernels.node", "build/Release/obj.target/qlora_kernels.node"])
      rmSync(join(root, p), { force: true });
  }
  return { library, cudart, compiled: jobs.length, seconds: (Date.now() - t0) / 1000 };
}

const previous = (() => {
  try {
    return JSON.parse(readFileSync(stateFile, "utf8"));
  } catch {
    return { enabled: false };
  }
})();
const nvcc = findNvcc();
let state = { enabled: false };
if (nvcc) {
  try {
    const r = await buildCuda(nvcc);
    state = { enabled: true, nvcc, library: r.library, cudart: r.cudart };
    console.log(
      `qlora: CUDA kernels: nvcc ${nvcc}, ${r.compiled} of ${listDir(join(root, "csrc", "cuda"), ".cu").length} ` +
        `sources compiled in ${r.seconds.toFixed(1)} s (sm_80, sm_90, compute_90 PTX); linking with libcudart_static`,
    );
  } catch (e) {
    console.error(`qlora: compiling the CUDA kernels failed: ${e.message}`);
    process.exit(1);
  }
} else {
  console.log(
    process.env.QLORA_CUDA === "0"
      ? "qlora: CUDA kernels: disabled (QLORA_CUDA=0); building the CPU addon only"
      : "qlora: CUDA kernels: nvcc not found (CUDA_HOME, /usr/local/cuda/bin, PATH); building the CPU addon only",
  );
}
mkdirSync(dirname(stateFile), { recursive: true });
writeFileSync(stateFile, JSON.stringify(state));
// switching CUDA on or off changes the link line: make must relink
if (previous.enabled !== state.enabled) rmSync(join(root, "build", "Release", "qlora_kernels.node"), { force: true });
run(["configure", ...common]);
run(["build", ...common, "-j", "max"]);
