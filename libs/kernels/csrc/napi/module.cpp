#include "napi/registry.h"

namespace qk {

std::vector<ExportEntry>& exportRegistry() {
  static std::vector<ExportEntry> entries;
  return entries;
}

}  // namespace qk

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  for (const auto& e : qk::exportRegistry()) exports.Set(e.name, Napi::Function::New(env, e.fn, e.name));
  return exports;
}

NODE_API_MODULE(qlora_kernels, Init)
