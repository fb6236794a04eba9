// Runtime information and settings: CPU features, SIMD level, threads.
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "napi/registry.h"

#include <atomic>
#include <cstring>
#include <vector>

namespace {

Napi::Value cpuInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const qk::CpuFeatures& f = qk::cpuFeatures();
  Napi::Object o = Napi::Object::New(env);
  o.Set("avx2", f.avx2 && f.fma);
  o.Set("avx512", f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq);
  o.Set("avx512bf16", f.avx512bf16);
  o.Set("avx512vnni", f.avx512vnni);
  o.Set("simd", qk::simdLevelName(qk::simdLevel()));
  o.Set("threads", qk::numThreads());
  return o;
}

Napi::Value setSimd(const Napi::CallbackInfo& info) {
  std::string s = info[0].As<Napi::String>().Utf8Value();
  qk::SimdLevel l = qk::SimdLevel::Avx512;
  if (s == "scalar") l = qk::SimdLevel::Scalar;
  else if (s == "avx2") l = qk::SimdLevel::Avx2;
  else if (s != "avx512") throw Napi::TypeError::New(info.Env(), "simd level must be scalar, avx2 or avx512");
  qk::setSimdLevel(l);
  return Napi::String::New(info.Env(), qk::simdLevelName(qk::simdLevel()));
}

Napi::Value setThreads(const Napi::CallbackInfo& info) {
  qk::setNumThreads(info[0].As<Napi::Number>().Int32Value());
  return Napi::Number::New(info.Env(), qk::numThreads());
}

// Runs `regions` parallel regions over n items and counts how often each item was visited:
// every item must be visited exactly once per region, whoever (worker or caller) runs a part.
// A self-test of the pool's claiming protocol, used by the tests under many thread counts.
Napi::Value poolSelfTest(const Napi::CallbackInfo& info) {
  const int64_t n = info[0].As<Napi::Number>().Int64Value();
  const int64_t grain = info[1].As<Napi::Number>().Int64Value();
  const int regions = info[2].As<Napi::Number>().Int32Value();
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  int64_t bad = 0;
  for (int r = 0; r < regions; ++r) {
    for (auto& h : hits) h.store(0, std::memory_order_relaxed);
    qk::parallelFor(n, grain, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1, std::memory_order_relaxed);
    });
    for (auto& h : hits) bad += h.load(std::memory_order_relaxed) != 1;
  }
  return Napi::Number::New(info.Env(), static_cast<double>(bad));
}

}  // namespace

QK_EXPORT("poolSelfTest", poolSelfTest);
QK_EXPORT("cpuInfo", cpuInfo);
QK_EXPORT("setSimd", setSimd);
QK_EXPORT("setThreads", setThreads);
