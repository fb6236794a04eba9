// LoRA training on a frozen engine::Model (QLoRA: NF4 / f16 / bf16 / f32 base, fp32 activations,
// fp32 LoRA A/B, gradients and AdamW moments). The trainer reads the model's weights in place
// (friend of Model) and installs each slot's A/B in the model with Model::setAdapter, so a trained
// slot also serves Model::forward (inference) without a copy. See docs/engine-training.md.
//
// One step: trainForwardBackward (any number of times: gradients accumulate) → adamwStep.
// Shapes: B rows × T positions, N = B·T tokens, H hidden, I intermediate, r rank, V vocab.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cpu/adamw.h"
#include "cpu/backward.h"
#include "model/model.h"

namespace qk {
namespace engine {

struct LoraSpec {
  int rank = 8;
  double alpha = 16;
  bool useRslora = false;
  double dropout = 0;
  std::vector<std::string> targets;  // "layers.{i}.<hf module path>"
  uint64_t seed = 0;
};

// One targeted linear: A [r, in], B [out, r], their gradients and AdamW moments.
struct LoraParam {
  std::string name;
  int layer = 0;
  Lin lin = LQ;
  int64_t in = 0, out = 0;
  std::vector<float> a, b, ga, gb, ma, va, mb, vb;
};

struct LoraSlot {
  int rank = 0;
  float scaling = 0.f;
  float dropout = 0.f;
  std::vector<LoraParam> mods;  // canonical order: (layer, lin)
  std::vector<int> index;       // [layer·kNumLin + lin] → mods index, or −1
};

struct TrainBatch {
  const int32_t* tokens = nullptr;    // [B·T]
  const int32_t* labels = nullptr;    // [B·T]: target at position t, or −100
  const int32_t* segments = nullptr;  // [B·T] or null: runs of equal ids are separate examples
  int64_t B = 0, T = 0;
};

struct TrainOptions {
  uint64_t dropoutSeed = 0;
  float gradScale = 1.f;
  bool checkpointing = true;
};

struct AdamWOptions {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0, maxGradNorm = 0;
  int64_t step = 1;
  // The update's parameters (cpu/adamw.h; clipping is applied separately).
  AdamWParams params() const {
    AdamWParams p;
    p.lr = lr;
    p.beta1 = beta1;
    p.beta2 = beta2;
    p.eps = eps;
    p.weightDecay = weightDecay;
    p.step = step;
    return p;
  }
};

struct LossResult {
  double loss = 0;     // mean over the labelled positions
  int64_t tokens = 0;  // labelled positions
};

struct LoraTrainer {
  explicit LoraTrainer(Model* m) : m_(m) {}

  Model* model() const { return m_; }

  // A ~ U(−1/√in, 1/√in) (kaiming_uniform, a = √5), B = 0; installs the slot in the model.
  void initLora(int slot, const LoraSpec& spec);
  // Loss of the batch; gradients of (loss · gradScale) accumulated into the slot.
  LossResult trainForwardBackward(int slot, const TrainBatch& batch, const TrainOptions& opts);
  // Loss without dropout or gradients; slot −1 = the base model.
  LossResult evalLoss(int slot, const TrainBatch& batch);
  // Clip (global norm), AdamW, zero the gradients; returns the pre-clip global norm.
  double adamwStep(int slot, const AdamWOptions& o);
  void zeroGrad(int slot);

  const LoraSlot& slotState(int slot) const;
  // Validates (same module set, same shapes) and copies A, B and the moments; zeroes the gradients.
  struct ModuleState {
    const float *a, *b, *ma, *va, *mb, *vb;
    size_t na, nb;  // lengths of a/ma/va and b/mb/vb
  };
  void setState(int slot, int rank, const std::map<std::string, ModuleState>& mods);

  // ---- host-side parts shared with the CUDA trainer (cuda/train_cuda.{h,cu}): the same slot init,
  // batch metadata, validation and activation layout on both devices ----

  // A new slot for `spec` on model m: targets resolved (InvalidArgument on unknown / duplicate names),
  // A ~ U(−1/√in, 1/√in) from one xoshiro256** stream seeded by spec.seed, B, gradients, moments 0.
  static LoraSlot newSlot(const Model& m, const LoraSpec& spec);
  // A batch's per-token metadata (validated against the model: ids, labels, OPT positions).
  struct BatchPlan {
    std::vector<int32_t> pos;    // [N] position (restarts per segment)
    std::vector<int32_t> start;  // [N] row-local first position of the token's segment
    std::vector<int32_t> rows;   // [M] the labelled tokens (flat index), in order
    std::vector<int32_t> lab;    // [M] their labels
    int32_t maxPos = 0;
  };
  static void planBatch(const Model& m, const TrainBatch& b, BatchPlan* p);
  // setState's checks: same rank, same module set, same sizes (InvalidArgument otherwise).
  static void checkState(const LoraSlot& s, int rank, const std::map<std::string, ModuleState>& mods);
  // adamwStep's argument checks, and the clip factor of torch clip_grad_norm_ for the global norm.
  static void checkAdamW(const AdamWOptions& o);
  static float clipCoef(const AdamWOptions& o, double norm);
  // The decoder's attention shape (Llama scales scores by hd^-½; OPT scales q after q_proj instead).
  static AttentionShape attentionShape(const ModelConfig& cfg);
  // RoPE tables for positions [0, cap) (ropeInvFreq + ropeTables, as the inference engine).
  static void ropeTablesFor(const ModelConfig& cfg, int64_t cap, std::vector<float>* cosT, std::vector<float>* sinT);

  // A layer's saved activations (pointers into one slab). See train.cpp for who writes what.
  struct Acts {
    float *n1, *q, *k, *v, *lse, *att, *r1, *n2, *g, *u, *r2;
    float* lu[kNumLin];  // LoRA u = drop(x)·Aᵀ [N, r] per targeted linear
  };
  // One layer's activation slab (floats, without the LoRA u) for N tokens, and its binding.
  static size_t actsFloats(const Model& m, int64_t N);
  static void bindActs(const Model& m, float* base, int64_t N, Acts* a);

 private:
  struct Ctx;  // one call's batch metadata and LoRA binding

  LoraSlot& slotRef(int slot);
  void checkInstalled(int slot, const LoraSlot& s) const;
  void validate(const TrainBatch& b, Ctx& c);
  void ensureRope(int64_t positions);

  void embed(const Ctx& c, float* x);
  void layerForward(const Ctx& c, int l, const float* xin, float* xout, const Acts& a);
  void layerBackward(const Ctx& c, int l, const float* xin, const Acts& a, float* dX, bool needDx);
  void linFwd(const Ctx& c, int l, Lin which, const float* x, float* y, bool accumulate, float* lu);
  void linBwd(const Ctx& c, int l, Lin which, const float* x, const float* lu, const float* dy, float* dx,
              bool accumulate, bool needDx);
  void normFwd(const Norm& n, const float* x, float* y, int64_t rows) const;
  void normBwd(const Norm& n, const float* dy, const float* x, float* dx, int64_t rows, bool accumulate) const;
  // Final norm + chunked lm_head + cross-entropy over the labelled rows of xL [N, H]; with dX, also
  // writes dX [N, H] = d(Σ loss · gradScale / count)/dxL (zero on unlabelled rows).
  double head(const Ctx& c, const float* xL, float gradScale, float* dX);
  LossResult run(int slot, const TrainBatch& batch, const TrainOptions* train);

  Model* m_;
  std::map<int, LoraSlot> slots_;

  // RoPE tables (Llama) for positions [0, ropeCap_)
  std::vector<float> cos_, sin_;
  int64_t ropeCap_ = 0;

  // workspace, grown on demand and kept between calls
  BatchPlan plan_;
  std::vector<float> xs_;      // [(layers + 1), N, H] residual stream: layer inputs (the checkpoints)
  std::vector<float> acts_;    // 1 slab (checkpointing / eval) or `layers` slabs
  std::vector<float> dX_, dR_, dN_, dH_, dG_, dU_, hb_, dAtt_, dQ_, dK_, dV_;
  std::vector<float> hs_, hn_, dhn_, dhs_, logits_;
};

}  // namespace engine
}  // namespace qk
