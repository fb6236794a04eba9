// One registry for every N-API export, so each kernel family adds its bindings in its
// own file (QK_EXPORT) and the module init needs no central list.
#pragma once
#include <napi.h>
#include <vector>

namespace qk {

using ExportFn = Napi::Value (*)(const Napi::CallbackInfo&);

struct ExportEntry {
  const char* name;
  ExportFn fn;
};

std::vector<ExportEntry>& exportRegistry();

struct ExportRegistrar {
  ExportRegistrar(const char* name, ExportFn fn) { exportRegistry().push_back({name, fn}); }
};

}  // namespace qk

#define QK_EXPORT(jsName, fn) static ::qk::ExportRegistrar qk_registrar_##fn(jsName, fn)
