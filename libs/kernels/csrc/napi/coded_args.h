// Argument helpers for the bindings whose errors carry a status code (engine_napi.cpp, train_napi.cpp):
// a thrown EngineError{code, message} becomes a JS Error with `code` set, which libs/kernels maps to the
// @qlora/core error classes (INVALID_ARGUMENT → InvalidArgument, NOT_FOUND → NotFound, …). The kernel
// bindings (nf4, matmul) use args.h instead: their TS wrappers validate first, so a native check
// failing there is a plain TypeError.
#pragma once
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <new>
#include <string>

#include "model/model.h"  // engine::EngineError

namespace qk::napi::coded {

using engine::EngineError;

[[noreturn]] inline void fail(const std::string& code, const std::string& msg) { throw EngineError(code, msg); }
[[noreturn]] inline void bad(const std::string& msg) { fail("INVALID_ARGUMENT", msg); }

// Runs a binding body: EngineError → Error with its code, bad_alloc → RESOURCE_EXHAUSTED ("<what>: out
// of memory"), anything else → INTERNAL; errors already raised in JS pass through.
template <typename F>
Napi::Value guarded(const Napi::CallbackInfo& info, const char* what, F&& f) {
  auto raise = [&](const std::string& code, const std::string& msg) {
    Napi::Error err = Napi::Error::New(info.Env(), msg);
    err.Set("code", Napi::String::New(info.Env(), code));
    throw err;
  };
  try {
    return f();
  } catch (const Napi::Error&) {
    throw;
  } catch (const EngineError& e) {
    raise(e.code, e.what());
  } catch (const std::bad_alloc&) {
    raise("RESOURCE_EXHAUSTED", std::string(what) + ": out of memory");
  } catch (const std::exception& e) {
    raise("INTERNAL", e.what());
  }
  return info.Env().Undefined();
}

template <typename T>
struct Typed {
  T* data = nullptr;
  size_t length = 0;  // elements
};

// A typed array of the given element type (zero copy); `expected` names it in the error ("a Float32Array").
template <typename T>
Typed<T> typed(const Napi::Value& v, napi_typedarray_type type, const std::string& what, const char* expected) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    bad(what + " has the wrong type (expected " + expected + ")");
  auto ta = v.As<Napi::TypedArray>();
  return {reinterpret_cast<T*>(static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset()), ta.ElementLength()};
}
inline Typed<float> f32(const Napi::Value& v, const std::string& what) {
  return typed<float>(v, napi_float32_array, what, "a Float32Array");
}
inline Typed<int32_t> i32(const Napi::Value& v, const std::string& what) {
  return typed<int32_t>(v, napi_int32_array, what, "an Int32Array");
}

// o[key] as a number.
inline double num(const Napi::Object& o, const char* key, const std::string& what) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) bad(what + "." + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

// v as an integer of type Int: a number without a fraction whose magnitude fits — int32 for the
// engine's sizes and indices, 2^53 - 1 (what a JS number holds exactly) for int64 counters.
template <typename Int>
Int integerArg(const Napi::Value& v, const std::string& what) {
  static_assert(sizeof(Int) == 4 || sizeof(Int) == 8, "int32 or int64");
  constexpr double limit = sizeof(Int) == 4 ? 2147483647.0 : 9007199254740991.0;
  if (!v.IsNumber()) bad(what + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (d != std::floor(d) || std::fabs(d) > limit) bad(what + " must be an integer");
  return static_cast<Int>(d);
}
// o[key] as an integer of type Int (integerArg), named "<what>.<key>" in errors.
template <typename Int>
Int integerOf(const Napi::Object& o, const char* key, const std::string& what) {
  return integerArg<Int>(o.Get(key), what + "." + key);
}

}  // namespace qk::napi::coded
