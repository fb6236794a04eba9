// The native model: a Llama-family or OPT decoder over frozen (NF4 / f16 / bf16 / f32) base
// weights referenced in place, unmerged LoRA adapters (any number, mixed per batch row), a
// per-sequence fp32 KV cache and preallocated scratch. Forward only (inference + evaluation).
// See docs/engine.md for the design; the N-API wrapper is csrc/napi/engine_napi.cpp.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu/attention.h"
#include "cpu/ops.h"
#include "cpu/matmul.h"

namespace qk {
namespace engine {

// Errors carry a code the TypeScript layer maps to @qlora/core errors.
struct EngineError : std::runtime_error {
  std::string code;  // "INVALID_ARGUMENT" | "RESOURCE_EXHAUSTED" | "FAILED_PRECONDITION" | "NOT_FOUND"
  EngineError(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

enum class Arch { Llama, Opt };

struct ModelConfig {
  Arch arch = Arch::Llama;
  int hidden = 0, intermediate = 0, layers = 0, heads = 0, kvHeads = 0, headDim = 0, vocab = 0;
  int maxPositions = 0;
  float normEps = 1e-5f;
  RopeParams rope;  // Llama only (rope.headDim = headDim)
  Activation act = Activation::Silu;
  bool tied = false, qkvBias = false, oBias = false, mlpBias = false;
  bool layerNormBefore = true;  // OPT: pre-LN (true) or post-LN
};

// A tensor handed over by the binding: memory stays owned by JS (the binding keeps it alive).
struct RawTensor {
  TableType dtype = TableType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t bytes = 0;
  const float* absmax = nullptr;  // nf4
  size_t absmaxCount = 0;
  int blocksize = 0;
};
using TensorMap = std::unordered_map<std::string, RawTensor>;

// The linear modules of one layer in a fixed order. OPT: out_proj → O, fc1 → Up, fc2 → Down,
// and no Gate.
enum Lin { LQ = 0, LK, LV, LO, LGate, LUp, LDown, kNumLin };

struct Linear {
  bool present = false;
  WeightView w{};                 // [out, in], referenced in place (NF4 stays packed)
  const float* bias = nullptr;    // [out] fp32 (owned copy) or null
};
struct Norm {
  const float* w = nullptr;  // [H] fp32 (owned copy)
  const float* b = nullptr;  // LayerNorm bias or null
};
struct Layer {
  Linear lin[kNumLin];
  Norm norm1, norm2;  // Llama: input/post_attention_layernorm; OPT: self_attn_layer_norm/final_layer_norm
};

struct LoraModule {
  const float* a = nullptr;  // [r, in]
  const float* b = nullptr;  // [out, r]
  int rank = 0;
};
struct Adapter {
  bool active = false;
  float scaling = 0.f;
  std::vector<LoraModule> mods;  // [layer · kNumLin + lin]; a == null: module not targeted
  int maxRank = 0;
  size_t bytes = 0;
};

struct RowSpec {
  int seq;
  const int32_t* tokens;
  int64_t n;
  int adapter;  // -1: base model
};

class Model {
  friend struct LoraTrainer;  // model/train.{h,cpp}: LoRA training reads the weights in place
  friend class CudaModel;     // cuda/model_cuda.cu: uploads the validated binding to the device

 public:
  Model(const ModelConfig& cfg, const TensorMap& weights, int maxSequences, int maxContext);

  const ModelConfig& config() const { return cfg_; }
  int maxSequences() const { return maxSeq_; }
  int maxContext() const { return maxCtx_; }

  // ---- sequences (KV-cache slots) ----
  int createSequence();
  void dropSequence(int seq);
  int64_t sequenceLength(int seq) const;
  void truncateSequence(int seq, int64_t length);

  // ---- adapters ----
  // Resolves "layers.{i}.<hf module path>" to (layer, lin, in, out); throws on unknown names.
  void resolveModule(const std::string& name, int* layer, Lin* lin, int64_t* in, int64_t* out) const;
  void setAdapter(int slot, Adapter adapter);
  void removeAdapter(int slot);
  bool hasAdapter(int slot) const;

  // ---- compute ----
  // Appends each row's tokens to its sequence, returns logits into `logits`:
  // [nRows, V] (last token of each row) or [Σn, V] (allLogits, rows in the given order).
  void forward(const RowSpec* rows, int nRows, bool allLogits, float* logits);
  // Mean next-token cross-entropy of tokens[0..T) (T >= 2) with vocab-chunked logits; returns the
  // mean and sets *count = T - 1.
  double crossEntropy(const int32_t* tokens, int64_t T, int adapter, int64_t* count);

  size_t residentBytes() const;

 private:
  struct Seq {
    bool used = false;
    int64_t len = 0;
    std::unique_ptr<float[]> k, v;  // [layers][maxCtx][kvDim] each, uninitialised until written
  };
  struct Segment {
    int adapter;
    int64_t t0, t1;  // packed token range
  };

  const float* ownFloats(const RawTensor& t, const std::string& name, int64_t n);
  WeightView weightView(const RawTensor& t, const std::string& name, int64_t rows, int64_t cols);
  void loadWeights(const TensorMap& weights);
  void ensureSeqCache(Seq& s);
  void ensureScratch(int64_t T);
  Seq& seqAt(int seq, const char* what);
  void checkAdapter(int adapter) const;

  // Runs the decoder over the packed tokens (tokIds_, tokPos_, tokSeq_ filled, segments_ set);
  // leaves the residual stream (before the final norm) in x_ [T, H].
  void runDecoder(int64_t T);
  // y[T, out] (+)= x[T, in]·Wᵀ + b + per-segment LoRA
  void linear(int layer, Lin which, const float* x, int64_t T, float* y, bool accumulate);
  void finalNorm(const float* x, float* y, int64_t rows);
  WeightView lmHeadRows(int64_t v0, int64_t v1) const;

  ModelConfig cfg_;
  int maxSeq_, maxCtx_;
  int64_t qDim_, kvDim_;

  TableView embed_{}, positions_{};
  Norm finalNorm_;
  WeightView lmHead_{};
  std::vector<Layer> layers_;
  std::vector<std::unique_ptr<std::vector<float>>> owned_;  // fp32 copies of norms / biases
  size_t weightBytes_ = 0;

  std::vector<float> cos_, sin_;  // [maxCtx, hd/2]
  std::vector<Seq> seqs_;         // maxSeq_ user slots + 1 internal (crossEntropy)
  std::vector<Adapter> adapters_;

  // scratch (grown on demand, never shrunk)
  int64_t cap_ = 0;
  std::vector<float> x_, xn_, q_, k_, v_, att_, g_, u_, lora_;
  std::vector<int32_t> tokIds_, tokPos_, tokSeq_;
  std::vector<const float*> kPtr_, vPtr_;
  std::vector<Segment> segments_;
  std::vector<int> order_;
  std::vector<int64_t> rowStart_;
  std::vector<float> sel_, ceBuf_;
};

}  // namespace engine
}  // namespace qk
