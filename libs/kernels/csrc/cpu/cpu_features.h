// Runtime CPU feature dispatch (ggml style): kernels are compiled for every level with
// function target attributes and the widest level the CPU supports is picked at run time.
#pragma once

namespace qk {

enum class SimdLevel { Scalar = 0, Avx2 = 1, Avx512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512bf16 = false, avx512vnni = false;
};

const CpuFeatures& cpuFeatures();
// The level kernels use: the best the CPU has, capped by QLORA_SIMD=scalar|avx2|avx512 and setSimdLevel().
SimdLevel simdLevel();
void setSimdLevel(SimdLevel level);  // clamps to what the CPU supports
const char* simdLevelName(SimdLevel level);

}  // namespace qk
