// N-API bindings of LoRA training (model/train.h on the CPU, cuda/train_cuda.h for a model on device
// "cuda") and of the backward kernels (cpu/backward.h, cpu/adamw.h) for the tests. src/train.ts
// attaches the training functions to NativeModel's prototype: each takes the trainer (an External
// created once per model by trainCreate) and the model's native handle (NativeModel.handle), which is
// re-checked on every call (disposed → error).
// Errors carry a `code` (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED).
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cpu/adamw.h"
#include "cpu/backward.h"
#include "cpu/thread_pool.h"
#include "model/model.h"
#include "model/train.h"
#include "napi/args.h"
#include "napi/coded_args.h"
#include "napi/native_model.h"
#include "napi/registry.h"
#ifdef QLORA_WITH_CUDA
#include "cuda/train_cuda.h"
#endif

namespace {

using qk::engine::EngineError;
using qk::napi::coded::bad;
using qk::napi::coded::f32;
using qk::napi::coded::fail;
using qk::napi::coded::i32;
using qk::napi::coded::integerArg;
using qk::napi::coded::integerOf;
using qk::napi::coded::num;
using qk::napi::coded::Typed;

template <typename F>
Napi::Value guarded(const Napi::CallbackInfo& info, F&& f) {
  return qk::napi::coded::guarded(info, "training", std::forward<F>(f));
}

// ---- argument helpers (the shared ones: napi/coded_args.h) -------------------------------------
const float* optF32(const Napi::Value& v, size_t need, const std::string& what) {
  if (v.IsNull() || v.IsUndefined()) return nullptr;
  auto a = f32(v, what);
  if (a.length < need) bad(what + " is too short");
  return a.data;
}

int64_t integer(const Napi::Value& v, const std::string& what) { return integerArg<int64_t>(v, what); }
int64_t intOf(const Napi::Object& o, const char* key, const std::string& what) {
  return integerOf<int64_t>(o, key, what);
}
bool boolOf(const Napi::Object& o, const char* key, const std::string& what) {
  Napi::Value v = o.Get(key);
  if (!v.IsBoolean()) bad(what + "." + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}
uint64_t u64(const Napi::Value& v, const std::string& what) {
  if (!v.IsBigInt()) bad(what + " must be a bigint");
  bool lossless = true;
  const uint64_t x = v.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) bad(what + " must be in 0..2^64-1");
  return x;
}
Napi::Object obj(const Napi::Value& v, const std::string& what) {
  if (!v.IsObject()) bad(what + " must be an object");
  return v.As<Napi::Object>();
}
Napi::Float32Array copyOf(Napi::Env env, const float* p, size_t n) {
  auto a = Napi::Float32Array::New(env, n);
  if (n) std::memcpy(a.Data(), p, n * sizeof(float));
  return a;
}

// ---- trainer + model ----------------------------------------------------------------------------
// One trainer per NativeModel, on the model's device: engine::LoraTrainer for the CPU engine,
// engine::CudaLoraTrainer for the CUDA engine. Both have the same member functions, so every binding
// below is written once as a generic lambda (withTrainer).
struct TrainerHandle {
  std::unique_ptr<qk::engine::LoraTrainer> cpu;
#ifdef QLORA_WITH_CUDA
  std::unique_ptr<qk::engine::CudaLoraTrainer> cuda;
#endif
};

template <typename F>
auto withTrainer(const Napi::CallbackInfo& info, F&& f) -> decltype(f(std::declval<qk::engine::LoraTrainer&>())) {
  if (!info[0].IsExternal()) bad("training: bad trainer handle");
  TrainerHandle* t = info[0].As<Napi::External<TrainerHandle>>().Data();
  const qk::engine::NativeEngine e = qk::engine::unwrapNativeModel(info[1]);
  if (!e.cpu && !e.cuda) fail("FAILED_PRECONDITION", "the model was disposed");
  if (t->cpu && t->cpu->model() == e.cpu) return f(*t->cpu);
#ifdef QLORA_WITH_CUDA
  if (t->cuda && t->cuda->model() == e.cuda) return f(*t->cuda);
#endif
  fail("FAILED_PRECONDITION", "training: the trainer belongs to another model");
}
// batch {tokens, labels, batchSize, seqLen, segments?}
qk::engine::TrainBatch batchOf(const Napi::Value& v) {
  Napi::Object o = obj(v, "batch");
  qk::engine::TrainBatch b;
  b.B = intOf(o, "batchSize", "batch");
  b.T = intOf(o, "seqLen", "batch");
  if (b.B < 1 || b.T < 1 || b.B * b.T > (int64_t(1) << 30)) bad("batch: batchSize and seqLen must be >= 1");
  const size_t n = static_cast<size_t>(b.B * b.T);
  auto tok = i32(o.Get("tokens"), "batch.tokens");
  auto lab = i32(o.Get("labels"), "batch.labels");
  if (tok.length != n) bad("batch.tokens holds " + std::to_string(tok.length) + " ids, batchSize·seqLen = " + std::to_string(n));
  if (lab.length != n) bad("batch.labels holds " + std::to_string(lab.length) + " labels, batchSize·seqLen = " + std::to_string(n));
  b.tokens = tok.data;
  b.labels = lab.data;
  Napi::Value seg = o.Get("segments");
  if (!seg.IsUndefined() && !seg.IsNull()) {
    auto s = i32(seg, "batch.segments");
    if (s.length != n) bad("batch.segments must hold batchSize·seqLen ids");
    b.segments = s.data;
  }
  return b;
}

Napi::Value lossObject(Napi::Env env, const qk::engine::LossResult& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("loss", r.loss);
  o.Set("tokens", static_cast<double>(r.tokens));
  return o;
}

// trainCreate(handle) → External<TrainerHandle>: a CPU or CUDA trainer, on the model's device
Napi::Value trainCreate(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const qk::engine::NativeEngine e = qk::engine::unwrapNativeModel(info[0]);
    if (!e.cpu && !e.cuda) fail("FAILED_PRECONDITION", "the model was disposed");
    auto t = std::make_unique<TrainerHandle>();
    if (e.cpu) t->cpu = std::make_unique<qk::engine::LoraTrainer>(e.cpu);
#ifdef QLORA_WITH_CUDA
    if (e.cuda) t->cuda = std::make_unique<qk::engine::CudaLoraTrainer>(e.cuda);
#endif
    return Napi::External<TrainerHandle>::New(info.Env(), t.release(), [](Napi::Env, TrainerHandle* p) { delete p; });
  });
}

// trainRelease(trainer): frees the trainer's state now — LoRA slots, gradients, moments, activation
// workspaces, device buffers — instead of when the garbage collector finalises the handle (it is
// called right after the model's dispose, so no live model still points at a CUDA slot's A / B). Every
// later call with this handle is FAILED_PRECONDITION.
Napi::Value trainRelease(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (!info[0].IsExternal()) bad("training: bad trainer handle");
    TrainerHandle* t = info[0].As<Napi::External<TrainerHandle>>().Data();
    t->cpu.reset();
#ifdef QLORA_WITH_CUDA
    t->cuda.reset();
#endif
    return info.Env().Undefined();
  });
}

// trainInitLora(trainer, handle, slot, {rank, alpha, useRslora, dropout, targets, seed})
Napi::Value trainInitLora(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int64_t slot = integer(info[2], "slot");
    if (slot < 0 || slot >= 65536) bad("initLora: slot must be in 0..65535");
    Napi::Object o = obj(info[3], "initLora spec");
    qk::engine::LoraSpec s;
    const int64_t rank = intOf(o, "rank", "spec");
    if (rank < 1 || rank > 65536) bad("initLora: rank must be a positive integer");
    s.rank = static_cast<int>(rank);
    s.alpha = num(o, "alpha", "spec");
    s.useRslora = boolOf(o, "useRslora", "spec");
    s.dropout = num(o, "dropout", "spec");
    s.seed = u64(o.Get("seed"), "spec.seed");
    Napi::Value tv = o.Get("targets");
    if (!tv.IsArray()) bad("initLora: spec.targets must be an array of module names");
    Napi::Array ta = tv.As<Napi::Array>();
    for (uint32_t i = 0; i < ta.Length(); ++i) {
      Napi::Value e = ta.Get(i);
      if (!e.IsString()) bad("initLora: spec.targets must hold strings");
      s.targets.push_back(e.As<Napi::String>().Utf8Value());
    }
    return withTrainer(info, [&](auto& t) -> Napi::Value {
      t.initLora(static_cast<int>(slot), s);
      return info.Env().Undefined();
    });
  });
}

// trainForwardBackward(trainer, handle, slot, batch, {dropoutSeed, gradScale, checkpointing})
Napi::Value trainForwardBackward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int64_t slot = integer(info[2], "slot");
    if (slot < 0 || slot >= 65536) bad("trainForwardBackward: slot must be in 0..65535");
    qk::engine::TrainBatch b = batchOf(info[3]);
    Napi::Object o = obj(info[4], "options");
    qk::engine::TrainOptions opts;
    opts.dropoutSeed = u64(o.Get("dropoutSeed"), "options.dropoutSeed");
    opts.gradScale = static_cast<float>(num(o, "gradScale", "options"));
    opts.checkpointing = boolOf(o, "checkpointing", "options");
    return withTrainer(info, [&](auto& t) -> Napi::Value {
      return lossObject(info.Env(), t.trainForwardBackward(static_cast<int>(slot), b, opts));
    });
  });
}

// trainEvalLoss(trainer, handle, slot, batch)
Napi::Value trainEvalLoss(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int64_t slot = integer(info[2], "slot");
    if (slot < -1 || slot >= 65536) bad("evalLoss: slot must be in 0..65535, or -1 for the base model");
    const qk::engine::TrainBatch b = batchOf(info[3]);
    return withTrainer(info, [&](auto& t) -> Napi::Value {
      return lossObject(info.Env(), t.evalLoss(static_cast<int>(slot), b));
    });
  });
}

// trainAdamwStep(trainer, handle, slot, {lr, beta1, beta2, eps, weightDecay, maxGradNorm, step}) → {gradNorm}
Napi::Value trainAdamwStep(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int64_t slot = integer(info[2], "slot");
    Napi::Object o = obj(info[3], "adamw options");
    qk::engine::AdamWOptions a;
    a.lr = num(o, "lr", "adamw");
    a.beta1 = num(o, "beta1", "adamw");
    a.beta2 = num(o, "beta2", "adamw");
    a.eps = num(o, "eps", "adamw");
    a.weightDecay = num(o, "weightDecay", "adamw");
    a.maxGradNorm = num(o, "maxGradNorm", "adamw");
    a.step = intOf(o, "step", "adamw");
    return withTrainer(info, [&](auto& t) -> Napi::Value {
      Napi::Object r = Napi::Object::New(info.Env());
      r.Set("gradNorm", t.adamwStep(static_cast<int>(slot), a));
      return r;
    });
  });
}

// trainZeroGrad(trainer, handle, slot)
Napi::Value trainZeroGrad(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int slot = static_cast<int>(integer(info[2], "slot"));
    return withTrainer(info, [&](auto& t) -> Napi::Value {
      t.zeroGrad(slot);
      return info.Env().Undefined();
    });
  });
}

// trainGetLoraState(trainer, handle, slot) → {rank, scaling, modules: {name: {a, b, ma, va, mb, vb}}} (copies)
Napi::Value trainGetLoraState(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int slot = static_cast<int>(integer(info[2], "slot"));
    const qk::engine::LoraSlot& s =
        *withTrainer(info, [&](auto& t) -> const qk::engine::LoraSlot* { return &t.slotState(slot); });
    Napi::Env env = info.Env();
    Napi::Object r = Napi::Object::New(env);
    r.Set("rank", s.rank);
    r.Set("scaling", static_cast<double>(s.scaling));
    Napi::Object mods = Napi::Object::New(env);
    for (const qk::engine::LoraParam& p : s.mods) {
      Napi::Object m = Napi::Object::New(env);
      m.Set("a", copyOf(env, p.a.data(), p.a.size()));
      m.Set("b", copyOf(env, p.b.data(), p.b.size()));
      m.Set("ma", copyOf(env, p.ma.data(), p.ma.size()));
      m.Set("va", copyOf(env, p.va.data(), p.va.size()));
      m.Set("mb", copyOf(env, p.mb.data(), p.mb.size()));
      m.Set("vb", copyOf(env, p.vb.data(), p.vb.size()));
      mods.Set(p.name, m);
    }
    r.Set("modules", mods);
    return r;
  });
}

// trainSetLoraState(trainer, handle, slot, state)
Napi::Value trainSetLoraState(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    const int slot = static_cast<int>(integer(info[2], "slot"));
    Napi::Object st = obj(info[3], "state");
    const int rank = static_cast<int>(intOf(st, "rank", "state"));
    Napi::Object mods = obj(st.Get("modules"), "state.modules");
    Napi::Array names = mods.GetPropertyNames();
    std::map<std::string, qk::engine::LoraTrainer::ModuleState> map;
    for (uint32_t i = 0; i < names.Length(); ++i) {
      const std::string name = names.Get(i).ToString().Utf8Value();
      Napi::Object m = obj(mods.Get(name), "state.modules[" + name + "]");
      auto a = f32(m.Get("a"), name + ".a"), b = f32(m.Get("b"), name + ".b");
      auto ma = f32(m.Get("ma"), name + ".ma"), va = f32(m.Get("va"), name + ".va");
      auto mb = f32(m.Get("mb"), name + ".mb"), vb = f32(m.Get("vb"), name + ".vb");
      if (ma.length != a.length || va.length != a.length || mb.length != b.length || vb.length != b.length)
        bad("setLoraState: module " + name + ": the moments must have the sizes of a and b");
      map[name] = {a.data, b.data, ma.data, va.data, mb.data, vb.data, a.length, b.length};
    }
    return withTrainer(info, [&](auto& t) -> Napi::Value {
      t.setState(slot, rank, map);
      return info.Env().Undefined();
    });
  });
}

// =================================================================================================
// Kernels, exposed for tests (fresh output arrays)
// =================================================================================================
// A WeightTensor {dtype, shape [rows, cols], data, absmax? | absmaxDq?, blocksize?} → WeightView (validated)
qk::WeightView weightOf(const Napi::Value& v) {
  Napi::Object o = obj(v, "weight");
  qk::WeightView w{};
  Napi::Value dt = o.Get("dtype");
  const std::string d = dt.IsString() ? dt.As<Napi::String>().Utf8Value() : "";
  if (d == "f32") w.type = qk::WType::F32;
  else if (d == "f16") w.type = qk::WType::F16;
  else if (d == "bf16") w.type = qk::WType::BF16;
  else if (d == "nf4") w.type = qk::WType::NF4;
  else bad("weight.dtype must be f32, f16, bf16 or nf4");
  Napi::Value sh = o.Get("shape");
  if (!sh.IsArray() || sh.As<Napi::Array>().Length() != 2) bad("weight.shape must be [rows, cols]");
  w.rows = integer(sh.As<Napi::Array>().Get(0u), "weight.shape[0]");
  w.cols = integer(sh.As<Napi::Array>().Get(1u), "weight.shape[1]");
  if (w.rows < 1 || w.cols < 1) bad("weight.shape must be positive");
  Napi::Value data = o.Get("data");
  if (!data.IsTypedArray()) bad("weight.data must be a Uint8Array");
  auto ta = data.As<Napi::TypedArray>();
  w.data = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  const int64_t n = w.rows * w.cols;
  const size_t need = w.type == qk::WType::F32 ? n * 4 : w.type == qk::WType::NF4 ? (n + 1) / 2 : n * 2;
  if (ta.ByteLength() < need) bad("weight.data is too short");
  if (w.type == qk::WType::NF4) {
    Napi::Value bs = o.Get("blocksize");
    w.blocksize = bs.IsNumber() ? bs.As<Napi::Number>().Int32Value() : 64;
    if (w.blocksize < 32 || w.blocksize > 4096 || (w.blocksize & (w.blocksize - 1))) bad("weight.blocksize must be a power of two in 32..4096");
    const size_t blocks = static_cast<size_t>((n + w.blocksize - 1) / w.blocksize);
    Napi::Value dqv = o.Get("absmaxDq");
    if (!dqv.IsUndefined() && !dqv.IsNull() && o.Get("absmax").IsUndefined()) {
      qk::napi::DoubleQuantAbsmaxArg dq;
      try {
        dq = qk::napi::doubleQuantAbsmaxOf(dqv, "weight.absmaxDq");
      } catch (const std::invalid_argument& e) {
        bad(e.what());
      }
      if (dq.codes < blocks) bad("weight.absmaxDq.qabsmax is too short");
      w.absmaxDq = dq.dq;
    } else {
      auto am = f32(o.Get("absmax"), "weight.absmax");
      if (am.length < blocks) bad("weight.absmax is too short");
      w.absmax = am.data;
    }
  }
  return w;
}

// trainOpRmsNormBackward(dy, x, w, rows, dim, eps) → dx
Napi::Value trainOpRmsNormBackward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto dy = f32(info[0], "dy"), x = f32(info[1], "x"), w = f32(info[2], "w");
    const int64_t rows = integer(info[3], "rows"), dim = integer(info[4], "dim");
    const size_t n = static_cast<size_t>(rows * dim);
    if (rows < 1 || dim < 1 || dy.length < n || x.length < n || w.length < static_cast<size_t>(dim)) bad("sizes");
    auto dx = Napi::Float32Array::New(info.Env(), n);
    qk::rmsNormBackward(dy.data, x.data, w.data, dx.Data(), rows, dim, info[5].As<Napi::Number>().FloatValue(), false);
    return dx;
  });
}

// trainOpLayerNormBackward(dy, x, w|null, rows, dim, eps) → dx
Napi::Value trainOpLayerNormBackward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto dy = f32(info[0], "dy"), x = f32(info[1], "x");
    const int64_t rows = integer(info[3], "rows"), dim = integer(info[4], "dim");
    const size_t n = static_cast<size_t>(rows * dim);
    if (rows < 1 || dim < 1 || dy.length < n || x.length < n) bad("sizes");
    const float* w = optF32(info[2], static_cast<size_t>(dim), "w");
    auto dx = Napi::Float32Array::New(info.Env(), n);
    qk::layerNormBackward(dy.data, x.data, w, dx.Data(), rows, dim, info[5].As<Napi::Number>().FloatValue(), false);
    return dx;
  });
}

// trainOpRopeBackward(dy [T, nHeads·hd], T, nHeads, headDim, pos, theta) → dx
Napi::Value trainOpRopeBackward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto dy = f32(info[0], "dy");
    const int64_t T = integer(info[1], "T"), nh = integer(info[2], "nHeads"), hd = integer(info[3], "headDim");
    auto pos = i32(info[4], "pos");
    if (hd < 2 || hd % 2 || nh < 1 || T < 1 || dy.length < static_cast<size_t>(T * nh * hd) || pos.length < static_cast<size_t>(T)) bad("sizes");
    qk::RopeParams rp;
    rp.headDim = static_cast<int>(hd);
    rp.theta = info[5].As<Napi::Number>().FloatValue();
    int32_t maxPos = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (pos.data[t] < 0) bad("positions must be >= 0");
      maxPos = std::max(maxPos, pos.data[t]);
    }
    const int half = static_cast<int>(hd / 2);
    std::vector<float> inv(half), c(static_cast<size_t>(maxPos + 1) * half), s(c.size());
    qk::ropeInvFreq(rp, inv.data());
    qk::ropeTables(inv.data(), half, maxPos + 1, c.data(), s.data());
    auto dx = copyOf(info.Env(), dy.data, static_cast<size_t>(T * nh * hd));
    qk::ropeBackward(dx.Data(), T, static_cast<int>(nh), static_cast<int>(hd), pos.data, c.data(), s.data());
    return dx;
  });
}

qk::Activation activationOf(const Napi::Value& v) {
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (s == "silu") return qk::Activation::Silu;
  if (s == "relu") return qk::Activation::Relu;
  if (s == "gelu") return qk::Activation::Gelu;
  bad("activation must be silu, relu or gelu");
}

// trainOpActivationBackward(kind, x, dy) → dx
Napi::Value trainOpActivationBackward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    qk::Activation a = activationOf(info[0]);
    auto x = f32(info[1], "x"), dy = f32(info[2], "dy");
    if (dy.length != x.length) bad("x and dy differ in length");
    auto dx = Napi::Float32Array::New(info.Env(), x.length);
    qk::activationBackward(a, x.data, dy.data, dx.Data(), static_cast<int64_t>(x.length));
    return dx;
  });
}

// trainOpGatedActivationBackward(kind, gate, up, dy) → {dgate, dup}
Napi::Value trainOpGatedActivationBackward(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    qk::Activation a = activationOf(info[0]);
    auto g = f32(info[1], "gate"), u = f32(info[2], "up"), dy = f32(info[3], "dy");
    if (u.length != g.length || dy.length != g.length) bad("gate, up and dy differ in length");
    auto dg = Napi::Float32Array::New(info.Env(), g.length), du = Napi::Float32Array::New(info.Env(), g.length);
    qk::gatedActivationBackward(a, g.data, u.data, dy.data, dg.Data(), du.Data(), static_cast<int64_t>(g.length));
    Napi::Object r = Napi::Object::New(info.Env());
    r.Set("dgate", dg);
    r.Set("dup", du);
    return r;
  });
}

// trainOpAttention(q, k, v, B, T, start, nHeads, nKvHeads, headDim, scale, dout|null) → {out, lse, dq?, dk?, dv?}
Napi::Value trainOpAttention(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto q = f32(info[0], "q"), k = f32(info[1], "k"), v = f32(info[2], "v");
    const int64_t B = integer(info[3], "B"), T = integer(info[4], "T");
    auto start = i32(info[5], "start");
    qk::AttentionShape s;
    s.nHeads = static_cast<int>(integer(info[6], "nHeads"));
    s.nKvHeads = static_cast<int>(integer(info[7], "nKvHeads"));
    s.headDim = static_cast<int>(integer(info[8], "headDim"));
    s.scale = info[9].As<Napi::Number>().FloatValue();
    if (B < 1 || T < 1 || s.nHeads < 1 || s.nKvHeads < 1 || s.headDim < 1 || s.nHeads % s.nKvHeads) bad("shape");
    const int64_t N = B * T, qw = static_cast<int64_t>(s.nHeads) * s.headDim, kw = static_cast<int64_t>(s.nKvHeads) * s.headDim;
    if (q.length < static_cast<size_t>(N * qw) || k.length < static_cast<size_t>(N * kw) || v.length < static_cast<size_t>(N * kw) ||
        start.length < static_cast<size_t>(N))
      bad("sizes");
    for (int64_t i = 0; i < N; ++i)
      if (start.data[i] < 0 || start.data[i] > i % T) bad("start[i] must be in 0..t");
    Napi::Env env = info.Env();
    auto out = Napi::Float32Array::New(env, N * qw);
    auto lse = Napi::Float32Array::New(env, N * s.nHeads);
    qk::attentionTrainForward(s, B, T, start.data, q.data, k.data, v.data, out.Data(), lse.Data());
    Napi::Object r = Napi::Object::New(env);
    r.Set("out", out);
    r.Set("lse", lse);
    const float* dout = optF32(info[10], static_cast<size_t>(N * qw), "dout");
    if (dout) {
      auto dq = Napi::Float32Array::New(env, N * qw), dk = Napi::Float32Array::New(env, N * kw),
           dv = Napi::Float32Array::New(env, N * kw);
      qk::attentionTrainBackward(s, B, T, start.data, q.data, k.data, v.data, out.Data(), lse.Data(), dout, dq.Data(),
                                 dk.Data(), dv.Data());
      r.Set("dq", dq);
      r.Set("dk", dk);
      r.Set("dv", dv);
    }
    return r;
  });
}

// trainOpLmHeadCrossEntropy(h [M, H], W [V, H] WeightTensor, labels, chunkRows, gradScale) → {loss (Σ), dh}
Napi::Value trainOpLmHeadCrossEntropy(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto h = f32(info[0], "h");
    qk::WeightView w = weightOf(info[1]);
    auto labels = i32(info[2], "labels");
    const int64_t M = static_cast<int64_t>(labels.length), chunk = integer(info[3], "chunkRows");
    if (h.length < static_cast<size_t>(M * w.cols) || chunk < 1) bad("sizes");
    for (int64_t r = 0; r < M; ++r)
      if (labels.data[r] < 0 || labels.data[r] >= w.rows) bad("label out of range");
    auto dh = Napi::Float32Array::New(info.Env(), M * w.cols);
    std::vector<float> logits;
    const double loss = qk::lmHeadCrossEntropy(h.data, M, w, labels.data, chunk,
                                               info[4].As<Napi::Number>().FloatValue(), dh.Data(), logits);
    Napi::Object r = Napi::Object::New(info.Env());
    r.Set("loss", loss);
    r.Set("dh", dh);
    r.Set("logitsFloats", static_cast<double>(logits.size()));
    return r;
  });
}

// trainOpDropout(x, rows, cols, p, seed: bigint, stream) → drop(x)
Napi::Value trainOpDropout(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto x = f32(info[0], "x");
    const int64_t rows = integer(info[1], "rows"), cols = integer(info[2], "cols");
    const double p = info[3].As<Napi::Number>().DoubleValue();
    if (rows < 1 || cols < 1 || x.length < static_cast<size_t>(rows * cols) || !(p >= 0 && p < 1)) bad("sizes / p");
    const uint64_t key = qk::dropoutKey(u64(info[4], "seed"), static_cast<uint64_t>(integer(info[5], "stream")));
    auto y = Napi::Float32Array::New(info.Env(), rows * cols);
    qk::dropoutApply(x.data, y.Data(), rows, cols, static_cast<float>(p), key, false);
    return y;
  });
}

// trainOpLoraLinear(x [N, in], N, W [out, in], bias|null, lora {a, b, rank, scaling, dropout, seed, stream}|null,
//                   dy [N, out], needDx) → {y, dx, ga, gb}
Napi::Value trainOpLoraLinear(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto x = f32(info[0], "x");
    const int64_t N = integer(info[1], "N");
    qk::WeightView w = weightOf(info[2]);
    const int64_t in = w.cols, out = w.rows;
    if (N < 1 || x.length < static_cast<size_t>(N * in)) bad("x is too short");
    const float* bias = optF32(info[3], static_cast<size_t>(out), "bias");
    auto dy = f32(info[5], "dy");
    if (dy.length < static_cast<size_t>(N * out)) bad("dy is too short");
    const bool needDx = info[6].ToBoolean().Value();
    Napi::Env env = info.Env();
    qk::LoraBranch br;
    std::vector<float> u;
    Napi::Float32Array ga, gb;
    const bool hasLora = !info[4].IsNull() && !info[4].IsUndefined();
    if (hasLora) {
      Napi::Object o = obj(info[4], "lora");
      br.rank = static_cast<int>(intOf(o, "rank", "lora"));
      if (br.rank < 1) bad("lora.rank must be >= 1");
      auto a = f32(o.Get("a"), "lora.a"), b = f32(o.Get("b"), "lora.b");
      if (a.length != static_cast<size_t>(br.rank * in) || b.length != static_cast<size_t>(out * br.rank)) bad("lora sizes");
      br.a = a.data;
      br.b = b.data;
      br.scaling = static_cast<float>(num(o, "scaling", "lora"));
      br.dropout = static_cast<float>(num(o, "dropout", "lora"));
      if (!(br.dropout >= 0 && br.dropout < 1)) bad("lora.dropout must be in [0, 1)");
      br.key = qk::dropoutKey(u64(o.Get("seed"), "lora.seed"), static_cast<uint64_t>(intOf(o, "stream", "lora")));
      ga = Napi::Float32Array::New(env, a.length);
      gb = Napi::Float32Array::New(env, b.length);
      br.ga = ga.Data();
      br.gb = gb.Data();
      u.resize(static_cast<size_t>(N * br.rank));
    }
    auto y = Napi::Float32Array::New(env, N * out);
    auto dx = Napi::Float32Array::New(env, N * in);
    qk::loraLinearForward(x.data, N, w, bias, hasLora ? &br : nullptr, y.Data(), false, hasLora ? u.data() : nullptr);
    qk::loraLinearBackward(x.data, hasLora ? u.data() : nullptr, dy.data, N, w, hasLora ? &br : nullptr, dx.Data(), false,
                           needDx);
    Napi::Object r = Napi::Object::New(env);
    r.Set("y", y);
    r.Set("dx", dx);
    if (hasLora) {
      r.Set("ga", ga);
      r.Set("gb", gb);
    }
    return r;
  });
}

// trainOpAdamw(p, g, m, v, {lr, beta1, beta2, eps, weightDecay, step}, clip): updates in place
Napi::Value trainOpAdamw(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto p = f32(info[0], "p"), g = f32(info[1], "g"), m = f32(info[2], "m"), v = f32(info[3], "v");
    if (g.length != p.length || m.length != p.length || v.length != p.length) bad("p, g, m, v differ in length");
    Napi::Object o = obj(info[4], "adamw");
    qk::AdamWParams a;
    a.lr = num(o, "lr", "adamw");
    a.beta1 = num(o, "beta1", "adamw");
    a.beta2 = num(o, "beta2", "adamw");
    a.eps = num(o, "eps", "adamw");
    a.weightDecay = num(o, "weightDecay", "adamw");
    a.step = intOf(o, "step", "adamw");
    qk::adamwUpdate(p.data, g.data, m.data, v.data, static_cast<int64_t>(p.length), a,
                    info[5].As<Napi::Number>().FloatValue());
    return info.Env().Undefined();
  });
}

}  // namespace

QK_EXPORT("trainCreate", trainCreate);
QK_EXPORT("trainRelease", trainRelease);
QK_EXPORT("trainInitLora", trainInitLora);
QK_EXPORT("trainForwardBackward", trainForwardBackward);
QK_EXPORT("trainEvalLoss", trainEvalLoss);
QK_EXPORT("trainAdamwStep", trainAdamwStep);
QK_EXPORT("trainZeroGrad", trainZeroGrad);
QK_EXPORT("trainGetLoraState", trainGetLoraState);
QK_EXPORT("trainSetLoraState", trainSetLoraState);
QK_EXPORT("trainOpRmsNormBackward", trainOpRmsNormBackward);
QK_EXPORT("trainOpLayerNormBackward", trainOpLayerNormBackward);
QK_EXPORT("trainOpRopeBackward", trainOpRopeBackward);
QK_EXPORT("trainOpActivationBackward", trainOpActivationBackward);
QK_EXPORT("trainOpGatedActivationBackward", trainOpGatedActivationBackward);
QK_EXPORT("trainOpAttention", trainOpAttention);
QK_EXPORT("trainOpLmHeadCrossEntropy", trainOpLmHeadCrossEntropy);
QK_EXPORT("trainOpDropout", trainOpDropout);
QK_EXPORT("trainOpLoraLinear", trainOpLoraLinear);
QK_EXPORT("trainOpAdamw", trainOpAdamw);
