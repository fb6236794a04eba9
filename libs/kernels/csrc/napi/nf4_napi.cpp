// N-API bindings of the NF4 kernels (cpu/nf4.h). Buffers cross as typed arrays, zero copy; the TS
// wrapper (src/nf4.ts) validates arguments with clear errors, these checks only guard memory safety.
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/nf4.h"
#include "napi/args.h"
#include "napi/registry.h"

namespace {

using qk::napi::bytesOf;
using qk::napi::Span;
using qk::napi::guarded;
using qk::napi::typedOf;

int64_t intArg(const Napi::CallbackInfo& info, size_t i, const char* what) { return qk::napi::intArg(info[i], what); }

// nf4Quantize(src, dtype: "f32"|"f16"|"bf16", n, blocksize, packedOut: Uint8Array, absmaxOut: Float32Array)
Napi::Value nf4Quantize(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Span src = bytesOf(info[0], "data");
    std::string dt = info[1].As<Napi::String>().Utf8Value();
    qk::FloatType t;
    size_t es;
    if (dt == "f32") t = qk::FloatType::F32, es = 4;
    else if (dt == "f16") t = qk::FloatType::F16, es = 2;
    else if (dt == "bf16") t = qk::FloatType::BF16, es = 2;
    else throw Napi::TypeError::New(info.Env(), "dtype must be f32, f16 or bf16");
    const int64_t n = intArg(info, 2, "n"), bs = intArg(info, 3, "blocksize");
    if (!qk::nf4ValidBlocksize(bs))
      throw Napi::TypeError::New(info.Env(), "blocksize must be a power of two in 32..4096");
    if (src.bytes < static_cast<size_t>(n) * es) throw Napi::RangeError::New(info.Env(), "data holds fewer than n elements");
    auto* packed = typedOf<uint8_t>(info[4], napi_uint8_array, (n + 1) / 2, "packed");
    auto* absmax = typedOf<float>(info[5], napi_float32_array, (n + bs - 1) / bs, "absmax");
    qk::nf4Quantize(src.data, t, n, static_cast<int>(bs), packed, absmax);
    return info.Env().Undefined();
  });
}

// nf4Dequantize(packed, absmax, n, blocksize, out: Float32Array | Uint16Array (bf16))
Napi::Value dequant(const Napi::CallbackInfo& info, bool bf16) {
  return guarded(info, [&]() -> Napi::Value {
    const int64_t n = intArg(info, 2, "n"), bs = intArg(info, 3, "blocksize");
    if (!qk::nf4ValidBlocksize(bs))
      throw Napi::TypeError::New(info.Env(), "blocksize must be a power of two in 32..4096");
    Span packed = bytesOf(info[0], "packed");
    if (packed.bytes < static_cast<size_t>((n + 1) / 2)) throw Napi::RangeError::New(info.Env(), "packed is too short");
    auto* absmax = typedOf<float>(info[1], napi_float32_array, (n + bs - 1) / bs, "absmax");
    if (bf16) {
      auto* out = typedOf<uint16_t>(info[4], napi_uint16_array, n, "out");
      qk::nf4DequantizeBf16(packed.data, absmax, n, static_cast<int>(bs), out);
    } else {
      auto* out = typedOf<float>(info[4], napi_float32_array, n, "out");
      qk::nf4Dequantize(packed.data, absmax, n, static_cast<int>(bs), out);
    }
    return info.Env().Undefined();
  });
}
Napi::Value nf4Dequantize(const Napi::CallbackInfo& info) { return dequant(info, false); }
Napi::Value nf4DequantizeBf16(const Napi::CallbackInfo& info) { return dequant(info, true); }

// nf4DoubleQuantize(absmax: Float32Array, nestedBlocksize, quantMap: Float32Array(256), qOut: Uint8Array,
//                   nestedOut: Float32Array) -> offset
Napi::Value nf4DoubleQuantize(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto absmaxTa = info[0].As<Napi::TypedArray>();
    const int64_t nb = static_cast<int64_t>(absmaxTa.ElementLength());
    auto* absmax = typedOf<float>(info[0], napi_float32_array, nb, "absmax");
    const int64_t nbs = intArg(info, 1, "nestedBlocksize");
    if (nbs < 1) throw Napi::RangeError::New(info.Env(), "nestedBlocksize must be >= 1");
    auto* map = typedOf<float>(info[2], napi_float32_array, 256, "quantMap");
    auto* q = typedOf<uint8_t>(info[3], napi_uint8_array, nb, "qabsmax");
    auto* nested = typedOf<float>(info[4], napi_float32_array, (nb + nbs - 1) / nbs, "nestedAbsmax");
    float off = qk::nf4DoubleQuantize(absmax, nb, static_cast<int>(nbs), map, q, nested);
    return Napi::Number::New(info.Env(), off);
  });
}

// nf4DequantizeAbsmax(q: Uint8Array, nested: Float32Array, offset, quantMap, nestedBlocksize, out: Float32Array)
Napi::Value nf4DequantizeAbsmax(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int64_t nb = static_cast<int64_t>(info[0].As<Napi::TypedArray>().ElementLength());
    auto* q = typedOf<uint8_t>(info[0], napi_uint8_array, nb, "qabsmax");
    const int64_t nbs = intArg(info, 4, "nestedBlocksize");
    if (nbs < 1) throw Napi::RangeError::New(info.Env(), "nestedBlocksize must be >= 1");
    auto* nested = typedOf<float>(info[1], napi_float32_array, (nb + nbs - 1) / nbs, "nestedAbsmax");
    const float offset = static_cast<float>(info[2].As<Napi::Number>().DoubleValue());
    auto* map = typedOf<float>(info[3], napi_float32_array, 256, "quantMap");
    auto* out = typedOf<float>(info[5], napi_float32_array, nb, "out");
    qk::nf4DequantizeAbsmax(q, nested, offset, map, nb, static_cast<int>(nbs), out);
    return info.Env().Undefined();
  });
}

Napi::Value dynamicMap8bit(const Napi::CallbackInfo& info) {
  auto* out = typedOf<float>(info[0], napi_float32_array, 256, "out");
  qk::dynamicMap8bit(out);
  return info.Env().Undefined();
}

Napi::Value nf4Code(const Napi::CallbackInfo& info) {
  auto* out = typedOf<float>(info[0], napi_float32_array, 16, "out");
  std::memcpy(out, qk::kNf4Code, sizeof(qk::kNf4Code));
  return info.Env().Undefined();
}

// streamCopy(src, dst): threaded memcpy of min(src, dst) bytes (copy-bandwidth reference).
Napi::Value streamCopy(const Napi::CallbackInfo& info) {
  Span s = bytesOf(info[0], "src"), d = bytesOf(info[1], "dst");
  qk::streamCopy(s.data, d.data, std::min(s.bytes, d.bytes));
  return info.Env().Undefined();
}

}  // namespace

QK_EXPORT("nf4Quantize", nf4Quantize);
QK_EXPORT("nf4Dequantize", nf4Dequantize);
QK_EXPORT("nf4DequantizeBf16", nf4DequantizeBf16);
QK_EXPORT("nf4DoubleQuantize", nf4DoubleQuantize);
QK_EXPORT("nf4DequantizeAbsmax", nf4DequantizeAbsmax);
QK_EXPORT("dynamicMap8bit", dynamicMap8bit);
QK_EXPORT("nf4Code", nf4Code);
QK_EXPORT("streamCopy", streamCopy);
