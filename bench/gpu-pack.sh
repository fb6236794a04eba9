#!/usr/bin/env bash
# Packs what bench/gpu-check.sh needs on a device machine into .gpu-carry/ (git-ignored, ~40 MB): the
# device image has CUDA but no Node.js, no node_modules and no network, so everything is built here
# (nvcc is here) and carried: Node itself (xz), the addon with its CUDA kernels, the compiled dist/ of
# the libraries the GPU tests load, the tokenizer packages, and stories260K when ../shared has it.
# Then, with the device tool:  run(command="bash bench/gpu-run.sh", carry=[".gpu-carry"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-carry
addon=libs/kernels/build/Release/qlora_kernels.node
[ -f "$addon" ] || { echo "gpu-pack: build first (npm ci or npm run build)" >&2; exit 1; }
node --input-type=module -e '
  import { cudaInfo } from "./libs/kernels/dist/src/index.js";
  if (!cudaInfo().compiled) { console.error("gpu-pack: the addon was built without CUDA (no nvcc here?)"); process.exit(1); }
'
rm -rf "$out"
mkdir -p "$out/dist"
xz -T0 -6 -c "$(node -p process.execPath)" > "$out/node.xz"
cp "$addon" "$out/qlora_kernels.node"
for p in core kernels formats model; do cp -r "libs/$p/dist" "$out/dist/$p"; done
cp -rL node_modules/@huggingface "$out/huggingface"
if [ -f ../shared/models/stories260K/model.safetensors ]; then cp -r ../shared/models/stories260K "$out/stories260K"; fi
du -sh "$out" | sed 's/^/gpu-pack: /'
echo "gpu-pack: now run bench/gpu-run.sh on the device machine with carry [\"$out\"]"
