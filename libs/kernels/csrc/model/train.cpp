// LoRA training over the frozen engine::Model: the training forward (activations saved, or only
// each layer's input with gradient checkpointing), the backward through every op, AdamW and the
// adapter state. Shapes: N = B·T tokens, H hidden, I intermediate, qDim = nh·hd, kvDim = nkv·hd,
// r rank, V vocab. Design: docs/engine-training.md.
#include "model/train.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "cpu/adamw.h"
#include "cpu/sampling.h"
#include "cpu/thread_pool.h"

namespace qk {
namespace engine {

namespace {
[[noreturn]] void invalid(const std::string& msg) { throw EngineError("INVALID_ARGUMENT", msg); }
template <class V>
float* grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
}  // namespace

// One call's batch metadata and LoRA binding.
struct LoraTrainer::Ctx {
  int64_t B = 0, T = 0, N = 0;
  const int32_t* tokens = nullptr;
  const int32_t* pos = nullptr;    // [N] position (restarts per segment)
  const int32_t* start = nullptr;  // [N] row-local first position of the token's segment
  int64_t count = 0;               // labelled positions
  int rank = 0;                    // slot rank (0: no LoRA activations to keep)
  std::vector<LoraBranch> br;      // [layer·kNumLin + lin]
  std::vector<char> has;
  const LoraBranch* branch(int l, Lin w) const {
    const size_t i = static_cast<size_t>(l) * kNumLin + w;
    return has.empty() || !has[i] ? nullptr : &br[i];
  }
};

// =============================================================================================
// Adapter slots: init, state, install
// =============================================================================================
LoraSlot LoraTrainer::newSlot(const Model& m, const LoraSpec& spec) {
  const ModelConfig& cfg = m.cfg_;
  if (spec.rank < 1 || spec.rank > 65536) invalid("initLora: rank must be a positive integer");
  if (!std::isfinite(spec.alpha)) invalid("initLora: alpha must be finite");
  if (!(spec.dropout >= 0 && spec.dropout < 1)) invalid("initLora: dropout must be in [0, 1)");
  if (spec.targets.empty()) invalid("initLora: no target modules");

  LoraSlot s;
  s.rank = spec.rank;
  s.scaling = static_cast<float>(spec.useRslora ? spec.alpha / std::sqrt(static_cast<double>(spec.rank))
                                                : spec.alpha / spec.rank);
  s.dropout = static_cast<float>(spec.dropout);
  std::set<std::string> seen;
  for (const std::string& name : spec.targets) {
    if (!seen.insert(name).second) invalid("initLora: target module " + name + " is listed twice");
    LoraParam p;
    p.name = name;
    m.resolveModule(name, &p.layer, &p.lin, &p.in, &p.out);
    s.mods.push_back(std::move(p));
  }
  std::sort(s.mods.begin(), s.mods.end(), [](const LoraParam& x, const LoraParam& y) {
    return x.layer != y.layer ? x.layer < y.layer : x.lin < y.lin;
  });
  // A ~ U(−1/√in, 1/√in) (torch kaiming_uniform_(a=√5): gain·√(3/fan_in) = 1/√fan_in), one
  // xoshiro256** stream for the slot, modules in canonical order, elements row-major; B = 0.
  uint64_t rng[4];
  rngSeed(spec.seed, rng);
  s.index.assign(static_cast<size_t>(cfg.layers) * kNumLin, -1);
  for (size_t i = 0; i < s.mods.size(); ++i) {
    LoraParam& p = s.mods[i];
    const size_t na = static_cast<size_t>(spec.rank) * p.in, nb = static_cast<size_t>(p.out) * spec.rank;
    const double bound = 1.0 / std::sqrt(static_cast<double>(p.in));
    p.a.resize(na);
    for (size_t j = 0; j < na; ++j) p.a[j] = static_cast<float>(-bound + 2.0 * bound * rngUniform(rng));
    p.b.assign(nb, 0.f);
    p.ga.assign(na, 0.f);
    p.ma.assign(na, 0.f);
    p.va.assign(na, 0.f);
    p.gb.assign(nb, 0.f);
    p.mb.assign(nb, 0.f);
    p.vb.assign(nb, 0.f);
    s.index[static_cast<size_t>(p.layer) * kNumLin + p.lin] = static_cast<int>(i);
  }
  return s;
}

void LoraTrainer::initLora(int slot, const LoraSpec& spec) {
  const ModelConfig& cfg = m_->cfg_;
  if (slot < 0 || slot >= 65536) invalid("initLora: adapter slot must be in 0..65535");
  LoraSlot s = newSlot(*m_, spec);
  LoraSlot& dst = slots_[slot];
  dst = std::move(s);  // vector buffers move: the pointers installed below stay valid

  // Install in the model: the slot serves Model::forward with these very buffers.
  Adapter ad;
  ad.scaling = dst.scaling;
  ad.mods.resize(static_cast<size_t>(cfg.layers) * kNumLin);
  for (const LoraParam& p : dst.mods) {
    LoraModule& lm = ad.mods[static_cast<size_t>(p.layer) * kNumLin + p.lin];
    lm.a = p.a.data();
    lm.b = p.b.data();
    lm.rank = dst.rank;
    ad.bytes += 4 * (p.a.size() + p.b.size()) * sizeof(float);  // A, B, grads, 2 moments
  }
  m_->setAdapter(slot, std::move(ad));
}

LoraSlot& LoraTrainer::slotRef(int slot) {
  auto it = slots_.find(slot);
  if (it == slots_.end())
    throw EngineError("NOT_FOUND", "no LoRA training state in slot " + std::to_string(slot) + " (call initLora first)");
  return it->second;
}

const LoraSlot& LoraTrainer::slotState(int slot) const {
  auto it = slots_.find(slot);
  if (it == slots_.end())
    throw EngineError("NOT_FOUND", "no LoRA training state in slot " + std::to_string(slot) + " (call initLora first)");
  return it->second;
}

// The model's adapter in `slot` must still be ours (setAdapter / removeAdapter may have replaced it).
void LoraTrainer::checkInstalled(int slot, const LoraSlot& s) const {
  bool ok = m_->hasAdapter(slot);
  if (ok) {
    const Adapter& ad = m_->adapters_[slot];
    for (const LoraParam& p : s.mods)
      if (ad.mods[static_cast<size_t>(p.layer) * kNumLin + p.lin].a != p.a.data()) ok = false;
  }
  if (!ok)
    throw EngineError("FAILED_PRECONDITION", "adapter slot " + std::to_string(slot) +
                                                 " was replaced or removed after initLora; call initLora again");
}

void LoraTrainer::zeroGrad(int slot) {
  LoraSlot& s = slotRef(slot);
  for (LoraParam& p : s.mods) {
    std::fill(p.ga.begin(), p.ga.end(), 0.f);
    std::fill(p.gb.begin(), p.gb.end(), 0.f);
  }
}

void LoraTrainer::checkState(const LoraSlot& s, int rank, const std::map<std::string, ModuleState>& mods) {
  if (rank != s.rank)
    invalid("setLoraState: rank " + std::to_string(rank) + " differs from the slot's rank " + std::to_string(s.rank));
  if (mods.size() != s.mods.size())
    invalid("setLoraState: the state has " + std::to_string(mods.size()) + " modules, the slot " +
            std::to_string(s.mods.size()));
  for (const LoraParam& p : s.mods) {
    auto it = mods.find(p.name);
    if (it == mods.end()) invalid("setLoraState: module " + p.name + " is missing from the state");
    if (it->second.na != p.a.size() || it->second.nb != p.b.size())
      invalid("setLoraState: module " + p.name + " has the wrong sizes (a: " + std::to_string(p.a.size()) +
              " floats, b: " + std::to_string(p.b.size()) + ")");
  }
}

void LoraTrainer::setState(int slot, int rank, const std::map<std::string, ModuleState>& mods) {
  LoraSlot& s = slotRef(slot);
  checkState(s, rank, mods);
  for (LoraParam& p : s.mods) {
    const ModuleState& m = mods.at(p.name);
    std::copy(m.a, m.a + m.na, p.a.begin());
    std::copy(m.ma, m.ma + m.na, p.ma.begin());
    std::copy(m.va, m.va + m.na, p.va.begin());
    std::copy(m.b, m.b + m.nb, p.b.begin());
    std::copy(m.mb, m.mb + m.nb, p.mb.begin());
    std::copy(m.vb, m.vb + m.nb, p.vb.begin());
    std::fill(p.ga.begin(), p.ga.end(), 0.f);
    std::fill(p.gb.begin(), p.gb.end(), 0.f);
  }
}

// =============================================================================================
// AdamW
// =============================================================================================
void LoraTrainer::checkAdamW(const AdamWOptions& o) {
  if (!(o.lr >= 0) || !std::isfinite(o.lr)) invalid("adamwStep: lr must be finite and >= 0");
  if (!(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1)) invalid("adamwStep: betas must be in [0, 1)");
  if (!(o.eps >= 0) || !(o.weightDecay >= 0) || !(o.maxGradNorm >= 0))
    invalid("adamwStep: eps, weightDecay and maxGradNorm must be >= 0");
  if (o.step < 1) invalid("adamwStep: step must be >= 1 (1-based)");
}

float LoraTrainer::clipCoef(const AdamWOptions& o, double norm) {
  float clip = 1.f;  // torch clip_grad_norm_: coef = max / (norm + 1e-6), applied when < 1
  if (o.maxGradNorm > 0) {
    const double coef = o.maxGradNorm / (norm + 1e-6);
    if (coef < 1.0) clip = static_cast<float>(coef);
  }
  return clip;
}

double LoraTrainer::adamwStep(int slot, const AdamWOptions& o) {
  LoraSlot& s = slotRef(slot);
  checkAdamW(o);
  // global L2 norm over every A and B gradient, modules in canonical order (fixed order)
  double sq = 0.0;
  for (const LoraParam& p : s.mods) {
    sq += sumSquares(p.ga.data(), static_cast<int64_t>(p.ga.size()));
    sq += sumSquares(p.gb.data(), static_cast<int64_t>(p.gb.size()));
  }
  const double norm = std::sqrt(sq);
  const float clip = clipCoef(o, norm);
  const AdamWParams ap = o.params();
  for (LoraParam& p : s.mods) {
    adamwUpdate(p.a.data(), p.ga.data(), p.ma.data(), p.va.data(), static_cast<int64_t>(p.a.size()), ap, clip);
    adamwUpdate(p.b.data(), p.gb.data(), p.mb.data(), p.vb.data(), static_cast<int64_t>(p.b.size()), ap, clip);
  }
  return norm;
}

// =============================================================================================
// Batch metadata, tables, workspace
// =============================================================================================
void LoraTrainer::planBatch(const Model& m, const TrainBatch& b, BatchPlan* p) {
  const ModelConfig& cfg = m.cfg_;
  if (b.B < 1 || b.T < 1) invalid("batch: batchSize and seqLen must be >= 1");
  if (b.B * b.T > (int64_t(1) << 30)) invalid("batch: too many tokens");
  const int64_t N = b.B * b.T;
  p->pos.resize(N);
  p->start.resize(N);
  p->rows.clear();
  p->lab.clear();
  int32_t maxPos = 0;
  for (int64_t r = 0; r < b.B; ++r) {
    int64_t run = 0;  // row-local start of the current segment
    for (int64_t t = 0; t < b.T; ++t) {
      const int64_t i = r * b.T + t;
      if (b.tokens[i] < 0 || b.tokens[i] >= cfg.vocab)
        invalid("batch: token id " + std::to_string(b.tokens[i]) + " is outside 0.." + std::to_string(cfg.vocab - 1));
      const int32_t y = b.labels[i];
      if (y != -100 && (y < 0 || y >= cfg.vocab))
        invalid("batch: label " + std::to_string(y) + " is neither -100 nor a token id in 0.." + std::to_string(cfg.vocab - 1));
      if (y != -100) {
        p->rows.push_back(static_cast<int32_t>(i));
        p->lab.push_back(y);
      }
      if (t > 0 && b.segments && b.segments[i] != b.segments[i - 1]) run = t;
      p->pos[i] = static_cast<int32_t>(t - run);
      p->start[i] = static_cast<int32_t>(run);
      maxPos = std::max(maxPos, p->pos[i]);
    }
  }
  if (cfg.arch != Arch::Llama && static_cast<int64_t>(maxPos) + 2 >= m.positions_.rows) {
    invalid("batch: position " + std::to_string(maxPos) + " exceeds OPT's learned positions (" +
            std::to_string(m.positions_.rows - 2) + ")");
  }
  p->maxPos = maxPos;
}

void LoraTrainer::validate(const TrainBatch& b, Ctx& c) {
  planBatch(*m_, b, &plan_);
  c.B = b.B;
  c.T = b.T;
  c.N = b.B * b.T;
  c.tokens = b.tokens;
  if (m_->cfg_.arch == Arch::Llama) ensureRope(static_cast<int64_t>(plan_.maxPos) + 1);
  c.pos = plan_.pos.data();
  c.start = plan_.start.data();
  c.count = static_cast<int64_t>(plan_.rows.size());
}

AttentionShape LoraTrainer::attentionShape(const ModelConfig& cfg) {
  AttentionShape as;
  as.nHeads = cfg.heads;
  as.nKvHeads = cfg.kvHeads;
  as.headDim = cfg.headDim;
  as.scale = cfg.arch == Arch::Llama ? 1.f / std::sqrt(static_cast<float>(cfg.headDim)) : 1.f;
  return as;
}

void LoraTrainer::ropeTablesFor(const ModelConfig& cfg, int64_t cap, std::vector<float>* cosT,
                                std::vector<float>* sinT) {
  const int half = cfg.headDim / 2;
  RopeParams rp = cfg.rope;
  rp.headDim = cfg.headDim;
  std::vector<float> inv(half);
  ropeInvFreq(rp, inv.data());
  cosT->resize(static_cast<size_t>(cap) * half);
  sinT->resize(static_cast<size_t>(cap) * half);
  ropeTables(inv.data(), half, cap, cosT->data(), sinT->data());
}

void LoraTrainer::ensureRope(int64_t positions) {
  if (positions <= ropeCap_) return;
  const int64_t cap = std::max<int64_t>(positions, 2 * ropeCap_);
  ropeTablesFor(m_->cfg_, cap, &cos_, &sin_);
  ropeCap_ = cap;
}

// One layer's activation slab (floats) for N tokens and the context's rank.
size_t LoraTrainer::actsFloats(const Model& m, int64_t N) {
  const ModelConfig& cfg = m.cfg_;
  const bool llama = cfg.arch == Arch::Llama, postLN = !llama && !cfg.layerNormBefore;
  const int64_t H = cfg.hidden, I = cfg.intermediate, q = m.qDim_, kv = m.kvDim_;
  int64_t per = H /*n1*/ + q /*q*/ + 2 * kv /*k, v*/ + cfg.heads /*lse*/ + q /*att*/ + 2 * H /*r1, n2*/ + I /*g*/;
  if (llama) per += I;   // u
  if (postLN) per += H;  // r2
  return static_cast<size_t>(N * per);
}

void LoraTrainer::bindActs(const Model& m, float* p, int64_t N, Acts* a) {
  const ModelConfig& cfg = m.cfg_;
  const bool llama = cfg.arch == Arch::Llama, postLN = !llama && !cfg.layerNormBefore;
  const int64_t H = cfg.hidden, I = cfg.intermediate, q = m.qDim_, kv = m.kvDim_;
  auto take = [&](int64_t n) {
    float* r = p;
    p += N * n;
    return r;
  };
  a->n1 = take(H);
  a->q = take(q);
  a->k = take(kv);
  a->v = take(kv);
  a->lse = take(cfg.heads);
  a->att = take(q);
  a->r1 = take(H);
  a->n2 = take(H);
  a->g = take(I);
  a->u = llama ? take(I) : nullptr;
  a->r2 = postLN ? take(H) : nullptr;
  for (float*& lu : a->lu) lu = nullptr;
}

// =============================================================================================
// Forward / backward building blocks
// =============================================================================================
void LoraTrainer::normFwd(const Norm& n, const float* x, float* y, int64_t rows) const {
  const ModelConfig& cfg = m_->cfg_;
  if (cfg.arch == Arch::Llama) rmsNormForward(x, n.w, y, rows, cfg.hidden, cfg.normEps);
  else layerNormForward(x, n.w, n.b, y, rows, cfg.hidden, cfg.normEps);
}

void LoraTrainer::normBwd(const Norm& n, const float* dy, const float* x, float* dx, int64_t rows,
                          bool accumulate) const {
  const ModelConfig& cfg = m_->cfg_;
  if (cfg.arch == Arch::Llama) rmsNormBackward(dy, x, n.w, dx, rows, cfg.hidden, cfg.normEps, accumulate);
  else layerNormBackward(dy, x, n.w, dx, rows, cfg.hidden, cfg.normEps, accumulate);
}

// y[N, out] (+)= x·Wᵀ + b + LoRA (dropout on the branch input); lu receives u = drop(x)·Aᵀ
void LoraTrainer::linFwd(const Ctx& c, int l, Lin which, const float* x, float* y, bool accumulate, float* lu) {
  const Linear& L = m_->layers_[l].lin[which];
  const LoraBranch* br = c.branch(l, which);
  loraLinearForward(x, c.N, L.w, L.bias, br, y, accumulate, br ? lu : nullptr);
}

// dx (+)= dy·W + LoRA input gradient; dA, dB accumulated
void LoraTrainer::linBwd(const Ctx& c, int l, Lin which, const float* x, const float* lu, const float* dy, float* dx,
                         bool accumulate, bool needDx) {
  const Linear& L = m_->layers_[l].lin[which];
  loraLinearBackward(x, lu, dy, c.N, L.w, c.branch(l, which), dx, accumulate, needDx);
}

// x[N, H] = embed[id] (+ OPT learned position row pos + 2)
void LoraTrainer::embed(const Ctx& c, float* x) {
  const int64_t H = m_->cfg_.hidden;
  embeddingForward(m_->embed_, c.tokens, c.N, x, false);
  if (m_->cfg_.arch == Arch::Opt) {
    parallelFor(c.N, 64, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) tableRow(m_->positions_, static_cast<int64_t>(c.pos[i]) + 2, x + i * H, true);
    });
  }
}

// One decoder layer, saving what its backward needs into `a` (xout = the next layer's input).
//   pre-LN (Llama, OPT):  n1 = norm1(x); q,k,v = lin(n1); att = attn(q,k,v); r1 = x + o(att)
//                         n2 = norm2(r1); h = act(gate(n2))·up(n2) | act(fc1(n2)); xout = r1 + down(h)
//   post-LN (OPT):        q,k,v = lin(x); r1 = x + o(att); n2 = LN1(r1); r2 = n2 + fc2(act(fc1(n2)));
//                         xout = LN2(r2)
void LoraTrainer::layerForward(const Ctx& c, int l, const float* xin, float* xout, const Acts& a) {
  const ModelConfig& cfg = m_->cfg_;
  const Layer& L = m_->layers_[l];
  const bool llama = cfg.arch == Arch::Llama, preLN = llama || cfg.layerNormBefore;
  const int64_t N = c.N, H = cfg.hidden, I = cfg.intermediate, hd = cfg.headDim;

  // ---- attention block ----
  const float* ain = xin;
  if (preLN) {
    normFwd(L.norm1, xin, a.n1, N);  // n1 [N, H]
    ain = a.n1;
  }
  linFwd(c, l, LQ, ain, a.q, false, a.lu[LQ]);  // q [N, qDim]
  linFwd(c, l, LK, ain, a.k, false, a.lu[LK]);  // k [N, kvDim]
  linFwd(c, l, LV, ain, a.v, false, a.lu[LV]);  // v [N, kvDim]
  const AttentionShape as = LoraTrainer::attentionShape(cfg);
  if (llama) {
    ropeForward(a.q, N, cfg.heads, cfg.headDim, c.pos, cos_.data(), sin_.data());
    ropeForward(a.k, N, cfg.kvHeads, cfg.headDim, c.pos, cos_.data(), sin_.data());
  } else {
    scale(a.q, 1.f / std::sqrt(static_cast<float>(hd)), N * m_->qDim_);  // OPT: q_proj(x)·hd^-½
  }
  attentionTrainForward(as, c.B, c.T, c.start, a.q, a.k, a.v, a.att, a.lse);  // att [N, qDim], lse [N, nh]
  std::memcpy(a.r1, xin, sizeof(float) * N * H);
  linFwd(c, l, LO, a.att, a.r1, true, a.lu[LO]);  // r1 = x + o(att)
  normFwd(preLN ? L.norm2 : L.norm1, a.r1, a.n2, N);  // n2: the MLP input

  // ---- MLP block ----
  float* h = grow(hb_, static_cast<size_t>(N * I));  // [N, I], not kept (recomputed in backward)
  if (llama) {
    linFwd(c, l, LGate, a.n2, a.g, false, a.lu[LGate]);  // g [N, I]
    linFwd(c, l, LUp, a.n2, a.u, false, a.lu[LUp]);      // u [N, I]
    gatedActivationForward(cfg.act, a.g, a.u, h, N * I);  // h = act(g)·u
  } else {
    linFwd(c, l, LUp, a.n2, a.g, false, a.lu[LUp]);  // g = fc1(n2) [N, I]
    activationForward(cfg.act, a.g, h, N * I);        // h = act(g)
  }
  float* r2 = preLN ? xout : a.r2;
  std::memcpy(r2, preLN ? a.r1 : a.n2, sizeof(float) * N * H);
  linFwd(c, l, LDown, h, r2, true, a.lu[LDown]);  // r2 = residual + down(h)
  if (!preLN) normFwd(L.norm2, a.r2, xout, N);    // xout = LN2(r2)
}

// Backward of layerForward: dX [N, H] holds d(xout) on entry and d(xin) on return (when needDx).
void LoraTrainer::layerBackward(const Ctx& c, int l, const float* xin, const Acts& a, float* dX, bool needDx) {
  const ModelConfig& cfg = m_->cfg_;
  const Layer& L = m_->layers_[l];
  const bool llama = cfg.arch == Arch::Llama, preLN = llama || cfg.layerNormBefore;
  const int64_t N = c.N, H = cfg.hidden, I = cfg.intermediate, hd = cfg.headDim;
  const int64_t qDim = m_->qDim_, kvDim = m_->kvDim_;
  float* h = grow(hb_, static_cast<size_t>(N * I));
  float* dN = grow(dN_, static_cast<size_t>(N * H));
  float* dH = grow(dH_, static_cast<size_t>(N * I));

  // ---- MLP block ----
  const float* dr2 = dX;  // d(r2)
  float* dR = nullptr;
  if (!preLN) {
    dR = grow(dR_, static_cast<size_t>(N * H));
    normBwd(L.norm2, dX, a.r2, dR, N, false);  // xout = LN2(r2)
    dr2 = dR;
  }
  if (llama) gatedActivationForward(cfg.act, a.g, a.u, h, N * I);  // recompute h (the down input)
  else activationForward(cfg.act, a.g, h, N * I);
  linBwd(c, l, LDown, h, a.lu[LDown], dr2, dH, false, true);  // dh [N, I]
  if (llama) {
    float* dG = grow(dG_, static_cast<size_t>(N * I));
    float* dU = grow(dU_, static_cast<size_t>(N * I));
    gatedActivationBackward(cfg.act, a.g, a.u, dH, dG, dU, N * I);  // dg, du
    linBwd(c, l, LGate, a.n2, a.lu[LGate], dG, dN, false, true);
    linBwd(c, l, LUp, a.n2, a.lu[LUp], dU, dN, true, true);  // dN = d(n2) through the MLP
  } else {
    activationBackward(cfg.act, a.g, dH, dH, N * I);  // in place: d(fc1 output)
    linBwd(c, l, LUp, a.n2, a.lu[LUp], dH, dN, false, true);
  }
  if (preLN) {
    normBwd(L.norm2, dN, a.r1, dX, N, true);  // d(r1) = d(r2) + norm2'(dN)
  } else {
    addInto(dN, dR, N * H);                    // d(n2) = d(r2) (residual) + MLP
    normBwd(L.norm1, dN, a.r1, dX, N, false);  // d(r1) = LN1'(d(n2))
  }

  // ---- attention block: dX = d(r1) = d(o_proj output) ----
  float* dAtt = grow(dAtt_, static_cast<size_t>(N * qDim));
  float* dQ = grow(dQ_, static_cast<size_t>(N * qDim));
  float* dK = grow(dK_, static_cast<size_t>(N * kvDim));
  float* dV = grow(dV_, static_cast<size_t>(N * kvDim));
  linBwd(c, l, LO, a.att, a.lu[LO], dX, dAtt, false, true);
  const AttentionShape as = LoraTrainer::attentionShape(cfg);
  attentionTrainBackward(as, c.B, c.T, c.start, a.q, a.k, a.v, a.att, a.lse, dAtt, dQ, dK, dV);
  if (llama) {
    ropeBackward(dQ, N, cfg.heads, cfg.headDim, c.pos, cos_.data(), sin_.data());
    ropeBackward(dK, N, cfg.kvHeads, cfg.headDim, c.pos, cos_.data(), sin_.data());
  } else {
    scale(dQ, 1.f / std::sqrt(static_cast<float>(hd)), N * qDim);
  }
  // pre-LN: the projections read n1 → dN = d(n1), then d(x) = d(r1) + norm1'(dN);
  // post-LN: they read x itself → accumulate straight into dX = d(r1).
  const float* ain = preLN ? a.n1 : xin;
  float* dAin = preLN ? dN : dX;
  linBwd(c, l, LQ, ain, a.lu[LQ], dQ, dAin, !preLN, needDx);
  linBwd(c, l, LK, ain, a.lu[LK], dK, dAin, true, needDx);
  linBwd(c, l, LV, ain, a.lu[LV], dV, dAin, true, needDx);
  if (preLN && needDx) normBwd(L.norm1, dN, xin, dX, N, true);
}

// Final norm, chunked lm_head + softmax + cross-entropy over the labelled rows, and its backward.
double LoraTrainer::head(const Ctx& c, const float* xL, float gradScale, float* dX) {
  const ModelConfig& cfg = m_->cfg_;
  const int64_t H = cfg.hidden, M = c.count;
  float* hs = grow(hs_, static_cast<size_t>(M * H));  // labelled rows of xL [M, H]
  for (int64_t r = 0; r < M; ++r) std::memcpy(hs + r * H, xL + static_cast<int64_t>(plan_.rows[r]) * H, sizeof(float) * H);
  const bool hasNorm = m_->finalNorm_.w != nullptr;  // OPT post-LN has none
  float* hn = hs;
  if (hasNorm) {
    hn = grow(hn_, static_cast<size_t>(M * H));
    normFwd(m_->finalNorm_, hs, hn, M);
  }
  float* dhn = dX ? grow(dhn_, static_cast<size_t>(M * H)) : nullptr;
  const double loss =
      lmHeadCrossEntropy(hn, M, m_->lmHead_, plan_.lab.data(), lmHeadChunkRows(M, cfg.vocab), gradScale, dhn, logits_);
  if (dX) {
    float* dhs = dhn;
    if (hasNorm) {
      dhs = grow(dhs_, static_cast<size_t>(M * H));
      normBwd(m_->finalNorm_, dhn, hs, dhs, M, false);
    }
    std::memset(dX, 0, sizeof(float) * c.N * H);
    for (int64_t r = 0; r < M; ++r) std::memcpy(dX + static_cast<int64_t>(plan_.rows[r]) * H, dhs + r * H, sizeof(float) * H);
  }
  return loss;
}

// =============================================================================================
// Steps
// =============================================================================================
LossResult LoraTrainer::run(int slot, const TrainBatch& batch, const TrainOptions* train) {
  const ModelConfig& cfg = m_->cfg_;
  Ctx c;
  validate(batch, c);

  // ---- LoRA binding: training uses the slot's own state (and its gradients); evaluation uses
  // whatever adapter the model has in the slot (a trained one or one set with setAdapter) ----
  const size_t nMods = static_cast<size_t>(cfg.layers) * kNumLin;
  if (train) {
    LoraSlot& s = slotRef(slot);
    checkInstalled(slot, s);
    c.rank = s.rank;
    c.br.resize(nMods);
    c.has.assign(nMods, 0);
    for (LoraParam& p : s.mods) {
      const size_t i = static_cast<size_t>(p.layer) * kNumLin + p.lin;
      LoraBranch& b = c.br[i];
      b.a = p.a.data();
      b.b = p.b.data();
      b.ga = p.ga.data();
      b.gb = p.gb.data();
      b.rank = s.rank;
      b.scaling = s.scaling;
      b.dropout = s.dropout;
      b.key = dropoutKey(train->dropoutSeed, i);
      c.has[i] = 1;
    }
  } else if (slot != -1) {
    m_->checkAdapter(slot);
    const Adapter& ad = m_->adapters_[slot];
    c.br.resize(nMods);
    c.has.assign(nMods, 0);
    for (size_t i = 0; i < nMods; ++i) {
      const LoraModule& lm = ad.mods[i];
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
  if (c.count == 0) return res;  // nothing to predict: loss 0, no gradient

  // ---- workspace ----
  const int L = cfg.layers;
  const int64_t N = c.N, H = cfg.hidden;
  const bool ckpt = !train || train->checkpointing;
  const size_t slabActs = actsFloats(*m_, N), slabLora = static_cast<size_t>(kNumLin) * N * c.rank;
  const size_t slab = slabActs + slabLora;
  const int slabs = ckpt ? 1 : L;
  float* xs = grow(xs_, static_cast<size_t>(L + 1) * N * H);
  float* acts = grow(acts_, slab * slabs);
  auto actsOf = [&](int l) {
    Acts a;
    float* base = acts + (ckpt ? 0 : static_cast<size_t>(l) * slab);
    bindActs(*m_, base, N, &a);
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
  float* dX = grow(dX_, static_cast<size_t>(N * H));
  const float g = static_cast<float>(static_cast<double>(train->gradScale) / static_cast<double>(c.count));
  res.loss = head(c, xL, g, dX) / static_cast<double>(c.count);

  // ---- backward, last layer first; with checkpointing, recompute each layer from its input
  // (the last layer's activations are still in the slab from the forward) ----
  for (int l = L - 1; l >= 0; --l) {
    const Acts a = actsOf(l);
    if (ckpt && l != L - 1) layerForward(c, l, xs + l * N * H, xs + (l + 1) * N * H, a);
    layerBackward(c, l, xs + l * N * H, a, dX, l > 0);  // layer 0's input gradient is not needed
  }
  return res;
}

LossResult LoraTrainer::trainForwardBackward(int slot, const TrainBatch& batch, const TrainOptions& opts) {
  if (!std::isfinite(opts.gradScale)) invalid("trainForwardBackward: gradScale must be finite");
  return run(slot, batch, &opts);
}

LossResult LoraTrainer::evalLoss(int slot, const TrainBatch& batch) {
  if (slot < -1) invalid("evalLoss: slot must be >= 0, or -1 for the base model");
  return run(slot, batch, nullptr);
}

}  // namespace engine
}  // namespace qk
