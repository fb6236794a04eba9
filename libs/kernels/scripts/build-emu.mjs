// Builds the addon against the CUDA emulator (emu/, docs/cuda.md §8): every csrc/cuda/*.cu compiled
// by g++ as C++ (kernel launches rewritten into qk_emu::launch calls, emu/include/qk_emu.h
// force-included, emu/include/mma.h in place of the toolkit's WMMA), linked with emu/runtime.cpp
// instead of libcudart. The result, build-emu/pkg/build/Release/qlora_kernels.node, is the normal
// addon with QLORA_WITH_CUDA whose "GPU" is the emulator; QLORA_KERNELS_ADDON=<that path> makes
// @qlora/kernels load it, so the GPU tests run their kernels on the CPU (scripts/test-cuda-emu.mjs at the root).
// Needs the CUDA toolkit's headers (next to nvcc), not a GPU.
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, join } from "node:path";
import { findNvcc, root } from "./cuda-config.mjs";

const nvcc = findNvcc();
if (!nvcc) {
  console.log("qlora: CUDA emulator: no CUDA toolkit (nvcc) found; its headers are needed");
  process.exit(2);
}
const cudaInclude = join(dirname(dirname(nvcc)), "include");
const realNvcc = (() => {  // /usr/local/bin/nvcc may be a wrapper: ask nvcc where its headers are
  if (existsSync(join(cudaInclude, "cuda_runtime.h"))) return cudaInclude;
  const r = spawnSync(nvcc, ["-dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"], { encoding: "utf8" });
  const m = /_INCLUDES_="?([^"\n]*)"?/.exec(`${r.stdout}${r.stderr}`);
  const dirs = (m?.[1] ?? "").split(/\s+/).filter((s) => s.startsWith("-I")).map((s) => s.slice(2).replace(/"/g, ""));
  return dirs.find((d) => existsSync(join(d, "cuda_runtime.h"))) ?? null;
})();
if (!realNvcc) {
  console.error(`qlora: CUDA emulator: cuda_runtime.h not found next to ${nvcc}`);
  process.exit(1);
}

const out = join(root, "build-emu");
const pkg = join(out, "pkg");
const objDir = join(out, "obj");
const srcDir = join(out, "src");
for (const d of [pkg, objDir, srcDir]) mkdirSync(d, { recursive: true });

// ---- kernel<<<cfg>>>(args); → ::qk_emu::launch(kernel, ::qk_emu::LaunchConfig(cfg), args); ----
function matchForward(s, i, open, close) {  // index of the bracket closing s[i] (== open)
  let depth = 0;
  for (let k = i; k < s.length; k++) {
    if (s[k] === open) depth++;
    else if (s[k] === close && --depth === 0) return k;
  }
  throw new Error("unbalanced brackets");
}
export function rewriteLaunches(src) {
  let s = src;
  for (let at = s.indexOf("<<<"); at >= 0; at = s.indexOf("<<<", at)) {
    // the kernel expression: an identifier (with :: qualifiers) and an optional <template args>
    let b = at;
    if (s[b - 1] === ">") {
      let depth = 0;
      for (b = at - 1; b >= 0; b--) {
        if (s[b] === ">") depth++;
        else if (s[b] === "<" && --depth === 0) break;
      }
    }
    while (b > 0 && /[\w:]/.test(s[b - 1])) b--;
    const kernel = s.slice(b, at);
    const cfgEnd = s.indexOf(">>>", at);
    const cfg = s.slice(at + 3, cfgEnd);
    const argOpen = s.indexOf("(", cfgEnd);
    const argClose = matchForward(s, argOpen, "(", ")");
    const args = s.slice(argOpen + 1, argClose).trim();
    const call = `::qk_emu::launch(${kernel}, ::qk_emu::LaunchConfig(${cfg})${args ? `, ${args}` : ""})`;
    s = s.slice(0, b) + call + s.slice(argClose + 1);
    at = b + call.length;
  }
  // dynamic shared memory: one buffer per launch
  s = s.replace(/extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\[\];/g,
    (_, type, name) => `${type}* ${name} = static_cast<${type}*>(::qk_emu::dynamicShared());`);
  return s;
}

const cudaDir = join(root, "csrc", "cuda");
const sources = readdirSync(cudaDir).filter((f) => f.endsWith(".cu")).sort();
// Floating-point contraction as nvcc's default (--fmad=true: a·b + c may become one FMA) where the CPU has
// FMA; __fmul_rn and friends stay unfused (qk_emu.h). The exact places GCC and nvcc fuse differ.
const hasFma = (() => {
  try {
    return /\bfma\b/.test(readFileSync("/proc/cpuinfo", "utf8"));
  } catch {
    return false;
  }
})();
const flags = ["-std=c++17", "-O2", "-fPIC", "-fno-math-errno", "-Wno-attributes",
  ...(hasFma ? ["-mfma", "-ffp-contract=fast"] : ["-ffp-contract=off"]),
  `-I${join(root, "emu", "include")}`, `-I${realNvcc}`, `-I${join(root, "csrc")}`, `-I${cudaDir}`,
  "-include", "qk_emu.h", "-DQLORA_CUDA_EMULATOR",
  ...(process.env.QLORA_EMU_CXXFLAGS ?? "").split(/\s+/).filter(Boolean)];  // for experiments
const t0 = Date.now();
const jobs = sources.map((f) => {
  const cpp = join(srcDir, f.replace(/\.cu$/, ".cpp"));
  const text = rewriteLaunches(readFileSync(join(cudaDir, f), "utf8"));
  if (!existsSync(cpp) || readFileSync(cpp, "utf8") !== text) writeFileSync(cpp, text);
  return { cpp, obj: join(objDir, f.replace(/\.cu$/, ".o")) };
});
jobs.push({ cpp: join(root, "emu", "runtime.cpp"), obj: join(objDir, "emu_runtime.o") });
const headers = [...readdirSync(cudaDir).filter((f) => /\.(cuh|h)$/.test(f)).map((f) => join(cudaDir, f)),
  ...["cpu", "model"].flatMap((d) => readdirSync(join(root, "csrc", d)).filter((f) => f.endsWith(".h")).map((f) => join(root, "csrc", d, f))),
  ...readdirSync(join(root, "emu", "include")).map((f) => join(root, "emu", "include", f))];
const newest = Math.max(...headers.map((h) => statSync(h).mtimeMs));
const flagsFile = join(objDir, "flags.txt"), flagsKey = flags.join(" ");
const flagsSame = existsSync(flagsFile) && readFileSync(flagsFile, "utf8") === flagsKey;
const todo = jobs.filter(({ cpp, obj }) =>
  !flagsSame || !existsSync(obj) || statSync(obj).mtimeMs < Math.max(statSync(cpp).mtimeMs, newest));
const compile = ({ cpp, obj }) => new Promise((resolve, reject) => {
  // the runtime includes qk_emu.h itself, without the CUDA dialect macros
  const f = cpp === join(root, "emu", "runtime.cpp") ? flags.filter((x, i) => x !== "-include" && flags[i - 1] !== "-include") : flags;
  const p = spawn("g++", [...f, "-c", cpp, "-o", obj], { stdio: "inherit" });
  p.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`g++ failed on ${cpp}`))));
});
const queue = [...todo];
try {
  await Promise.all(Array.from({ length: Math.max(1, Math.min(availableParallelism(), queue.length)) }, async () => {
    while (queue.length) await compile(queue.shift());
  }));
} catch (e) {
  for (const { obj } of todo) rmSync(obj, { force: true });
  console.error(`qlora: CUDA emulator: ${e.message}`);
  process.exit(1);
}
writeFileSync(flagsFile, flagsKey);
const library = join(objDir, "libqlora_cuda_emu.a");
rmSync(library, { force: true });
const kernelObjs = jobs.filter((j) => !j.obj.endsWith("emu_runtime.o")).map((j) => j.obj);
if (spawnSync("ar", ["rcs", library, ...kernelObjs], { stdio: "inherit" }).status !== 0) process.exit(1);

// ---- the emulator's self-test: the semantics the kernels rely on and the misuse it must catch ----
{
  const cpp = join(srcDir, "selftest.cpp"), exe = join(objDir, "selftest");
  writeFileSync(cpp, rewriteLaunches(readFileSync(join(root, "emu", "selftest.cpp"), "utf8")));
  const c = spawnSync("g++", [...flags, cpp, join(objDir, "emu_runtime.o"), "-o", exe], { stdio: "inherit" });
  const r = c.status === 0 ? spawnSync(exe, [], { encoding: "utf8" }) : null;
  if (!r || r.status !== 0) {
    process.stdout.write(r ? r.stdout : "");
    console.error("qlora: CUDA emulator: the self-test failed");
    process.exit(1);
  }
  console.log(`qlora: CUDA emulator: self-test passed (${r.stdout.split("\n").filter((l) => l.startsWith("ok")).length} checks)`);
}

// ---- the addon, built by node-gyp in a package folder that shares csrc/ and links the emulator ----
for (const f of ["binding.gyp", "package.json"]) copyFileSync(join(root, f), join(pkg, f));
mkdirSync(join(pkg, "scripts"), { recursive: true });
for (const f of readdirSync(join(root, "scripts"))) copyFileSync(join(root, "scripts", f), join(pkg, "scripts", f));
if (!existsSync(join(pkg, "csrc"))) symlinkSync(join(root, "csrc"), join(pkg, "csrc"));
mkdirSync(join(pkg, "build", "cuda"), { recursive: true });
const state = { enabled: true, emulator: true, library, cudart: join(objDir, "emu_runtime.o") };
writeFileSync(join(pkg, "build", "cuda", "state.json"), JSON.stringify(state));
for (const p of [["Release", "qlora_kernels.node"], ["Release", "obj.target", "qlora_kernels.node"]])
  rmSync(join(pkg, "build", ...p), { force: true });  // relink with the new objects
const nodeDir = join(dirname(process.execPath), "..");
const gypArgs = ["--release", `--jobs=${availableParallelism()}`, ...(existsSync(join(nodeDir, "include", "node", "node_api.h")) ? [`--nodedir=${nodeDir}`] : [])];
// node-gyp: npm's own (set when run by npm), else the one bundled with this Node's npm
const bundledGyp = join(nodeDir, "lib", "node_modules", "npm", "node_modules", "node-gyp", "bin", "node-gyp.js");
const gyp = process.env.npm_config_node_gyp ?? (existsSync(bundledGyp) ? bundledGyp : undefined);
for (const step of ["configure", "build"]) {
  const [cmd, args] = gyp ? [process.execPath, [gyp, step, ...gypArgs]] : ["node-gyp", [step, ...gypArgs]];
  const r = spawnSync(cmd, args, { cwd: pkg, stdio: ["ignore", "ignore", "inherit"] });
  if (r.status !== 0) {
    console.error(`qlora: CUDA emulator: node-gyp ${step} failed`);
    process.exit(1);
  }
}
console.log(`qlora: CUDA emulator: ${todo.length} of ${jobs.length} sources compiled in ${((Date.now() - t0) / 1000).toFixed(1)} s; ` +
  `addon ${join(pkg, "build", "Release", "qlora_kernels.node")}`);
