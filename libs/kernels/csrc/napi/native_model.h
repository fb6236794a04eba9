// The engine behind a NativeModel JS object (napi/engine_napi.cpp), for the other bindings that take
// a NativeModel handle (napi/train_napi.cpp: LoRA training on whichever device the model lives on).
#pragma once
#include <napi.h>

namespace qk {
namespace engine {

class Model;
class CudaModel;

// Exactly one of the two is set for a live model; both are null once it was disposed. cuda is only
// ever set in an addon built with CUDA (QLORA_WITH_CUDA).
struct NativeEngine {
  Model* cpu = nullptr;
  CudaModel* cuda = nullptr;
};
// Throws EngineError INVALID_ARGUMENT when v is not a NativeModel.
NativeEngine unwrapNativeModel(const Napi::Value& v);

}  // namespace engine
}  // namespace qk
