# The native addon: C++17 kernels (scalar / AVX2 / AVX-512, chosen at run time) behind N-API.
# Sources are listed by scripts/list-sources.mjs so each kernel family is one file to add.
# CUDA sources (csrc/cuda/*.cu) are compiled by nvcc in scripts/build.mjs when nvcc exists; the
# state it leaves (scripts/cuda-config.mjs) adds the QLORA_WITH_CUDA define and links the static
# library + libcudart_static here. Without it the two expansions below are empty.
{
  "targets": [
    {
      "target_name": "qlora_kernels",
      "sources": ["<!@(node scripts/list-sources.mjs)"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")", "csrc"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "<!@(node scripts/cuda-config.mjs gyp-defines)"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-fno-math-errno", "-Wall", "-Wno-unused-function"],
      "ldflags": ["-pthread"],
      "libraries": ["<!@(node scripts/cuda-config.mjs gyp-libraries)"]
    }
  ]
}
