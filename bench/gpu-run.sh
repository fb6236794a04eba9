#!/usr/bin/env bash
# The device-machine side of bench/gpu-pack.sh: puts the carried Node.js, addon, dist/ and packages in
# place (the device image has none of them and no network), then runs bench/gpu-check.sh without
# building. Exit status: gpu-check's (0 passed, 1 failed, 2 no CUDA device / no CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
c=.gpu-carry
[ -f "$c/node.xz" ] || { echo "gpu-run: no $c here (run bench/gpu-pack.sh first and carry $c)" >&2; exit 2; }
mkdir -p "$c/bin"
[ -x "$c/bin/node" ] || { xz -dc "$c/node.xz" > "$c/bin/node" && chmod +x "$c/bin/node"; }
export PATH="$PWD/$c/bin:$PATH"
node --version
for p in core kernels formats model; do rm -rf "libs/$p/dist" && cp -r "$c/dist/$p" "libs/$p/dist"; done
mkdir -p libs/kernels/build/Release node_modules/@qlora node_modules/@huggingface
cp "$c/qlora_kernels.node" libs/kernels/build/Release/qlora_kernels.node
for p in core kernels formats model; do ln -sfn "../../libs/$p" "node_modules/@qlora/$p"; done
cp -r "$c/huggingface/." node_modules/@huggingface/
[ -d "$c/stories260K" ] && export QLORA_STORIES_DIR="$PWD/$c/stories260K"
QLORA_GPU_CHECK_BUILD=0 exec bash bench/gpu-check.sh "$@"
