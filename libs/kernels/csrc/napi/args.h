// Argument helpers shared by the kernel bindings (nf4_napi.cpp, matmul_napi.cpp): typed arrays in,
// zero copy, checked only as far as memory safety needs (the TS wrappers give the clear errors).
#pragma once
#include <napi.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qk::napi {

struct Span {
  uint8_t* data;
  size_t bytes;
};

// Any typed array / Buffer / DataView / ArrayBuffer: its bytes (raw little-endian tensor data).
inline Span bytesOf(const Napi::Value& v, const char* what) {
  if (v.IsTypedArray()) {
    auto ta = v.As<Napi::TypedArray>();
    return {static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), ta.ByteLength()};
  }
  if (v.IsDataView()) {
    auto dv = v.As<Napi::DataView>();
    return {static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset(), dv.ByteLength()};
  }
  if (v.IsArrayBuffer()) {
    auto ab = v.As<Napi::ArrayBuffer>();
    return {static_cast<uint8_t*>(ab.Data()), ab.ByteLength()};
  }
  throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a typed array");
}

// A typed array of the given element type with at least minElems elements.
template <typename T>
T* typedOf(const Napi::Value& v, napi_typedarray_type type, size_t minElems, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    throw Napi::TypeError::New(v.Env(), std::string(what) + " has the wrong typed array type");
  auto ta = v.As<Napi::TypedArray>();
  if (ta.ElementLength() < minElems)
    throw Napi::RangeError::New(v.Env(), std::string(what) + " is too short: " + std::to_string(ta.ElementLength()) +
                                             " < " + std::to_string(minElems));
  return reinterpret_cast<T*>(static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset());
}

// A non-negative integer that a double represents exactly.
inline int64_t intArg(const Napi::Value& v, const char* what) {
  if (!v.IsNumber()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d != static_cast<double>(static_cast<int64_t>(d)) || d > 9007199254740991.0)
    throw Napi::RangeError::New(v.Env(), std::string(what) + " must be a non-negative integer");
  return static_cast<int64_t>(d);
}

// Runs a binding body, turning C++ exceptions into JS errors (invalid_argument -> TypeError).
template <typename F>
Napi::Value guarded(const Napi::CallbackInfo& info, F&& f) {
  try {
    return f();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::invalid_argument& e) {
    throw Napi::TypeError::New(info.Env(), e.what());
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

}  // namespace qk::napi
