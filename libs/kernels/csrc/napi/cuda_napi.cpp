// N-API bindings of the CUDA layer (csrc/cuda/qk_cuda.h, docs/cuda.md):
//  - cudaInfo(): whether the addon was compiled with CUDA and whether a device can be used;
//  - cudaTest*(): one kernel on host typed arrays (upload, run, download), so the tests compare every
//    CUDA kernel with the CPU kernel exposed next to it (trainOps, engineOps, linear, ...);
//  - cudaBench(kind, opts): device-side timings for bench/cuda.bench.mjs.
// Without QLORA_WITH_CUDA (no nvcc at build time) only cudaInfo exists and reports compiled: false.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "napi/args.h"
#include "napi/registry.h"

#ifdef QLORA_WITH_CUDA
#include "cuda/qk_cuda.h"
#endif

namespace {

using qk::napi::guarded;

#ifndef QLORA_WITH_CUDA

Napi::Value cudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", false);
  o.Set("available", false);
  o.Set("reason", "the native addon was built without CUDA (nvcc not found at build time, or QLORA_CUDA=0)");
  o.Set("runtimeVersion", 0);
  o.Set("driverVersion", 0);
  o.Set("devices", Napi::Array::New(env));
  return o;
}

#else  // QLORA_WITH_CUDA

namespace cu = qk::cuda;
using qk::napi::intArg;

Napi::Value cudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cu::Info i = cu::info();
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", true);
  o.Set("available", i.available);
  o.Set("reason", i.reason);
  o.Set("runtimeVersion", i.runtimeVersion);
  o.Set("driverVersion", i.driverVersion);
  Napi::Array devs = Napi::Array::New(env, i.devices.size());
  for (size_t d = 0; d < i.devices.size(); ++d) {
    Napi::Object x = Napi::Object::New(env);
    x.Set("name", i.devices[d].name);
    x.Set("totalMemory", static_cast<double>(i.devices[d].totalMemory));
    x.Set("computeCapability", std::to_string(i.devices[d].major) + "." + std::to_string(i.devices[d].minor));
    x.Set("multiprocessors", i.devices[d].multiprocessors);
    devs.Set(static_cast<uint32_t>(d), x);
  }
  o.Set("devices", devs);
  return o;
}

// ---- host <-> device helpers ----------------------------------------------------------------
struct F32 {
  const float* data;
  size_t n;
};
F32 f32(const Napi::Value& v, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a Float32Array");
  auto a = v.As<Napi::Float32Array>();
  return {a.Data(), a.ElementLength()};
}
bool isNull(const Napi::Value& v) { return v.IsNull() || v.IsUndefined(); }
template <class T>
cu::Buffer up(const T* p, size_t n) {
  return cu::uploaded(p, n * sizeof(T));
}
cu::Buffer upF32(const Napi::Value& v, size_t need, const char* what) {
  F32 a = f32(v, what);
  if (a.n < need) throw Napi::RangeError::New(v.Env(), std::string(what) + " is too short");
  return up(a.data, need);
}
Napi::Float32Array downF32(Napi::Env env, const cu::Buffer& b, size_t n) {
  auto a = Napi::Float32Array::New(env, n);
  b.download(a.Data(), n * sizeof(float));
  return a;
}
template <class T>
const T* typed(const Napi::Value& v, napi_typedarray_type t, size_t n, const char* what) {
  return qk::napi::typedOf<T>(v, t, n, what);
}
double num(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}
qk::Activation activationOf(const Napi::Value& v) {
  const std::string s = v.As<Napi::String>().Utf8Value();
  if (s == "silu") return qk::Activation::Silu;
  if (s == "relu") return qk::Activation::Relu;
  if (s == "gelu") return qk::Activation::Gelu;
  throw Napi::TypeError::New(v.Env(), "activation must be silu, relu or gelu");
}

// A WeightTensor {dtype, shape: [rows, cols], data: Uint8Array, absmax?, blocksize?} in device memory.
struct DeviceWeight {
  cu::Buffer data, absmax;
  qk::WeightView view{};
};
DeviceWeight weightOf(const Napi::Value& v) {
  Napi::Env env = v.Env();
  if (!v.IsObject()) throw Napi::TypeError::New(env, "weight must be a WeightTensor");
  Napi::Object o = v.As<Napi::Object>();
  Napi::Array shape = o.Get("shape").As<Napi::Array>();
  if (shape.Length() != 2) throw Napi::TypeError::New(env, "weight shape must be [rows, cols]");
  DeviceWeight w;
  w.view.rows = intArg(shape.Get(0u), "weight rows");
  w.view.cols = intArg(shape.Get(1u), "weight cols");
  const std::string dt = o.Get("dtype").As<Napi::String>().Utf8Value();
  const int64_t n = w.view.rows * w.view.cols;
  size_t bytes;
  if (dt == "f32") w.view.type = qk::WType::F32, bytes = 4 * n;
  else if (dt == "f16") w.view.type = qk::WType::F16, bytes = 2 * n;
  else if (dt == "bf16") w.view.type = qk::WType::BF16, bytes = 2 * n;
  else if (dt == "nf4") w.view.type = qk::WType::NF4, bytes = (n + 1) / 2;
  else throw Napi::TypeError::New(env, "weight dtype must be f32, f16, bf16 or nf4");
  qk::napi::Span d = qk::napi::bytesOf(o.Get("data"), "weight data");
  if (d.bytes < bytes) throw Napi::RangeError::New(env, "weight data is too short");
  w.data = up(d.data, bytes);
  w.view.data = w.data.data();
  if (w.view.type == qk::WType::NF4) {
    Napi::Value bs = o.Get("blocksize");
    w.view.blocksize = isNull(bs) ? 64 : static_cast<int>(intArg(bs, "blocksize"));
    const size_t nb = static_cast<size_t>((n + w.view.blocksize - 1) / w.view.blocksize);
    Napi::Value dqv = o.Get("absmaxDq");
    if (o.Get("absmax").IsUndefined() && !isNull(dqv)) {
      // The device kernels read fp32 absmax: a double-quantized weight (src/tensor.ts absmaxDq)
      // is resolved on the host (the CPU decode, bit-identical) and uploaded in that form.
      qk::napi::DoubleQuantAbsmaxArg dq = qk::napi::doubleQuantAbsmaxOf(dqv, "weight absmaxDq");
      if (dq.codes < nb) throw Napi::RangeError::New(env, "weight absmaxDq.qabsmax is too short");
      std::vector<float> resolved(nb);
      qk::nf4DoubleQuantAbsmaxRange(dq.dq, 0, static_cast<int64_t>(nb), resolved.data());
      w.absmax = up(resolved.data(), nb);
    } else {
      w.absmax = upF32(o.Get("absmax"), nb, "weight absmax");
    }
    w.view.absmax = w.absmax.as<float>();
  }
  return w;
}

// ---- kernels on host arrays -------------------------------------------------------------------
// cudaTestNf4Dequantize(packed, absmax, n, blocksize, bf16) -> Float32Array | Uint16Array
Napi::Value testNf4Dequantize(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const int64_t n = intArg(info[2], "n");
    const int bs = static_cast<int>(intArg(info[3], "blocksize"));
    const bool bf16 = info[4].ToBoolean().Value();
    const uint8_t* packed = typed<uint8_t>(info[0], napi_uint8_array, static_cast<size_t>((n + 1) / 2), "packed");
    cu::Buffer p = up(packed, static_cast<size_t>((n + 1) / 2));
    cu::Buffer a = upF32(info[1], static_cast<size_t>((n + bs - 1) / bs), "absmax");
    Napi::Env env = info.Env();
    if (bf16) {
      cu::Buffer o(static_cast<size_t>(n) * 2);
      cu::nf4DequantizeBf16(p.as<uint8_t>(), a.as<float>(), n, bs, o.as<uint16_t>());
      auto r = Napi::Uint16Array::New(env, static_cast<size_t>(n));
      o.download(r.Data(), static_cast<size_t>(n) * 2);
      return r;
    }
    cu::Buffer o(static_cast<size_t>(n) * 4);
    cu::nf4Dequantize(p.as<uint8_t>(), a.as<float>(), n, bs, o.as<float>());
    return downF32(env, o, static_cast<size_t>(n));
  });
}

// cudaTestLinear(x, M, weight, bias|null, yInit|null) -> y  (yInit given: accumulate into it)
Napi::Value testLinear(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const int64_t M = intArg(info[1], "M");
    DeviceWeight w = weightOf(info[2]);
    const int64_t N = w.view.rows, K = w.view.cols;
    cu::Buffer x = upF32(info[0], static_cast<size_t>(M * K), "x");
    cu::Buffer bias = isNull(info[3]) ? cu::Buffer() : upF32(info[3], static_cast<size_t>(N), "bias");
    const bool acc = !isNull(info[4]);
    cu::Buffer y = acc ? upF32(info[4], static_cast<size_t>(M * N), "yInit") : cu::Buffer(static_cast<size_t>(M * N) * 4);
    cu::linearForward(x.as<float>(), M, w.view, bias.as<float>(), y.as<float>(), acc);
    return downF32(info.Env(), y, static_cast<size_t>(M * N));
  });
}

// cudaTestLinearMany(x, M, weights: WeightTensor[], biases: (Float32Array|null)[]) -> {ys: y_i[], fused}
Napi::Value testLinearMany(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const int64_t M = intArg(info[1], "M");
    Napi::Array ws = info[2].As<Napi::Array>(), bs = info[3].As<Napi::Array>();
    const uint32_t n = ws.Length();
    if (n < 1 || n > 3 || bs.Length() != n) throw Napi::RangeError::New(info.Env(), "1..3 weights, one bias entry each");
    std::vector<DeviceWeight> w(n);
    std::vector<cu::Buffer> bias(n), y(n);
    std::vector<cu::LinearOut> outs(n);
    for (uint32_t i = 0; i < n; ++i) {
      w[i] = weightOf(ws.Get(i));
      const int64_t N = w[i].view.rows;
      if (!isNull(bs.Get(i))) bias[i] = upF32(bs.Get(i), static_cast<size_t>(N), "bias");
      y[i] = cu::Buffer(static_cast<size_t>(M * N) * 4);
      outs[i] = {&w[i].view, bias[i].as<float>(), y[i].as<float>()};
    }
    cu::Buffer x = upF32(info[0], static_cast<size_t>(M * w[0].view.cols), "x");
    const bool fused = cu::linearForwardMany(x.as<float>(), M, outs.data(), static_cast<int>(n), false);
    Napi::Array ys = Napi::Array::New(info.Env(), n);
    for (uint32_t i = 0; i < n; ++i) ys.Set(i, downF32(info.Env(), y[i], static_cast<size_t>(M * w[i].view.rows)));
    Napi::Object r = Napi::Object::New(info.Env());
    r.Set("ys", ys);
    r.Set("fused", fused);
    return r;
  });
}

// cudaTestGatedLinear(x, M, gate, up, gateBias|null, upBias|null, act) -> {y: act(x·Gᵀ + b)·(x·Uᵀ + b), fused}
Napi::Value testGatedLinear(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const int64_t M = intArg(info[1], "M");
    DeviceWeight g = weightOf(info[2]), u = weightOf(info[3]);
    const int64_t N = g.view.rows;
    cu::Buffer bg = isNull(info[4]) ? cu::Buffer() : upF32(info[4], static_cast<size_t>(N), "gateBias");
    cu::Buffer bu = isNull(info[5]) ? cu::Buffer() : upF32(info[5], static_cast<size_t>(N), "upBias");
    cu::Buffer x = upF32(info[0], static_cast<size_t>(M * g.view.cols), "x");
    cu::Buffer yg(static_cast<size_t>(M * N) * 4), yu(static_cast<size_t>(M * u.view.rows) * 4);
    const bool fused = cu::gatedLinearForward(x.as<float>(), M, {&g.view, bg.as<float>(), yg.as<float>()},
                                              {&u.view, bu.as<float>(), yu.as<float>()}, activationOf(info[6]));
    Napi::Object r = Napi::Object::New(info.Env());
    r.Set("y", downF32(info.Env(), yg, static_cast<size_t>(M * N)));
    r.Set("fused", fused);
    return r;
  });
}

// cudaTestLinearBackwardInput(dy, M, weight, dxInit|null) -> dx
Napi::Value testLinearBackwardInput(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const int64_t M = intArg(info[1], "M");
    DeviceWeight w = weightOf(info[2]);
    const int64_t N = w.view.rows, K = w.view.cols;
    cu::Buffer dy = upF32(info[0], static_cast<size_t>(M * N), "dy");
    const bool acc = !isNull(info[3]);
    cu::Buffer dx = acc ? upF32(info[3], static_cast<size_t>(M * K), "dxInit") : cu::Buffer(static_cast<size_t>(M * K) * 4);
    cu::linearBackwardInput(dy.as<float>(), M, w.view, dx.as<float>(), acc);
    return downF32(info.Env(), dx, static_cast<size_t>(M * K));
  });
}

// cudaTestGemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) -> C
Napi::Value testGemm(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const bool tA = info[0].ToBoolean().Value(), tB = info[1].ToBoolean().Value();
    const int64_t M = intArg(info[2], "M"), N = intArg(info[3], "N"), K = intArg(info[4], "K");
    const float alpha = static_cast<float>(info[5].As<Napi::Number>().DoubleValue());
    const int64_t lda = intArg(info[7], "lda"), ldb = intArg(info[9], "ldb"), ldc = intArg(info[12], "ldc");
    const float beta = static_cast<float>(info[10].As<Napi::Number>().DoubleValue());
    cu::Buffer A = upF32(info[6], f32(info[6], "A").n, "A");
    cu::Buffer B = upF32(info[8], f32(info[8], "B").n, "B");
    const size_t nc = f32(info[11], "C").n;
    if (nc < static_cast<size_t>(M * ldc)) throw Napi::RangeError::New(info.Env(), "C is too short");
    cu::Buffer C = upF32(info[11], nc, "C");
    cu::gemmF32(tA, tB, M, N, K, alpha, A.as<float>(), lda, B.as<float>(), ldb, beta, C.as<float>(), ldc);
    return downF32(info.Env(), C, nc);
  });
}

// cudaTestLoraLinear(x, N, weight, bias|null, lora|null, dy, needDx) -> {y, dx, ga?, gb?}
// (the same arguments as trainOpLoraLinear: forward, then backward of dy)
Napi::Value testLoraLinear(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    Napi::Env env = info.Env();
    const int64_t N = intArg(info[1], "N");
    DeviceWeight w = weightOf(info[2]);
    const int64_t in = w.view.cols, out = w.view.rows;
    cu::Buffer x = upF32(info[0], static_cast<size_t>(N * in), "x");
    cu::Buffer bias = isNull(info[3]) ? cu::Buffer() : upF32(info[3], static_cast<size_t>(out), "bias");
    cu::Buffer dy = upF32(info[5], static_cast<size_t>(N * out), "dy");
    const bool needDx = info[6].ToBoolean().Value();
    const bool hasLora = !isNull(info[4]);
    qk::LoraBranch br;
    cu::Buffer a, b, ga, gb, u;
    if (hasLora) {
      Napi::Object o = info[4].As<Napi::Object>();
      br.rank = static_cast<int>(intArg(o.Get("rank"), "lora.rank"));
      if (br.rank < 1) throw Napi::RangeError::New(env, "lora.rank must be >= 1");
      a = upF32(o.Get("a"), static_cast<size_t>(br.rank * in), "lora.a");
      b = upF32(o.Get("b"), static_cast<size_t>(out * br.rank), "lora.b");
      br.a = a.as<float>();
      br.b = b.as<float>();
      br.scaling = static_cast<float>(num(o, "scaling"));
      br.dropout = static_cast<float>(num(o, "dropout"));
      if (!(br.dropout >= 0 && br.dropout < 1)) throw Napi::RangeError::New(env, "lora.dropout must be in [0, 1)");
      Napi::Value seed = o.Get("seed");
      bool lossless = true;
      const uint64_t s = seed.As<Napi::BigInt>().Uint64Value(&lossless);
      br.key = qk::dropoutKey(s, static_cast<uint64_t>(intArg(o.Get("stream"), "lora.stream")));
      ga = cu::Buffer(static_cast<size_t>(br.rank * in) * 4);
      gb = cu::Buffer(static_cast<size_t>(out * br.rank) * 4);
      ga.zero();
      gb.zero();
      br.ga = ga.as<float>();
      br.gb = gb.as<float>();
      u = cu::Buffer(static_cast<size_t>(N * br.rank) * 4);
    }
    cu::Buffer y(static_cast<size_t>(N * out) * 4), dx(static_cast<size_t>(N * in) * 4);
    dx.zero();  // needDx = false leaves it untouched, as the CPU binding's fresh array
    cu::Workspace ws;
    cu::loraLinearForward(x.as<float>(), N, w.view, bias.as<float>(), hasLora ? &br : nullptr, y.as<float>(), false,
                          u.as<float>(), ws);
    cu::loraLinearBackward(x.as<float>(), u.as<float>(), dy.as<float>(), N, w.view, hasLora ? &br : nullptr,
                           dx.as<float>(), false, needDx, ws);
    Napi::Object r = Napi::Object::New(env);
    r.Set("y", downF32(env, y, static_cast<size_t>(N * out)));
    r.Set("dx", downF32(env, dx, static_cast<size_t>(N * in)));
    if (hasLora) {
      r.Set("ga", downF32(env, ga, static_cast<size_t>(br.rank * in)));
      r.Set("gb", downF32(env, gb, static_cast<size_t>(out * br.rank)));
    }
    return r;
  });
}

// cudaTestNorm(kind "rms"|"layer", x, w|null, b|null, rows, dim, eps, dy) -> {y, dx}
Napi::Value testNorm(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const bool rms = info[0].As<Napi::String>().Utf8Value() == "rms";
    const int64_t rows = intArg(info[4], "rows"), dim = intArg(info[5], "dim");
    const float eps = static_cast<float>(info[6].As<Napi::Number>().DoubleValue());
    const size_t n = static_cast<size_t>(rows * dim);
    cu::Buffer x = upF32(info[1], n, "x"), dy = upF32(info[7], n, "dy");
    if (rms && isNull(info[2])) throw Napi::TypeError::New(info.Env(), "rmsNorm needs w");
    cu::Buffer w = isNull(info[2]) ? cu::Buffer() : upF32(info[2], static_cast<size_t>(dim), "w");
    cu::Buffer b = isNull(info[3]) ? cu::Buffer() : upF32(info[3], static_cast<size_t>(dim), "b");
    cu::Buffer y(n * 4), dx(n * 4);
    if (rms) {
      cu::rmsNormForward(x.as<float>(), w.as<float>(), y.as<float>(), rows, dim, eps);
      cu::rmsNormBackward(dy.as<float>(), x.as<float>(), w.as<float>(), dx.as<float>(), rows, dim, eps, false);
    } else {
      cu::layerNormForward(x.as<float>(), w.as<float>(), b.as<float>(), y.as<float>(), rows, dim, eps);
      cu::layerNormBackward(dy.as<float>(), x.as<float>(), w.as<float>(), dx.as<float>(), rows, dim, eps, false);
    }
    Napi::Object r = Napi::Object::New(info.Env());
    r.Set("y", downF32(info.Env(), y, n));
    r.Set("dx", downF32(info.Env(), dx, n));
    return r;
  });
}

// cudaTestRope(x, T, nHeads, headDim, pos, theta, scaling|null, backward) -> rotated copy of x.
// The cos/sin tables are the CPU path's (qk::ropeInvFreq + qk::ropeTables), uploaded.
Napi::Value testRope(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const int64_t T = intArg(info[1], "T");
    const int nh = static_cast<int>(intArg(info[2], "nHeads")), hd = static_cast<int>(intArg(info[3], "headDim"));
    const int32_t* pos = typed<int32_t>(info[4], napi_int32_array, static_cast<size_t>(T), "pos");
    qk::RopeParams rp;
    rp.headDim = hd;
    rp.theta = static_cast<float>(info[5].As<Napi::Number>().DoubleValue());
    if (!isNull(info[6])) {
      Napi::Object s = info[6].As<Napi::Object>();
      rp.llama3 = true;
      rp.factor = static_cast<float>(num(s, "factor"));
      rp.lowFreqFactor = static_cast<float>(num(s, "lowFreqFactor"));
      rp.highFreqFactor = static_cast<float>(num(s, "highFreqFactor"));
      rp.originalMaxPositions = static_cast<float>(num(s, "originalMaxPositions"));
    }
    int32_t maxPos = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (pos[t] < 0) throw Napi::RangeError::New(info.Env(), "positions must be >= 0");
      maxPos = std::max(maxPos, pos[t]);
    }
    const int half = hd / 2;
    std::vector<float> invFreq(static_cast<size_t>(half)), cosT(static_cast<size_t>((maxPos + 1) * half)),
        sinT(cosT.size());
    qk::ropeInvFreq(rp, invFreq.data());
    qk::ropeTables(invFreq.data(), half, maxPos + 1, cosT.data(), sinT.data());
    const size_t n = static_cast<size_t>(T * nh * hd);
    cu::Buffer x = upF32(info[0], n, "x"), dp = up(pos, static_cast<size_t>(T)), dc = up(cosT.data(), cosT.size()),
               ds = up(sinT.data(), sinT.size());
    if (info[7].ToBoolean().Value())
      cu::ropeBackward(x.as<float>(), T, nh, hd, dp.as<int32_t>(), dc.as<float>(), ds.as<float>());
    else
      cu::ropeForward(x.as<float>(), T, nh, hd, dp.as<int32_t>(), dc.as<float>(), ds.as<float>());
    return downF32(info.Env(), x, n);
  });
}

// cudaTestActivation(kind, x, dy) -> {y, dx}
Napi::Value testActivation(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const qk::Activation act = activationOf(info[0]);
    const size_t n = f32(info[1], "x").n;
    cu::Buffer x = upF32(info[1], n, "x"), dy = upF32(info[2], n, "dy"), y(n * 4), dx(n * 4);
    cu::activationForward(act, x.as<float>(), y.as<float>(), static_cast<int64_t>(n));
    cu::activationBackward(act, x.as<float>(), dy.as<float>(), dx.as<float>(), static_cast<int64_t>(n));
    Napi::Object r = Napi::Object::New(info.Env());
    r.Set("y", downF32(info.Env(), y, n));
    r.Set("dx", downF32(info.Env(), dx, n));
    return r;
  });
}

// cudaTestGatedActivation(kind, gate, up, dy) -> {y, dgate, dup}
Napi::Value testGatedActivation(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const qk::Activation act = activationOf(info[0]);
    const size_t n = f32(info[1], "gate").n;
    cu::Buffer g = upF32(info[1], n, "gate"), u = upF32(info[2], n, "up"), dy = upF32(info[3], n, "dy");
    cu::Buffer y(n * 4), dg(n * 4), du(n * 4);
    const int64_t ni = static_cast<int64_t>(n);
    cu::gatedActivationForward(act, g.as<float>(), u.as<float>(), y.as<float>(), ni);
    cu::gatedActivationBackward(act, g.as<float>(), u.as<float>(), dy.as<float>(), dg.as<float>(), du.as<float>(), ni);
    Napi::Object r = Napi::Object::New(info.Env());
    r.Set("y", downF32(info.Env(), y, n));
    r.Set("dgate", downF32(info.Env(), dg, n));
    r.Set("dup", downF32(info.Env(), du, n));
    return r;
  });
}

qk::AttentionShape shapeOf(const Napi::CallbackInfo& info, size_t i) {
  qk::AttentionShape s;
  s.nHeads = static_cast<int>(intArg(info[i], "nHeads"));
  s.nKvHeads = static_cast<int>(intArg(info[i + 1], "nKvHeads"));
  s.headDim = static_cast<int>(intArg(info[i + 2], "headDim"));
  s.scale = static_cast<float>(info[i + 3].As<Napi::Number>().DoubleValue());
  if (s.nKvHeads < 1 || s.nHeads % s.nKvHeads != 0) throw Napi::RangeError::New(info.Env(), "bad head counts");
  return s;
}

cu::AttentionKernel attentionKernelArg(const Napi::Value& v) {
  const std::string k = v.IsString() ? v.As<Napi::String>().Utf8Value() : "auto";
  if (k == "auto") return cu::AttentionKernel::Auto;
  if (k == "simt") return cu::AttentionKernel::Simt;
  if (k == "flash") return cu::AttentionKernel::Flash;
  throw std::invalid_argument("attention kernel must be auto, simt or flash");
}

// cudaTestAttention(q, kCache, vCache, pos, nHeads, nKvHeads, headDim, scale, offsetRows|null, kernel?) -> out
//   (kernel "flash": the engine's prefill plan on the flash kernel; otherwise SIMT for every token)
// Token t reads its sequence cache from row offsetRows[t] (default 0: one shared cache).
Napi::Value testAttention(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const qk::AttentionShape s = shapeOf(info, 4);
    const size_t T = static_cast<size_t>(info[3].As<Napi::Int32Array>().ElementLength());
    const int32_t* pos = typed<int32_t>(info[3], napi_int32_array, T, "pos");
    const int64_t kw = static_cast<int64_t>(s.nKvHeads) * s.headDim;
    std::vector<int64_t> off(T, 0);
    if (!isNull(info[8])) {
      const int32_t* rows = typed<int32_t>(info[8], napi_int32_array, T, "offsetRows");
      for (size_t t = 0; t < T; ++t) off[t] = static_cast<int64_t>(rows[t]) * kw;
    }
    const size_t ck = f32(info[1], "k").n;
    for (size_t t = 0; t < T; ++t)
      if (pos[t] < 0 || static_cast<size_t>(off[t] + (pos[t] + 1) * kw) > ck)
        throw Napi::RangeError::New(info.Env(), "a token's cache rows are out of range");
    const size_t nq = T * static_cast<size_t>(s.nHeads * s.headDim);
    cu::Buffer q = upF32(info[0], nq, "q"), k = upF32(info[1], ck, "k"), v = upF32(info[2], ck, "v");
    cu::Buffer dp = up(pos, T), doff = up(off.data(), T), o(nq * 4);
    // kernel "flash": the engine's plan — runs of > 8 tokens of one cache at consecutive positions on
    // the flash kernel, the rest on SIMT (an error where the flash kernel does not apply)
    const cu::AttentionKernel kernel = attentionKernelArg(info[9]);
    if (kernel == cu::AttentionKernel::Flash) {
      if (!cu::attentionTilesSupported(s))
        throw std::invalid_argument("the flash attention kernels take headDim 32, 64 or 128 (and this GPU's shared memory)");
      std::vector<int32_t> tok0(T), nqs(T), pos0(T), simt(T);
      std::vector<int64_t> tkv(T);
      int64_t nSimt = 0;
      const int64_t nt = cu::planAttentionTiles(off.data(), pos, static_cast<int64_t>(T), tok0.data(), nqs.data(),
                                                pos0.data(), tkv.data(), simt.data(), &nSimt);
      cu::Buffer a0 = up(tok0.data(), T), a1 = up(nqs.data(), T), a2 = up(pos0.data(), T), a3 = up(tkv.data(), T),
                 a4 = up(simt.data(), T);
      const cu::AttentionTiles tiles{a0.as<int32_t>(), a1.as<int32_t>(), a2.as<int32_t>(), a3.as<int64_t>(), nt,
                                     a4.as<int32_t>(), nSimt};
      cu::attentionForward(s, q.as<float>(), k.as<float>(), v.as<float>(), doff.as<int64_t>(), dp.as<int32_t>(),
                           static_cast<int64_t>(T), o.as<float>(), nullptr, &tiles);
    } else {
      cu::attentionForward(s, q.as<float>(), k.as<float>(), v.as<float>(), doff.as<int64_t>(), dp.as<int32_t>(),
                           static_cast<int64_t>(T), o.as<float>());
    }
    return downF32(info.Env(), o, nq);
  });
}

// cudaTestAttentionTrain(q, k, v, B, T, start, nHeads, nKvHeads, headDim, scale, dout|null, kernel?)
//   -> {out, lse, dq?, dk?, dv?}   (the arguments of trainOpAttention; kernel: auto | simt | flash)
Napi::Value testAttentionTrain(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    Napi::Env env = info.Env();
    const cu::AttentionKernel kernel = attentionKernelArg(info[11]);
    const int64_t B = intArg(info[3], "B"), T = intArg(info[4], "T");
    const qk::AttentionShape s = shapeOf(info, 6);
    const size_t N = static_cast<size_t>(B * T);
    const int32_t* start = typed<int32_t>(info[5], napi_int32_array, N, "start");
    for (size_t i = 0; i < N; ++i)
      if (start[i] < 0 || start[i] > static_cast<int32_t>(i % T)) throw Napi::RangeError::New(env, "start out of range");
    const size_t nq = N * s.nHeads * s.headDim, nk = N * s.nKvHeads * s.headDim;
    cu::Buffer q = upF32(info[0], nq, "q"), k = upF32(info[1], nk, "k"), v = upF32(info[2], nk, "v");
    cu::Buffer st = up(start, N), out(nq * 4), lse(N * s.nHeads * 4);
    cu::attentionTrainForward(s, B, T, st.as<int32_t>(), q.as<float>(), k.as<float>(), v.as<float>(), out.as<float>(),
                              lse.as<float>(), nullptr, kernel);
    Napi::Object r = Napi::Object::New(env);
    r.Set("out", downF32(env, out, nq));
    r.Set("lse", downF32(env, lse, N * s.nHeads));
    if (!isNull(info[10])) {
      cu::Buffer dout = upF32(info[10], nq, "dout"), dq(nq * 4), dk(nk * 4), dv(nk * 4);
      cu::Workspace ws;
      cu::attentionTrainBackward(s, B, T, st.as<int32_t>(), q.as<float>(), k.as<float>(), v.as<float>(),
                                 out.as<float>(), lse.as<float>(), dout.as<float>(), dq.as<float>(), dk.as<float>(),
                                 dv.as<float>(), ws, nullptr, kernel);
      r.Set("dq", downF32(env, dq, nq));
      r.Set("dk", downF32(env, dk, nk));
      r.Set("dv", downF32(env, dv, nk));
    }
    return r;
  });
}

// cudaTestSoftmaxCrossEntropy(logits, rows, V, labels, gradScale) -> {loss: Float64Array, dlogits}
Napi::Value testSoftmaxCrossEntropy(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    Napi::Env env = info.Env();
    const int64_t rows = intArg(info[1], "rows"), V = intArg(info[2], "V");
    const int32_t* labels = typed<int32_t>(info[3], napi_int32_array, static_cast<size_t>(rows), "labels");
    for (int64_t r = 0; r < rows; ++r)
      if (labels[r] < 0 || labels[r] >= V) throw Napi::RangeError::New(env, "label out of range");
    const float gs = static_cast<float>(info[4].As<Napi::Number>().DoubleValue());
    const size_t n = static_cast<size_t>(rows * V);
    cu::Buffer z = upF32(info[0], n, "logits"), lab = up(labels, static_cast<size_t>(rows)),
               loss(static_cast<size_t>(rows) * 8);
    cu::softmaxCrossEntropy(z.as<float>(), rows, V, lab.as<int32_t>(), loss.as<double>(), gs, true);
    auto l = Napi::Float64Array::New(env, static_cast<size_t>(rows));
    loss.download(l.Data(), static_cast<size_t>(rows) * 8);
    Napi::Object r = Napi::Object::New(env);
    r.Set("loss", l);
    r.Set("dlogits", downF32(env, z, n));
    return r;
  });
}

// cudaTestLmHeadCrossEntropy(h, weight, labels, chunkRows, gradScale) -> {loss, dh}
Napi::Value testLmHeadCrossEntropy(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    Napi::Env env = info.Env();
    DeviceWeight w = weightOf(info[1]);
    const int64_t V = w.view.rows, H = w.view.cols;
    const size_t M = static_cast<size_t>(info[2].As<Napi::Int32Array>().ElementLength());
    const int32_t* labels = typed<int32_t>(info[2], napi_int32_array, M, "labels");
    for (size_t r = 0; r < M; ++r)
      if (labels[r] < 0 || labels[r] >= V) throw Napi::RangeError::New(env, "label out of range");
    cu::Buffer h = upF32(info[0], M * H, "h"), lab = up(labels, M), dh(M * H * 4);
    cu::Workspace ws;
    const double loss = cu::lmHeadCrossEntropy(h.as<float>(), static_cast<int64_t>(M), w.view, lab.as<int32_t>(),
                                               intArg(info[3], "chunkRows"),
                                               static_cast<float>(info[4].As<Napi::Number>().DoubleValue()),
                                               dh.as<float>(), ws);
    Napi::Object r = Napi::Object::New(env);
    r.Set("loss", loss);
    r.Set("dh", downF32(env, dh, M * H));
    return r;
  });
}

// cudaTestAdamw(p, g, m, v, {lr, beta1, beta2, eps, weightDecay, step}, clip): in place, as trainOpAdamw
Napi::Value testAdamw(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    const size_t n = f32(info[0], "p").n;
    F32 hp = f32(info[0], "p"), hg = f32(info[1], "g"), hm = f32(info[2], "m"), hv = f32(info[3], "v");
    if (hg.n != n || hm.n != n || hv.n != n) throw Napi::RangeError::New(info.Env(), "p, g, m, v lengths differ");
    Napi::Object o = info[4].As<Napi::Object>();
    qk::AdamWParams ap;
    ap.lr = num(o, "lr"), ap.beta1 = num(o, "beta1"), ap.beta2 = num(o, "beta2"), ap.eps = num(o, "eps");
    ap.weightDecay = num(o, "weightDecay"), ap.step = static_cast<int64_t>(num(o, "step"));
    const float clip = static_cast<float>(info[5].As<Napi::Number>().DoubleValue());
    cu::Buffer p = up(hp.data, n), g = up(hg.data, n), m = up(hm.data, n), v = up(hv.data, n);
    cu::adamwUpdate(p.as<float>(), g.as<float>(), m.as<float>(), v.as<float>(), static_cast<int64_t>(n), ap, clip);
    p.download(const_cast<float*>(hp.data), n * 4);
    g.download(const_cast<float*>(hg.data), n * 4);
    m.download(const_cast<float*>(hm.data), n * 4);
    v.download(const_cast<float*>(hv.data), n * 4);
    return info.Env().Undefined();
  });
}

// cudaTestSumSquares(g) -> Σ g² (float64)
Napi::Value testSumSquares(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    F32 g = f32(info[0], "g");
    cu::Buffer d = up(g.data, g.n);
    cu::Workspace ws;
    return Napi::Number::New(info.Env(), cu::sumSquares(d.as<float>(), static_cast<int64_t>(g.n), ws));
  });
}

// cudaTestSample(logits, {temperature, topK, topP, repetitionPenalty}, recent|null, rng: BigUint64Array(4)) -> token
// (rng advanced in place, as engineSampleToken)
Napi::Value testSample(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    F32 l = f32(info[0], "logits");
    Napi::Object po = info[1].As<Napi::Object>();
    qk::SamplingParams p;
    p.temperature = static_cast<float>(num(po, "temperature"));
    p.topK = static_cast<int>(num(po, "topK"));
    p.topP = static_cast<float>(num(po, "topP"));
    p.repetitionPenalty = static_cast<float>(num(po, "repetitionPenalty"));
    cu::Buffer dl = up(l.data, l.n);
    qk::RowSampling row;
    row.p = p;
    if (!isNull(info[2])) {
      row.nRecent = static_cast<int64_t>(info[2].As<Napi::Int32Array>().ElementLength());
      row.recent = typed<int32_t>(info[2], napi_int32_array, static_cast<size_t>(row.nRecent), "recent");
    }
    row.rng = const_cast<uint64_t*>(typed<uint64_t>(info[3], napi_biguint64_array, 4, "rng"));
    cu::SampleScratch scratch;
    const qk::RowSampling* rows[1] = {&row};
    int32_t t = -1;
    cu::sampleTokens(dl.as<float>(), static_cast<int64_t>(l.n), rows, 1, &t, scratch);
    return Napi::Number::New(info.Env(), t);
  });
}

// ---- benchmarks (device time by CUDA events) ---------------------------------------------------
std::vector<float> randomFloats(size_t n, uint64_t seed, float scale) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;  // xorshift64
    x = (static_cast<float>(s >> 40) / 16777216.f * 2.f - 1.f) * scale;
  }
  return v;
}
std::vector<uint8_t> randomBytes(size_t n, uint64_t seed) {
  std::vector<uint8_t> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    v[i] = static_cast<uint8_t>(s >> 32);
  }
  return v;
}
double optNum(const Napi::Object& o, const char* key, double def) {
  Napi::Value v = o.Get(key);
  return v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : def;
}

// cudaBench(kind, opts) -> timings; kinds: copy, gemv, gemm, lora, attentionDecode, attentionTrain
Napi::Value bench(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    cu::requireDevice();
    Napi::Env env = info.Env();
    const std::string kind = info[0].As<Napi::String>().Utf8Value();
    Napi::Object o = info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
    const int iters = static_cast<int>(optNum(o, "iters", 20));
    Napi::Object r = Napi::Object::New(env);
    auto nf4Weight = [&](int64_t N, int64_t K, int bs, cu::Buffer& data, cu::Buffer& absmax) {
      auto bytes = randomBytes(static_cast<size_t>(N * K / 2), 1);
      auto am = randomFloats(static_cast<size_t>(N * K / bs), 2, 0.05f);
      data = up(bytes.data(), bytes.size());
      absmax = up(am.data(), am.size());
      return qk::WeightView{qk::WType::NF4, data.data(), absmax.as<float>(), N, K, bs};
    };
    if (kind == "copy") {
      const size_t bytes = static_cast<size_t>(optNum(o, "bytes", 1 << 30));
      cu::Buffer a(bytes), b(bytes);
      a.zero();
      const double ms = cu::timeMs([&] { cu::copyDeviceToDevice(b.data(), a.data(), bytes); }, iters);
      r.Set("ms", ms);
      r.Set("gbps", 2.0 * bytes / (ms * 1e6));  // read + write
    } else if (kind == "gemv" || kind == "gemm") {
      const int64_t M = static_cast<int64_t>(optNum(o, "M", 1)), N = static_cast<int64_t>(optNum(o, "N", 8192)),
                    K = static_cast<int64_t>(optNum(o, "K", 8192));
      const int bs = static_cast<int>(optNum(o, "blocksize", 64));
      cu::Buffer wd, wa;
      const qk::WeightView w = nf4Weight(N, K, bs, wd, wa);
      auto xs = randomFloats(static_cast<size_t>(M * K), 3, 1.f);
      cu::Buffer x = up(xs.data(), xs.size()), y(static_cast<size_t>(M * N) * 4);
      const double ms = cu::timeMs([&] { cu::linearForward(x.as<float>(), M, w, nullptr, y.as<float>(), false); }, iters);
      const double wbytes = static_cast<double>(N * K) / 2 + static_cast<double>(N * K / bs) * 4;
      r.Set("ms", ms);
      r.Set("weightGBps", wbytes / (ms * 1e6));
      r.Set("tflops", 2.0 * M * N * K / (ms * 1e9));
      if (kind == "gemm") {
        cu::Buffer dx(static_cast<size_t>(M * K) * 4);
        const double bms =
            cu::timeMs([&] { cu::linearBackwardInput(y.as<float>(), M, w, dx.as<float>(), false); }, iters);
        r.Set("backwardMs", bms);
        r.Set("backwardTflops", 2.0 * M * N * K / (bms * 1e9));
      }
    } else if (kind == "gemvMany") {
      // weights of rows N0, N1, N2 (0: absent) over the same x [M, K]: one fused launch vs one each
      const int64_t M = static_cast<int64_t>(optNum(o, "M", 1)), K = static_cast<int64_t>(optNum(o, "K", 2048));
      std::vector<int64_t> Ns;
      for (const char* key : {"N0", "N1", "N2"})
        if (const int64_t n = static_cast<int64_t>(optNum(o, key, 0)); n > 0) Ns.push_back(n);
      const size_t n = Ns.size();
      std::vector<cu::Buffer> wd(n), wa(n), y(n);
      std::vector<qk::WeightView> w(n);
      std::vector<cu::LinearOut> outs(n);
      double wbytes = 0;
      for (size_t i = 0; i < n; ++i) {
        w[i] = nf4Weight(Ns[i], K, 64, wd[i], wa[i]);
        y[i] = cu::Buffer(static_cast<size_t>(M * Ns[i]) * 4);
        outs[i] = {&w[i], nullptr, y[i].as<float>()};
        wbytes += static_cast<double>(Ns[i] * K) / 2 + static_cast<double>(Ns[i] * K / 64) * 4;
      }
      auto xs = randomFloats(static_cast<size_t>(M * K), 3, 1.f);
      cu::Buffer x = up(xs.data(), xs.size());
      // gated (two equal weights): gatedLinearForward vs two GEMVs + the gated activation
      const bool gated = optNum(o, "gated", 0) != 0 && n == 2;
      const int64_t N0 = n ? Ns[0] : 0;
      bool fused = false;
      const double ms = cu::timeMs([&] {
        fused = gated ? cu::gatedLinearForward(x.as<float>(), M, outs[0], outs[1], qk::Activation::Silu)
                      : cu::linearForwardMany(x.as<float>(), M, outs.data(), static_cast<int>(n), false);
      }, iters);
      const double sms = cu::timeMs([&] {
        for (size_t i = 0; i < n; ++i) cu::linearForward(x.as<float>(), M, w[i], nullptr, y[i].as<float>(), false);
        if (gated) cu::gatedActivationForward(qk::Activation::Silu, y[0].as<float>(), y[1].as<float>(), y[0].as<float>(), M * N0);
      }, iters);
      r.Set("fused", fused);
      r.Set("ms", ms);
      r.Set("separateMs", sms);
      r.Set("weightGBps", wbytes / (ms * 1e6));
    } else if (kind == "lora") {
      const int64_t N = static_cast<int64_t>(optNum(o, "N", 4096)), in = static_cast<int64_t>(optNum(o, "in", 2048)),
                    out = static_cast<int64_t>(optNum(o, "out", 2048));
      const int rank = static_cast<int>(optNum(o, "rank", 16));
      cu::Buffer wd, wa;
      const qk::WeightView w = nf4Weight(out, in, 64, wd, wa);
      auto xs = randomFloats(static_cast<size_t>(N * in), 4, 1.f), dys = randomFloats(static_cast<size_t>(N * out), 5, 1.f);
      auto as = randomFloats(static_cast<size_t>(rank * in), 6, 0.02f), bs = randomFloats(static_cast<size_t>(out * rank), 7, 0.02f);
      cu::Buffer x = up(xs.data(), xs.size()), dy = up(dys.data(), dys.size()), a = up(as.data(), as.size()),
                 b = up(bs.data(), bs.size()), ga(as.size() * 4), gb(bs.size() * 4), u(static_cast<size_t>(N * rank) * 4),
                 y(static_cast<size_t>(N * out) * 4), dx(static_cast<size_t>(N * in) * 4);
      ga.zero();
      gb.zero();
      qk::LoraBranch br;
      br.a = a.as<float>(), br.b = b.as<float>(), br.ga = ga.as<float>(), br.gb = gb.as<float>();
      br.rank = rank, br.scaling = 2.f, br.dropout = static_cast<float>(optNum(o, "dropout", 0.05)), br.key = 42;
      cu::Workspace ws;
      const double fms = cu::timeMs(
          [&] { cu::loraLinearForward(x.as<float>(), N, w, nullptr, &br, y.as<float>(), false, u.as<float>(), ws); },
          iters);
      const double bms = cu::timeMs(
          [&] {
            cu::loraLinearBackward(x.as<float>(), u.as<float>(), dy.as<float>(), N, w, &br, dx.as<float>(), false, true,
                                   ws);
          },
          iters);
      r.Set("forwardMs", fms);
      r.Set("backwardMs", bms);
    } else if (kind == "attentionDecode" || kind == "attentionTrain") {
      const int nh = static_cast<int>(optNum(o, "nHeads", 32)), nkv = static_cast<int>(optNum(o, "nKvHeads", 8)),
                hd = static_cast<int>(optNum(o, "headDim", 64));
      qk::AttentionShape s{nh, nkv, hd, 1.f / std::sqrt(static_cast<float>(hd))};
      if (kind == "attentionDecode") {
        const int64_t ctx = static_cast<int64_t>(optNum(o, "ctx", 1024)), batch = static_cast<int64_t>(optNum(o, "batch", 1));
        const int64_t kw = static_cast<int64_t>(nkv) * hd;
        auto ks = randomFloats(static_cast<size_t>(batch * ctx * kw), 8, 1.f), qs = randomFloats(static_cast<size_t>(batch * nh * hd), 9, 1.f);
        std::vector<int64_t> off(static_cast<size_t>(batch));
        std::vector<int32_t> pos(static_cast<size_t>(batch), static_cast<int32_t>(ctx - 1));
        for (int64_t b = 0; b < batch; ++b) off[static_cast<size_t>(b)] = b * ctx * kw;
        cu::Buffer k = up(ks.data(), ks.size()), v = up(ks.data(), ks.size()), q = up(qs.data(), qs.size()),
                   dof = up(off.data(), off.size()), dp = up(pos.data(), pos.size()), out(qs.size() * 4);
        const double ms = cu::timeMs(
            [&] {
              cu::attentionForward(s, q.as<float>(), k.as<float>(), v.as<float>(), dof.as<int64_t>(), dp.as<int32_t>(),
                                   batch, out.as<float>());
            },
            iters);
        r.Set("ms", ms);
        r.Set("kvGBps", 2.0 * ks.size() * 4 / (ms * 1e6));
      } else {
        const int64_t B = static_cast<int64_t>(optNum(o, "B", 8)), T = static_cast<int64_t>(optNum(o, "T", 512));
        const size_t nq = static_cast<size_t>(B * T * nh * hd), nk = static_cast<size_t>(B * T * nkv * hd);
        auto qs = randomFloats(nq, 10, 1.f), ks = randomFloats(nk, 11, 1.f);
        std::vector<int32_t> start(static_cast<size_t>(B * T), 0);
        cu::Buffer q = up(qs.data(), nq), k = up(ks.data(), nk), v = up(ks.data(), nk), st = up(start.data(), start.size()),
                   out(nq * 4), lse(static_cast<size_t>(B * T * nh) * 4), dq(nq * 4), dk(nk * 4), dv(nk * 4);
        cu::Workspace ws;
        // flash: 1 = the tensor-core kernels (an error where they do not apply), 0 = SIMT
        const cu::AttentionKernel kernel = optNum(o, "flash", 1) != 0 ? cu::AttentionKernel::Flash : cu::AttentionKernel::Simt;
        const double fms = cu::timeMs(
            [&] {
              cu::attentionTrainForward(s, B, T, st.as<int32_t>(), q.as<float>(), k.as<float>(), v.as<float>(),
                                        out.as<float>(), lse.as<float>(), nullptr, kernel);
            },
            iters);
        const double bms = cu::timeMs(
            [&] {
              cu::attentionTrainBackward(s, B, T, st.as<int32_t>(), q.as<float>(), k.as<float>(), v.as<float>(),
                                         out.as<float>(), lse.as<float>(), q.as<float>(), dq.as<float>(), dk.as<float>(),
                                         dv.as<float>(), ws, nullptr, kernel);
            },
            iters);
        r.Set("forwardMs", fms);
        r.Set("backwardMs", bms);
      }
    } else {
      throw Napi::TypeError::New(env, "unknown benchmark " + kind);
    }
    return r;
  });
}

#endif  // QLORA_WITH_CUDA

}  // namespace

QK_EXPORT("cudaInfo", cudaInfo);
#ifdef QLORA_WITH_CUDA
QK_EXPORT("cudaTestNf4Dequantize", testNf4Dequantize);
QK_EXPORT("cudaTestLinear", testLinear);
QK_EXPORT("cudaTestLinearMany", testLinearMany);
QK_EXPORT("cudaTestGatedLinear", testGatedLinear);
QK_EXPORT("cudaTestLinearBackwardInput", testLinearBackwardInput);
QK_EXPORT("cudaTestGemm", testGemm);
QK_EXPORT("cudaTestLoraLinear", testLoraLinear);
QK_EXPORT("cudaTestNorm", testNorm);
QK_EXPORT("cudaTestRope", testRope);
QK_EXPORT("cudaTestActivation", testActivation);
QK_EXPORT("cudaTestGatedActivation", testGatedActivation);
QK_EXPORT("cudaTestAttention", testAttention);
QK_EXPORT("cudaTestAttentionTrain", testAttentionTrain);
QK_EXPORT("cudaTestSoftmaxCrossEntropy", testSoftmaxCrossEntropy);
QK_EXPORT("cudaTestLmHeadCrossEntropy", testLmHeadCrossEntropy);
QK_EXPORT("cudaTestAdamw", testAdamw);
QK_EXPORT("cudaTestSumSquares", testSumSquares);
QK_EXPORT("cudaTestSample", testSample);
QK_EXPORT("cudaBench", bench);
#endif
