// engine::CudaLoraTrainer: model/train.cpp's LoRA training on the GPU. The functions below read side by
// side with train.cpp (same names, same order of operations, same shapes); the host-side parts — slot
// init, batch plan, checks, clip factor — are train.cpp's own (LoraTrainer's static helpers).
// Shapes: N = B·T tokens, H hidden, I intermediate, qDim = nh·hd, kvDim = nkv·hd, r rank, V vocab,
// M labelled tokens.
//
// Everything runs on the CudaModel's stream, so training and the model's forward / crossEntropy are
// ordered without extra synchronisation. A call uploads its batch metadata once (one async copy),
// launches, and synchronises once at the end (lmHeadCrossEntropy already waits for the loss sum).
#include "cuda/train_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/common.cuh"

namespace qk {
namespace engine {

namespace {
[[noreturn]] void invalid(const std::string& msg) { throw EngineError("INVALID_ARGUMENT", msg); }
constexpr size_t kF = sizeof(float);
}  // namespace

// One call's batch metadata (device pointers into meta_) and LoRA binding (device pointers).
struct CudaLoraTrainer::Ctx {
  int64_t B = 0, T = 0, N = 0;
  const int32_t* tokens = nullptr;  // [N]
  const int32_t* pos = nullptr;     // [N] position (restarts per segment)
  const int32_t* start = nullptr;   // [N] row-local first position of the token's segment
  const int32_t* rows = nullptr;    // [M] labelled tokens
  const int32_t* lab = nullptr;     // [M] their labels
  int64_t count = 0;                // M
  int rank = 0;                     // slot rank (0: no LoRA activations to keep)
  std::vector<LoraBranch> br;       // [layer·kNumLin + lin]
  std::vector<char> has;
  const LoraBranch* branch(int l, Lin w) const {
    const size_t i = static_cast<size_t>(l) * kNumLin + w;
    return has.empty() || !has[i] ? nullptr : &br[i];
  }
};

float* CudaLoraTrainer::scratch(cuda::Buffer& b, size_t n) {
  if (b.bytes() < n * kF) {
    b = cuda::Buffer();  // free first: the old contents are not needed (cudaFree waits for the device)
    b = m_->alloc(std::max<size_t>(n, 1) * kF, "training activations");
  }
  return b.as<float>();
}

// =============================================================================================
// Adapter slots: init, state, install
// =============================================================================================
void CudaLoraTrainer::initLora(int slot, const LoraSpec& spec) {
  if (slot < 0 || slot >= 65536) invalid("initLora: adapter slot must be in 0..65535");
  DevSlot d;
  // The CPU trainer's slot (same validation, same A values from the same seed), then uploaded.
  d.host = LoraTrainer::newSlot(*m_->host_, spec);
  for (const LoraParam& p : d.host.mods) {
    d.offA.push_back(d.total);
    d.total += p.a.size();
    d.offB.push_back(d.total);
    d.total += p.b.size();
  }
  d.buf = m_->alloc(4 * d.total * kF, "LoRA training state");
  upload(d);
  DevSlot& dst = slots_[slot];
  dst = std::move(d);  // the device buffer moves: the pointers installed below stay valid
  install(slot, dst);
}

// The slot serves CudaModel::forward / crossEntropy with the trainer's own device A / B (borrowed:
// the DevAdapter owns no buffers), so every optimizer step is visible to inference at once. Captured
// decode graphs read A / B at replay, so they stay valid; they are dropped anyway because the
// adapter table changes (as CudaModel::setAdapter does).
void CudaLoraTrainer::install(int slot, const DevSlot& s) {
  const ModelConfig& cfg = m_->cfg_;
  CudaModel::DevAdapter ad;
  ad.active = true;
  ad.scaling = s.host.scaling;
  ad.maxRank = s.host.rank;
  ad.mods.resize(static_cast<size_t>(cfg.layers) * kNumLin);
  const float* P = s.region(kParam);
  for (size_t i = 0; i < s.host.mods.size(); ++i) {
    const LoraParam& p = s.host.mods[i];
    ad.mods[static_cast<size_t>(p.layer) * kNumLin + p.lin] = {P + s.offA[i], P + s.offB[i], s.host.rank};
  }
  ad.bytes = 4 * s.total * kF;  // A, B, grads, 2 moments (as the CPU trainer reports)
  m_->invalidateGraphs();
  if (static_cast<size_t>(slot) >= m_->adapters_.size()) m_->adapters_.resize(static_cast<size_t>(slot) + 1);
  m_->adapters_[slot] = std::move(ad);
}

CudaLoraTrainer::DevSlot& CudaLoraTrainer::slotRef(int slot) {
  auto it = slots_.find(slot);
  if (it == slots_.end())
    throw EngineError("NOT_FOUND", "no LoRA training state in slot " + std::to_string(slot) + " (call initLora first)");
  return it->second;
}

// The model's adapter in `slot` must still be ours (setAdapter / removeAdapter may have replaced it).
void CudaLoraTrainer::checkInstalled(int slot, const DevSlot& s) const {
  bool ok = m_->hasAdapter(slot);
  if (ok) {
    const CudaModel::DevAdapter& ad = m_->adapters_[slot];
    const float* P = s.region(kParam);
    for (size_t i = 0; i < s.host.mods.size(); ++i) {
      const LoraParam& p = s.host.mods[i];
      if (ad.mods[static_cast<size_t>(p.layer) * kNumLin + p.lin].a != P + s.offA[i]) ok = false;
    }
  }
  if (!ok)
    throw EngineError("FAILED_PRECONDITION", "adapter slot " + std::to_string(slot) +
                                                 " was replaced or removed after initLora; call initLora again");
}

// Host mirror → device: params, grads, m, v (one staging vector, one copy).
void CudaLoraTrainer::upload(DevSlot& s) {
  std::vector<float> h(4 * s.total);
  for (size_t i = 0; i < s.host.mods.size(); ++i) {
    const LoraParam& p = s.host.mods[i];
    const std::vector<float>* a[4] = {&p.a, &p.ga, &p.ma, &p.va};
    const std::vector<float>* b[4] = {&p.b, &p.gb, &p.mb, &p.vb};
    for (int r = 0; r < 4; ++r) {
      std::copy(a[r]->begin(), a[r]->end(), h.begin() + r * s.total + s.offA[i]);
      std::copy(b[r]->begin(), b[r]->end(), h.begin() + r * s.total + s.offB[i]);
    }
  }
  cuda::copyHostToDevice(s.buf.data(), h.data(), h.size() * kF, m_->stream_);
  cuda::synchronize(m_->stream_);
}

const LoraSlot& CudaLoraTrainer::slotState(int slot) {
  DevSlot& s = slotRef(slot);
  std::vector<float> h(4 * s.total);
  cuda::copyDeviceToHost(h.data(), s.buf.data(), h.size() * kF, m_->stream_);
  cuda::synchronize(m_->stream_);
  for (size_t i = 0; i < s.host.mods.size(); ++i) {
    LoraParam& p = s.host.mods[i];
    std::vector<float>* a[4] = {&p.a, &p.ga, &p.ma, &p.va};
    std::vector<float>* b[4] = {&p.b, &p.gb, &p.mb, &p.vb};
    for (int r = 0; r < 4; ++r) {
      std::copy_n(h.begin() + r * s.total + s.offA[i], a[r]->size(), a[r]->begin());
      std::copy_n(h.begin() + r * s.total + s.offB[i], b[r]->size(), b[r]->begin());
    }
  }
  return s.host;
}

void CudaLoraTrainer::setState(int slot, int rank, const std::map<std::string, LoraTrainer::ModuleState>& mods) {
  DevSlot& s = slotRef(slot);
  LoraTrainer::checkState(s.host, rank, mods);
  for (LoraParam& p : s.host.mods) {
    const LoraTrainer::ModuleState& m = mods.at(p.name);
    std::copy(m.a, m.a + m.na, p.a.begin());
    std::copy(m.ma, m.ma + m.na, p.ma.begin());
    std::copy(m.va, m.va + m.na, p.va.begin());
    std::copy(m.b, m.b + m.nb, p.b.begin());
    std::copy(m.mb, m.mb + m.nb, p.mb.begin());
    std::copy(m.vb, m.vb + m.nb, p.vb.begin());
    std::fill(p.ga.begin(), p.ga.end(), 0.f);
    std::fill(p.gb.begin(), p.gb.end(), 0.f);
  }
  upload(s);
}

void CudaLoraTrainer::zeroGrad(int slot) {
  DevSlot& s = slotRef(slot);
  QK_CUDA_CHECK(cudaMemsetAsync(s.region(kGrad), 0, s.total * kF, cuda::cs(m_->stream_)));
  cuda::synchronize(m_->stream_);
}

// =============================================================================================
// AdamW: the CPU's global norm (float64, modules in canonical order, A then B, 4096-element blocks
// in order), clip factor and fp32 scalars; the update is elementwise, so one launch covers the
// slot's contiguous [A_0 B_0 A_1 …] region with exactly the per-element operations of the CPU.
// =============================================================================================
double CudaLoraTrainer::adamwStep(int slot, const AdamWOptions& o) {
  DevSlot& s = slotRef(slot);
  LoraTrainer::checkAdamW(o);
  // every A and B gradient's Σg² with one synchronisation, then added in the CPU's order
  const float* G = s.region(kGrad);
  const size_t nt = 2 * s.host.mods.size();
  std::vector<const float*> ptr(nt);
  std::vector<int64_t> len(nt);
  std::vector<double> sums(nt);
  for (size_t i = 0; i < s.host.mods.size(); ++i) {
    ptr[2 * i] = G + s.offA[i];
    len[2 * i] = static_cast<int64_t>(s.host.mods[i].a.size());
    ptr[2 * i + 1] = G + s.offB[i];
    len[2 * i + 1] = static_cast<int64_t>(s.host.mods[i].b.size());
  }
  cuda::sumSquaresMany(ptr.data(), len.data(), static_cast<int>(nt), sums.data(), ws_, m_->stream_);
  double sq = 0.0;
  for (double x : sums) sq += x;
  const double norm = std::sqrt(sq);
  const float clip = LoraTrainer::clipCoef(o, norm);
  const AdamWParams ap = o.params();
  cuda::adamwUpdate(s.region(kParam), s.region(kGrad), s.region(kM), s.region(kV), static_cast<int64_t>(s.total), ap,
                    clip, m_->stream_);  // also zeroes the gradients
  cuda::synchronize(m_->stream_);
  return norm;
}

// =============================================================================================
// Batch metadata, tables
// =============================================================================================
void CudaLoraTrainer::prepare(const TrainBatch& b, Ctx& c) {
  LoraTrainer::planBatch(*m_->host_, b, &plan_);  // validates (the CPU trainer's messages)
  c.B = b.B;
  c.T = b.T;
  c.N = b.B * b.T;
  const int64_t N = c.N, M = static_cast<int64_t>(plan_.rows.size());
  c.count = M;
  if (m_->cfg_.arch == Arch::Llama) ensureRope(static_cast<int64_t>(plan_.maxPos) + 1);
  // device block: tokens [N] | pos [N] | start [N] | rows [M] | lab [M]
  metaHost_.resize(static_cast<size_t>(3 * N + 2 * M));
  int32_t* h = metaHost_.data();
  std::copy_n(b.tokens, N, h);
  std::copy(plan_.pos.begin(), plan_.pos.end(), h + N);
  std::copy(plan_.start.begin(), plan_.start.end(), h + 2 * N);
  std::copy(plan_.rows.begin(), plan_.rows.end(), h + 3 * N);
  std::copy(plan_.lab.begin(), plan_.lab.end(), h + 3 * N + M);
  const size_t bytes = metaHost_.size() * sizeof(int32_t);
  if (meta_.bytes() < bytes) {
    meta_ = cuda::Buffer();
    meta_ = m_->alloc(bytes, "training batch metadata");
  }
  // pageable source: staged before the call returns, ordered on the stream before the kernels
  cuda::copyHostToDevice(meta_.data(), h, bytes, m_->stream_);
  const int32_t* d = meta_.as<int32_t>();
  c.tokens = d;
  c.pos = d + N;
  c.start = d + 2 * N;
  c.rows = d + 3 * N;
  c.lab = d + 3 * N + M;
}

// The CPU trainer's tables (LoraTrainer::ropeTablesFor), uploaded: the rotation is bit-identical.
void CudaLoraTrainer::ensureRope(int64_t positions) {
  if (positions <= ropeCap_) return;
  const int64_t cap = std::max<int64_t>(positions, 2 * ropeCap_);
  std::vector<float> c, s;
  LoraTrainer::ropeTablesFor(m_->cfg_, cap, &c, &s);
  cos_ = cuda::Buffer();
  sin_ = cuda::Buffer();
  cos_ = m_->alloc(c.size() * kF, "RoPE tables");
  sin_ = m_->alloc(s.size() * kF, "RoPE tables");
  cuda::copyHostToDevice(cos_.data(), c.data(), c.size() * kF, m_->stream_);
  cuda::copyHostToDevice(sin_.data(), s.data(), s.size() * kF, m_->stream_);
  cuda::synchronize(m_->stream_);
  ropeCap_ = cap;
}

// =============================================================================================
// Forward / backward building blocks
// =============================================================================================
void CudaLoraTrainer::normFwd(const float* w, const float* b, const float* x, float* y, int64_t rows) {
  const ModelConfig& cfg = m_->cfg_;
  if (cfg.arch == Arch::Llama) cuda::rmsNormForward(x, w, y, rows, cfg.hidden, cfg.normEps, m_->stream_);
  else cuda::layerNormForward(x, w, b, y, rows, cfg.hidden, cfg.normEps, m_->stream_);
}

void CudaLoraTrainer::normBwd(const float* w, const float* dy, const float* x, float* dx, int64_t rows,
                              bool accumulate) {
  const ModelConfig& cfg = m_->cfg_;
  if (cfg.arch == Arch::Llama)
    cuda::rmsNormBackward(dy, x, w, dx, rows, cfg.hidden, cfg.normEps, accumulate, m_->stream_);
  else cuda::layerNormBackward(dy, x, w, dx, rows, cfg.hidden, cfg.normEps, accumulate, m_->stream_);
}

// y[N, out] (+)= x·Wᵀ + b + LoRA (dropout on the branch input); lu receives u = drop(x)·Aᵀ
void CudaLoraTrainer::linFwd(const Ctx& c, int l, Lin which, const float* x, float* y, bool accumulate, float* lu) {
  const auto& L = m_->layers_[l].lin[which];
  const LoraBranch* br = c.branch(l, which);
  cuda::loraLinearForward(x, c.N, L.w, L.bias, br, y, accumulate, br ? lu : nullptr, ws_, m_->stream_);
}

// dx (+)= dy·W + LoRA input gradient; dA, dB accumulated
void CudaLoraTrainer::linBwd(const Ctx& c, int l, Lin which, const float* x, const float* lu, const float* dy,
                             float* dx, bool accumulate, bool needDx) {
  const auto& L = m_->layers_[l].lin[which];
  cuda::loraLinearBackward(x, lu, dy, c.N, L.w, c.branch(l, which), dx, accumulate, needDx, ws_, m_->stream_);
}

// x[N, H] = embed[id] (+ OPT learned position row pos + 2)
void CudaLoraTrainer::embed(const Ctx& c, float* x) {
  cuda::embeddingForward(m_->embed_, c.tokens, 0, c.N, x, false, m_->stream_);
  if (m_->cfg_.arch == Arch::Opt) cuda::embeddingForward(m_->positions_, c.pos, 2, c.N, x, true, m_->stream_);
}

// One decoder layer, saving what its backward needs into `a` (xout = the next layer's input).
//   pre-LN (Llama, OPT):  n1 = norm1(x); q,k,v = lin(n1); att = attn(q,k,v); r1 = x + o(att)
//                         n2 = norm2(r1); h = act(gate(n2))·up(n2) | act(fc1(n2)); xout = r1 + down(h)
//   post-LN (OPT):        q,k,v = lin(x); r1 = x + o(att); n2 = LN1(r1); r2 = n2 + fc2(act(fc1(n2)));
//                         xout = LN2(r2)
void CudaLoraTrainer::layerForward(const Ctx& c, int l, const float* xin, float* xout, const LoraTrainer::Acts& a) {
  const ModelConfig& cfg = m_->cfg_;
  const auto& L = m_->layers_[l];
  const bool llama = cfg.arch == Arch::Llama, preLN = llama || cfg.layerNormBefore;
  const int64_t N = c.N, H = cfg.hidden, I = cfg.intermediate, hd = cfg.headDim;
  const cuda::Stream st = m_->stream_;

  // ---- attention block ----
  const float* ain = xin;
  if (preLN) {
    normFwd(L.norm1.w, L.norm1.b, xin, a.n1, N);  // n1 [N, H]
    ain = a.n1;
  }
  linFwd(c, l, LQ, ain, a.q, false, a.lu[LQ]);  // q [N, qDim]
  linFwd(c, l, LK, ain, a.k, false, a.lu[LK]);  // k [N, kvDim]
  linFwd(c, l, LV, ain, a.v, false, a.lu[LV]);  // v [N, kvDim]
  const AttentionShape as = LoraTrainer::attentionShape(cfg);
  if (llama) {
    cuda::ropeForward(a.q, N, cfg.heads, cfg.headDim, c.pos, cos_.as<float>(), sin_.as<float>(), st);
    cuda::ropeForward(a.k, N, cfg.kvHeads, cfg.headDim, c.pos, cos_.as<float>(), sin_.as<float>(), st);
  } else {
    cuda::scaleInPlace(a.q, 1.f / std::sqrt(static_cast<float>(hd)), N * m_->qDim_, st);  // OPT: q_proj(x)·hd^-½
  }
  // flash attention where it applies (Auto), SIMT when the model was made with QLORA_CUDA_FLASH=0
  const auto kernel = m_->flashAttention_ ? cuda::AttentionKernel::Auto : cuda::AttentionKernel::Simt;
  cuda::attentionTrainForward(as, c.B, c.T, c.start, a.q, a.k, a.v, a.att, a.lse, st, kernel);  // att [N, qDim], lse [N, nh]
  cuda::copyDeviceToDevice(a.r1, xin, kF * N * H, st);
  linFwd(c, l, LO, a.att, a.r1, true, a.lu[LO]);  // r1 = x + o(att)
  const auto& nrm = preLN ? L.norm2 : L.norm1;
  normFwd(nrm.w, nrm.b, a.r1, a.n2, N);  // n2: the MLP input

  // ---- MLP block ----
  float* h = scratch(hb_, static_cast<size_t>(N * I));  // [N, I], not kept (recomputed in backward)
  if (llama) {
    linFwd(c, l, LGate, a.n2, a.g, false, a.lu[LGate]);             // g [N, I]
    linFwd(c, l, LUp, a.n2, a.u, false, a.lu[LUp]);                 // u [N, I]
    cuda::gatedActivationForward(cfg.act, a.g, a.u, h, N * I, st);  // h = act(g)·u
  } else {
    linFwd(c, l, LUp, a.n2, a.g, false, a.lu[LUp]);  // g = fc1(n2) [N, I]
    cuda::activationForward(cfg.act, a.g, h, N * I, st);  // h = act(g)
  }
  float* r2 = preLN ? xout : a.r2;
  cuda::copyDeviceToDevice(r2, preLN ? a.r1 : a.n2, kF * N * H, st);
  linFwd(c, l, LDown, h, r2, true, a.lu[LDown]);  // r2 = residual + down(h)
  if (!preLN) normFwd(L.norm2.w, L.norm2.b, a.r2, xout, N);  // xout = LN2(r2)
}

// Backward of layerForward: dX [N, H] holds d(xout) on entry and d(xin) on return (when needDx).
void CudaLoraTrainer::layerBackward(const Ctx& c, int l, const float* xin, const LoraTrainer::Acts& a, float* dX,
                                    bool needDx) {
  const ModelConfig& cfg = m_->cfg_;
  const auto& L = m_->layers_[l];
  const bool llama = cfg.arch == Arch::Llama, preLN = llama || cfg.layerNormBefore;
  const int64_t N = c.N, H = cfg.hidden, I = cfg.intermediate, hd = cfg.headDim;
  const int64_t qDim = m_->qDim_, kvDim = m_->kvDim_;
  const cuda::Stream st = m_->stream_;
  float* h = scratch(hb_, static_cast<size_t>(N * I));
  float* dN = scratch(dN_, static_cast<size_t>(N * H));
  float* dH = scratch(dH_, static_cast<size_t>(N * I));

  // ---- MLP block ----
  const float* dr2 = dX;  // d(r2)
  float* dR = nullptr;
  if (!preLN) {
    dR = scratch(dR_, static_cast<size_t>(N * H));
    normBwd(L.norm2.w, dX, a.r2, dR, N, false);  // xout = LN2(r2)
    dr2 = dR;
  }
  if (llama) cuda::gatedActivationForward(cfg.act, a.g, a.u, h, N * I, st);  // recompute h (the down input)
  else cuda::activationForward(cfg.act, a.g, h, N * I, st);
  linBwd(c, l, LDown, h, a.lu[LDown], dr2, dH, false, true);  // dh [N, I]
  if (llama) {
    float* dG = scratch(dG_, static_cast<size_t>(N * I));
    float* dU = scratch(dU_, static_cast<size_t>(N * I));
    cuda::gatedActivationBackward(cfg.act, a.g, a.u, dH, dG, dU, N * I, st);  // dg, du
    linBwd(c, l, LGate, a.n2, a.lu[LGate], dG, dN, false, true);
    linBwd(c, l, LUp, a.n2, a.lu[LUp], dU, dN, true, true);  // dN = d(n2) through the MLP
  } else {
    cuda::activationBackward(cfg.act, a.g, dH, dH, N * I, st);  // in place: d(fc1 output)
    linBwd(c, l, LUp, a.n2, a.lu[LUp], dH, dN, false, true);
  }
  if (preLN) {
    normBwd(L.norm2.w, dN, a.r1, dX, N, true);  // d(r1) = d(r2) + norm2'(dN)
  } else {
    cuda::addInPlace(dN, dR, N * H, st);         // d(n2) = d(r2) (residual) + MLP
    normBwd(L.norm1.w, dN, a.r1, dX, N, false);  // d(r1) = LN1'(d(n2))
  }

  // ---- attention block: dX = d(r1) = d(o_proj output) ----
  float* dAtt = scratch(dAtt_, static_cast<size_t>(N * qDim));
  float* dQ = scratch(dQ_, static_cast<size_t>(N * qDim));
  float* dK = scratch(dK_, static_cast<size_t>(N * kvDim));
  float* dV = scratch(dV_, static_cast<size_t>(N * kvDim));
  linBwd(c, l, LO, a.att, a.lu[LO], dX, dAtt, false, true);
  const AttentionShape as = LoraTrainer::attentionShape(cfg);
  cuda::attentionTrainBackward(as, c.B, c.T, c.start, a.q, a.k, a.v, a.att, a.lse, dAtt, dQ, dK, dV, ws_, st,
                               m_->flashAttention_ ? cuda::AttentionKernel::Auto : cuda::AttentionKernel::Simt);
  if (llama) {
    cuda::ropeBackward(dQ, N, cfg.heads, cfg.headDim, c.pos, cos_.as<float>(), sin_.as<float>(), st);
    cuda::ropeBackward(dK, N, cfg.kvHeads, cfg.headDim, c.pos, cos_.as<float>(), sin_.as<float>(), st);
  } else {
    cuda::scaleInPlace(dQ, 1.f / std::sqrt(static_cast<float>(hd)), N * qDim, st);
  }
  // pre-LN: the projections read n1 → dN = d(n1), then d(x) = d(r1) + norm1'(dN);
  // post-LN: they read x itself → accumulate straight into dX = d(r1).
  const float* ain = preLN ? a.n1 : xin;
  float* dAin = preLN ? dN : dX;
  linBwd(c, l, LQ, ain, a.lu[LQ], dQ, dAin, !preLN, needDx);
  linBwd(c, l, LK, ain, a.lu[LK], dK, dAin, true, needDx);
  linBwd(c, l, LV, ain, a.lu[LV], dV, dAin, true, needDx);
  if (preLN && needDx) normBwd(L.norm1.w, dN, xin, dX, N, true);
}

// Final norm, chunked lm_head + softmax + cross-entropy over the labelled rows (the CPU's chunking:
// lmHeadChunkRows), and its backward: dX [N, H] = d(Σ loss · gradScale)/dxL (zero on unlabelled rows).
double CudaLoraTrainer::head(const Ctx& c, const float* xL, float gradScale, float* dX) {
  const ModelConfig& cfg = m_->cfg_;
  const int64_t H = cfg.hidden, M = c.count;
  const cuda::Stream st = m_->stream_;
  float* hs = scratch(hs_, static_cast<size_t>(M * H));  // labelled rows of xL [M, H]
  cuda::gatherRows(xL, c.rows, M, H, hs, st);
  const bool hasNorm = m_->finalNorm_.w != nullptr;  // OPT post-LN has none
  float* hn = hs;
  if (hasNorm) {
    hn = scratch(hn_, static_cast<size_t>(M * H));
    normFwd(m_->finalNorm_.w, m_->finalNorm_.b, hs, hn, M);
  }
  float* dhn = dX ? scratch(dhn_, static_cast<size_t>(M * H)) : nullptr;
  const double loss = cuda::lmHeadCrossEntropy(hn, M, m_->lmHead_, c.lab, lmHeadChunkRows(M, cfg.vocab), gradScale,
                                               dhn, ws_, st);  // synchronises
  if (dX) {
    float* dhs = dhn;
    if (hasNorm) {
      dhs = scratch(dhs_, static_cast<size_t>(M * H));
      normBwd(m_->finalNorm_.w, dhn, hs, dhs, M, false);
    }
    QK_CUDA_CHECK(cudaMemsetAsync(dX, 0, kF * c.N * H, cuda::cs(st)));
    cuda::scatterRows(dhs, c.rows, M, H, dX, st);
  }
  return loss;
}

// =============================================================================================
// Steps
// =============================================================================================
LossResult CudaLoraTrainer::run(int slot, const TrainBatch& batch, const TrainOptions* train) {
  const ModelConfig& cfg = m_->cfg_;
  Ctx c;
  prepare(batch, c);

  // ---- LoRA binding (device pointers): training uses the slot's own state and gradients;
  // evaluation uses whatever adapter the model has in the slot ----
  const size_t nMods = static_cast<size_t>(cfg.layers) * kNumLin;
  if (train) {
    DevSlot& s = slotRef(slot);
    checkInstalled(slot, s);
    c.rank = s.host.rank;
    c.br.resize(nMods);
    c.has.assign(nMods, 0);
    for (size_t j = 0; j < s.host.mods.size(); ++j) {
      const LoraParam& p = s.host.mods[j];
      const size_t i = static_cast<size_t>(p.layer) * kNumLin + p.lin;
      LoraBranch& b = c.br[i];
      b.a = s.region(kParam) + s.offA[j];
      b.b = s.region(kParam) + s.offB[j];
      b.ga = s.region(kGrad) + s.offA[j];
      b.gb = s.region(kGrad) + s.offB[j];
      b.rank = s.host.rank;
      b.scaling = s.host.scaling;
      b.dropout = s.host.dropout;
      b.key = dropoutKey(train->dropoutSeed, i);  // the CPU's key: the same masks
      c.has[i] = 1;
    }
  } else if (slot != -1) {
    m_->checkAdapter(slot);
    const CudaModel::DevAdapter& ad = m_->adapters_[slot];
    c.br.resize(nMods);
    c.has.assign(nMods, 0);
    for (size_t i = 0; i < nMods; ++i) {
      const auto& lm = ad.mods[i];
      if (!lm.a) continue;
      c.br[i].a = lm.a;
      c.br[i].b = lm.b;
      c.br[i].rank = lm.rank;
      c.br[i].scaling = ad.scaling;
      c.has[i] = 1;
    }
  }
  LossResult res;
  res.tokens = c.count;
  if (c.count == 0) {  // nothing to predict: loss 0, no gradient
    cuda::synchronize(m_->stream_);
    return res;
  }

  // ---- workspace (device) ----
  const int L = cfg.layers;
  const int64_t N = c.N, H = cfg.hidden;
  const bool ckpt = !train || train->checkpointing;
  const size_t slabActs = LoraTrainer::actsFloats(*m_->host_, N), slabLora = static_cast<size_t>(kNumLin) * N * c.rank;
  const size_t slab = slabActs + slabLora;
  const int slabs = ckpt ? 1 : L;
  float* xs = scratch(xs_, static_cast<size_t>(L + 1) * N * H);  // [(L+1), N, H] layer inputs
  float* acts = scratch(acts_, slab * slabs);
  auto actsOf = [&](int l) {
    LoraTrainer::Acts a;
    float* base = acts + (ckpt ? 0 : static_cast<size_t>(l) * slab);
    LoraTrainer::bindActs(*m_->host_, base, N, &a);
    if (train)
      for (int w = 0; w < kNumLin; ++w) a.lu[w] = base + slabActs + static_cast<size_t>(w) * N * c.rank;
    return a;
  };

  // ---- forward: xs[l] = input of layer l (the checkpoints), xs[L] = the last hidden state ----
  embed(c, xs);
  for (int l = 0; l < L; ++l) layerForward(c, l, xs + l * N * H, xs + (l + 1) * N * H, actsOf(l));
  const float* xL = xs + static_cast<int64_t>(L) * N * H;
  if (!train) {
    res.loss = head(c, xL, 0.f, nullptr) / static_cast<double>(c.count);
    return res;
  }

  // ---- loss and d(xL): gradient of gradScale · mean loss ----
  float* dX = scratch(dX_, static_cast<size_t>(N * H));
  const float g = static_cast<float>(static_cast<double>(train->gradScale) / static_cast<double>(c.count));
  res.loss = head(c, xL, g, dX) / static_cast<double>(c.count);

  // ---- backward, last layer first; with checkpointing, recompute each layer from its input
  // (the last layer's activations are still in the slab from the forward) ----
  for (int l = L - 1; l >= 0; --l) {
    const LoraTrainer::Acts a = actsOf(l);
    if (ckpt && l != L - 1) layerForward(c, l, xs + l * N * H, xs + (l + 1) * N * H, a);
    layerBackward(c, l, xs + l * N * H, a, dX, l > 0);  // layer 0's input gradient is not needed
  }
  cuda::synchronize(m_->stream_);  // execution errors surface in this call; the gradients are complete
  return res;
}

LossResult CudaLoraTrainer::trainForwardBackward(int slot, const TrainBatch& batch, const TrainOptions& opts) {
  if (!std::isfinite(opts.gradScale)) invalid("trainForwardBackward: gradScale must be finite");
  return run(slot, batch, &opts);
}

LossResult CudaLoraTrainer::evalLoss(int slot, const TrainBatch& batch) {
  if (slot < -1) invalid("evalLoss: slot must be >= 0, or -1 for the base model");
  return run(slot, batch, nullptr);
}

}  // namespace engine
}  // namespace qk
