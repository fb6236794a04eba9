// LoRA training on the GPU: engine::LoraTrainer's API and semantics (model/train.h) over a CudaModel's
// device weights. A plain C++ header (no CUDA headers), so the N-API binding (csrc/napi/train_napi.cpp,
// compiled by g++) creates it for a NativeModel on device "cuda". Only compiled and linked when the
// build found nvcc (QLORA_WITH_CUDA). Design: docs/cuda.md §7.
//
// What is shared with the CPU trainer (so both give the same slot, batch plan and errors): the slot
// init (LoraTrainer::newSlot: the same A values, generated on the host and uploaded), the batch
// validation and metadata (planBatch), the state checks, AdamW's argument checks, clip factor and fp32
// scalars, the dropout keys and masks, the activation slab layout. What differs: the frozen-base
// GEMMs run on bf16 tensor cores (x and W rounded to bf16, fp32 accumulation), so losses and
// gradients match the CPU within the bf16 bound, not bit for bit.
//
// Memory (device): per slot one buffer [A | B] + [dA | dB] + [mA | mB] + [vA | vB] (fp32 master
// weights, gradients and moments); per call the residual stream xs [(L+1), N, H], one activation slab
// (checkpointing) or L, the backward scratch and the loss head's [chunk, V] logits. The base stays as
// the CudaModel uploaded it (NF4 packed). The slot's A / B are installed in the CudaModel's adapter
// table as borrowed pointers, so CudaModel::forward / crossEntropy serve the trained weights directly.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cuda/model_cuda.h"
#include "cuda/qk_cuda.h"
#include "model/train.h"

namespace qk {
namespace engine {

class CudaLoraTrainer {
 public:
  explicit CudaLoraTrainer(CudaModel* m) : m_(m) {}
  CudaLoraTrainer(const CudaLoraTrainer&) = delete;
  CudaLoraTrainer& operator=(const CudaLoraTrainer&) = delete;

  CudaModel* model() const { return m_; }

  // As LoraTrainer (model/train.h). initLora's A values are the CPU trainer's for the same seed.
  void initLora(int slot, const LoraSpec& spec);
  LossResult trainForwardBackward(int slot, const TrainBatch& batch, const TrainOptions& opts);
  LossResult evalLoss(int slot, const TrainBatch& batch);
  double adamwStep(int slot, const AdamWOptions& o);
  void zeroGrad(int slot);
  // Downloads A, B, the gradients and the moments into the slot's host mirror and returns it.
  const LoraSlot& slotState(int slot);
  void setState(int slot, int rank, const std::map<std::string, LoraTrainer::ModuleState>& mods);

 private:
  // One slot: the host mirror (names, shapes; vectors filled by slotState) and the device state.
  // Device layout: four regions of `total` floats — params, grads, m, v — each [A_0 B_0 A_1 B_1 …]
  // with the same per-module offsets, so zeroGrad is one memset and a module's a/ga/ma/va are
  // region + offA.
  struct DevSlot {
    LoraSlot host;
    std::vector<size_t> offA, offB;  // per module (canonical order)
    size_t total = 0;
    cuda::Buffer buf;  // [4 · total] floats
    float* region(int r) const { return buf.as<float>() + static_cast<size_t>(r) * total; }
  };
  enum Region { kParam = 0, kGrad = 1, kM = 2, kV = 3 };
  struct Ctx;

  DevSlot& slotRef(int slot);
  void checkInstalled(int slot, const DevSlot& s) const;
  void install(int slot, const DevSlot& s);
  void upload(DevSlot& s);  // host mirror → device (all four regions)
  void prepare(const TrainBatch& b, Ctx& c);
  void ensureRope(int64_t positions);

  void embed(const Ctx& c, float* x);
  void layerForward(const Ctx& c, int l, const float* xin, float* xout, const LoraTrainer::Acts& a);
  void layerBackward(const Ctx& c, int l, const float* xin, const LoraTrainer::Acts& a, float* dX, bool needDx);
  void linFwd(const Ctx& c, int l, Lin which, const float* x, float* y, bool accumulate, float* lu);
  void linBwd(const Ctx& c, int l, Lin which, const float* x, const float* lu, const float* dy, float* dx,
              bool accumulate, bool needDx);
  void normFwd(const float* w, const float* b, const float* x, float* y, int64_t rows);
  void normBwd(const float* w, const float* dy, const float* x, float* dx, int64_t rows, bool accumulate);
  double head(const Ctx& c, const float* xL, float gradScale, float* dX);
  LossResult run(int slot, const TrainBatch& batch, const TrainOptions* train);
  // device scratch buffer `b` holding at least n floats (grown, never shrunk; contents not kept)
  float* scratch(cuda::Buffer& b, size_t n);

  CudaModel* m_;
  std::map<int, DevSlot> slots_;

  // RoPE tables (Llama) for positions [0, ropeCap_), the CPU trainer's values, on the device
  cuda::Buffer cos_, sin_;
  int64_t ropeCap_ = 0;

  // per call: batch metadata (host plan, device copy [tokens | pos | start | rows | lab], int32)
  LoraTrainer::BatchPlan plan_;
  std::vector<int32_t> metaHost_;
  cuda::Buffer meta_;
  // workspace, grown on demand and kept between calls
  cuda::Buffer xs_, acts_, dX_, dR_, dN_, dH_, dG_, dU_, hb_, dAtt_, dQ_, dK_, dV_, hs_, hn_, dhn_, dhs_;
  cuda::Workspace ws_;
};

}  // namespace engine
}  // namespace qk
