// The device decoder: engine::Model's forward (Llama family + OPT, same config, weight names and
// semantics — docs/engine.md) with the weights, KV caches, adapters and activations in GPU memory,
// built from the CUDA kernels of qk_cuda.h. A plain C++ header (no CUDA headers): the N-API binding
// (csrc/napi/engine_napi.cpp, compiled by g++) creates it for NativeModel's device "cuda".
// Only compiled and linked when the build found nvcc (QLORA_WITH_CUDA). Design: docs/cuda.md §6.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda/qk_cuda.h"
#include "model/model.h"

namespace qk {
namespace engine {

class CudaLoraTrainer;

class CudaModel {
  // cuda/train_cuda.cu: LoRA training reads the device weights in place (NF4 stays packed), runs on
  // this model's stream and installs each trained slot in adapters_ (borrowed device A/B pointers).
  friend class CudaLoraTrainer;

 public:
  // Validates like engine::Model (it builds one as the host-side binding), then uploads every
  // weight once: NF4 stays packed, f32/f16/bf16 as stored, norms/biases as fp32. After the
  // constructor returns the host weight buffers are no longer read (the caller may free them).
  // Throws EngineError FAILED_PRECONDITION without a usable device.
  CudaModel(const ModelConfig& cfg, const TensorMap& weights, int maxSequences, int maxContext, bool useGraphs);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const { return cfg_; }
  int maxSequences() const { return maxSeq_; }
  int maxContext() const { return maxCtx_; }

  // ---- sequences (KV-cache slots), as engine::Model ----
  int createSequence();
  void dropSequence(int seq);
  int64_t sequenceLength(int seq) const;
  void truncateSequence(int seq, int64_t length);

  // ---- adapters: A/B are copied to the device (the host arrays may be freed afterwards) ----
  void resolveModule(const std::string& name, int* layer, Lin* lin, int64_t* in, int64_t* out) const {
    host_->resolveModule(name, layer, lin, in, out);
  }
  void setAdapter(int slot, Adapter adapter);
  void removeAdapter(int slot);
  bool hasAdapter(int slot) const;

  // ---- compute: the semantics of engine::Model::forward / crossEntropy (logits copied to host) ----
  void forward(const RowSpec* rows, int nRows, bool allLogits, float* logits);
  // engine::Model::forwardSample: the logits stay on the device, one batched sampling launch
  // (cuda::sampleTokens) picks every row's token; only the ids are downloaded.
  void forwardSample(const RowSpec* rows, int nRows, const RowSampling* const* sampling, int32_t* tokens);
  double crossEntropy(const int32_t* tokens, int64_t T, int adapter, int64_t* count);

  // Device bytes held: weights, KV caches, adapters, tables, scratch.
  size_t residentBytes() const;
  // CUDA-graph statistics (decode steps replayed from a captured graph), for tests and benchmarks.
  int64_t graphsCaptured() const { return graphsCaptured_; }
  int64_t graphLaunches() const { return graphLaunches_; }

 private:
  struct Seq {
    bool used = false;
    int64_t len = 0;
  };
  struct Segment {
    int adapter;
    int64_t t0, t1;
  };
  struct DevLinear {
    bool present = false;
    WeightView w{};               // device data / absmax
    const float* bias = nullptr;  // device fp32 or null
  };
  struct DevNorm {
    const float* w = nullptr;
    const float* b = nullptr;
  };
  struct DevLayer {
    DevLinear lin[kNumLin];
    DevNorm norm1, norm2;
  };
  struct DevLora {
    const float* a = nullptr;  // [r, in] device
    const float* b = nullptr;  // [out, r] device
    int rank = 0;
  };
  struct DevAdapter {
    bool active = false;
    float scaling = 0.f;
    std::vector<DevLora> mods;  // [layer · kNumLin + lin]
    int maxRank = 0;
    std::vector<cuda::Buffer> buffers;
    size_t bytes = 0;
  };
  // Per-step token metadata: one pinned host block uploaded with one copy, the same layout on the
  // device. kvOff[cap] | tileKv[cap] (int64) | ids[cap] | pos[cap] | rowIdx[cap] (crossEntropy: labels)
  // | tileTok | tileN | tilePos | simtIdx [cap] (int32; the attention plan, cuda::AttentionTiles).
  struct Meta {
    int64_t *kvOff, *tileKv;
    int32_t *ids, *pos, *rowIdx;
    int32_t *tileTok, *tileN, *tilePos, *simtIdx;
  };

  cuda::Buffer alloc(size_t bytes, const char* what);
  // Copies host bytes to the device once per key (default: the host pointer).
  const void* upload(const void* host, size_t bytes, const void* key = nullptr);
  WeightView deviceView(const WeightView& host);
  const float* uploadFloats(const float* host, int64_t n);
  void uploadWeights();
  void ensureSlots(int slots);
  void ensureScratch(int64_t T, int64_t R, int rank);
  Meta metaAt(void* base) const;
  AttentionShape attentionShape() const;
  // Fills the attention plan of the T packed tokens in the host metadata (nTiles_, nSimt_): prefill
  // runs to flash tiles when flashPrefill_, decode steps (graph-captured) always SIMT.
  void planAttention(const Meta& host, int64_t T, bool decode);
  Seq& seqAt(int seq, const char* what);
  void checkAdapter(int adapter) const;
  void invalidateGraphs();

  // The decoder over the packed tokens whose metadata is on the device (metaDev_), segments_ set;
  // leaves the residual stream (before the final norm) in x_ [T, H]. kPool/vPool: the caches the
  // kvOff offsets address (layer l's rows at + l·maxCtx·kvDim).
  void runDecoder(int64_t T, float* kPool, float* vPool);
  // y[T, out] (+)= x[T, in]·Wᵀ + b + per-segment LoRA
  void linear(int layer, Lin which, const float* x, int64_t T, float* y, bool accumulate);
  // y_i[T, out_i] = x·W_iᵀ + b_i + LoRA_i for modules sharing x (the base GEMVs fused into one launch)
  void linearMany(int layer, std::initializer_list<std::pair<Lin, float*>> outs, const float* x, int64_t T);
  // y[seg] += scaling·(x[seg]·Aᵀ)·Bᵀ for every segment whose adapter has this module (steps of
  // <= kGraphMaxRows tokens: all segments in two launches, cuda::loraSegmentsForward)
  void loraAdd(int layer, Lin which, const float* x, int64_t T, float* y);
  // Some row of the current step has a LoRA on this module.
  bool hasLora(int layer, Lin which) const;
  void norm(const DevNorm& n, const float* x, float* y, int64_t rows);
  // logits_[R, V] = lm_head(finalNorm(x_[rowIdx[r]]))
  void logitsStep(int64_t R);
  // Validates and packs the rows into metaHost_, uploads them and queues the decoder + logitsStep (a
  // captured graph for decode steps); returns R, the logits rows left in logits_. The caller
  // synchronises the stream (metaHost_ is rewritten by the next step) and then calls appendRows.
  int64_t runStep(const RowSpec* rows, int nRows, bool allLogits);
  // The step's tokens are in the caches: each row's sequence grows by its token count.
  void appendRows(const RowSpec* rows, int nRows);

  std::unique_ptr<Model> host_;  // validation, module names, norms/biases and RoPE tables (host)
  ModelConfig cfg_;
  int maxSeq_, maxCtx_;
  int64_t qDim_, kvDim_, slotFloats_;  // slotFloats_: layers · maxCtx · kvDim
  bool useGraphs_;
  bool flashAttention_ = true;          // QLORA_CUDA_FLASH != 0 at construction (prefill and training)
  bool flashPrefill_ = false;           // prefill attention on the flash kernel (attentionTilesSupported)
  int64_t nTiles_ = 0, nSimt_ = 0;      // the current step's attention plan (planAttention)
  cuda::Stream stream_ = nullptr;

  // weights
  std::vector<cuda::Buffer> weightBufs_;
  std::unordered_map<const void*, const void*> uploaded_;  // host → device (tied embeddings share)
  size_t weightBytes_ = 0;
  WeightView embed_{}, positions_{}, lmHead_{};
  DevNorm finalNorm_;
  std::vector<DevLayer> layers_;
  const float *cos_ = nullptr, *sin_ = nullptr;

  // KV caches: one pool [slotCap][layers][maxCtx][kvDim] per K and V, grown by slots (see .cu)
  std::vector<Seq> seqs_;
  int slotCap_ = 0;
  cuda::Buffer kPool_, vPool_, ceK_, ceV_;

  std::vector<DevAdapter> adapters_;

  // scratch (grown on demand, never shrunk)
  int64_t cap_ = 0, capR_ = 0, capRank_ = 0;
  cuda::Buffer x_, xn_, q_, k_, v_, att_, g_, u_, lora_, sel_, logits_, meta_;
  cuda::PinnedBuffer metaHost_, logitsHost_;
  cuda::Workspace ws_;
  cuda::SampleScratch sample_;  // cuda::sampleTokens' staging and slots
  std::vector<Segment> segments_;
  std::vector<cuda::LoraSegment> loraSegs_;  // loraAdd's per-module table
  std::vector<int> order_;
  std::vector<int64_t> rowStart_;

  // captured decode steps, keyed by the adapter of each row (caller order): cudaGraphExec_t
  std::map<std::vector<int>, void*> graphs_;
  int64_t graphsCaptured_ = 0, graphLaunches_ = 0;
};

}  // namespace engine
}  // namespace qk
