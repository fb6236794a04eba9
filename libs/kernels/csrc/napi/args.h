// Argument helpers shared by the kernel bindings (nf4_napi.cpp, matmul_napi.cpp): typed arrays in,
// zero copy, checked only as far as memory safety needs (the TS wrappers give the clear errors).
#pragma once
#include <napi.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/nf4.h"

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

// The double-quantized scales of an NF4 WeightTensor (src/tensor.ts `absmaxDq`): {qabsmax: Uint8Array
// (one code per block), nestedAbsmax: Float32Array, offset: number, quantMap: Float32Array(256),
// nestedBlocksize?: number (256)}. Shared by the matmul, train and engine bindings. Throws
// std::invalid_argument (each binding maps it to its own error) when a field is missing or the
// arrays disagree; the caller checks `codes` against the weight's block count.
struct DoubleQuantAbsmaxArg {
  qk::Nf4DoubleQuantAbsmax dq;
  size_t codes = 0, nested = 0;    // lengths of qabsmax / nestedAbsmax
  Napi::Object arrays[3];          // qabsmax, nestedAbsmax, quantMap: for bindings that keep them alive
};
inline DoubleQuantAbsmaxArg doubleQuantAbsmaxOf(const Napi::Value& v, const std::string& what) {
  if (!v.IsObject() || v.IsTypedArray()) throw std::invalid_argument(what + " must be an object {qabsmax, nestedAbsmax, offset, quantMap}");
  Napi::Object o = v.As<Napi::Object>();
  DoubleQuantAbsmaxArg r;
  auto array = [&](const char* key, napi_typedarray_type type, int slot) -> std::pair<uint8_t*, size_t> {
    Napi::Value a = o.Get(key);
    if (!a.IsTypedArray() || a.As<Napi::TypedArray>().TypedArrayType() != type)
      throw std::invalid_argument(what + "." + key + (type == napi_uint8_array ? " must be a Uint8Array" : " must be a Float32Array"));
    auto ta = a.As<Napi::TypedArray>();
    r.arrays[slot] = a.As<Napi::Object>();
    return {static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), ta.ElementLength()};
  };
  auto [codes, nCodes] = array("qabsmax", napi_uint8_array, 0);
  auto [nested, nNested] = array("nestedAbsmax", napi_float32_array, 1);
  auto [map, nMap] = array("quantMap", napi_float32_array, 2);
  if (nMap != 256) throw std::invalid_argument(what + ".quantMap must hold 256 values");
  Napi::Value off = o.Get("offset");
  if (!off.IsNumber()) throw std::invalid_argument(what + ".offset must be a number");
  Napi::Value nbs = o.Get("nestedBlocksize");
  double nbsv = nbs.IsUndefined() || nbs.IsNull() ? 256.0 : (nbs.IsNumber() ? nbs.As<Napi::Number>().DoubleValue() : -1.0);
  if (!(nbsv >= 1 && nbsv <= 1048576 && nbsv == static_cast<double>(static_cast<int>(nbsv))))
    throw std::invalid_argument(what + ".nestedBlocksize must be a positive integer");
  r.dq.codes = codes;
  r.dq.nestedAbsmax = reinterpret_cast<const float*>(nested);
  r.dq.quantMap = reinterpret_cast<const float*>(map);
  r.dq.offset = static_cast<float>(off.As<Napi::Number>().DoubleValue());
  r.dq.nestedBlocksize = static_cast<int>(nbsv);
  r.codes = nCodes;
  r.nested = nNested;
  if (nNested * static_cast<size_t>(r.dq.nestedBlocksize) < nCodes)
    throw std::invalid_argument(what + ".nestedAbsmax is too short for its codes");
  return r;
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
