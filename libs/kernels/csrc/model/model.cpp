// The native model: weight binding, KV cache, mixed-adapter batching and the forward pass.
// Shapes in comments: T = tokens in the step (all rows packed), H = hidden, I = intermediate,
// nh / nkv = query / key-value heads, hd = head dim, qDim = nh·hd, kvDim = nkv·hd, V = vocab.
#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include <sys/mman.h>

#include "cpu/thread_pool.h"

namespace qk {
namespace engine {

namespace {

[[noreturn]] void invalid(const std::string& msg) { throw EngineError("INVALID_ARGUMENT", msg); }

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shapeStr(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

size_t dtypeBytes(TableType t, int64_t n) {
  switch (t) {
    case TableType::F32: return static_cast<size_t>(n) * 4;
    case TableType::F16:
    case TableType::BF16: return static_cast<size_t>(n) * 2;
    default: return static_cast<size_t>((n + 1) / 2);
  }
}

// The Hugging Face module path (inside a layer) of each linear, per architecture.
const char* linName(Arch a, Lin l) {
  static const char* llama[kNumLin] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                       "mlp.down_proj"};
  static const char* opt[kNumLin] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj", nullptr, "fc1", "fc2"};
  return a == Arch::Llama ? llama[l] : opt[l];
}

// KV capacity grows in multiples of this many tokens (OPT-125m: 4.5 MiB, Llama-3.2-1B: 4 MiB).
constexpr int64_t kKvChunkRows = 64;
// Float budget of the [window, ·] decoder scratch (x, xn, q, att, k, v, u, g): 16 MiB.
constexpr int64_t kScratchBudgetFloats = (int64_t(16) << 20) / 4;
// Float budget of crossEntropy's [positions, vocab chunk] logits buffer: 8 MiB.
constexpr int64_t kCeBudgetFloats = (int64_t(8) << 20) / 4;

}  // namespace

// =============================================================================================
// Construction: bind the weights (zero copy for matrices), allocate tables
// =============================================================================================
Model::Model(const ModelConfig& cfg, const TensorMap& weights, int maxSequences, int maxContext)
    : cfg_(cfg), maxSeq_(maxSequences), maxCtx_(maxContext) {
  const ModelConfig& c = cfg_;
  if (c.hidden <= 0 || c.intermediate <= 0 || c.layers <= 0 || c.heads <= 0 || c.kvHeads <= 0 ||
      c.headDim <= 0 || c.vocab <= 0 || c.maxPositions <= 0)
    invalid("engine config: sizes must be positive");
  if (c.heads % c.kvHeads) invalid("engine config: numHeads must be a multiple of numKvHeads");
  if (c.arch == Arch::Llama && c.headDim % 2) invalid("engine config: headDim must be even (RoPE)");
  if (c.arch == Arch::Opt && (c.kvHeads != c.heads || c.heads * c.headDim != c.hidden))
    invalid("engine config: OPT needs numKvHeads == numHeads and numHeads·headDim == hiddenSize");
  if (maxSeq_ < 1 || maxSeq_ > 4096) invalid("maxSequences must be in 1..4096");
  if (maxCtx_ < 1) invalid("maxContext must be >= 1");
  if (c.arch == Arch::Opt && maxCtx_ > c.maxPositions)
    invalid("maxContext exceeds OPT's learned positions (" + std::to_string(c.maxPositions) + ")");
  qDim_ = static_cast<int64_t>(c.heads) * c.headDim;
  kvDim_ = static_cast<int64_t>(c.kvHeads) * c.headDim;
  // Decoder window: as many packed tokens as fit the scratch budget, 64..1024, a multiple of 16.
  // A 512-token prefill of Llama-3.2-1B would otherwise hold 50 MiB of [T, ·] scratch for good
  // (g and u are [T, 8192]); at 160 tokens per pass the GEMMs are still compute bound (each NF4
  // weight panel decoded per pass is reused by 160 rows).
  {
    const int64_t perToken = 2 * c.hidden + 2 * qDim_ + 2 * kvDim_ + (c.arch == Arch::Llama ? 2 : 1) * int64_t(c.intermediate);
    window_ = std::clamp<int64_t>(kScratchBudgetFloats / perToken / 16 * 16, 64, 1024);
  }

  loadWeights(weights);

  if (c.arch == Arch::Llama) {
    // RoPE tables: cos/sin[pos, j] for every position the cache can hold.
    const int half = c.headDim / 2;
    std::vector<float> invFreq(half);
    RopeParams rp = c.rope;
    rp.headDim = c.headDim;
    ropeInvFreq(rp, invFreq.data());
    cos_.resize(static_cast<size_t>(maxCtx_) * half);
    sin_.resize(static_cast<size_t>(maxCtx_) * half);
    ropeTables(invFreq.data(), half, maxCtx_, cos_.data(), sin_.data());
  }
  seqs_.resize(static_cast<size_t>(maxSeq_) + 1);  // + the internal crossEntropy slot
}

const float* Model::ownFloats(const RawTensor& t, const std::string& name, int64_t n) {
  if (numel(t.shape) != n) invalid("weight " + name + ": expected " + std::to_string(n) + " elements, got shape " + shapeStr(t.shape));
  auto v = std::make_unique<std::vector<float>>(static_cast<size_t>(n));
  TableView tv{t.dtype, t.data, t.absmax, 1, n, t.blocksize, t.absmaxDq};
  tableRow(tv, 0, v->data(), false);
  owned_.push_back(std::move(v));
  return owned_.back()->data();
}

WeightView Model::weightView(const RawTensor& t, const std::string& name, int64_t rows, int64_t cols) {
  if (t.shape.size() != 2 || t.shape[0] != rows || t.shape[1] != cols)
    invalid("weight " + name + ": expected shape [" + std::to_string(rows) + "," + std::to_string(cols) + "], got " +
            shapeStr(t.shape));
  WeightView w{};
  w.type = static_cast<WType>(t.dtype);
  w.data = t.data;
  w.absmax = t.absmax;
  w.absmaxDq = t.absmaxDq;
  w.rows = rows;
  w.cols = cols;
  w.blocksize = t.blocksize;
  return w;
}

void Model::loadWeights(const TensorMap& weights) {
  const ModelConfig& c = cfg_;
  const bool opt = c.arch == Arch::Opt;
  std::unordered_map<std::string, bool> used;

  // Validates bytes / absmax of every tensor once.
  for (const auto& [name, t] : weights) {
    int64_t n = numel(t.shape);
    if (t.data == nullptr && n > 0) invalid("weight " + name + ": no data");
    if (t.bytes < dtypeBytes(t.dtype, n))
      invalid("weight " + name + ": " + std::to_string(t.bytes) + " bytes is too short for shape " + shapeStr(t.shape));
    if (t.dtype == TableType::NF4) {
      if (t.blocksize <= 0 || t.blocksize % 2) invalid("weight " + name + ": nf4 needs an even positive blocksize");
      const int64_t blocks = (n + t.blocksize - 1) / t.blocksize;
      if ((t.absmax == nullptr && !t.absmaxDq.present()) || t.absmaxCount < static_cast<size_t>(blocks))
        invalid("weight " + name + ": nf4 absmax missing or too short");
      if (t.absmax == nullptr &&
          (t.absmaxDq.nestedAbsmax == nullptr || t.absmaxDq.quantMap == nullptr || t.absmaxDq.nestedBlocksize <= 0 ||
           t.absmaxDqNested * t.absmaxDq.nestedBlocksize < static_cast<size_t>(blocks)))
        invalid("weight " + name + ": nf4 double-quantized absmax incomplete");
    }
  }
  auto find = [&](const std::string& name) -> const RawTensor* {
    auto it = weights.find(name);
    if (it == weights.end()) return nullptr;
    used[name] = true;
    return &it->second;
  };
  auto need = [&](const std::string& name) -> const RawTensor& {
    const RawTensor* t = find(name);
    if (!t) throw EngineError("NOT_FOUND", "weight " + name + " is missing");
    return *t;
  };
  auto needAny = [&](const std::string& a, const std::string& b) -> std::pair<std::string, const RawTensor*> {
    if (const RawTensor* t = find(a)) return {a, t};
    if (const RawTensor* t = find(b)) return {b, t};
    throw EngineError("NOT_FOUND", "weight " + a + " is missing");
  };
  auto countBytes = [&](const RawTensor& t) {
    // NF4 scales: 4 bytes per block (fp32), or 1 byte per block + the nested fp32 scales when
    // double-quantized (the 1 KiB code map is shared between tensors by the loader: not counted)
    size_t scales = 0;
    if (t.dtype == TableType::NF4) scales = t.absmax ? t.absmaxCount * 4 : t.absmaxCount + t.absmaxDqNested * 4;
    weightBytes_ += dtypeBytes(t.dtype, numel(t.shape)) + scales;
  };

  // embed_tokens [V, H]
  {
    auto [name, t] = needAny("embed_tokens", "embed_tokens.weight");
    if (t->shape.size() != 2 || t->shape[0] != c.vocab || t->shape[1] != c.hidden)
      invalid("weight " + name + ": expected shape [" + std::to_string(c.vocab) + "," + std::to_string(c.hidden) + "], got " + shapeStr(t->shape));
    embed_ = TableView{t->dtype, t->data, t->absmax, c.vocab, c.hidden, t->blocksize, t->absmaxDq};
    countBytes(*t);
    if (c.tied) lmHead_ = weightView(*t, name, c.vocab, c.hidden);
  }
  // embed_positions [P + 2, H] (OPT)
  if (opt) {
    auto [name, t] = needAny("embed_positions", "embed_positions.weight");
    if (t->shape.size() != 2 || t->shape[1] != c.hidden || t->shape[0] < static_cast<int64_t>(maxCtx_) + 2)
      invalid("weight " + name + ": expected shape [>= maxContext+2," + std::to_string(c.hidden) + "], got " + shapeStr(t->shape));
    positions_ = TableView{t->dtype, t->data, t->absmax, t->shape[0], c.hidden, t->blocksize, t->absmaxDq};
    countBytes(*t);
  }
  // lm_head [V, H]
  if (c.tied) {
    find("lm_head");  // a tied checkpoint may still carry the duplicate; it is not read
    find("lm_head.weight");
  } else {
    auto [name, t] = needAny("lm_head", "lm_head.weight");
    lmHead_ = weightView(*t, name, c.vocab, c.hidden);
    countBytes(*t);
  }
  // final norm (Llama: model.norm; OPT: decoder.final_layer_norm, absent for post-LN models)
  if (const RawTensor* t = find("norm.weight")) {
    finalNorm_.w = ownFloats(*t, "norm.weight", c.hidden);
    if (opt) finalNorm_.b = ownFloats(need("norm.bias"), "norm.bias", c.hidden);
  } else if (!opt || c.layerNormBefore) {
    throw EngineError("NOT_FOUND", "weight norm.weight is missing");
  }

  layers_.resize(c.layers);
  for (int l = 0; l < c.layers; ++l) {
    Layer& L = layers_[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    const int64_t H = c.hidden, I = c.intermediate;
    struct Spec { Lin lin; int64_t out, in; bool bias; };
    std::vector<Spec> specs = {{LQ, qDim_, H, c.qkvBias},   {LK, kvDim_, H, c.qkvBias}, {LV, kvDim_, H, c.qkvBias},
                               {LO, H, qDim_, c.oBias},     {LUp, I, H, c.mlpBias},     {LDown, H, I, c.mlpBias}};
    if (!opt) specs.push_back({LGate, I, H, c.mlpBias});
    for (const Spec& s : specs) {
      const std::string base = p + linName(c.arch, s.lin);
      const RawTensor& w = need(base + ".weight");
      L.lin[s.lin].present = true;
      L.lin[s.lin].w = weightView(w, base + ".weight", s.out, s.in);
      countBytes(w);
      if (s.bias) L.lin[s.lin].bias = ownFloats(need(base + ".bias"), base + ".bias", s.out);
    }
    const char* n1 = opt ? "self_attn_layer_norm" : "input_layernorm";
    const char* n2 = opt ? "final_layer_norm" : "post_attention_layernorm";
    L.norm1.w = ownFloats(need(p + n1 + ".weight"), p + n1 + ".weight", H);
    L.norm2.w = ownFloats(need(p + n2 + ".weight"), p + n2 + ".weight", H);
    if (opt) {
      L.norm1.b = ownFloats(need(p + n1 + ".bias"), p + n1 + ".bias", H);
      L.norm2.b = ownFloats(need(p + n2 + ".bias"), p + n2 + ".bias", H);
    }
  }

  // Every tensor handed over must have been consumed: a stray name is a loader bug.
  std::vector<std::string> unused;
  for (const auto& kv : weights) {
    const std::string& n = kv.first;
    if (used.count(n)) continue;
    if (n.size() >= 19 && n.compare(n.size() - 19, 19, "rotary_emb.inv_freq") == 0) continue;
    unused.push_back(n);
  }
  if (!unused.empty()) {
    std::sort(unused.begin(), unused.end());
    std::string msg = "unexpected weights for this config:";
    for (size_t i = 0; i < unused.size() && i < 6; ++i) msg += " " + unused[i];
    if (unused.size() > 6) msg += " … (" + std::to_string(unused.size()) + " in all)";
    invalid(msg);
  }
  for (const auto& v : owned_) weightBytes_ += v->size() * sizeof(float);
}

// =============================================================================================
// Sequences
// =============================================================================================
Model::PageBuffer& Model::PageBuffer::operator=(PageBuffer&& o) noexcept {
  if (this != &o) {
    release();
    p_ = o.p_;
    bytes_ = o.bytes_;
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

bool Model::PageBuffer::grow(size_t bytes) {
  if (bytes <= bytes_) return true;
  void* p;
  if (!p_) {
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  } else {
#ifdef __linux__
    p = mremap(p_, bytes_, bytes, MREMAP_MAYMOVE);  // extends in place or moves the page tables
#else
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      std::memcpy(p, p_, bytes_);
      munmap(p_, bytes_);
    }
#endif
  }
  if (p == MAP_FAILED) return false;
  p_ = p;
  bytes_ = bytes;
  return true;
}

void Model::PageBuffer::release() {
  if (p_) munmap(p_, bytes_);
  p_ = nullptr;
  bytes_ = 0;
}

// Growth policy: a slot holds no KV memory until tokens arrive; then each layer's K and V arrays
// ([cap][kvDim], the contiguous rows attentionForward reads) hold the rows needed rounded up to
// kKvChunkRows (never more than maxContext). Growing remaps the pages (mremap): no copy, no
// transient second array, so the cache costs what its rows use, ≤ 63 rows of slack per slot.
void Model::reserveKv(Seq& s, int64_t rows) {
  if (rows <= s.cap) return;
  const int64_t cap = std::min<int64_t>((rows + kKvChunkRows - 1) / kKvChunkRows * kKvChunkRows, maxCtx_);
  const size_t bytes = static_cast<size_t>(cap) * kvDim_ * sizeof(float);
  s.k.resize(cfg_.layers);
  s.v.resize(cfg_.layers);
  for (int l = 0; l < cfg_.layers; ++l)
    if (!s.k[l].grow(bytes) || !s.v[l].grow(bytes))
      throw EngineError("RESOURCE_EXHAUSTED", "out of memory growing a KV cache to " + std::to_string(cap) + " tokens (" +
                                                  std::to_string(2 * bytes * cfg_.layers) + " bytes)");
  s.cap = cap;  // only once every layer holds it (a failed grow leaves the old capacity usable)
}

void Model::releaseKv(Seq& s) {
  s.k.clear();  // PageBuffer destructors unmap
  s.v.clear();
  s.cap = 0;
  s.len = 0;
}

int64_t Model::kvCapacity(int seq) const { return liveSlot(seqs_, maxSeq_, seq, "kvCapacity").cap; }

int Model::createSequence() {
  const int i = firstFreeSlot(seqs_, maxSeq_);
  seqs_[i].used = true;
  seqs_[i].len = 0;
  return i;
}

Model::Seq& Model::seqAt(int seq, const char* what) { return liveSlot(seqs_, maxSeq_, seq, what); }

void Model::dropSequence(int seq) {
  Seq& s = seqAt(seq, "dropSequence");
  s.used = false;
  releaseKv(s);  // back to the kernel (munmap): an idle slot holds nothing
}

int64_t Model::sequenceLength(int seq) const { return liveSlot(seqs_, maxSeq_, seq, "sequenceLength").len; }

void Model::truncateSequence(int seq, int64_t length) { truncateLive(seqAt(seq, "truncateSequence"), length); }

// =============================================================================================
// Adapters
// =============================================================================================
void Model::resolveModule(const std::string& name, int* layer, Lin* lin, int64_t* in, int64_t* out) const {
  // "layers.{i}.{hf module path}"
  const std::string pre = "layers.";
  if (name.compare(0, pre.size(), pre) == 0) {
    size_t dot = name.find('.', pre.size());
    if (dot != std::string::npos && dot > pre.size()) {
      const std::string num = name.substr(pre.size(), dot - pre.size());
      if (num.find_first_not_of("0123456789") == std::string::npos && num.size() < 7) {
        int l = std::stoi(num);
        const std::string mod = name.substr(dot + 1);
        for (int k = 0; k < kNumLin; ++k) {
          const char* n = linName(cfg_.arch, static_cast<Lin>(k));
          if (n && mod == n && l < cfg_.layers && layers_[l].lin[k].present) {
            *layer = l;
            *lin = static_cast<Lin>(k);
            *in = layers_[l].lin[k].w.cols;
            *out = layers_[l].lin[k].w.rows;
            return;
          }
        }
      }
    }
  }
  invalid("adapter module " + name + " is not a linear layer of this model");
}

void Model::setAdapter(int slot, Adapter adapter) {
  if (slot < 0 || slot >= 65536) invalid("adapter slot must be in 0..65535");
  if (adapter.mods.size() != static_cast<size_t>(cfg_.layers) * kNumLin) invalid("adapter: bad module table");
  if (static_cast<size_t>(slot) >= adapters_.size()) adapters_.resize(static_cast<size_t>(slot) + 1);
  adapter.active = true;
  adapter.maxRank = 0;
  for (const LoraModule& m : adapter.mods)
    if (m.a) adapter.maxRank = std::max(adapter.maxRank, m.rank);
  adapters_[slot] = std::move(adapter);
}

void Model::removeAdapter(int slot) {
  if (!hasAdapter(slot)) throw EngineError("NOT_FOUND", "removeAdapter: no adapter in slot " + std::to_string(slot));
  adapters_[slot] = Adapter{};
}

bool Model::hasAdapter(int slot) const { return adapterActive(adapters_, slot); }

void Model::checkAdapter(int adapter) const { checkAdapterSlot(adapters_, adapter); }

// =============================================================================================
// Scratch
// =============================================================================================
void Model::ensureScratch(int64_t T) {
  if (T <= cap_) return;
  const int64_t H = cfg_.hidden, I = cfg_.intermediate;
  int64_t cap = std::min(std::max<int64_t>(T, 16), window_);
  x_.resize(cap * H);
  xn_.resize(cap * H);
  q_.resize(cap * qDim_);
  k_.resize(cap * kvDim_);
  v_.resize(cap * kvDim_);
  att_.resize(cap * qDim_);
  u_.resize(cap * I);
  if (cfg_.arch == Arch::Llama) g_.resize(cap * I);
  kPtr_.resize(cap);
  vPtr_.resize(cap);
  cap_ = cap;
}

// =============================================================================================
// Forward
// =============================================================================================

// y[T, out] (+)= x[T, in]·Wᵀ + b, then for every segment of rows that use an adapter with this
// module: y[seg] += scaling · (x[seg]·Aᵀ)·Bᵀ   (SGMV: one shared base GEMM, per-adapter low rank)
void Model::linear(int layer, Lin which, const float* x, int64_t T, float* y, bool accumulate) {
  const Linear& L = layers_[layer].lin[which];
  const int64_t in = L.w.cols, out = L.w.rows;
  baseLinear(x, T, L.w, L.bias, y, accumulate);
  for (const Segment& s : segments_) {
    if (s.adapter < 0) continue;
    const Adapter& ad = adapters_[s.adapter];
    const LoraModule& m = ad.mods[static_cast<size_t>(layer) * kNumLin + which];
    if (!m.a) continue;
    const int64_t rows = s.t1 - s.t0, r = m.rank;
    if (static_cast<int64_t>(lora_.size()) < rows * r) lora_.resize(rows * r);
    // t[rows, r] = x[seg]·Aᵀ        A: [r, in]
    gemmF32(false, true, rows, r, in, 1.f, x + s.t0 * in, in, m.a, in, 0.f, lora_.data(), r);
    // y[seg] += scaling · t·Bᵀ       B: [out, r]
    gemmF32(false, true, rows, out, r, ad.scaling, lora_.data(), r, m.b, r, 1.f, y + s.t0 * out, out);
  }
}

void Model::finalNorm(const float* x, float* y, int64_t rows) {
  const int64_t H = cfg_.hidden;
  if (!finalNorm_.w) {  // OPT post-LN: no final norm
    if (x != y) std::memcpy(y, x, sizeof(float) * rows * H);
    return;
  }
  if (cfg_.arch == Arch::Llama) rmsNormForward(x, finalNorm_.w, y, rows, H, cfg_.normEps);
  else layerNormForward(x, finalNorm_.w, finalNorm_.b, y, rows, H, cfg_.normEps);
}

void Model::windowSegments(int64_t t0, int64_t t1) {
  segments_.clear();
  for (const Segment& s : packedSegments_) {
    const int64_t a = std::max(s.t0, t0), b = std::min(s.t1, t1);
    if (a < b) segments_.push_back({s.adapter, a - t0, b - t0});
  }
}

// T here is the number of tokens in this pass (≤ window_), the packed tokens t0 .. t0 + T - 1.
void Model::runDecoder(int64_t t0, int64_t T) {
  const ModelConfig& c = cfg_;
  const bool llama = c.arch == Arch::Llama, preLN = llama || c.layerNormBefore;
  const int64_t H = c.hidden, I = c.intermediate, hd = c.headDim;
  float* x = x_.data();    // [T, H] residual stream
  float* xn = xn_.data();  // [T, H] normed input of a block
  float* q = q_.data();    // [T, qDim]
  float* k = k_.data();    // [T, kvDim]
  float* v = v_.data();    // [T, kvDim]
  float* att = att_.data();  // [T, qDim]
  float* u = u_.data();    // [T, I]
  float* g = llama ? g_.data() : nullptr;  // [T, I]
  const int32_t* pos = tokPos_.data() + t0;
  const int32_t* seqOf = tokSeq_.data() + t0;

  auto norm = [&](const Norm& n, const float* in, float* out) {
    if (llama) rmsNormForward(in, n.w, out, T, H, c.normEps);
    else layerNormForward(in, n.w, n.b, out, T, H, c.normEps);
  };

  // ---- embeddings: x[t] = embed[id_t] (+ OPT learned position row pos_t + 2) ----
  embeddingForward(embed_, tokIds_.data() + t0, T, x, false);
  if (!llama)
    for (int64_t t = 0; t < T; ++t) tableRow(positions_, static_cast<int64_t>(pos[t]) + 2, x + t * H, true);

  AttentionShape as;
  as.nHeads = c.heads;
  as.nKvHeads = c.kvHeads;
  as.headDim = c.headDim;
  as.scale = llama ? 1.f / std::sqrt(static_cast<float>(hd)) : 1.f;  // OPT scales q itself

  for (int l = 0; l < c.layers; ++l) {
    const Layer& L = layers_[l];

    // ---- self-attention block ----
    const float* ain = x;
    if (preLN) {
      norm(L.norm1, x, xn);  // xn = norm1(x)
      ain = xn;
    }
    linear(l, LQ, ain, T, q, false);  // q [T, qDim]
    linear(l, LK, ain, T, k, false);  // k [T, kvDim]
    linear(l, LV, ain, T, v, false);  // v [T, kvDim]
    if (llama) {
      ropeForward(q, T, c.heads, c.headDim, pos, cos_.data(), sin_.data());
      ropeForward(k, T, c.kvHeads, c.headDim, pos, cos_.data(), sin_.data());
    } else {
      scale(q, 1.f / std::sqrt(static_cast<float>(hd)), T * qDim_);  // OPT: q_proj(h)·hd^-0.5
    }
    // append k, v at each token's position in its sequence's cache (capacity reserved by the caller)
    for (int64_t t = 0; t < T; ++t) {
      Seq& s = seqs_[seqOf[t]];
      float* kl = s.k[l].data();
      float* vl = s.v[l].data();
      std::memcpy(kl + static_cast<int64_t>(pos[t]) * kvDim_, k + t * kvDim_, sizeof(float) * kvDim_);
      std::memcpy(vl + static_cast<int64_t>(pos[t]) * kvDim_, v + t * kvDim_, sizeof(float) * kvDim_);
      kPtr_[t] = kl;
      vPtr_[t] = vl;
    }
    attentionForward(as, q, kPtr_.data(), vPtr_.data(), pos, T, att);  // att [T, qDim]
    linear(l, LO, att, T, x, true);  // x += o_proj(att)
    if (!preLN) norm(L.norm1, x, x);

    // ---- MLP block ----
    const float* min = x;
    if (preLN) {
      norm(L.norm2, x, xn);
      min = xn;
    }
    if (llama) {
      linear(l, LGate, min, T, g, false);              // g [T, I]
      linear(l, LUp, min, T, u, false);                // u [T, I]
      gatedActivationForward(c.act, g, u, g, T * I);   // g = act(g)·u
      linear(l, LDown, g, T, x, true);                 // x += down(g)
    } else {
      linear(l, LUp, min, T, u, false);                // u = fc1(xn) [T, I]
      activationForward(c.act, u, u, T * I);           // u = act(u)
      linear(l, LDown, u, T, x, true);                 // x += fc2(u)
    }
    if (!preLN) norm(L.norm2, x, x);
  }
}

void Model::forward(const RowSpec* rows, int nRows, bool allLogits, float* logits) {
  const ModelConfig& c = cfg_;
  const int64_t T = validateRows(
      rows, nRows, maxCtx_, c.vocab, [&](int seq) { return seqAt(seq, "forward").len; },
      [&](int adapter) { checkAdapter(adapter); });
  tokIds_.resize(T);
  tokPos_.resize(T);
  tokSeq_.resize(T);

  // ---- pack rows grouped by adapter (stable), so each adapter is one contiguous segment ----
  orderRowsByAdapter(rows, nRows, order_);
  rowStart_.resize(nRows);
  packedSegments_.clear();
  int64_t t = 0;
  for (int oi = 0; oi < nRows; ++oi) {
    const RowSpec& r = rows[order_[oi]];
    const Seq& s = seqs_[r.seq];
    rowStart_[order_[oi]] = t;
    if (packedSegments_.empty() || packedSegments_.back().adapter != r.adapter) packedSegments_.push_back({r.adapter, t, t});
    for (int64_t j = 0; j < r.n; ++j, ++t) {
      tokIds_[t] = r.tokens[j];
      tokPos_[t] = static_cast<int32_t>(s.len + j);
      tokSeq_[t] = r.seq;
    }
    packedSegments_.back().t1 = t;
  }
  // every row's cache must hold its new tokens before the first layer writes them
  for (int i = 0; i < nRows; ++i) reserveKv(seqs_[rows[i].seq], seqs_[rows[i].seq].len + rows[i].n);

  // ---- the wanted hidden rows (caller's order): [first, first + cnt) of the packed tokens ----
  const int64_t H = c.hidden;
  const int64_t R = allLogits ? T : nRows;
  if (static_cast<int64_t>(sel_.size()) < R * H) sel_.resize(R * H);
  outStart_.resize(nRows);
  for (int i = 0, o = 0; i < nRows; o += allLogits ? static_cast<int>(rows[i].n) : 1, ++i) outStart_[i] = o;

  // ---- the decoder in windows of window_ packed tokens; each window's wanted rows go to sel_ ----
  // (a window's tokens attend to cache rows written by earlier windows, so this equals one pass)
  ensureScratch(std::min(T, window_));
  for (int64_t w0 = 0; w0 < T; w0 += window_) {
    const int64_t w1 = std::min(T, w0 + window_);
    windowSegments(w0, w1);
    runDecoder(w0, w1 - w0);
    for (int i = 0; i < nRows; ++i) {
      const int64_t first = allLogits ? rowStart_[i] : rowStart_[i] + rows[i].n - 1;
      const int64_t a = std::max(first, w0), b = std::min(first + (allLogits ? rows[i].n : 1), w1);
      if (a < b) std::memcpy(sel_.data() + (outStart_[i] + a - first) * H, x_.data() + (a - w0) * H, sizeof(float) * (b - a) * H);
    }
  }
  for (int i = 0; i < nRows; ++i) seqs_[rows[i].seq].len += rows[i].n;

  // ---- logits: final norm, lm_head ----
  finalNorm(sel_.data(), sel_.data(), R);
  baseLinear(sel_.data(), R, lmHead_, nullptr, logits, false);  // logits [R, V]
}

void Model::forwardSample(const RowSpec* rows, int nRows, const RowSampling* const* sampling, int32_t* tokens) {
  const int64_t V = cfg_.vocab;
  if (nRows > 0) sampleLogits_.resize(static_cast<size_t>(nRows) * static_cast<size_t>(V));
  forward(rows, nRows, false, sampleLogits_.data());
  for (int i = 0; i < nRows; ++i) {
    const RowSampling* r = sampling[i];
    tokens[i] = r ? sampleToken(sampleLogits_.data() + i * V, V, r->p, r->recent, r->nRecent, r->rng) : -1;
  }
}

void Model::baseLinear(const float* x, int64_t rows, const WeightView& w, const float* bias, float* y,
                       bool accumulate) const {
  // linearForwardInt8 itself falls back to linearForward outside NF4 / K % blocksize == 0 / rows <= 8
  if (decodeMatmul_ == DecodeMatmul::Int8) linearForwardInt8(x, rows, w, bias, y, accumulate);
  else linearForward(x, rows, w, bias, y, accumulate);
}

// lm_head rows [v0, v1) as a view (NF4: v0·H must start a quantization block).
WeightView Model::lmHeadRows(int64_t v0, int64_t v1) const {
  WeightView w = lmHead_;
  const int64_t e0 = v0 * w.cols;
  const unsigned char* base = static_cast<const unsigned char*>(w.data);
  switch (w.type) {
    case WType::F32: w.data = base + e0 * 4; break;
    case WType::F16:
    case WType::BF16: w.data = base + e0 * 2; break;
    default:
      w.data = base + e0 / 2;
      if (w.absmax) w.absmax = lmHead_.absmax + e0 / w.blocksize;
      else w.absmaxDq.firstBlock = lmHead_.absmaxDq.firstBlock + e0 / w.blocksize;
      break;
  }
  w.rows = v1 - v0;
  return w;
}

double Model::crossEntropy(const int32_t* tokens, int64_t T, int adapter, int64_t* count) {
  const ModelConfig& c = cfg_;
  checkAdapter(adapter);
  if (T < 2) invalid("crossEntropy: needs at least 2 tokens");
  if (T > maxCtx_)
    throw EngineError("RESOURCE_EXHAUSTED", "crossEntropy: " + std::to_string(T) + " tokens exceed maxContext " + std::to_string(maxCtx_));
  for (int64_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= c.vocab) invalid("crossEntropy: token id " + std::to_string(tokens[t]) + " out of range");

  // ---- forward over a temporary sequence (the internal slot) ----
  const int tmp = maxSeq_;
  Seq& s = seqs_[tmp];
  s.len = 0;
  reserveKv(s, T);
  tokIds_.resize(T);
  tokPos_.resize(T);
  tokSeq_.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    tokIds_[t] = tokens[t];
    tokPos_[t] = static_cast<int32_t>(t);
    tokSeq_[t] = tmp;
  }
  packedSegments_.assign(1, Segment{adapter, 0, T});

  // ---- decoder in windows; final norm of positions 0..T-2 into h [M, H] ----
  const int64_t H = c.hidden, M = T - 1, V = c.vocab;
  if (static_cast<int64_t>(sel_.size()) < M * H) sel_.resize(M * H);
  ensureScratch(std::min(T, window_));
  for (int64_t w0 = 0; w0 < T; w0 += window_) {
    const int64_t w1 = std::min(T, w0 + window_);
    windowSegments(w0, w1);
    runDecoder(w0, w1 - w0);
    if (w0 < M) finalNorm(x_.data(), sel_.data() + w0 * H, std::min(w1, M) - w0);
  }
  releaseKv(s);  // the internal slot holds nothing between calls

  // ---- logits of positions 0..T-2 in vocab chunks with an online log-sum-exp ----
  int64_t unit = 1;  // NF4 slices must start on a block: v0·H ≡ 0 (mod blocksize)
  if (lmHead_.type == WType::NF4) unit = lmHead_.blocksize / std::gcd<int64_t>(H, lmHead_.blocksize);
  int64_t chunk = std::max<int64_t>(unit, std::min<int64_t>(4096, kCeBudgetFloats / std::max<int64_t>(M, 1)) / unit * unit);
  chunk = std::min(chunk, V);  // one chunk covers a small vocabulary (only v0 = 0 must be aligned then)
  if (static_cast<int64_t>(ceBuf_.size()) < M * chunk) ceBuf_.resize(M * chunk);
  std::vector<double> mx(M, -INFINITY), sum(M, 0.0), tgt(M, 0.0);
  for (int64_t v0 = 0; v0 < V; v0 += chunk) {
    const int64_t v1 = std::min(V, v0 + chunk), w = v1 - v0;
    float* buf = ceBuf_.data();  // logits [M, w]
    baseLinear(sel_.data(), M, lmHeadRows(v0, v1), nullptr, buf, false);
    parallelFor(M, 4, [&](int64_t b, int64_t e, int) {
      for (int64_t r = b; r < e; ++r) {
        float* row = buf + r * w;
        const int32_t id = tokens[r + 1];
        if (id >= v0 && id < v1) tgt[r] = row[id - v0];
        const double cm = maxOf(row, w);
        if (cm > mx[r]) {
          sum[r] *= std::exp(mx[r] - cm);
          mx[r] = cm;
        }
        sum[r] += expShiftSum(row, static_cast<float>(mx[r]), w);
      }
    });
  }
  double total = 0.0;
  for (int64_t r = 0; r < M; ++r) total += mx[r] + std::log(sum[r]) - tgt[r];  // -log softmax[target]
  *count = M;
  return total / static_cast<double>(M);
}

size_t Model::residentBytes() const {
  size_t b = weightBytes_;
  for (const Seq& s : seqs_)  // capacity as allocated (grows with the sequence)
    for (size_t l = 0; l < s.k.size(); ++l) b += s.k[l].bytes() + s.v[l].bytes();
  for (const Adapter& a : adapters_) b += a.bytes;
  auto vb = [](const auto& v) { return v.capacity() * sizeof(v[0]); };
  b += vb(cos_) + vb(sin_) + vb(x_) + vb(xn_) + vb(q_) + vb(k_) + vb(v_) + vb(att_) + vb(g_) + vb(u_) + vb(lora_) +
       vb(tokIds_) + vb(tokPos_) + vb(tokSeq_) + vb(kPtr_) + vb(vPtr_) + vb(sel_) + vb(ceBuf_) + vb(sampleLogits_) + vb(outStart_) +
       vb(rowStart_) + vb(order_) + vb(segments_) + vb(packedSegments_);
  return b;
}

}  // namespace engine
}  // namespace qk
