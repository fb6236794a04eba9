// N-API bindings of the matmul kernels (cpu/matmul.h). The TS wrapper (src/matmul.ts) validates
// shapes with clear errors; the checks here only guard memory safety.
#include <stdexcept>
#include <string>

#include "cpu/matmul.h"
#include "napi/args.h"
#include "napi/registry.h"

namespace {

using qk::napi::bytesOf;
using qk::napi::Span;
using qk::napi::guarded;
using qk::napi::intArg;

// A Float32Array of at least minElems (or null/undefined when optional).
float* f32Of(const Napi::Value& v, size_t minElems, const char* what, bool optional = false) {
  if (optional && (v.IsNull() || v.IsUndefined())) return nullptr;
  return qk::napi::typedOf<float>(v, napi_float32_array, minElems, what);
}

// (dtype, data, absmax | absmaxDq, blocksize, rows, cols) starting at info[i] -> WeightView, bounds-checked.
qk::WeightView weightArgs(const Napi::CallbackInfo& info, size_t i) {
  Napi::Env env = info.Env();
  std::string dt = info[i].As<Napi::String>().Utf8Value();
  qk::WeightView w{};
  w.rows = intArg(info[i + 4], "rows");
  w.cols = intArg(info[i + 5], "cols");
  const uint64_t n = static_cast<uint64_t>(w.rows) * static_cast<uint64_t>(w.cols);
  Span data = bytesOf(info[i + 1], "weight data");
  w.data = data.data;
  uint64_t need;
  if (dt == "nf4") {
    w.type = qk::WType::NF4;
    w.blocksize = static_cast<int>(intArg(info[i + 3], "blocksize"));
    if (w.blocksize < 32 || w.blocksize > 4096 || (w.blocksize & (w.blocksize - 1)))
      throw Napi::TypeError::New(env, "NF4 blocksize must be a power of two in 32..4096");
    const uint64_t blocks = (n + w.blocksize - 1) / w.blocksize;
    if (info[i + 2].IsTypedArray()) {
      w.absmax = f32Of(info[i + 2], blocks, "absmax");
    } else {
      // the double-quantized form (src/tensor.ts absmaxDq)
      qk::napi::DoubleQuantAbsmaxArg dq = qk::napi::doubleQuantAbsmaxOf(info[i + 2], "absmaxDq");
      if (dq.codes < blocks) throw Napi::RangeError::New(env, "absmaxDq.qabsmax is too short for the weight");
      w.absmax = nullptr;
      w.absmaxDq = dq.dq;
    }
    need = (n + 1) / 2;
  } else {
    if (dt == "f32") w.type = qk::WType::F32, need = 4 * n;
    else if (dt == "f16") w.type = qk::WType::F16, need = 2 * n;
    else if (dt == "bf16") w.type = qk::WType::BF16, need = 2 * n;
    else throw Napi::TypeError::New(env, "weight dtype must be f32, f16, bf16 or nf4");
    w.absmax = nullptr;
    w.blocksize = 0;
  }
  if (data.bytes < need) throw Napi::RangeError::New(env, "weight data is too short for its shape");
  return w;
}

// The arguments of linear and linearInt8: (x, M, dtype, data, absmax, blocksize, N, K, bias|null, out,
// accumulate), checked against the weight's shape.
struct LinearCall {
  int64_t M;
  qk::WeightView w;
  float *x, *bias, *out;
  bool accumulate;
};
LinearCall linearArgs(const Napi::CallbackInfo& info) {
  LinearCall c;
  c.M = intArg(info[1], "M");
  c.w = weightArgs(info, 2);
  c.x = f32Of(info[0], c.M * c.w.cols, "x");
  c.bias = f32Of(info[8], c.w.rows, "bias", true);
  c.out = f32Of(info[9], c.M * c.w.rows, "out");
  c.accumulate = info[10].ToBoolean().Value();
  return c;
}

// linear(x, M, dtype, data, absmax, blocksize, N, K, bias|null, out, accumulate)
Napi::Value linear(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const LinearCall c = linearArgs(info);
    qk::linearForward(c.x, c.M, c.w, c.bias, c.out, c.accumulate);
    return info.Env().Undefined();
  });
}

// linearInt8(x, M, dtype, data, absmax, blocksize, N, K, bias|null, out, accumulate) -> whether the
// int8-activation path ran (false: the shape fell back to the exact linear)
Napi::Value linearInt8(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const LinearCall c = linearArgs(info);
    qk::linearForwardInt8(c.x, c.M, c.w, c.bias, c.out, c.accumulate);
    return Napi::Boolean::New(info.Env(), qk::int8DecodeApplies(c.M, c.w) && c.w.rows > 0);
  });
}

// linearBackwardInput(dy, M, dtype, data, absmax, blocksize, N, K, dx, accumulate)
Napi::Value linearBackwardInput(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int64_t M = intArg(info[1], "M");
    qk::WeightView w = weightArgs(info, 2);
    float* dy = f32Of(info[0], M * w.rows, "dy");
    float* dx = f32Of(info[8], M * w.cols, "dx");
    qk::linearBackwardInput(dy, M, w, dx, info[9].ToBoolean().Value());
    return info.Env().Undefined();
  });
}

// weightDecode(dtype, data, absmax, blocksize, N, K, start, len, out)
Napi::Value weightDecode(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    qk::WeightView w = weightArgs(info, 0);
    const int64_t start = intArg(info[6], "start"), len = intArg(info[7], "len");
    if (start + len > w.rows * w.cols) throw Napi::RangeError::New(info.Env(), "range is outside the weight");
    float* out = f32Of(info[8], len, "out");
    qk::weightDecode(w, start, len, out);
    return info.Env().Undefined();
  });
}

// gemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
Napi::Value gemm(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const bool tA = info[0].ToBoolean().Value(), tB = info[1].ToBoolean().Value();
    const int64_t M = intArg(info[2], "M"), N = intArg(info[3], "N"), K = intArg(info[4], "K");
    const float alpha = static_cast<float>(info[5].As<Napi::Number>().DoubleValue());
    const int64_t lda = intArg(info[7], "lda"), ldb = intArg(info[9], "ldb"), ldc = intArg(info[12], "ldc");
    const float beta = static_cast<float>(info[10].As<Napi::Number>().DoubleValue());
    // rows x cols as stored, with leading dimension ld: needs (rows-1)*ld + cols elements
    auto need = [&](int64_t rows, int64_t cols, int64_t ld, const char* what) -> size_t {
      if (rows == 0 || cols == 0) return 0;
      if (ld < cols) throw Napi::RangeError::New(info.Env(), std::string(what) + ": leading dimension too small");
      return static_cast<size_t>((rows - 1) * ld + cols);
    };
    const float* A = f32Of(info[6], tA ? need(K, M, lda, "A") : need(M, K, lda, "A"), "A");
    const float* B = f32Of(info[8], tB ? need(N, K, ldb, "B") : need(K, N, ldb, "B"), "B");
    float* C = f32Of(info[11], need(M, N, ldc, "C"), "C");
    qk::gemmF32(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return info.Env().Undefined();
  });
}

}  // namespace

QK_EXPORT("linear", linear);
QK_EXPORT("linearInt8", linearInt8);
QK_EXPORT("linearBackwardInput", linearBackwardInput);
QK_EXPORT("weightDecode", weightDecode);
QK_EXPORT("gemm", gemm);
