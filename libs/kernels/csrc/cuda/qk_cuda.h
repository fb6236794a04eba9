// The CUDA kernel layer (docs/cuda.md): one plain C++ header, so the N-API bindings (compiled by g++)
// never see CUDA headers. Every function is implemented in csrc/cuda/*.cu (compiled by nvcc into a
// static library, linked with libcudart_static only when the build found nvcc: QLORA_WITH_CUDA).
//
// Conventions:
//  - Every pointer argument of a kernel launcher is a DEVICE pointer unless the comment says host.
//  - The math of each kernel is the CPU kernel's (csrc/cpu/*.h): the same structs (WeightView,
//    AttentionShape, LoraBranch, AdamWParams, SamplingParams) are reused with device pointers inside.
//  - Launchers are asynchronous on `stream` (nullptr = the legacy default stream) unless they return a
//    host value (then they synchronise that stream).
//  - Every CUDA call is checked; a failure throws qk::cuda::Error (a std::runtime_error) with the CUDA
//    error text — never an abort. Bad arguments throw std::invalid_argument.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/adamw.h"
#include "cpu/attention.h"
#include "cpu/backward.h"
#include "cpu/matmul.h"
#include "cpu/ops.h"
#include "cpu/sampling.h"

namespace qk::cuda {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---- runtime ---------------------------------------------------------------------------------
struct DeviceInfo {
  std::string name;
  size_t totalMemory = 0;
  int major = 0, minor = 0;  // compute capability
  int multiprocessors = 0;
};
struct Info {
  bool available = false;  // a device can be used (driver present, >= 1 device of sm_80+)
  std::string reason;      // why not (the CUDA error text), empty when available
  int runtimeVersion = 0;  // e.g. 13000
  int driverVersion = 0;   // 0 without a driver
  std::vector<DeviceInfo> devices;
};
Info info();  // never throws; probes once, then cached
// Throws Error("no CUDA device: <reason>") unless info().available.
void requireDevice();

using Stream = void*;  // a cudaStream_t; nullptr = the legacy default stream
void synchronize(Stream stream = nullptr);

// Device memory owned by an object (cudaMalloc / cudaFree); move-only.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t bytes);
  ~Buffer();
  Buffer(Buffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return ptr_; }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }
  // Synchronous copies (bytes <= this->bytes() - offset, checked).
  void upload(const void* host, size_t bytes, size_t offset = 0);
  void download(void* host, size_t bytes, size_t offset = 0) const;
  void zero();

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A buffer uploaded from host memory in one call.
Buffer uploaded(const void* host, size_t bytes);

// Page-locked host memory (cudaMallocHost / cudaFreeHost), move-only: the staging area of
// asynchronous copies (a copy from pageable memory is synchronous and cannot be captured in a
// CUDA graph). Contents are uninitialised.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() const { return ptr_; }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// cudaMemcpyAsync in either direction on `stream` (host memory should be pinned for it to be
// asynchronous).
void copyHostToDevice(void* dst, const void* src, size_t bytes, Stream stream = nullptr);
void copyDeviceToHost(void* dst, const void* src, size_t bytes, Stream stream = nullptr);

// Scratch memory for the launchers that need temporaries: numbered slots that grow on demand and
// are reused across calls (one Workspace per stream; not thread-safe).
class Workspace {
 public:
  void* get(int slot, size_t bytes);
  template <class T>
  T* get(int slot, size_t count) { return static_cast<T*>(get(slot, count * sizeof(T))); }

 private:
  std::vector<Buffer> slots_;
};

void copyDeviceToDevice(void* dst, const void* src, size_t bytes, Stream stream = nullptr);

// Runs fn once (warm-up), then `iters` times between two events; returns milliseconds per run.
double timeMs(const std::function<void()>& fn, int iters, Stream stream = nullptr);

// ---- NF4 and linear layers (cpu/nf4.h, cpu/matmul.h) ---------------------------------------------
// out[i] = NF4[code_i] · absmax[i / blocksize] (bit-identical to qk::nf4Dequantize).
void nf4Dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, float* out,
                   Stream stream = nullptr);
// The same values rounded to bf16 (nearest even; bit-identical to qk::nf4DequantizeBf16).
void nf4DequantizeBf16(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, uint16_t* out,
                       Stream stream = nullptr);

// y[M,N] (=|+=) x[M,K]·Wᵀ (+ bias).  w: a WeightView whose data/absmax are device pointers
// (f32/f16/bf16 data element-aligned). M <= 8: GEMV (fp32 math, NF4 decoded in registers); M > 8:
// bf16 tensor-core GEMM (x and W rounded to bf16, fp32 accumulation), NF4 tiles dequantized into
// shared memory.
void linearForward(const float* x, int64_t M, const WeightView& w, const float* bias, float* y, bool accumulate,
                   Stream stream = nullptr);
// One output of linearForwardMany: y[M, w.rows] (=|+=) x·wᵀ + bias.
struct LinearOut {
  const WeightView* w;
  const float* bias;
  float* y;
};
// linearForward for up to 3 weights that read the same x (q/k/v; gate/up): at M <= 8 with every
// weight on the fast NF4 GEMV (NF4, K % 32 == 0, 16-byte aligned, same K) one launch computes all
// of them, with the same per-output arithmetic as linearForward; otherwise one linearForward each.
// Returns whether it fused.
bool linearForwardMany(const float* x, int64_t M, const LinearOut* outs, int n, bool accumulate,
                       Stream stream = nullptr);
// gate.y[M, I] = act(x·Gᵀ + b_g)·(x·Uᵀ + b_u) (a gated MLP's first half, SwiGLU for silu): at M <= 8
// with both weights on the fast NF4 GEMV one launch, per output the same arithmetic as the two
// linearForward + gatedActivationForward it otherwise runs (up.y is then scratch). Returns whether
// it fused.
bool gatedLinearForward(const float* x, int64_t M, const LinearOut& gate, const LinearOut& up, Activation act,
                        Stream stream = nullptr);
// dx[M,K] (=|+=) dy[M,N]·W (bf16 tensor cores for any M; training only).
void linearBackwardInput(const float* dy, int64_t M, const WeightView& w, float* dx, bool accumulate,
                         Stream stream = nullptr);
// The LoRA branch of a short step for every adapter segment at once (the SGMV shape of Punica /
// S-LoRA): for each segment s, rows [t0, t1) of the packed tokens:
//   y[t0..t1) += scaling_s · (x[t0..t1)·A_sᵀ)·B_sᵀ      A_s [rank_s, in], B_s [out, rank_s] (fp32)
// Two launches however many segments (shrink: a warp per (row, rank index) into tmp[t, ·] with row
// stride ldTmp >= every rank; expand: a thread per (row, output)), where one gemmF32 pair per
// segment would cost 2 launches each — a decode batch over 8 adapters with all 7 Llama linears
// adapted: 14 launches per layer instead of 112. At most kMaxLoraSegments segments.
struct LoraSegment {
  int64_t t0, t1;
  const float* a;
  const float* b;
  int rank;
  float scaling;
};
constexpr int kMaxLoraSegments = 64;
void loraSegmentsForward(const float* x, int64_t in, float* y, int64_t out, const LoraSegment* segs, int n, float* tmp,
                         int64_t ldTmp, Stream stream = nullptr);

// Dense fp32 GEMM on CUDA cores (the LoRA branch keeps fp32 master weights), qk::gemmF32 semantics:
// C = alpha·op(A)·op(B) + beta·C, row-major, beta == 0: C not read. Deterministic.
void gemmF32(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc, Stream stream = nullptr);

// ---- LoRA (cpu/backward.h) ----------------------------------------------------------------------
// y (=|+=) drop(x)·mask with the same counter-based bits as qk::dropoutApply (bit-identical).
void dropoutApply(const float* x, float* y, int64_t rows, int64_t cols, float p, uint64_t key, bool accumulate,
                  Stream stream = nullptr);
// qk::loraLinearForward / loraLinearBackward with device pointers everywhere (lora->a, b, ga, gb too).
void loraLinearForward(const float* x, int64_t N, const WeightView& w, const float* bias, const LoraBranch* lora,
                       float* y, bool accumulate, float* u, Workspace& ws, Stream stream = nullptr);
void loraLinearBackward(const float* x, const float* u, const float* dy, int64_t N, const WeightView& w,
                        const LoraBranch* lora, float* dx, bool accumulate, bool needDx, Workspace& ws,
                        Stream stream = nullptr);

// ---- norms, RoPE, activations (cpu/ops.h, cpu/backward.h) -------------------------------------
void rmsNormForward(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps,
                    Stream stream = nullptr);
void layerNormForward(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim, float eps,
                      Stream stream = nullptr);
void rmsNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim, float eps,
                     bool accumulate, Stream stream = nullptr);
void layerNormBackward(const float* dy, const float* x, const float* w, float* dx, int64_t rows, int64_t dim,
                       float eps, bool accumulate, Stream stream = nullptr);
// cosT / sinT: the CPU path's tables (qk::ropeTables) uploaded, [positions, headDim/2].
void ropeForward(float* x, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                 const float* sinT, Stream stream = nullptr);
void ropeBackward(float* dx, int64_t T, int nHeads, int headDim, const int32_t* pos, const float* cosT,
                  const float* sinT, Stream stream = nullptr);
void activationForward(Activation act, const float* x, float* y, int64_t n, Stream stream = nullptr);
void gatedActivationForward(Activation act, const float* gate, const float* up, float* y, int64_t n,
                            Stream stream = nullptr);
void activationBackward(Activation act, const float* x, const float* dy, float* dx, int64_t n,
                        Stream stream = nullptr);
void gatedActivationBackward(Activation act, const float* gate, const float* up, const float* dy, float* dgate,
                             float* dup, int64_t n, Stream stream = nullptr);

// ---- engine glue (the device decoder, model/model_cuda.cu) ------------------------------------
// out[t, :] (=|+=) table[ids[t] + idOffset, :] as fp32, any weight dtype (exactly qk::tableRow's
// values). table: a device WeightView [rows, cols]; ids: device, in range (checked by the caller).
void embeddingForward(const WeightView& table, const int32_t* ids, int32_t idOffset, int64_t T, float* out,
                      bool accumulate, Stream stream = nullptr);
// Appends each token's k / v row [kvDim] to its sequence's cache: kCache[kvOffset[t] + pos[t]·kvDim + e]
// (the addressing of attentionForward, so the same kvOffset / pos arrays serve both).
void kvCacheWrite(const float* k, const float* v, const int64_t* kvOffset, const int32_t* pos, int64_t T,
                  int64_t kvDim, float* kCache, float* vCache, Stream stream = nullptr);
// ropeForward on q [T, nHeads·hd] and k [T, nKvHeads·hd], then kvCacheWrite of the rotated k and of
// v — one launch (a decode step's Llama attention prologue); the same values bit for bit.
void ropeAppendKv(float* q, float* k, const float* v, int64_t T, int nHeads, int nKvHeads, int headDim,
                  const int32_t* pos, const float* cosT, const float* sinT, const int64_t* kvOffset, float* kCache,
                  float* vCache, Stream stream = nullptr);
// dst[r, :] = src[idx[r], :] for r < R, rows of `cols` floats (idx: device).
void gatherRows(const float* src, const int32_t* idx, int64_t R, int64_t cols, float* dst, Stream stream = nullptr);
// dst[idx[r], :] = src[r, :] for r < R (the inverse of gatherRows; idx distinct; other rows untouched).
void scatterRows(const float* src, const int32_t* idx, int64_t R, int64_t cols, float* dst, Stream stream = nullptr);
// y[i] += x[i] (qk::addInto: one fp32 add).
void addInPlace(float* y, const float* x, int64_t n, Stream stream = nullptr);
// x[i] *= s (the OPT query scaling; one fp32 multiply as qk::scale).
void scaleInPlace(float* x, float s, int64_t n, Stream stream = nullptr);

// ---- attention (cpu/attention.h, cpu/backward.h) -----------------------------------------------
// Prefill tiles for the flash kernel (attention_flash.cu): tile i = packed tokens tok0[i] ..
// tok0[i] + nq[i] − 1 (nq <= kAttentionTileRows), consecutive positions pos0[i].. of the one sequence
// whose cache starts at element kvOff[i]; simtTokens: the other tokens (for the SIMT kernel). Device
// arrays, made on the host by planAttentionTiles.
struct AttentionTiles {
  const int32_t* tok0;
  const int32_t* nq;
  const int32_t* pos0;
  const int64_t* kvOff;
  int64_t count;
  const int32_t* simtTokens;
  int64_t simtCount;
};
constexpr int kAttentionTileRows = 64;
constexpr int kAttentionTileMinRun = 8;  // runs longer than this (prefill) go to the flash kernel
// Inference (prefill and decode) over KV caches: token t's sequence cache starts at element
// kvOffset[t] of kCache / vCache (rows of nKvHeads·hd floats, position-major) and it attends to
// positions 0..pos[t]. q, out: [T, nHeads·hd]. headDim <= 256. Without tiles every token runs the
// SIMT kernel (fp32); with tiles (attentionTilesSupported) the tiles' tokens run the flash kernel
// (TF32 tensor cores, as training's) and tiles->simtTokens the SIMT one.
void attentionForward(const AttentionShape& s, const float* q, const float* kCache, const float* vCache,
                      const int64_t* kvOffset, const int32_t* pos, int64_t T, float* out, Stream stream = nullptr,
                      const AttentionTiles* tiles = nullptr);
// Whether the flash prefill kernel takes this shape on the current device (headDim 32/64/128, shared memory).
bool attentionTilesSupported(const AttentionShape& s);
// Host: splits T packed tokens (host kvOffset / pos) into flash tiles — every maximal run of
// consecutive tokens of one cache at consecutive positions longer than kAttentionTileMinRun, cut in
// tiles of kAttentionTileRows, whose cache offset is a multiple of 4 floats (read as float4) — and the
// remaining tokens. Arrays of capacity T; returns the tile count.
int64_t planAttentionTiles(const int64_t* kvOffset, const int32_t* pos, int64_t T, int32_t* tok0, int32_t* nq,
                           int32_t* pos0, int64_t* tileKv, int32_t* simtTokens, int64_t* simtCount);
// Which kernels the training attention runs. Flash: tensor-core tiles (attention_flash.cu; q, k, v,
// dout and the probabilities rounded to TF32, fp32 accumulation and softmax) for headDim 32 / 64 / 128
// with 16-byte aligned buffers, where the device has the shared memory per block (backward: hd 64
// 103 KB, hd 128 167 KB — sm_90 has both, sm_80 only hd <= 64, sm_86/89 (99 KB) only hd 32); Simt:
// fp32 throughout (any headDim <= 256); Auto: Flash where forward and backward both apply, else Simt.
// Forcing Flash where it does not apply is invalid_argument.
enum class AttentionKernel { Auto, Simt, Flash };
// Training: B rows × T positions, token i = b·T+t sees row positions start[i]..t; lse [N, nHeads].
// start never decreases along a row (segments of packed sequences).
void attentionTrainForward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                           const float* k, const float* v, float* out, float* lse, Stream stream = nullptr,
                           AttentionKernel kernel = AttentionKernel::Auto);
// dq, dk, dv overwritten; deterministic (each output row reduced by one block in a fixed order).
void attentionTrainBackward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                            const float* k, const float* v, const float* out, const float* lse, const float* dout,
                            float* dq, float* dk, float* dv, Workspace& ws, Stream stream = nullptr,
                            AttentionKernel kernel = AttentionKernel::Auto);

// ---- loss ---------------------------------------------------------------------------------------
// qk::softmaxCrossEntropy: loss[r] (device float64) = logsumexp(z_r) − z_r[label]; with grad the logits
// become (softmax − onehot)·gradScale in place. One block streams each row's vocabulary.
void softmaxCrossEntropy(float* logits, int64_t rows, int64_t V, const int32_t* labels, double* loss,
                         float gradScale, bool grad, Stream stream = nullptr);
// qk::lmHeadCrossEntropy: chunkRows rows of logits at a time (GEMM → loss/grad in place → dh GEMM).
// h, labels, dh: device. Returns Σ loss (summed on the host in row order; synchronises).
double lmHeadCrossEntropy(const float* h, int64_t M, const WeightView& w, const int32_t* labels, int64_t chunkRows,
                          float gradScale, float* dh, Workspace& ws, Stream stream = nullptr);

// ---- optimizer ------------------------------------------------------------------------------------
// qk::adamwUpdate, bit-identical (the same IEEE operations in the same order, no FMA contraction).
void adamwUpdate(float* p, float* g, float* m, float* v, int64_t n, const AdamWParams& o, float clip,
                 Stream stream = nullptr);
// Σ g² in float64: per 4096-element block on the device, block sums added on the host in order.
double sumSquares(const float* g, int64_t n, Workspace& ws, Stream stream = nullptr);
// out[t] = sumSquares(g[t], n[t]) for `count` tensors, with one download and one synchronisation in
// all (the trainer's global gradient norm over every LoRA tensor).
void sumSquaresMany(const float* const* g, const int64_t* n, int count, double* out, Workspace& ws,
                    Stream stream = nullptr);

// ---- sampling -----------------------------------------------------------------------------------
// qk::sampleToken for a batch of device logits rows ([nRows, vocab]): rows[i] (host; null = row i is
// not sampled, tokens[i] = -1) gives row i's parameters, its recent ids (host) and its RNG, advanced
// exactly as the CPU path does (one draw per sampled row when temperature > 0, in row order). One
// upload (the per-row arguments and recent ids, staged in pinned memory), one launch (a block per
// sampled row), one download of the picked ids; always synchronises the stream before returning.
struct SampleScratch {
  Workspace dev;
  PinnedBuffer host;
};
void sampleTokens(const float* logits, int64_t vocab, const RowSampling* const* rows, int nRows, int32_t* tokens,
                  SampleScratch& scratch, Stream stream = nullptr);

}  // namespace qk::cuda
