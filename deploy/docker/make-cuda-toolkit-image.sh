#!/usr/bin/env bash
# Makes a local CUDA *build* image for deploy/docker/Dockerfile.cuda on a machine whose Docker engine
# cannot pull nvidia/cuda: node:20-bookworm-slim (../shared/tools/make-base-images.sh makes it offline)
# plus this machine's CUDA toolkit (nvcc, ptxas, cicc/nvvm, headers, libcudart_static), copied as it is.
# The addon links the CUDA runtime statically, so the toolkit is needed only to compile; the runtime
# stage needs no CUDA files at all (the NVIDIA container toolkit mounts the driver from the node).
#
#   bash deploy/docker/make-cuda-toolkit-image.sh            # → qlora-cuda-toolkit:<nvcc version>
#   DOCKER_BUILDKIT=1 docker build -f deploy/docker/Dockerfile.cuda \
#     --build-arg CUDA_BUILD_IMAGE=qlora-cuda-toolkit:13.0 --build-arg CUDA_RUNTIME_IMAGE=node:20-bookworm-slim .
#
# Environment: CUDA_HOME (default: the toolkit of the nvcc on PATH, else /usr/local/cuda),
# BASE_IMAGE (node:20-bookworm-slim), TAG (qlora-cuda-toolkit:<major.minor>), DOCKER (/usr/bin/docker).
# Prints the tag last. Skips the build when the tag exists (FORCE=1 rebuilds).
set -euo pipefail
DOCKER=${DOCKER:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker )}
if [ -z "${CUDA_HOME:-}" ]; then
  # The build's order (libs/kernels/scripts/cuda-config.mjs findNvcc): /usr/local/cuda, then PATH.
  nvcc=/usr/local/cuda/bin/nvcc
  [ -x "$nvcc" ] || nvcc=$(command -v nvcc) || { echo "make-cuda-toolkit-image: no nvcc (set CUDA_HOME)" >&2; exit 2; }
  # nvcc may be a wrapper script (exec …/cuda-X/bin/nvcc): a dry run says where the real one lives.
  probe=$(mktemp -d)
  echo '__global__ void probe() {}' >"$probe/probe.cu"
  here=$("$nvcc" -dryrun -c "$probe/probe.cu" -o "$probe/probe.o" 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  rm -rf "$probe"
  [ -n "$here" ] || { echo "make-cuda-toolkit-image: $nvcc -dryrun did not name its directory (set CUDA_HOME)" >&2; exit 2; }
  CUDA_HOME=$(cd "$here/.." && pwd -P)
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "make-cuda-toolkit-image: $CUDA_HOME/bin/nvcc not found" >&2; exit 2; }
version=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
[ -n "$version" ] || { echo "make-cuda-toolkit-image: cannot read the nvcc version" >&2; exit 2; }
BASE_IMAGE=${BASE_IMAGE:-node:20-bookworm-slim}
TAG=${TAG:-qlora-cuda-toolkit:$version}
if [ -z "${FORCE:-}" ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG already exists" >&2; echo "$TAG"; exit 0
fi
"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 ||
  { echo "make-cuda-toolkit-image: no $BASE_IMAGE image (../shared/tools/make-base-images.sh makes it)" >&2; exit 2; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# What compiling and linking the addon uses; the profilers, sanitizers and shared runtimes stay out.
mkdir -p "$ctx/cuda/lib"
cp -a "$CUDA_HOME/bin" "$CUDA_HOME/include" "$CUDA_HOME/nvvm" "$ctx/cuda/"
for f in libcudart_static.a libcudadevrt.a libculibos.a; do
  [ -e "$CUDA_HOME/lib64/$f" ] && cp -aL "$CUDA_HOME/lib64/$f" "$ctx/cuda/lib/"
done
[ -d "$CUDA_HOME/lib64/stubs" ] && cp -aL "$CUDA_HOME/lib64/stubs" "$ctx/cuda/lib/"
cat >"$ctx/Dockerfile" <<EOF
FROM $BASE_IMAGE
COPY cuda/ /usr/local/cuda-$version/
RUN ln -s cuda-$version /usr/local/cuda && ln -s lib /usr/local/cuda/lib64 \\
 && mkdir -p /usr/local/cuda/targets/x86_64-linux \\
 && ln -s ../../include /usr/local/cuda/targets/x86_64-linux/include \\
 && ln -s ../../lib /usr/local/cuda/targets/x86_64-linux/lib
ENV CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:\$PATH
EOF
echo "make-cuda-toolkit-image: $CUDA_HOME (nvcc $version, $(du -sh "$ctx/cuda" | cut -f1)) on $BASE_IMAGE → $TAG" >&2
DOCKER_BUILDKIT=1 "$DOCKER" build -q -t "$TAG" "$ctx" >/dev/null
echo "$TAG"
