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
#include "cpu/sampling.h"

namespace qk {
namespace engine {

// Errors carry a code the TypeScript layer maps to @qlora/core errors.
struct EngineError : std::runtime_error {
  std::string code;  // "INVALID_ARGUMENT" | "RESOURCE_EXHAUSTED" | "FAILED_PRECONDITION" | "NOT_FOUND"
  EngineError(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

enum class Arch { Llama, Opt };

// How NF4 linears with at most 8 rows (decode steps; the lm_head of <= 8 rows) multiply:
// Exact: linearForward (weights decoded to their exact fp32 values); Int8: linearForwardInt8 (x
// quantized to int8 per weight block, integer block dots; ~1% relative error per output, faster).
// Larger row counts (prefill, crossEntropy windows) always run linearForward. docs/engine.md.
enum class DecodeMatmul { Exact, Int8 };

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
  const float* absmax = nullptr;  // nf4: fp32 scales, or null when absmaxDq holds them
  size_t absmaxCount = 0;         // nf4: scales given (fp32 values, or 8-bit codes of absmaxDq)
  Nf4DoubleQuantAbsmax absmaxDq;  // nf4: double-quantized scales (cpu/nf4.h), validated by the binding
  size_t absmaxDqNested = 0;      // nf4 double-quantized: nested fp32 scales given
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

// Sequence slots, shared by the engines: `seqs` holds maxSeq user slots (Seq has `bool used` and
// `int64_t len`). liveSlot: the slot of a live sequence, NOT_FOUND otherwise; firstFreeSlot: the
// lowest unused slot, RESOURCE_EXHAUSTED when all are in use; truncateLive: keep the first `length`
// tokens (0..len).
template <class Seqs>
auto& liveSlot(Seqs& seqs, int maxSeq, int seq, const char* what) {
  if (seq < 0 || seq >= maxSeq || !seqs[seq].used)
    throw EngineError("NOT_FOUND", std::string(what) + ": no sequence " + std::to_string(seq));
  return seqs[seq];
}
template <class Seqs>
int firstFreeSlot(const Seqs& seqs, int maxSeq) {
  for (int i = 0; i < maxSeq; ++i)
    if (!seqs[i].used) return i;
  throw EngineError("RESOURCE_EXHAUSTED", "all " + std::to_string(maxSeq) + " sequence slots are in use");
}
template <class Seq>
void truncateLive(Seq& s, int64_t length) {
  if (length < 0 || length > s.len)
    throw EngineError("INVALID_ARGUMENT", "truncateSequence: length " + std::to_string(length) + " is outside 0.." +
                                              std::to_string(s.len));
  s.len = length;
}

// Adapter slots, shared by the engines: slot s holds an adapter when adapters[s].active; -1 is the base.
template <class Adapters>
bool adapterActive(const Adapters& adapters, int slot) {
  return slot >= 0 && static_cast<size_t>(slot) < adapters.size() && adapters[slot].active;
}
template <class Adapters>
void checkAdapterSlot(const Adapters& adapters, int adapter) {
  if (adapter != -1 && !adapterActive(adapters, adapter))
    throw EngineError("NOT_FOUND", "no adapter in slot " + std::to_string(adapter));
}

// The checks every engine's forward() applies to a batch, with the same messages: each row names a
// live sequence (lengthOf(seq) → its length, NOT_FOUND otherwise) and a loaded adapter or none
// (checkAdapter throws), has tokens, stays within maxContext, holds in-range token ids, and no
// sequence appears twice. Returns the total token count T.
template <class LengthOf, class CheckAdapter>
int64_t validateRows(const RowSpec* rows, int nRows, int64_t maxContext, int vocab, LengthOf&& lengthOf,
                     CheckAdapter&& checkAdapter) {
  if (nRows <= 0) throw EngineError("INVALID_ARGUMENT", "forward: no rows");
  int64_t T = 0;
  for (int i = 0; i < nRows; ++i) {
    const RowSpec& r = rows[i];
    const int64_t len = lengthOf(r.seq);
    checkAdapter(r.adapter);
    if (r.n <= 0) throw EngineError("INVALID_ARGUMENT", "forward: row " + std::to_string(i) + " has no tokens");
    if (len + r.n > maxContext)
      throw EngineError("RESOURCE_EXHAUSTED", "forward: sequence " + std::to_string(r.seq) + " would hold " +
                                                  std::to_string(len + r.n) + " tokens, maxContext is " +
                                                  std::to_string(maxContext));
    for (int j = 0; j < i; ++j)
      if (rows[j].seq == r.seq)
        throw EngineError("INVALID_ARGUMENT", "forward: sequence " + std::to_string(r.seq) + " appears in two rows");
    for (int64_t t = 0; t < r.n; ++t)
      if (r.tokens[t] < 0 || r.tokens[t] >= vocab)
        throw EngineError("INVALID_ARGUMENT", "forward: token id " + std::to_string(r.tokens[t]) + " is outside 0.." +
                                                  std::to_string(vocab - 1));
    T += r.n;
  }
  return T;
}

// order[0..nRows) = row indices grouped by adapter, stable (each adapter becomes one contiguous
// segment of the packed batch). Insertion sort: allocation free, batches are small.
inline void orderRowsByAdapter(const RowSpec* rows, int nRows, std::vector<int>& order) {
  order.resize(nRows);
  for (int i = 0; i < nRows; ++i) {
    int j = i;
    for (; j > 0 && rows[order[j - 1]].adapter > rows[i].adapter; --j) order[j] = order[j - 1];
    order[j] = i;
  }
}

class Model {
  friend struct LoraTrainer;  // model/train.{h,cpp}: LoRA training reads the weights in place
  friend class CudaModel;     // cuda/model_cuda.cu: uploads the validated binding to the device

 public:
  Model(const ModelConfig& cfg, const TensorMap& weights, int maxSequences, int maxContext);

  const ModelConfig& config() const { return cfg_; }
  int maxSequences() const { return maxSeq_; }
  int maxContext() const { return maxCtx_; }
  DecodeMatmul decodeMatmul() const { return decodeMatmul_; }
  void setDecodeMatmul(DecodeMatmul d) { decodeMatmul_ = d; }

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
  // forward, then one token per row picked from its last-token logits by sampleToken with
  // sampling[i] (null: the row is not sampled, tokens[i] = -1; e.g. a prompt chunk that is not the
  // prompt's last). The logits stay inside (CudaModel: on the device).
  void forwardSample(const RowSpec* rows, int nRows, const RowSampling* const* sampling, int32_t* tokens);
  // Mean next-token cross-entropy of tokens[0..T) (T >= 2) with vocab-chunked logits; returns the
  // mean and sets *count = T - 1.
  double crossEntropy(const int32_t* tokens, int64_t T, int adapter, int64_t* count);

  // Bytes the model holds: weights handed over, fp32 norm/bias copies, RoPE tables, the KV cache
  // capacity of every slot (as allocated, not maxContext), adapters, scratch.
  size_t residentBytes() const;
  // KV-cache rows (tokens) allocated for a sequence slot (>= its length; tests and diagnostics).
  int64_t kvCapacity(int seq) const;
  // Tokens the decoder runs per pass: longer steps (prefill, crossEntropy) go in windows of this
  // many packed tokens, so the [T, ·] scratch stays bounded (see stepWindow in model.cpp).
  int64_t stepWindow() const { return window_; }

 private:
  // Anonymous private pages from mmap: never touched rows cost no RSS, munmap hands the memory
  // back to the kernel at once (malloc may keep a freed block in its heap), and mremap grows a
  // buffer without copying its contents.
  class PageBuffer {
   public:
    PageBuffer() = default;
    PageBuffer(const PageBuffer&) = delete;
    PageBuffer& operator=(const PageBuffer&) = delete;
    PageBuffer(PageBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
    PageBuffer& operator=(PageBuffer&& o) noexcept;
    ~PageBuffer() { release(); }
    // Grows (or first allocates) to `bytes`, keeping the contents; false when the kernel refuses.
    bool grow(size_t bytes);
    void release();
    float* data() const { return static_cast<float*>(p_); }
    size_t bytes() const { return bytes_; }

   private:
    void* p_ = nullptr;
    size_t bytes_ = 0;
  };
  struct Seq {
    bool used = false;
    int64_t len = 0;
    int64_t cap = 0;   // rows per layer allocated (grows with the sequence, 0 when released)
    std::vector<PageBuffer> k, v;  // per layer [cap][kvDim]
  };
  struct Segment {
    int adapter;
    int64_t t0, t1;  // packed token range
  };

  const float* ownFloats(const RawTensor& t, const std::string& name, int64_t n);
  WeightView weightView(const RawTensor& t, const std::string& name, int64_t rows, int64_t cols);
  void loadWeights(const TensorMap& weights);
  // Grows the slot's KV arrays to hold `rows` tokens (see the growth policy in model.cpp).
  void reserveKv(Seq& s, int64_t rows);
  void releaseKv(Seq& s);
  void ensureScratch(int64_t T);
  Seq& seqAt(int seq, const char* what);
  void checkAdapter(int adapter) const;

  // Runs the decoder over packed tokens [t0, t0 + n) (tokIds_, tokPos_, tokSeq_ filled for them;
  // n <= window_), with segments_ set to packedSegments_ clipped to the window and made relative
  // to t0; leaves the residual stream (before the final norm) of those tokens in x_ [n, H].
  void runDecoder(int64_t t0, int64_t n);
  // Sets segments_ to the part of packedSegments_ inside [t0, t1), relative to t0.
  void windowSegments(int64_t t0, int64_t t1);
  // y[T, out] (+)= x[T, in]·Wᵀ + b + per-segment LoRA
  void linear(int layer, Lin which, const float* x, int64_t T, float* y, bool accumulate);
  void finalNorm(const float* x, float* y, int64_t rows);
  WeightView lmHeadRows(int64_t v0, int64_t v1) const;
  // y[rows, out] (+)= x·Wᵀ (+ bias) through the decode matmul the model was configured with
  void baseLinear(const float* x, int64_t rows, const WeightView& w, const float* bias, float* y, bool accumulate) const;

  ModelConfig cfg_;
  int maxSeq_, maxCtx_;
  int64_t qDim_, kvDim_;
  int64_t window_ = 0;  // packed tokens per decoder pass
  DecodeMatmul decodeMatmul_ = DecodeMatmul::Exact;

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
  std::vector<Segment> packedSegments_;  // adapter segments of the whole step
  std::vector<Segment> segments_;        // of the current window, relative to its first token (linear)
  std::vector<int> order_;
  std::vector<int64_t> rowStart_;
  std::vector<int64_t> outStart_;  // forward: first logits row of each caller row
  std::vector<float> sel_, ceBuf_, sampleLogits_;
};

}  // namespace engine
}  // namespace qk
