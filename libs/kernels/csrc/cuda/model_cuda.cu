// engine::CudaModel: the decoder of model/model.cpp on the GPU. Shapes in comments: T = tokens in the
// step (all rows packed), R = rows whose logits are returned, H = hidden, I = intermediate,
// qDim = nh·hd, kvDim = nkv·hd, V = vocab, r = LoRA rank.
//
// Everything runs on one non-blocking stream owned by the model; a forward call uploads the step's
// token metadata (one pinned block), launches the decoder (or replays a captured CUDA graph for a
// decode step), downloads the logits into pinned memory and synchronises once.
#include "cuda/model_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"

namespace qk {
namespace engine {

namespace {

[[noreturn]] void invalid(const std::string& msg) { throw EngineError("INVALID_ARGUMENT", msg); }

// Decode steps (every row one token) of at most this many rows are captured as CUDA graphs; the
// cache holds at most kMaxGraphs signatures (it is cleared when full: signatures are cheap to
// recapture and a server sees few distinct adapter mixes per batch size).
constexpr int kGraphMaxRows = 64;
constexpr size_t kMaxGraphs = 64;

size_t elementBytes(WType t, int64_t n) {
  switch (t) {
    case WType::F32: return static_cast<size_t>(n) * 4;
    case WType::F16:
    case WType::BF16: return static_cast<size_t>(n) * 2;
    default: return static_cast<size_t>((n + 1) / 2);
  }
}

bool cudaBlocksize(int bs) {
  for (int s = 5; s <= 12; ++s)
    if (bs == (1 << s)) return true;
  return false;
}

// The device check runs before the host binding is built, so a machine without a GPU fails with
// the driver's reason rather than after validating (and touching) every weight.
const ModelConfig& requireUsableDevice(const ModelConfig& cfg) {
  const cuda::Info i = cuda::info();
  if (!i.available) throw EngineError("FAILED_PRECONDITION", "no CUDA device: " + i.reason);
  return cfg;
}

WeightView tableWeight(const TableView& t) {
  WeightView w{};
  w.type = static_cast<WType>(t.type);  // TableType and WType enumerate the same dtypes in the same order
  w.data = t.data;
  w.absmax = t.absmax;
  w.rows = t.rows;
  w.cols = t.cols;
  w.blocksize = t.blocksize;
  w.absmaxDq = t.absmaxDq;
  return w;
}

size_t metaBytes(int64_t cap) { return static_cast<size_t>(cap) * (2 * sizeof(int64_t) + 7 * sizeof(int32_t)); }

}  // namespace

// =============================================================================================
// Construction: validate through the CPU binding, upload every weight once
// =============================================================================================
CudaModel::CudaModel(const ModelConfig& cfg, const TensorMap& weights, int maxSequences, int maxContext,
                     bool useGraphs)
    : host_(std::make_unique<Model>(requireUsableDevice(cfg), weights, maxSequences, maxContext)),
      cfg_(cfg),
      maxSeq_(maxSequences),
      maxCtx_(maxContext),
      useGraphs_(useGraphs) {
  qDim_ = host_->qDim_;
  kvDim_ = host_->kvDim_;
  slotFloats_ = static_cast<int64_t>(cfg_.layers) * maxCtx_ * kvDim_;
  if (cfg_.headDim > 256) throw EngineError("FAILED_PRECONDITION", "the CUDA engine supports headDim <= 256");
  // flash attention (prefill rows > 8 tokens here, training in CudaLoraTrainer) where it applies;
  // QLORA_CUDA_FLASH=0, read when a model is made, keeps this model on the SIMT kernels (comparisons)
  const char* flashEnv = std::getenv("QLORA_CUDA_FLASH");
  flashAttention_ = !(flashEnv && std::string(flashEnv) == "0");
  flashPrefill_ = flashAttention_ && cuda::attentionTilesSupported(attentionShape());
  seqs_.resize(static_cast<size_t>(maxSeq_));
  cudaStream_t st = nullptr;
  QK_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  stream_ = st;  // owned from here on: the destructor does not run if the constructor throws
  try {
    uploadWeights();
    // Buffer::upload copies from pageable memory on the legacy stream, which a non-blocking stream
    // does not wait for: finish them before the first kernel reads the weights.
    QK_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    cudaStreamDestroy(st);
    stream_ = nullptr;
    throw;
  }
}

CudaModel::~CudaModel() {
  invalidateGraphs();
  if (stream_) cudaStreamDestroy(cuda::cs(stream_));
}

cuda::Buffer CudaModel::alloc(size_t bytes, const char* what) {
  try {
    return cuda::Buffer(bytes);
  } catch (const cuda::Error& e) {
    if (std::strstr(e.what(), "cudaErrorMemoryAllocation"))
      throw EngineError("RESOURCE_EXHAUSTED", std::string("out of GPU memory allocating ") + what + " (" +
                                                  std::to_string(bytes) + " bytes)");
    throw;
  }
}

const void* CudaModel::upload(const void* host, size_t bytes, const void* key) {
  if (key == nullptr) key = host;
  auto it = uploaded_.find(key);
  if (it != uploaded_.end()) return it->second;  // a tied lm_head is the embedding: one device copy
  cuda::Buffer b = alloc(bytes, "weights");
  b.upload(host, bytes);
  const void* d = b.data();
  weightBytes_ += bytes;
  weightBufs_.push_back(std::move(b));
  uploaded_.emplace(key, d);
  return d;
}

const float* CudaModel::uploadFloats(const float* host, int64_t n) {
  return host ? static_cast<const float*>(upload(host, static_cast<size_t>(n) * sizeof(float))) : nullptr;
}

WeightView CudaModel::deviceView(const WeightView& h) {
  WeightView d = h;
  const int64_t n = h.rows * h.cols;
  d.data = upload(h.data, elementBytes(h.type, n));
  if (h.type == WType::NF4) {
    // The CUDA kernels index absmax with a shift: the blocksizes bitsandbytes writes (64, 128, ...).
    if (!cudaBlocksize(h.blocksize))
      throw EngineError("FAILED_PRECONDITION", "the CUDA engine needs NF4 blocksizes that are powers of two in 32..4096, got " +
                                                   std::to_string(h.blocksize));
    const int64_t nb = (n + h.blocksize - 1) / h.blocksize;
    if (h.absmax != nullptr) {
      d.absmax = uploadFloats(h.absmax, nb);
    } else {
      // Double-quantized scales (cpu/nf4.h) are resolved once on the host: the CUDA kernels read fp32
      // (4 bytes per block of device memory instead of ~1). Keyed by the codes of the view's first
      // block, so a tied lm_head shares the embedding's copy.
      std::vector<float> scales(static_cast<size_t>(nb));
      nf4DoubleQuantAbsmaxRange(h.absmaxDq, 0, nb, scales.data());
      d.absmax = static_cast<const float*>(
          upload(scales.data(), scales.size() * sizeof(float), h.absmaxDq.codes + h.absmaxDq.firstBlock));
    }
    d.absmaxDq = Nf4DoubleQuantAbsmax{};
  }
  return d;
}

void CudaModel::uploadWeights() {
  const Model& h = *host_;
  const ModelConfig& c = cfg_;
  embed_ = deviceView(tableWeight(h.embed_));
  if (c.arch == Arch::Opt) positions_ = deviceView(tableWeight(h.positions_));
  lmHead_ = deviceView(h.lmHead_);
  finalNorm_.w = uploadFloats(h.finalNorm_.w, c.hidden);
  finalNorm_.b = uploadFloats(h.finalNorm_.b, c.hidden);
  layers_.resize(c.layers);
  for (int l = 0; l < c.layers; ++l) {
    const Layer& hl = h.layers_[l];
    DevLayer& dl = layers_[l];
    for (int k = 0; k < kNumLin; ++k) {
      if (!hl.lin[k].present) continue;
      dl.lin[k].present = true;
      dl.lin[k].w = deviceView(hl.lin[k].w);
      dl.lin[k].bias = uploadFloats(hl.lin[k].bias, hl.lin[k].w.rows);
    }
    dl.norm1 = {uploadFloats(hl.norm1.w, c.hidden), uploadFloats(hl.norm1.b, c.hidden)};
    dl.norm2 = {uploadFloats(hl.norm2.w, c.hidden), uploadFloats(hl.norm2.b, c.hidden)};
  }
  if (c.arch == Arch::Llama) {
    // The CPU path's tables (ropeTables, fp32 products as HF): the rotation is then bit-identical.
    cos_ = uploadFloats(h.cos_.data(), static_cast<int64_t>(h.cos_.size()));
    sin_ = uploadFloats(h.sin_.data(), static_cast<int64_t>(h.sin_.size()));
  }
}

// =============================================================================================
// Sequences: KV caches reserved per slot (full maxContext), in one pool grown by slots
// =============================================================================================
// The attention kernel addresses every token's cache as base + kvOffset[t], so all sequences live in
// one allocation: [slotCap][layers][maxCtx][kvDim]. Layer l's base is pool + l·maxCtx·kvDim and a
// sequence's offset, slot·layers·maxCtx·kvDim, is the same in every layer. The pool starts empty and
// doubles (up to maxSequences slots) when createSequence needs a slot past its end; the old contents
// are copied over and the captured graphs (which hold the old pointers) are dropped.
void CudaModel::ensureSlots(int slots) {
  if (slots <= slotCap_) return;
  const int cap = std::min(maxSeq_, std::max(slots, 2 * slotCap_));
  const size_t bytes = static_cast<size_t>(cap) * slotFloats_ * sizeof(float);
  cuda::Buffer k = alloc(bytes, "KV cache"), v = alloc(bytes, "KV cache");
  const size_t old = static_cast<size_t>(slotCap_) * slotFloats_ * sizeof(float);
  cuda::copyDeviceToDevice(k.data(), kPool_.data(), old, stream_);
  cuda::copyDeviceToDevice(v.data(), vPool_.data(), old, stream_);
  cuda::synchronize(stream_);
  invalidateGraphs();
  kPool_ = std::move(k);
  vPool_ = std::move(v);
  slotCap_ = cap;
}

int CudaModel::createSequence() {
  const int i = firstFreeSlot(seqs_, maxSeq_);
  ensureSlots(i + 1);
  seqs_[i].used = true;
  seqs_[i].len = 0;
  return i;
}

CudaModel::Seq& CudaModel::seqAt(int seq, const char* what) { return liveSlot(seqs_, maxSeq_, seq, what); }

void CudaModel::dropSequence(int seq) {
  Seq& s = seqAt(seq, "dropSequence");
  s.used = false;  // the slot's cache stays reserved for the next createSequence
  s.len = 0;
}

int64_t CudaModel::sequenceLength(int seq) const { return liveSlot(seqs_, maxSeq_, seq, "sequenceLength").len; }

void CudaModel::truncateSequence(int seq, int64_t length) { truncateLive(seqAt(seq, "truncateSequence"), length); }

// =============================================================================================
// Adapters: copied to the device; replacing or removing one drops the captured graphs
// =============================================================================================
void CudaModel::setAdapter(int slot, Adapter adapter) {
  if (slot < 0 || slot >= 65536) invalid("adapter slot must be in 0..65535");
  if (adapter.mods.size() != static_cast<size_t>(cfg_.layers) * kNumLin) invalid("adapter: bad module table");
  DevAdapter d;
  d.active = true;
  d.scaling = adapter.scaling;
  d.mods.resize(adapter.mods.size());
  for (size_t i = 0; i < adapter.mods.size(); ++i) {
    const LoraModule& m = adapter.mods[i];
    if (!m.a) continue;
    const WeightView& w = layers_[i / kNumLin].lin[i % kNumLin].w;  // the binding resolved the module
    const size_t aBytes = static_cast<size_t>(m.rank) * w.cols * sizeof(float);
    const size_t bBytes = static_cast<size_t>(w.rows) * m.rank * sizeof(float);
    cuda::Buffer A = alloc(aBytes, "adapter"), B = alloc(bBytes, "adapter");
    A.upload(m.a, aBytes);
    B.upload(m.b, bBytes);
    d.mods[i] = {A.as<float>(), B.as<float>(), m.rank};
    d.maxRank = std::max(d.maxRank, m.rank);
    d.bytes += aBytes + bBytes;
    d.buffers.push_back(std::move(A));
    d.buffers.push_back(std::move(B));
  }
  cuda::synchronize(nullptr);  // the pageable uploads ran on the legacy stream (see the constructor)
  if (static_cast<size_t>(slot) >= adapters_.size()) adapters_.resize(static_cast<size_t>(slot) + 1);
  invalidateGraphs();
  adapters_[slot] = std::move(d);
}

void CudaModel::removeAdapter(int slot) {
  if (!hasAdapter(slot)) throw EngineError("NOT_FOUND", "removeAdapter: no adapter in slot " + std::to_string(slot));
  invalidateGraphs();
  adapters_[slot] = DevAdapter{};
}

bool CudaModel::hasAdapter(int slot) const { return adapterActive(adapters_, slot); }

void CudaModel::checkAdapter(int adapter) const { checkAdapterSlot(adapters_, adapter); }

// =============================================================================================
// Scratch and graphs
// =============================================================================================
// Activations [cap, ·] sized for T tokens, logits [capR, V] for R rows, the LoRA tmp [cap, rank].
// Growing any of them moves pointers that captured graphs hold: the graphs are dropped.
void CudaModel::ensureScratch(int64_t T, int64_t R, int rank) {
  const int64_t H = cfg_.hidden, I = cfg_.intermediate, V = cfg_.vocab;
  const auto f = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
  bool grew = false;
  if (T > cap_) {
    const int64_t cap = std::max<int64_t>(T, 16);
    invalidateGraphs();
    x_ = alloc(f(cap * H), "activations");
    xn_ = alloc(f(cap * H), "activations");
    sel_ = alloc(f(cap * H), "activations");
    q_ = alloc(f(cap * qDim_), "activations");
    k_ = alloc(f(cap * kvDim_), "activations");
    v_ = alloc(f(cap * kvDim_), "activations");
    att_ = alloc(f(cap * qDim_), "activations");
    u_ = alloc(f(cap * I), "activations");
    if (cfg_.arch == Arch::Llama) g_ = alloc(f(cap * I), "activations");
    meta_ = alloc(metaBytes(cap), "token metadata");
    metaHost_ = cuda::PinnedBuffer(metaBytes(cap));
    cap_ = cap;
    grew = true;
  }
  if (R > capR_) {
    invalidateGraphs();
    logits_ = alloc(f(R * V), "logits");
    logitsHost_ = cuda::PinnedBuffer(f(R * V));
    capR_ = R;
  }
  if (rank > capRank_ || (grew && capRank_ > 0)) {
    invalidateGraphs();
    capRank_ = std::max<int64_t>(rank, capRank_);
    lora_ = alloc(f(cap_ * capRank_), "LoRA scratch");
  }
}

CudaModel::Meta CudaModel::metaAt(void* base) const {
  Meta m;
  m.kvOff = static_cast<int64_t*>(base);
  m.tileKv = m.kvOff + cap_;
  m.ids = reinterpret_cast<int32_t*>(m.tileKv + cap_);
  m.pos = m.ids + cap_;
  m.rowIdx = m.pos + cap_;
  m.tileTok = m.rowIdx + cap_;
  m.tileN = m.tileTok + cap_;
  m.tilePos = m.tileN + cap_;
  m.simtIdx = m.tilePos + cap_;
  return m;
}

AttentionShape CudaModel::attentionShape() const {
  AttentionShape as;
  as.nHeads = cfg_.heads;
  as.nKvHeads = cfg_.kvHeads;
  as.headDim = cfg_.headDim;
  as.scale = cfg_.arch == Arch::Llama ? 1.f / std::sqrt(static_cast<float>(cfg_.headDim)) : 1.f;  // OPT scales q itself
  return as;
}

void CudaModel::planAttention(const Meta& host, int64_t T, bool decode) {
  nTiles_ = 0;
  nSimt_ = T;
  if (flashPrefill_ && !decode)
    nTiles_ = cuda::planAttentionTiles(host.kvOff, host.pos, T, host.tileTok, host.tileN, host.tilePos, host.tileKv,
                                       host.simtIdx, &nSimt_);
}

void CudaModel::invalidateGraphs() {
  for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec));
  graphs_.clear();
}

// =============================================================================================
// Forward (the layer bodies read top to bottom as model.cpp's runDecoder)
// =============================================================================================

// y[T, out] (+)= x[T, in]·Wᵀ + b, then for every segment whose adapter has this module:
// y[seg] += scaling · (x[seg]·Aᵀ)·Bᵀ   (one shared base GEMV/GEMM, per-adapter fp32 low rank)
void CudaModel::linear(int layer, Lin which, const float* x, int64_t T, float* y, bool accumulate) {
  const DevLinear& L = layers_[layer].lin[which];
  cuda::linearForward(x, T, L.w, L.bias, y, accumulate, stream_);
  loraAdd(layer, which, x, T, y);
}

// linear() for n modules that read the same x (q/k/v, gate/up): the base products in one fused
// GEMV launch where cuda::linearForwardMany can, then each module's LoRA.
void CudaModel::linearMany(int layer, std::initializer_list<std::pair<Lin, float*>> outs, const float* x, int64_t T) {
  cuda::LinearOut base[3];
  int n = 0;
  for (const auto& [which, y] : outs) {
    const DevLinear& L = layers_[layer].lin[which];
    base[n++] = {&L.w, L.bias, y};
  }
  cuda::linearForwardMany(x, T, base, n, false, stream_);
  for (const auto& [which, y] : outs) loraAdd(layer, which, x, T, y);
}

bool CudaModel::hasLora(int layer, Lin which) const {
  for (const Segment& s : segments_)
    if (s.adapter >= 0 && adapters_[s.adapter].mods[static_cast<size_t>(layer) * kNumLin + which].a) return true;
  return false;
}

void CudaModel::loraAdd(int layer, Lin which, const float* x, int64_t T, float* y) {
  const DevLinear& L = layers_[layer].lin[which];
  const int64_t in = L.w.cols, out = L.w.rows;
  float* tmp = lora_.as<float>();  // [T, capRank_]
  loraSegs_.clear();
  for (const Segment& s : segments_) {
    if (s.adapter < 0) continue;
    const DevAdapter& ad = adapters_[s.adapter];
    const DevLora& m = ad.mods[static_cast<size_t>(layer) * kNumLin + which];
    if (m.a) loraSegs_.push_back({s.t0, s.t1, m.a, m.b, m.rank, ad.scaling});
  }
  if (loraSegs_.empty()) return;
  // short steps (decode, the graph-captured ones included): every segment in two launches
  if (T <= kGraphMaxRows && loraSegs_.size() <= static_cast<size_t>(cuda::kMaxLoraSegments)) {
    cuda::loraSegmentsForward(x, in, y, out, loraSegs_.data(), static_cast<int>(loraSegs_.size()), tmp, capRank_, stream_);
    return;
  }
  // long steps: the tiled fp32 GEMM per segment
  for (const cuda::LoraSegment& s : loraSegs_) {
    const int64_t rows = s.t1 - s.t0, r = s.rank;
    // tmp[rows, r] = x[seg]·Aᵀ        A: [r, in]
    cuda::gemmF32(false, true, rows, r, in, 1.f, x + s.t0 * in, in, s.a, in, 0.f, tmp, r, stream_);
    // y[seg] += scaling · tmp·Bᵀ       B: [out, r]
    cuda::gemmF32(false, true, rows, out, r, s.scaling, tmp, r, s.b, r, 1.f, y + s.t0 * out, out, stream_);
  }
}

void CudaModel::norm(const DevNorm& n, const float* x, float* y, int64_t rows) {
  if (cfg_.arch == Arch::Llama) cuda::rmsNormForward(x, n.w, y, rows, cfg_.hidden, cfg_.normEps, stream_);
  else cuda::layerNormForward(x, n.w, n.b, y, rows, cfg_.hidden, cfg_.normEps, stream_);
}

void CudaModel::runDecoder(int64_t T, float* kPool, float* vPool) {
  const ModelConfig& c = cfg_;
  const bool llama = c.arch == Arch::Llama, preLN = llama || c.layerNormBefore;
  const int64_t I = c.intermediate, hd = c.headDim;
  float* x = x_.as<float>();      // [T, H] residual stream
  float* xn = xn_.as<float>();    // [T, H] normed input of a block
  float* q = q_.as<float>();      // [T, qDim]
  float* k = k_.as<float>();      // [T, kvDim]
  float* v = v_.as<float>();      // [T, kvDim]
  float* att = att_.as<float>();  // [T, qDim]
  float* u = u_.as<float>();      // [T, I]
  float* g = llama ? g_.as<float>() : nullptr;  // [T, I]
  const Meta m = metaAt(meta_.data());         // device: ids, pos, kvOff [T]

  // ---- embeddings: x[t] = embed[id_t] (+ OPT learned position row pos_t + 2) ----
  cuda::embeddingForward(embed_, m.ids, 0, T, x, false, stream_);
  if (!llama) cuda::embeddingForward(positions_, m.pos, 2, T, x, true, stream_);

  const AttentionShape as = attentionShape();
  // prefill runs → flash tiles, the other tokens → SIMT (planAttention; none for decode steps)
  const cuda::AttentionTiles tiles{m.tileTok, m.tileN, m.tilePos, m.tileKv, nTiles_, m.simtIdx, nSimt_};
  const int64_t layerStride = static_cast<int64_t>(maxCtx_) * kvDim_;

  for (int l = 0; l < c.layers; ++l) {
    const DevLayer& L = layers_[l];
    float* kc = kPool + l * layerStride;  // this layer's cache rows of every sequence (+ kvOff[t])
    float* vc = vPool + l * layerStride;

    // ---- self-attention block ----
    const float* ain = x;
    if (preLN) {
      norm(L.norm1, x, xn, T);  // xn = norm1(x)
      ain = xn;
    }
    linearMany(l, {{LQ, q}, {LK, k}, {LV, v}}, ain, T);  // q [T, qDim], k, v [T, kvDim]
    // rotate (Llama) and append k, v at each token's position in its sequence's cache, then attend
    // over rows 0..pos
    if (llama) {
      cuda::ropeAppendKv(q, k, v, T, c.heads, c.kvHeads, c.headDim, m.pos, cos_, sin_, m.kvOff, kc, vc, stream_);
    } else {
      cuda::scaleInPlace(q, 1.f / std::sqrt(static_cast<float>(hd)), T * qDim_, stream_);  // OPT: q_proj(h)·hd^-0.5
      cuda::kvCacheWrite(k, v, m.kvOff, m.pos, T, kvDim_, kc, vc, stream_);
    }
    cuda::attentionForward(as, q, kc, vc, m.kvOff, m.pos, T, att, stream_, nTiles_ > 0 ? &tiles : nullptr);  // att [T, qDim]
    linear(l, LO, att, T, x, true);  // x += o_proj(att)
    if (!preLN) norm(L.norm1, x, x, T);

    // ---- MLP block ----
    const float* min = x;
    if (preLN) {
      norm(L.norm2, x, xn, T);
      min = xn;
    }
    if (llama) {
      if (hasLora(l, LGate) || hasLora(l, LUp)) {  // the LoRA terms come before the activation
        linearMany(l, {{LGate, g}, {LUp, u}}, min, T);                // g, u [T, I]
        cuda::gatedActivationForward(c.act, g, u, g, T * I, stream_);  // g = act(g)·u
      } else {                                                        // g = act(gate(xn))·up(xn), one launch when short
        const DevLinear &G = L.lin[LGate], &U = L.lin[LUp];
        cuda::gatedLinearForward(min, T, {&G.w, G.bias, g}, {&U.w, U.bias, u}, c.act, stream_);
      }
      linear(l, LDown, g, T, x, true);                                // x += down(g)
    } else {
      linear(l, LUp, min, T, u, false);                               // u = fc1(xn) [T, I]
      cuda::activationForward(c.act, u, u, T * I, stream_);          // u = act(u)
      linear(l, LDown, u, T, x, true);                                // x += fc2(u)
    }
    if (!preLN) norm(L.norm2, x, x, T);
  }
}

void CudaModel::logitsStep(int64_t R) {
  const Meta m = metaAt(meta_.data());
  float* rowsX = xn_.as<float>();  // free after the last layer; R <= T rows fit
  float* h = rowsX;
  cuda::gatherRows(x_.as<float>(), m.rowIdx, R, cfg_.hidden, rowsX, stream_);  // [R, H]
  if (finalNorm_.w) {  // (OPT post-LN has none)
    h = sel_.as<float>();
    norm(finalNorm_, rowsX, h, R);  // h [R, H]
  }
  cuda::linearForward(h, R, lmHead_, nullptr, logits_.as<float>(), false, stream_);  // logits [R, V]
}

void CudaModel::forward(const RowSpec* rows, int nRows, bool allLogits, float* logits) {
  const int64_t R = runStep(rows, nRows, allLogits);
  const size_t bytes = static_cast<size_t>(R * cfg_.vocab) * sizeof(float);
  cuda::copyDeviceToHost(logitsHost_.data(), logits_.data(), bytes, stream_);
  cuda::synchronize(stream_);
  std::memcpy(logits, logitsHost_.data(), bytes);
  appendRows(rows, nRows);
}

void CudaModel::forwardSample(const RowSpec* rows, int nRows, const RowSampling* const* sampling, int32_t* tokens) {
  runStep(rows, nRows, false);
  // the logits never leave the device: one sampling launch, nRows ids come back (synchronised)
  cuda::sampleTokens(logits_.as<float>(), cfg_.vocab, sampling, nRows, tokens, sample_, stream_);
  appendRows(rows, nRows);
}

void CudaModel::appendRows(const RowSpec* rows, int nRows) {
  for (int i = 0; i < nRows; ++i) seqs_[rows[i].seq].len += rows[i].n;
}

int64_t CudaModel::runStep(const RowSpec* rows, int nRows, bool allLogits) {
  const ModelConfig& c = cfg_;
  // ---- validate (the same checks and messages as engine::Model::forward) ----
  const int64_t T = validateRows(
      rows, nRows, maxCtx_, c.vocab, [&](int seq) { return seqAt(seq, "forward").len; },
      [&](int adapter) { checkAdapter(adapter); });
  int rank = 0;
  bool decode = true;
  for (int i = 0; i < nRows; ++i) {
    if (rows[i].adapter >= 0) rank = std::max(rank, adapters_[rows[i].adapter].maxRank);
    decode = decode && rows[i].n == 1;
  }
  const int64_t R = allLogits ? T : nRows;
  ensureScratch(T, R, rank);

  // ---- pack rows grouped by adapter (stable), so each adapter is one contiguous segment ----
  orderRowsByAdapter(rows, nRows, order_);
  const Meta m = metaAt(metaHost_.data());
  rowStart_.resize(nRows);
  segments_.clear();
  int64_t t = 0;
  for (int oi = 0; oi < nRows; ++oi) {
    const RowSpec& r = rows[order_[oi]];
    const Seq& s = seqs_[r.seq];
    rowStart_[order_[oi]] = t;
    if (segments_.empty() || segments_.back().adapter != r.adapter) segments_.push_back({r.adapter, t, t});
    for (int64_t j = 0; j < r.n; ++j, ++t) {
      m.ids[t] = r.tokens[j];
      m.pos[t] = static_cast<int32_t>(s.len + j);
      m.kvOff[t] = static_cast<int64_t>(r.seq) * slotFloats_;
    }
    segments_.back().t1 = t;
  }
  planAttention(m, T, decode);
  // the packed rows whose logits are returned, in the caller's row order
  int64_t o = 0;
  for (int i = 0; i < nRows; ++i) {
    const int64_t first = allLogits ? rowStart_[i] : rowStart_[i] + rows[i].n - 1;
    const int64_t cnt = allLogits ? rows[i].n : 1;
    for (int64_t e = 0; e < cnt; ++e) m.rowIdx[o++] = static_cast<int32_t>(first + e);
  }
  cuda::copyHostToDevice(meta_.data(), metaHost_.data(), metaBytes(cap_), stream_);

  cudaStream_t st = cuda::cs(stream_);
  float* kPool = kPool_.as<float>();
  float* vPool = vPool_.as<float>();
  if (useGraphs_ && decode && nRows <= kGraphMaxRows) {
    // A decode step's launches depend only on the adapter of each row (segments, LoRA pointers) and
    // on buffers that stay put until ensureSlots/ensureScratch/setAdapter drop the graphs; the token
    // ids, positions and cache offsets are read from meta_, uploaded above. Replaying the captured
    // graph removes the per-kernel launch gaps (8 launches per Llama layer without LoRA: 2 norms, the
    // fused q/k/v GEMV, ropeAppendKv, attention, o, the gated gate/up GEMV, down).
    std::vector<int> key(nRows);
    for (int i = 0; i < nRows; ++i) key[i] = rows[i].adapter;
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
      if (graphs_.size() >= kMaxGraphs) invalidateGraphs();
      cudaGraph_t graph = nullptr;
      QK_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      try {
        runDecoder(T, kPool, vPool);
        logitsStep(R);
      } catch (...) {
        cudaStreamEndCapture(st, &graph);  // leaves capture mode; the partial graph is discarded
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();  // an invalidated capture's error must not resurface at the next launch check
        throw;
      }
      QK_CUDA_CHECK(cudaStreamEndCapture(st, &graph));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      QK_CUDA_CHECK(e);
      it = graphs_.emplace(std::move(key), exec).first;
      ++graphsCaptured_;
    }
    QK_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(it->second), st));
    ++graphLaunches_;
  } else {
    runDecoder(T, kPool, vPool);
    logitsStep(R);
  }
  return R;
}

// =============================================================================================
// crossEntropy: one prefill on a private cache, then the fused lm_head cross-entropy kernel
// =============================================================================================
double CudaModel::crossEntropy(const int32_t* tokens, int64_t T, int adapter, int64_t* count) {
  const ModelConfig& c = cfg_;
  checkAdapter(adapter);
  if (T < 2) invalid("crossEntropy: needs at least 2 tokens");
  if (T > maxCtx_)
    throw EngineError("RESOURCE_EXHAUSTED", "crossEntropy: " + std::to_string(T) + " tokens exceed maxContext " + std::to_string(maxCtx_));
  for (int64_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= c.vocab) invalid("crossEntropy: token id " + std::to_string(tokens[t]) + " out of range");

  // A private one-sequence cache (as the CPU engine's internal slot): evaluation never takes a
  // user slot and never grows the shared pool.
  if (!ceK_.data()) {
    ceK_ = alloc(static_cast<size_t>(slotFloats_) * sizeof(float), "crossEntropy KV cache");
    ceV_ = alloc(static_cast<size_t>(slotFloats_) * sizeof(float), "crossEntropy KV cache");
  }
  ensureScratch(T, 0, adapter >= 0 ? adapters_[adapter].maxRank : 0);
  const int64_t H = c.hidden, M = T - 1, V = c.vocab;
  const Meta m = metaAt(metaHost_.data());
  for (int64_t t = 0; t < T; ++t) {
    m.ids[t] = tokens[t];
    m.pos[t] = static_cast<int32_t>(t);
    m.kvOff[t] = 0;
    if (t < M) m.rowIdx[t] = tokens[t + 1];  // the labels
  }
  planAttention(m, T, false);
  cuda::copyHostToDevice(meta_.data(), metaHost_.data(), metaBytes(cap_), stream_);
  segments_.assign(1, Segment{adapter, 0, T});
  runDecoder(T, ceK_.as<float>(), ceV_.as<float>());

  float* h = sel_.as<float>();  // h [M, H] = finalNorm(x[0..M))
  if (finalNorm_.w) norm(finalNorm_, x_.as<float>(), h, M);
  else cuda::copyDeviceToDevice(h, x_.data(), static_cast<size_t>(M * H) * sizeof(float), stream_);
  // logits [chunk, V] at a time (≤ 64 MiB), the loss per row in float64, summed on the host in order
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(M, (int64_t(1) << 24) / V));
  const double total = cuda::lmHeadCrossEntropy(h, M, lmHead_, metaAt(meta_.data()).rowIdx, chunk, 1.f, nullptr, ws_,
                                                stream_);  // synchronises
  *count = M;
  return total / static_cast<double>(M);
}

size_t CudaModel::residentBytes() const {
  size_t b = weightBytes_;
  for (const DevAdapter& a : adapters_) b += a.bytes;
  for (const cuda::Buffer* p : {&kPool_, &vPool_, &ceK_, &ceV_, &x_, &xn_, &q_, &k_, &v_, &att_, &g_, &u_, &lora_,
                                &sel_, &logits_, &meta_})
    b += p->bytes();
  return b;
}

}  // namespace engine
}  // namespace qk
