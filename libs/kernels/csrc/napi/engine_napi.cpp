// N-API bindings of the engine: the NativeModel class (Napi::ObjectWrap over engine::Model), the
// sampling kernel, and the transformer ops exposed for tests (engineOp*). Tensors cross as typed
// arrays, zero copy; the model keeps a reference to every weight / adapter array it reads, so the
// buffers live as long as the model (or the adapter) does. Errors carry a `code` property
// (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION) that src/engine.ts maps
// to @qlora/core errors.
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "cpu/ops.h"
#include "cpu/sampling.h"
#include "model/model.h"
#include "napi/args.h"
#include "napi/coded_args.h"
#include "napi/native_model.h"
#include "napi/registry.h"
#ifdef QLORA_WITH_CUDA
#include "cuda/model_cuda.h"
#endif

namespace {

using qk::engine::EngineError;
using qk::napi::coded::f32;
using qk::napi::coded::fail;
using qk::napi::coded::i32;
using qk::napi::coded::integerArg;
using qk::napi::coded::integerOf;
using qk::napi::coded::num;
using qk::napi::coded::Typed;
using qk::napi::coded::typed;

template <typename F>
Napi::Value guarded(const Napi::CallbackInfo& info, F&& f) {
  return qk::napi::coded::guarded(info, "engine", std::forward<F>(f));
}

// ---- argument helpers (the shared ones: napi/coded_args.h) ------------------------------------
bool boolOf(const Napi::Object& o, const char* key, bool dflt) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return dflt;
  return v.ToBoolean().Value();
}
// The engine's sizes, counts and indices are int32.
int intArg(const Napi::Value& v, const std::string& what) { return integerArg<int>(v, what); }
int intOf(const Napi::Object& o, const char* key, const std::string& what) { return integerOf<int>(o, key, what); }

qk::TableType dtypeOf(const std::string& s, const std::string& what) {
  if (s == "f32") return qk::TableType::F32;
  if (s == "f16") return qk::TableType::F16;
  if (s == "bf16") return qk::TableType::BF16;
  if (s == "nf4") return qk::TableType::NF4;
  fail("INVALID_ARGUMENT", what + ": dtype must be f32, f16, bf16 or nf4");
}

// A WeightTensor {dtype, shape, data, absmax? | absmaxDq?, blocksize?} → RawTensor; `keep` receives the arrays
// that must stay alive.
qk::engine::RawTensor rawTensor(const Napi::Value& v, const std::string& name, std::vector<Napi::ObjectReference>* keep) {
  if (!v.IsObject()) fail("INVALID_ARGUMENT", "weight " + name + " must be a WeightTensor object");
  Napi::Object o = v.As<Napi::Object>();
  qk::engine::RawTensor t;
  Napi::Value dt = o.Get("dtype");
  if (!dt.IsString()) fail("INVALID_ARGUMENT", "weight " + name + ": dtype must be a string");
  t.dtype = dtypeOf(dt.As<Napi::String>().Utf8Value(), "weight " + name);
  Napi::Value sh = o.Get("shape");
  if (!sh.IsArray()) fail("INVALID_ARGUMENT", "weight " + name + ": shape must be an array");
  Napi::Array sa = sh.As<Napi::Array>();
  for (uint32_t i = 0; i < sa.Length(); ++i) {
    Napi::Value d = sa.Get(i);
    if (!d.IsNumber() || d.As<Napi::Number>().DoubleValue() < 0) fail("INVALID_ARGUMENT", "weight " + name + ": bad shape");
    t.shape.push_back(static_cast<int64_t>(d.As<Napi::Number>().DoubleValue()));
  }
  Napi::Value data = o.Get("data");
  if (!data.IsTypedArray()) fail("INVALID_ARGUMENT", "weight " + name + ": data must be a Uint8Array");
  auto ta = data.As<Napi::TypedArray>();
  t.data = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  t.bytes = ta.ByteLength();
  if (keep) keep->push_back(Napi::Persistent(data.As<Napi::Object>()));
  if (t.dtype == qk::TableType::NF4) {
    Napi::Value am = o.Get("absmax");
    Napi::Value dqv = o.Get("absmaxDq");
    if (am.IsUndefined() && !dqv.IsUndefined()) {
      qk::napi::DoubleQuantAbsmaxArg dq;
      try {
        dq = qk::napi::doubleQuantAbsmaxOf(dqv, "weight " + name + ".absmaxDq");
      } catch (const std::invalid_argument& e) {
        fail("INVALID_ARGUMENT", e.what());
      }
      t.absmaxDq = dq.dq;
      t.absmaxCount = dq.codes;
      t.absmaxDqNested = dq.nested;
      if (keep)
        for (const Napi::Object& a : dq.arrays) keep->push_back(Napi::Persistent(a));
    } else {
      auto a = f32(am, "weight " + name + ".absmax");
      t.absmax = a.data;
      t.absmaxCount = a.length;
      if (keep) keep->push_back(Napi::Persistent(am.As<Napi::Object>()));
    }
    Napi::Value bs = o.Get("blocksize");
    t.blocksize = bs.IsNumber() ? bs.As<Napi::Number>().Int32Value() : 64;
  }
  return t;
}

qk::Activation activationOf(const std::string& s) {
  if (s == "silu" || s == "swish") return qk::Activation::Silu;
  if (s == "relu") return qk::Activation::Relu;
  if (s == "gelu") return qk::Activation::Gelu;
  fail("INVALID_ARGUMENT", "hiddenAct must be silu, relu or gelu (got " + s + ")");
}

// ropeScaling {type: "llama3", factor, lowFreqFactor, highFreqFactor, originalMaxPositions} | null
void ropeScalingOf(const Napi::Value& v, qk::RopeParams* rp) {
  if (v.IsUndefined() || v.IsNull()) return;
  if (!v.IsObject()) fail("INVALID_ARGUMENT", "ropeScaling must be an object or null");
  Napi::Object o = v.As<Napi::Object>();
  Napi::Value ty = o.Get("type");
  if (!ty.IsString() || ty.As<Napi::String>().Utf8Value() != "llama3")
    fail("INVALID_ARGUMENT", "ropeScaling.type must be \"llama3\"");
  rp->llama3 = true;
  rp->factor = static_cast<float>(num(o, "factor", "ropeScaling"));
  rp->lowFreqFactor = static_cast<float>(num(o, "lowFreqFactor", "ropeScaling"));
  rp->highFreqFactor = static_cast<float>(num(o, "highFreqFactor", "ropeScaling"));
  rp->originalMaxPositions = static_cast<float>(num(o, "originalMaxPositions", "ropeScaling"));
  if (!(rp->highFreqFactor > rp->lowFreqFactor) || !(rp->factor > 0))
    fail("INVALID_ARGUMENT", "ropeScaling: needs factor > 0 and highFreqFactor > lowFreqFactor");
}

qk::engine::ModelConfig configOf(const Napi::Value& v) {
  if (!v.IsObject()) fail("INVALID_ARGUMENT", "config must be an object");
  Napi::Object o = v.As<Napi::Object>();
  qk::engine::ModelConfig c;
  Napi::Value arch = o.Get("arch");
  std::string a = arch.IsString() ? arch.As<Napi::String>().Utf8Value() : "";
  if (a == "llama") c.arch = qk::engine::Arch::Llama;
  else if (a == "opt") c.arch = qk::engine::Arch::Opt;
  else fail("INVALID_ARGUMENT", "config.arch must be \"llama\" or \"opt\"");
  c.hidden = intOf(o, "hiddenSize", "config");
  c.intermediate = intOf(o, "intermediateSize", "config");
  c.layers = intOf(o, "numLayers", "config");
  c.heads = intOf(o, "numHeads", "config");
  c.kvHeads = intOf(o, "numKvHeads", "config");
  c.headDim = intOf(o, "headDim", "config");
  c.vocab = intOf(o, "vocabSize", "config");
  c.maxPositions = intOf(o, "maxPositions", "config");
  c.normEps = static_cast<float>(num(o, "normEps", "config"));
  Napi::Value rt = o.Get("ropeTheta");
  c.rope.theta = rt.IsNumber() ? rt.As<Napi::Number>().FloatValue() : 10000.f;
  c.rope.headDim = c.headDim;
  ropeScalingOf(o.Get("ropeScaling"), &c.rope);
  Napi::Value act = o.Get("hiddenAct");
  c.act = activationOf(act.IsString() ? act.As<Napi::String>().Utf8Value() : "");
  c.tied = boolOf(o, "tiedEmbeddings", false);
  c.qkvBias = boolOf(o, "qkvBias", false);
  c.oBias = boolOf(o, "oBias", false);
  c.mlpBias = boolOf(o, "mlpBias", false);
  c.layerNormBefore = boolOf(o, "doLayerNormBefore", true);
  return c;
}

// {temperature, topK, topP, repetitionPenalty} → SamplingParams (validated as sampleToken needs)
qk::SamplingParams samplingParamsOf(const Napi::Value& v, const std::string& what) {
  if (!v.IsObject()) fail("INVALID_ARGUMENT", what + ": params must be an object");
  Napi::Object po = v.As<Napi::Object>();
  qk::SamplingParams p;
  p.temperature = static_cast<float>(num(po, "temperature", "params"));
  p.topK = intOf(po, "topK", "params");
  p.topP = static_cast<float>(num(po, "topP", "params"));
  p.repetitionPenalty = static_cast<float>(num(po, "repetitionPenalty", "params"));
  if (!(p.temperature >= 0) || !(p.topP > 0) || !(p.repetitionPenalty > 0))
    fail("INVALID_ARGUMENT", what + ": needs temperature >= 0, topP > 0, repetitionPenalty > 0");
  return p;
}

// a seedRng state: BigUint64Array(4), advanced in place by the sampler
uint64_t* rngOf(const Napi::Value& v, const std::string& what) {
  auto rng = typed<uint64_t>(v, napi_biguint64_array, what, "a BigUint64Array");
  if (rng.length < 4) fail("INVALID_ARGUMENT", what + " must be a BigUint64Array(4)");
  return rng.data;
}

// =================================================================================================
// NativeModel
// =================================================================================================
class NativeModelWrap : public Napi::ObjectWrap<NativeModelWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {
                           InstanceMethod<&NativeModelWrap::CreateSequence>("createSequence"),
                           InstanceMethod<&NativeModelWrap::DropSequence>("dropSequence"),
                           InstanceMethod<&NativeModelWrap::SequenceLength>("sequenceLength"),
                           InstanceMethod<&NativeModelWrap::TruncateSequence>("truncateSequence"),
                           InstanceMethod<&NativeModelWrap::SetAdapter>("setAdapter"),
                           InstanceMethod<&NativeModelWrap::RemoveAdapter>("removeAdapter"),
                           InstanceMethod<&NativeModelWrap::Forward>("forward"),
                           InstanceMethod<&NativeModelWrap::ForwardSample>("forwardSample"),
                           InstanceMethod<&NativeModelWrap::CrossEntropy>("crossEntropy"),
                           InstanceMethod<&NativeModelWrap::ResidentBytes>("residentBytes"),
                           InstanceMethod<&NativeModelWrap::Info>("info"),
                           InstanceMethod<&NativeModelWrap::Dispose>("dispose"),
                       });
  }

  // new NativeModel(config, weights: Record<string, WeightTensor>,
  //                 options?: {maxSequences, maxContext, decodeMatmul, device: "cpu" | "cuda", cudaGraphs})
  explicit NativeModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModelWrap>(info) {
    guarded(info, [&]() -> Napi::Value {
      qk::engine::ModelConfig cfg = configOf(info[0]);
      if (!info[1].IsObject()) fail("INVALID_ARGUMENT", "weights must be an object of WeightTensors");
      Napi::Object w = info[1].As<Napi::Object>();
      Napi::Array names = w.GetPropertyNames();
      qk::engine::TensorMap map;
      for (uint32_t i = 0; i < names.Length(); ++i) {
        std::string name = names.Get(i).ToString().Utf8Value();
        map.emplace(name, rawTensor(w.Get(name), name, &weightRefs_));
      }
      int maxSeq = 8, maxCtx = std::min(cfg.maxPositions, 2048);
      std::string device = "cpu";
      bool graphs = true;
      qk::engine::DecodeMatmul decode = qk::engine::DecodeMatmul::Exact;
      if (info.Length() > 2 && info[2].IsObject()) {
        Napi::Object o = info[2].As<Napi::Object>();
        if (!o.Get("maxSequences").IsUndefined()) maxSeq = intOf(o, "maxSequences", "options");
        if (!o.Get("maxContext").IsUndefined()) maxCtx = intOf(o, "maxContext", "options");
        Napi::Value dm = o.Get("decodeMatmul");
        if (!dm.IsUndefined()) {
          const std::string v = dm.IsString() ? dm.As<Napi::String>().Utf8Value() : "";
          if (v == "int8") decode = qk::engine::DecodeMatmul::Int8;
          else if (v != "exact") fail("INVALID_ARGUMENT", "options.decodeMatmul must be \"exact\" or \"int8\"");
        }
        Napi::Value d = o.Get("device");
        if (!d.IsUndefined()) {
          device = d.IsString() ? d.As<Napi::String>().Utf8Value() : "";
          if (device != "cpu" && device != "cuda") fail("INVALID_ARGUMENT", "options.device must be \"cpu\" or \"cuda\"");
        }
        graphs = boolOf(o, "cudaGraphs", true);
      }
      if (device == "cpu") {
        model_ = std::make_unique<qk::engine::Model>(cfg, map, maxSeq, maxCtx);
        model_->setDecodeMatmul(decode);
        return info.Env().Undefined();
      }
      // decodeMatmul selects a CPU kernel; the CUDA engine always runs its own (exact) GEMV, and
      // info().decodeMatmul says so.
#ifdef QLORA_WITH_CUDA
      // CudaModel fails with FAILED_PRECONDITION "no CUDA device: <reason>" without a usable GPU. It
      // copies every weight to the device, so the host arrays are not kept alive.
      cuda_ = std::make_unique<qk::engine::CudaModel>(cfg, map, maxSeq, maxCtx, graphs);
      weightRefs_.clear();
#else
      (void)graphs;
      fail("FAILED_PRECONDITION", "device \"cuda\": this addon was built without CUDA (nvcc was not found at build time)");
#endif
      return info.Env().Undefined();
    });
  }

  // The engine (both null once disposed), for csrc/napi/train_napi.cpp.
  qk::engine::NativeEngine engines() const {
    qk::engine::NativeEngine e;
    e.cpu = model_.get();
#ifdef QLORA_WITH_CUDA
    e.cuda = cuda_.get();
#endif
    return e;
  }
  bool onCuda() const {
#ifdef QLORA_WITH_CUDA
    return cuda_ != nullptr;
#else
    return false;
#endif
  }

 private:
  // Runs f on whichever engine this object holds (engine::Model or engine::CudaModel: the same
  // member functions, so each method below is written once as a generic lambda).
  template <typename F>
  Napi::Value withModel(F&& f) {
    if (model_) return f(*model_);
#ifdef QLORA_WITH_CUDA
    if (cuda_) return f(*cuda_);
#endif
    fail("FAILED_PRECONDITION", "the model was disposed");
  }

  Napi::Value CreateSequence(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      return withModel([&](auto& m) -> Napi::Value { return Napi::Number::New(info.Env(), m.createSequence()); });
    });
  }
  Napi::Value DropSequence(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      return withModel([&](auto& m) -> Napi::Value {
        m.dropSequence(intArg(info[0], "seq"));
        return info.Env().Undefined();
      });
    });
  }
  Napi::Value SequenceLength(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      return withModel([&](auto& m) -> Napi::Value {
        return Napi::Number::New(info.Env(), static_cast<double>(m.sequenceLength(intArg(info[0], "seq"))));
      });
    });
  }
  Napi::Value TruncateSequence(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      return withModel([&](auto& m) -> Napi::Value {
        m.truncateSequence(intArg(info[0], "seq"), intArg(info[1], "length"));
        return info.Env().Undefined();
      });
    });
  }

  // setAdapter(slot, {scaling, modules: {name: {a: Float32Array [r,in], b: Float32Array [out,r], rank}}})
  Napi::Value SetAdapter(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value { return withModel([&](auto& m) { return SetAdapterOn(info, m); }); });
  }
  template <typename M>
  Napi::Value SetAdapterOn(const Napi::CallbackInfo& info, M& m) {
    {
      const int slot = intArg(info[0], "slot");
      if (slot < 0 || slot >= 65536) fail("INVALID_ARGUMENT", "adapter slot must be in 0..65535");
      if (!info[1].IsObject()) fail("INVALID_ARGUMENT", "adapter must be an object");
      Napi::Object ad = info[1].As<Napi::Object>();
      qk::engine::Adapter a;
      a.scaling = static_cast<float>(num(ad, "scaling", "adapter"));
      a.mods.resize(static_cast<size_t>(m.config().layers) * qk::engine::kNumLin);
      Napi::Value mv = ad.Get("modules");
      if (!mv.IsObject()) fail("INVALID_ARGUMENT", "adapter.modules must be an object");
      Napi::Object mods = mv.As<Napi::Object>();
      Napi::Array names = mods.GetPropertyNames();
      std::vector<Napi::ObjectReference> keep;
      for (uint32_t i = 0; i < names.Length(); ++i) {
        const std::string name = names.Get(i).ToString().Utf8Value();
        int layer;
        qk::engine::Lin lin;
        int64_t in, out;
        m.resolveModule(name, &layer, &lin, &in, &out);
        Napi::Value e = mods.Get(name);
        if (!e.IsObject()) fail("INVALID_ARGUMENT", "adapter module " + name + " must be {a, b, rank}");
        Napi::Object eo = e.As<Napi::Object>();
        const int rank = intOf(eo, "rank", "adapter module " + name);
        if (rank <= 0) fail("INVALID_ARGUMENT", "adapter module " + name + ": rank must be positive");
        auto A = f32(eo.Get("a"), "adapter module " + name + ".a");
        auto B = f32(eo.Get("b"), "adapter module " + name + ".b");
        if (A.length != static_cast<size_t>(rank) * in)
          fail("INVALID_ARGUMENT", "adapter module " + name + ".a must hold rank·in = " + std::to_string(rank * in) +
                                       " floats, has " + std::to_string(A.length));
        if (B.length != static_cast<size_t>(out) * rank)
          fail("INVALID_ARGUMENT", "adapter module " + name + ".b must hold out·rank = " + std::to_string(out * rank) +
                                       " floats, has " + std::to_string(B.length));
        qk::engine::LoraModule& lm = a.mods[static_cast<size_t>(layer) * qk::engine::kNumLin + lin];
        lm.a = A.data;
        lm.b = B.data;
        lm.rank = rank;
        a.bytes += (A.length + B.length) * sizeof(float);
        keep.push_back(Napi::Persistent(eo.Get("a").As<Napi::Object>()));
        keep.push_back(Napi::Persistent(eo.Get("b").As<Napi::Object>()));
      }
      m.setAdapter(slot, std::move(a));
      if (onCuda()) keep.clear();  // the CUDA engine copied A and B to the device
      if (static_cast<size_t>(slot) >= adapterRefs_.size()) adapterRefs_.resize(static_cast<size_t>(slot) + 1);
      adapterRefs_[slot] = std::move(keep);  // releases the previous adapter's arrays
      return info.Env().Undefined();
    }
  }
  Napi::Value RemoveAdapter(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      const int slot = intArg(info[0], "slot");
      return withModel([&](auto& m) -> Napi::Value {
        m.removeAdapter(slot);
        if (static_cast<size_t>(slot) < adapterRefs_.size()) adapterRefs_[slot].clear();  // train_napi.cpp slots have none
        return info.Env().Undefined();
      });
    });
  }

  // forward(rows: {seq, tokens: Int32Array, adapter}[], allLogits: boolean, out?: Float32Array)
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value { return withModel([&](auto& m) { return ForwardOn(info, m); }); });
  }
  template <typename M>
  Napi::Value ForwardOn(const Napi::CallbackInfo& info, M& m) {
    const int64_t total = parseRows(info[0], "forward");
    const bool all = info.Length() > 1 && info[1].ToBoolean().Value();
    const int64_t R = all ? total : static_cast<int64_t>(rows_.size());
    const size_t need = static_cast<size_t>(R) * m.config().vocab;
    Napi::Float32Array out;
    if (info.Length() > 2 && info[2].IsTypedArray()) {
      auto o = f32(info[2], "forward: out");
      if (o.length < need) fail("INVALID_ARGUMENT", "forward: out holds " + std::to_string(o.length) + " floats, needs " + std::to_string(need));
      out = info[2].As<Napi::Float32Array>();
    } else {
      out = Napi::Float32Array::New(info.Env(), need);
    }
    m.forward(rows_.data(), static_cast<int>(rows_.size()), all, out.Data());
    return out;
  }

  // forwardSample(rows, sampling: ({params, recent: Int32Array | null, rng: BigUint64Array(4)} | null)[])
  // → Int32Array: each row's sampled token (-1 where sampling[i] is null); the rngs advance in place
  Napi::Value ForwardSample(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value { return withModel([&](auto& m) { return ForwardSampleOn(info, m); }); });
  }
  template <typename M>
  Napi::Value ForwardSampleOn(const Napi::CallbackInfo& info, M& m) {
    parseRows(info[0], "forwardSample");
    const uint32_t n = static_cast<uint32_t>(rows_.size());
    if (!info[1].IsArray() || info[1].As<Napi::Array>().Length() != n)
      fail("INVALID_ARGUMENT", "forwardSample: sampling must be an array with one entry (or null) per row");
    Napi::Array specs = info[1].As<Napi::Array>();
    sampling_.resize(n);
    samplingPtrs_.resize(n);
    for (uint32_t i = 0; i < n; ++i) {
      Napi::Value sv = specs.Get(i);
      samplingPtrs_[i] = nullptr;
      if (sv.IsNull() || sv.IsUndefined()) continue;
      if (!sv.IsObject()) fail("INVALID_ARGUMENT", "forwardSample: sampling[i] must be {params, recent, rng} or null");
      Napi::Object so = sv.As<Napi::Object>();
      qk::RowSampling& r = sampling_[i];
      r = qk::RowSampling{};
      r.p = samplingParamsOf(so.Get("params"), "forwardSample");
      Napi::Value rec = so.Get("recent");
      if (!rec.IsNull() && !rec.IsUndefined()) {
        auto ids = i32(rec, "forwardSample: sampling.recent");
        r.recent = ids.data;
        r.nRecent = static_cast<int64_t>(ids.length);
      }
      r.rng = rngOf(so.Get("rng"), "forwardSample: sampling.rng");
      samplingPtrs_[i] = &r;
    }
    Napi::Int32Array tokens = Napi::Int32Array::New(info.Env(), n);
    m.forwardSample(rows_.data(), static_cast<int>(n), samplingPtrs_.data(), tokens.Data());
    return tokens;
  }

  // rows_ ← rows: {seq, tokens: Int32Array, adapter}[] (views into the JS arrays); returns Σ tokens
  int64_t parseRows(const Napi::Value& v, const std::string& what) {
    if (!v.IsArray()) fail("INVALID_ARGUMENT", what + ": rows must be an array");
    Napi::Array rows = v.As<Napi::Array>();
    const uint32_t n = rows.Length();
    rows_.resize(n);
    int64_t total = 0;
    for (uint32_t i = 0; i < n; ++i) {
      Napi::Value rv = rows.Get(i);
      if (!rv.IsObject()) fail("INVALID_ARGUMENT", what + ": each row must be {seq, tokens, adapter}");
      Napi::Object r = rv.As<Napi::Object>();
      auto tok = i32(r.Get("tokens"), what + ": row.tokens");
      Napi::Value ad = r.Get("adapter");
      rows_[i].seq = intOf(r, "seq", "row");
      rows_[i].tokens = tok.data;
      rows_[i].n = static_cast<int64_t>(tok.length);
      rows_[i].adapter = ad.IsUndefined() || ad.IsNull() ? -1 : intArg(ad, "row.adapter");
      total += rows_[i].n;
    }
    return total;
  }

  // crossEntropy(tokens: Int32Array, adapter) → {loss, tokens}
  Napi::Value CrossEntropy(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      auto tok = i32(info[0], "crossEntropy: tokens");
      const int adapter = info[1].IsUndefined() || info[1].IsNull() ? -1 : intArg(info[1], "adapter");
      int64_t count = 0;
      double loss = 0;
      withModel([&](auto& m) -> Napi::Value {
        loss = m.crossEntropy(tok.data, static_cast<int64_t>(tok.length), adapter, &count);
        return info.Env().Undefined();
      });
      Napi::Object r = Napi::Object::New(info.Env());
      r.Set("loss", loss);
      r.Set("tokens", static_cast<double>(count));
      return r;
    });
  }

  Napi::Value ResidentBytes(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      return withModel([&](auto& m) -> Napi::Value {
        return Napi::Number::New(info.Env(), static_cast<double>(m.residentBytes()));
      });
    });
  }

  Napi::Value Info(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      Napi::Object o = Napi::Object::New(info.Env());
      withModel([&](auto& m) -> Napi::Value {
        o.Set("maxSequences", m.maxSequences());
        o.Set("maxContext", m.maxContext());
        o.Set("vocabSize", m.config().vocab);
        return o;
      });
      o.Set("device", onCuda() ? "cuda" : "cpu");
      o.Set("decodeMatmul", model_ && model_->decodeMatmul() == qk::engine::DecodeMatmul::Int8 ? "int8" : "exact");
#ifdef QLORA_WITH_CUDA
      if (cuda_) {  // decode steps captured / replayed as CUDA graphs
        o.Set("graphsCaptured", static_cast<double>(cuda_->graphsCaptured()));
        o.Set("graphLaunches", static_cast<double>(cuda_->graphLaunches()));
      }
#endif
      return o;
    });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    model_.reset();
#ifdef QLORA_WITH_CUDA
    cuda_.reset();
#endif
    weightRefs_.clear();
    adapterRefs_.clear();
    return info.Env().Undefined();
  }

  std::unique_ptr<qk::engine::Model> model_;  // device "cpu"
#ifdef QLORA_WITH_CUDA
  std::unique_ptr<qk::engine::CudaModel> cuda_;  // device "cuda" (exactly one of the two is set)
#endif
  std::vector<Napi::ObjectReference> weightRefs_;
  std::vector<std::vector<Napi::ObjectReference>> adapterRefs_;
  std::vector<qk::engine::RowSpec> rows_;
  std::vector<qk::RowSampling> sampling_;
  std::vector<const qk::RowSampling*> samplingPtrs_;
};

// engineModelClass() → the NativeModel constructor (src/engine.ts calls it once per thread)
Napi::Value engineModelClass(const Napi::CallbackInfo& info) { return NativeModelWrap::Define(info.Env()); }

// =================================================================================================
// Sampling
// =================================================================================================
// engineSampleToken(logits, offset, vocab, {temperature, topK, topP, repetitionPenalty}, recent|null, rng)
Napi::Value engineSampleToken(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto logits = f32(info[0], "logits");
    const int offset = intArg(info[1], "offset"), vocab = intArg(info[2], "vocab");
    if (offset < 0 || vocab <= 0 || static_cast<size_t>(offset) + vocab > logits.length)
      fail("INVALID_ARGUMENT", "sampleToken: logits[offset, offset+vocab) is out of range");
    const qk::SamplingParams p = samplingParamsOf(info[3], "sampleToken");
    const int32_t* recent = nullptr;
    int64_t nRecent = 0;
    if (!info[4].IsNull() && !info[4].IsUndefined()) {
      auto r = i32(info[4], "recent");
      recent = r.data;
      nRecent = static_cast<int64_t>(r.length);
    }
    uint64_t* rng = rngOf(info[5], "rng");
    int32_t tok = qk::sampleToken(logits.data + offset, vocab, p, recent, nRecent, rng);
    return Napi::Number::New(info.Env(), tok);
  });
}

// engineSeedRng(seed: bigint) → BigUint64Array(4)
Napi::Value engineSeedRng(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (!info[0].IsBigInt()) fail("INVALID_ARGUMENT", "seed must be a bigint");
    bool lossless = true;
    uint64_t seed = info[0].As<Napi::BigInt>().Uint64Value(&lossless);
    auto arr = Napi::BigUint64Array::New(info.Env(), 4);
    qk::rngSeed(seed, arr.Data());
    return arr;
  });
}

// =================================================================================================
// Ops, exposed for tests (each returns a fresh Float32Array)
// =================================================================================================
Napi::Float32Array copyOf(Napi::Env env, const float* p, size_t n) {
  auto a = Napi::Float32Array::New(env, n);
  std::memcpy(a.Data(), p, n * sizeof(float));
  return a;
}
const float* optF32(const Napi::Value& v, const std::string& what) {
  return v.IsNull() || v.IsUndefined() ? nullptr : f32(v, what).data;
}

// engineOpRmsNorm(x, w, rows, dim, eps)
Napi::Value engineOpRmsNorm(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto x = f32(info[0], "x");
    auto w = f32(info[1], "w");
    const int rows = intArg(info[2], "rows"), dim = intArg(info[3], "dim");
    if (x.length < static_cast<size_t>(rows) * dim || w.length < static_cast<size_t>(dim)) fail("INVALID_ARGUMENT", "sizes");
    auto y = Napi::Float32Array::New(info.Env(), static_cast<size_t>(rows) * dim);
    qk::rmsNormForward(x.data, w.data, y.Data(), rows, dim, info[4].As<Napi::Number>().FloatValue());
    return y;
  });
}

// engineOpLayerNorm(x, w|null, b|null, rows, dim, eps)
Napi::Value engineOpLayerNorm(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto x = f32(info[0], "x");
    const int rows = intArg(info[3], "rows"), dim = intArg(info[4], "dim");
    if (x.length < static_cast<size_t>(rows) * dim) fail("INVALID_ARGUMENT", "sizes");
    auto y = Napi::Float32Array::New(info.Env(), static_cast<size_t>(rows) * dim);
    qk::layerNormForward(x.data, optF32(info[1], "w"), optF32(info[2], "b"), y.Data(), rows, dim,
                         info[5].As<Napi::Number>().FloatValue());
    return y;
  });
}

qk::RopeParams ropeParamsOf(const Napi::CallbackInfo& info, size_t iHd, size_t iTheta, size_t iScaling) {
  qk::RopeParams rp;
  rp.headDim = intArg(info[iHd], "headDim");
  rp.theta = info[iTheta].As<Napi::Number>().FloatValue();
  ropeScalingOf(info[iScaling], &rp);
  if (rp.headDim <= 0 || rp.headDim % 2) fail("INVALID_ARGUMENT", "headDim must be even");
  return rp;
}

// engineOpRopeInvFreq(headDim, theta, scaling|null)
Napi::Value engineOpRopeInvFreq(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    qk::RopeParams rp = ropeParamsOf(info, 0, 1, 2);
    auto y = Napi::Float32Array::New(info.Env(), rp.headDim / 2);
    qk::ropeInvFreq(rp, y.Data());
    return y;
  });
}

// engineOpRope(x [T, nHeads·hd], T, nHeads, headDim, pos: Int32Array, theta, scaling|null)
Napi::Value engineOpRope(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto x = f32(info[0], "x");
    const int T = intArg(info[1], "T"), nh = intArg(info[2], "nHeads");
    qk::RopeParams rp = ropeParamsOf(info, 3, 5, 6);
    auto pos = i32(info[4], "pos");
    if (x.length < static_cast<size_t>(T) * nh * rp.headDim || pos.length < static_cast<size_t>(T)) fail("INVALID_ARGUMENT", "sizes");
    int32_t maxPos = 0;
    for (int t = 0; t < T; ++t) {
      if (pos.data[t] < 0) fail("INVALID_ARGUMENT", "positions must be >= 0");
      maxPos = std::max(maxPos, pos.data[t]);
    }
    const int half = rp.headDim / 2;
    std::vector<float> inv(half), c(static_cast<size_t>(maxPos + 1) * half), s(c.size());
    qk::ropeInvFreq(rp, inv.data());
    qk::ropeTables(inv.data(), half, maxPos + 1, c.data(), s.data());
    auto y = copyOf(info.Env(), x.data, static_cast<size_t>(T) * nh * rp.headDim);
    qk::ropeForward(y.Data(), T, nh, rp.headDim, pos.data, c.data(), s.data());
    return y;
  });
}

// engineOpActivation(kind, x) / engineOpGatedActivation(kind, gate, up)
Napi::Value engineOpActivation(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    qk::Activation a = activationOf(info[0].ToString().Utf8Value());
    auto x = f32(info[1], "x");
    auto y = Napi::Float32Array::New(info.Env(), x.length);
    qk::activationForward(a, x.data, y.Data(), static_cast<int64_t>(x.length));
    return y;
  });
}
Napi::Value engineOpGatedActivation(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    qk::Activation a = activationOf(info[0].ToString().Utf8Value());
    auto g = f32(info[1], "gate");
    auto u = f32(info[2], "up");
    if (u.length != g.length) fail("INVALID_ARGUMENT", "gate and up differ in length");
    auto y = Napi::Float32Array::New(info.Env(), g.length);
    qk::gatedActivationForward(a, g.data, u.data, y.Data(), static_cast<int64_t>(g.length));
    return y;
  });
}

// engineOpSoftmax(x, rows, n)
Napi::Value engineOpSoftmax(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto x = f32(info[0], "x");
    const int rows = intArg(info[1], "rows"), n = intArg(info[2], "n");
    if (n <= 0 || x.length < static_cast<size_t>(rows) * n) fail("INVALID_ARGUMENT", "sizes");
    auto y = copyOf(info.Env(), x.data, static_cast<size_t>(rows) * n);
    qk::softmaxForward(y.Data(), rows, n);
    return y;
  });
}

// engineOpAttention(q [T, nh·hd], k [ctx, nkv·hd], v [ctx, nkv·hd], pos: Int32Array, nHeads, nKvHeads, headDim, scale)
// All tokens read the same cache; token t attends to rows 0..pos[t].
Napi::Value engineOpAttention(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    auto q = f32(info[0], "q");
    auto k = f32(info[1], "k");
    auto v = f32(info[2], "v");
    auto pos = i32(info[3], "pos");
    qk::AttentionShape s;
    s.nHeads = intArg(info[4], "nHeads");
    s.nKvHeads = intArg(info[5], "nKvHeads");
    s.headDim = intArg(info[6], "headDim");
    s.scale = info[7].As<Napi::Number>().FloatValue();
    if (s.nHeads <= 0 || s.nKvHeads <= 0 || s.headDim <= 0 || s.nHeads % s.nKvHeads) fail("INVALID_ARGUMENT", "heads");
    const int64_t T = static_cast<int64_t>(pos.length), kvDim = static_cast<int64_t>(s.nKvHeads) * s.headDim;
    const int64_t ctx = static_cast<int64_t>(k.length) / kvDim;
    if (q.length < static_cast<size_t>(T) * s.nHeads * s.headDim || v.length != k.length) fail("INVALID_ARGUMENT", "sizes");
    for (int64_t t = 0; t < T; ++t)
      if (pos.data[t] < 0 || pos.data[t] >= ctx) fail("INVALID_ARGUMENT", "pos outside the cache");
    std::vector<const float*> kb(T, k.data), vb(T, v.data);
    auto out = Napi::Float32Array::New(info.Env(), static_cast<size_t>(T) * s.nHeads * s.headDim);
    qk::attentionForward(s, q.data, kb.data(), vb.data(), pos.data, T, out.Data());
    return out;
  });
}

// engineOpEmbedding(table: WeightTensor [rows, cols], ids: Int32Array) → [T, cols]
Napi::Value engineOpEmbedding(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    qk::engine::RawTensor t = rawTensor(info[0], "table", nullptr);
    auto ids = i32(info[1], "ids");
    if (t.shape.size() != 2) fail("INVALID_ARGUMENT", "table must be 2-D");
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const size_t need = t.dtype == qk::TableType::F32 ? rows * cols * 4
                        : t.dtype == qk::TableType::NF4 ? (rows * cols + 1) / 2 : rows * cols * 2;
    if (t.bytes < need) fail("INVALID_ARGUMENT", "table data too short");
    if (t.dtype == qk::TableType::NF4 &&
        (t.blocksize <= 0 || t.absmaxCount < static_cast<size_t>((rows * cols + t.blocksize - 1) / t.blocksize)))
      fail("INVALID_ARGUMENT", "table absmax too short");
    for (size_t i = 0; i < ids.length; ++i)
      if (ids.data[i] < 0 || ids.data[i] >= rows) fail("INVALID_ARGUMENT", "id out of range");
    qk::TableView tv{t.dtype, t.data, t.absmax, rows, cols, t.blocksize, t.absmaxDq};
    auto out = Napi::Float32Array::New(info.Env(), ids.length * cols);
    qk::embeddingForward(tv, ids.data, static_cast<int64_t>(ids.length), out.Data(), false);
    return out;
  });
}

}  // namespace

// The engine behind a NativeModel object (src/engine.ts `handle`); napi/native_model.h.
namespace qk {
namespace engine {
NativeEngine unwrapNativeModel(const Napi::Value& v) {
  if (!v.IsObject()) throw EngineError("INVALID_ARGUMENT", "expected a NativeModel");
  NativeModelWrap* w = NativeModelWrap::Unwrap(v.As<Napi::Object>());
  return w ? w->engines() : NativeEngine{};
}
}  // namespace engine
}  // namespace qk

QK_EXPORT("engineModelClass", engineModelClass);
QK_EXPORT("engineSampleToken", engineSampleToken);
QK_EXPORT("engineSeedRng", engineSeedRng);
QK_EXPORT("engineOpRmsNorm", engineOpRmsNorm);
QK_EXPORT("engineOpLayerNorm", engineOpLayerNorm);
QK_EXPORT("engineOpRopeInvFreq", engineOpRopeInvFreq);
QK_EXPORT("engineOpRope", engineOpRope);
QK_EXPORT("engineOpActivation", engineOpActivation);
QK_EXPORT("engineOpGatedActivation", engineOpGatedActivation);
QK_EXPORT("engineOpSoftmax", engineOpSoftmax);
QK_EXPORT("engineOpAttention", engineOpAttention);
QK_EXPORT("engineOpEmbedding", engineOpEmbedding);
