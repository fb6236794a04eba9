#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace qk {

static CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = true;  // every AVX2 CPU has F16C
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
#if defined(__GNUC__) && (__GNUC__ >= 12)
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
#endif
  return f;
}

const CpuFeatures& cpuFeatures() {
  static const CpuFeatures f = detect();
  return f;
}

static SimdLevel maxSupported() {
  const CpuFeatures& f = cpuFeatures();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq) return SimdLevel::Avx512;
  if (f.avx2 && f.fma) return SimdLevel::Avx2;
  return SimdLevel::Scalar;
}

static SimdLevel initialLevel() {
  SimdLevel lvl = maxSupported();
  if (const char* env = std::getenv("QLORA_SIMD")) {
    SimdLevel want = lvl;
    if (!std::strcmp(env, "scalar")) want = SimdLevel::Scalar;
    else if (!std::strcmp(env, "avx2")) want = SimdLevel::Avx2;
    else if (!std::strcmp(env, "avx512")) want = SimdLevel::Avx512;
    if (want < lvl) lvl = want;
  }
  return lvl;
}

static std::atomic<int> g_level{-1};

SimdLevel simdLevel() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l < 0) {
    l = static_cast<int>(initialLevel());
    g_level.store(l);
  }
  return static_cast<SimdLevel>(l);
}

void setSimdLevel(SimdLevel level) {
  SimdLevel mx = maxSupported();
  g_level.store(static_cast<int>(level > mx ? mx : level));
}

const char* simdLevelName(SimdLevel level) {
  switch (level) {
    case SimdLevel::Avx512: return "avx512";
    case SimdLevel::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace qk
