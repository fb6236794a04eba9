// Next-token sampling on device logits with the CPU path's semantics (cpu/sampling.cpp): repetition
// penalty → greedy argmax (ties → lowest id), or temperature → top-k → softmax → top-p → one draw
// u ∈ [0,1) from the caller's host RNG walking the kept tokens in rank order (logit desc, id asc;
// id order when nothing is cut).
//
// One block of 1024 threads per row does it all (no sort; sampleTokens launches one block per sampled
// row of a batch, each with its own parameters, draw and repetition context): "the first token, in rank order, at which a
// cumulative quantity exceeds a target" is found by a radix descent over a 32-bit rank key (4 levels
// of 8-bit histograms, then a scan over the ids that share the final key). The quantity is a count
// (top-k: the k-th token) or the probability mass (top-p prefix, the draw). Masses are unsigned
// 24.40 fixed point (prob·2⁴⁰, prob <= 1), so the shared-memory histogram atomics are integer adds:
// the same bits on every run. A token's probability is truncated to a multiple of 2⁻⁴⁰; a draw can
// differ from the CPU's float64 walk only when u falls within ~vocab·2⁻⁴⁰ of a boundary.
#include <algorithm>
#include <climits>

#include "cuda/common.cuh"

namespace qk::cuda {

namespace {

constexpr int kSampleThreads = 1024;
using u64 = unsigned long long;

struct SampleShared {
  u64 hist[256];
  u64 warpTot[32];
  float bestV[32];
  int32_t bestI[32];
  int digit;
  u64 below;
  int32_t found;
};

// Ascending key = rank order: descending logit (the float's order-preserving bit pattern, inverted).
__device__ __forceinline__ uint32_t rankKey(float l) {
  const uint32_t b = __float_as_uint(l);
  return ~((b & 0x80000000u) ? ~b : (b | 0x80000000u));
}
// A rank-order position: token (key, id) is at or before it iff key < c.key or (key == c.key, id <= c.id).
struct Cut {
  bool on;
  uint32_t key;
  int32_t id;
  __device__ bool admits(uint32_t k, int32_t i) const { return !on || k < key || (k == key && i <= id); }
};

__device__ u64 blockSumU64(u64 v, SampleShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) sh.warpTot[warp] = v;
  __syncthreads();
  u64 t = 0;
  for (int w = 0; w < kSampleThreads / 32; ++w) t += sh.warpTot[w];
  return t;
}

// Inclusive prefix sum over the block (thread order); *total = the block's sum.
__device__ u64 blockScanU64(u64 v, u64* total, SampleShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) sh.warpTot[warp] = v;
  __syncthreads();
  u64 before = 0, all = 0;
  for (int w = 0; w < kSampleThreads / 32; ++w) {
    if (w < warp) before += sh.warpTot[w];
    all += sh.warpTot[w];
  }
  *total = all;
  return v + before;
}

// The first token in rank order (among `member` tokens) whose inclusive cumulative quantity exceeds
// T; -1 when the members' total is <= T. keyOf(i) gives the rank key (a constant key = id order).
template <class Member, class Qty, class KeyOf>
__device__ int32_t rankSearch(int64_t V, Member member, Qty qty, KeyOf keyOf, u64 T, SampleShared& sh) {
  uint32_t prefix = 0, mask = 0;
  u64 below = 0;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int t = threadIdx.x; t < 256; t += blockDim.x) sh.hist[t] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      if (!member(i)) continue;
      const uint32_t k = keyOf(i);
      if ((k & mask) == prefix) atomicAdd(&sh.hist[(k >> shift) & 255u], qty(i));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      u64 cum = below;
      int d = 0;
      for (; d < 256; ++d) {
        if (cum + sh.hist[d] > T) break;
        cum += sh.hist[d];
      }
      sh.digit = d;
      sh.below = cum;
    }
    __syncthreads();
    const int d = sh.digit;
    below = sh.below;
    if (d == 256) return -1;
    prefix |= static_cast<uint32_t>(d) << shift;
    mask |= 255u << shift;
  }
  // the tokens sharing the final key, in id order
  for (int64_t c0 = 0; c0 < V; c0 += blockDim.x) {
    const int64_t i = c0 + threadIdx.x;
    const u64 q = (i < V && member(i) && keyOf(i) == prefix) ? qty(i) : 0;
    u64 total;
    const u64 incl = blockScanU64(q, &total, sh);
    if (threadIdx.x == 0) sh.found = -1;
    __syncthreads();
    if (q > 0 && below + incl > T && below + incl - q <= T) sh.found = static_cast<int32_t>(i);  // exactly one
    __syncthreads();
    const int32_t f = sh.found;
    if (f >= 0) return f;
    below += total;
  }
  return -1;
}

struct SampleArgs {
  const float* logits;
  float* work;  // penalised copy (null: no penalty)
  int64_t V;
  float temperature, invT, topP, penalty;
  int topK;
  const int32_t* recent;
  int64_t nRecent;
  double u;
  int32_t* result;
};

// grid: one block per sampled row; rows[blockIdx.x] is that row's work.
__global__ void __launch_bounds__(kSampleThreads) sampleKernel(const SampleArgs* rows) {
  __shared__ SampleShared sh;
  const SampleArgs a = rows[blockIdx.x];
  const int64_t V = a.V;
  // 1. repetition penalty from the original logit (a repeated id counts once)
  const float* L = a.logits;
  if (a.work) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) a.work[i] = a.logits[i];
    __syncthreads();
    for (int64_t r = threadIdx.x; r < a.nRecent; r += blockDim.x) {
      const int32_t id = a.recent[r];
      if (id < 0 || id >= V) continue;
      const float l = a.logits[id];
      a.work[id] = l > 0.f ? l / a.penalty : l * a.penalty;
    }
    __syncthreads();
    L = a.work;
  }
  // 2. argmax, ties to the lowest id
  float bv = L[0];
  int32_t bi = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    if (L[i] > bv) bv = L[i], bi = static_cast<int32_t>(i);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, bv, o);
    const int32_t i2 = __shfl_xor_sync(0xffffffffu, bi, o);
    if (v2 > bv || (v2 == bv && i2 < bi)) bv = v2, bi = i2;
  }
  if ((threadIdx.x & 31) == 0) sh.bestV[threadIdx.x >> 5] = bv, sh.bestI[threadIdx.x >> 5] = bi;
  __syncthreads();
  int32_t best = sh.bestI[0];
  float bestV = sh.bestV[0];
  for (int w = 1; w < kSampleThreads / 32; ++w)
    if (sh.bestV[w] > bestV || (sh.bestV[w] == bestV && sh.bestI[w] < best)) bestV = sh.bestV[w], best = sh.bestI[w];
  if (a.temperature <= 0.f) {
    if (threadIdx.x == 0) *a.result = best;
    return;
  }
  // 3. temperature: unnormalised probabilities e^{l/T − l_best/T} <= 1, as fixed point
  const float shiftV = L[best] * a.invT;
  auto mass = [&](int64_t i) -> u64 {
    // the CPU's two roundings (prob_i = l_i·invT stored, then e^{prob_i − shift}): nvcc would
    // otherwise contract the product and the difference into one FMA
    const float p = expf(__fsub_rn(__fmul_rn(L[i], a.invT), shiftV));
    return __double2ull_rd(static_cast<double>(p) * 1099511627776.0);  // · 2⁴⁰
  };
  auto one = [](int64_t) -> u64 { return 1; };
  auto key = [&](int64_t i) { return rankKey(L[i]); };
  auto idOrder = [](int64_t) { return 0u; };
  auto all = [](int64_t) { return true; };
  auto draw = [&](u64 total) { return static_cast<u64>(floor(a.u * static_cast<double>(total))); };
  const bool cutK = a.topK > 0 && a.topK < V, cutP = a.topP < 1.f;

  if (!cutK && !cutP) {  // full distribution, id order: first i with cum > u·total
    u64 part = 0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) part += mass(i);
    const u64 total = blockSumU64(part, sh);
    const int32_t t = rankSearch(V, all, mass, idOrder, draw(total), sh);
    if (threadIdx.x == 0) *a.result = t >= 0 ? t : best;
    return;
  }
  // 4. top-k: the k-th token in rank order bounds the candidates
  Cut kc{false, 0, 0};
  if (cutK) {
    const int32_t id = rankSearch(V, all, one, key, static_cast<u64>(a.topK - 1), sh);
    kc = {true, rankKey(L[id]), id};
  }
  auto inK = [&](int64_t i) { return kc.admits(rankKey(L[i]), static_cast<int32_t>(i)); };
  u64 part = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    if (inK(i)) part += mass(i);
  const u64 total = blockSumU64(part, sh);
  // 5. top-p: the smallest rank-order prefix whose mass reaches topP·total (at least one token)
  Cut pc{false, 0, 0};
  u64 kept = total;
  if (cutP) {
    const double target = static_cast<double>(a.topP) * static_cast<double>(total);
    const double c = ceil(target);
    const u64 T = c >= 1.0 ? static_cast<u64>(c) - 1 : 0;  // cum >= target ⇔ cum > ceil(target) − 1
    const int32_t id = rankSearch(V, inK, mass, key, T, sh);
    if (id >= 0) {
      pc = {true, rankKey(L[id]), id};
      u64 kp = 0;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
        if (inK(i) && pc.admits(rankKey(L[i]), static_cast<int32_t>(i))) kp += mass(i);
      kept = blockSumU64(kp, sh);
    }
  }
  auto inKept = [&](int64_t i) {
    const uint32_t k = rankKey(L[i]);
    return kc.admits(k, static_cast<int32_t>(i)) && pc.admits(k, static_cast<int32_t>(i));
  };
  // 6. one draw walks the kept tokens in rank order; rounding past the end → the last kept token
  int32_t t = rankSearch(V, inKept, mass, key, draw(kept), sh);
  if (t < 0) {
    u64 cnt = 0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) cnt += inKept(i) ? 1 : 0;
    const u64 n = blockSumU64(cnt, sh);
    t = rankSearch(V, inKept, one, key, n - 1, sh);
  }
  if (threadIdx.x == 0) *a.result = t;
}

}  // namespace

void sampleTokens(const float* logits, int64_t vocab, const RowSampling* const* rows, int nRows, int32_t* tokens,
                  SampleScratch& scratch, Stream stream) {
  checkArg(vocab >= 1 && vocab <= INT32_MAX, "vocab size");
  checkArg(nRows >= 0, "row count");
  auto penalised = [](const RowSampling& r) { return r.p.repetitionPenalty != 1.f && r.recent && r.nRecent > 0; };
  int nSampled = 0, nPenalised = 0;
  int64_t nRecent = 0;
  for (int i = 0; i < nRows; ++i) {
    tokens[i] = -1;
    if (!rows[i]) continue;
    ++nSampled;
    if (penalised(*rows[i])) ++nPenalised, nRecent += rows[i]->nRecent;
  }
  if (nSampled == 0) {
    synchronize(stream);  // the caller's step is complete when this returns, sampled or not
    return;
  }
  // Pinned staging [args | recent ids | picked ids] (so the upload does not wait for the queued
  // step); device: slot 0 the penalised copies [nPenalised, V], 1 the picked ids, 2 [args | recent].
  const size_t argBytes = sizeof(SampleArgs) * static_cast<size_t>(nSampled);
  const size_t recBytes = sizeof(int32_t) * static_cast<size_t>(nRecent);
  const size_t need = argBytes + recBytes + sizeof(int32_t) * static_cast<size_t>(nSampled);
  if (scratch.host.bytes() < need) scratch.host = PinnedBuffer(need);
  char* host = scratch.host.as<char>();
  auto* args = reinterpret_cast<SampleArgs*>(host);
  auto* recentHost = reinterpret_cast<int32_t*>(host + argBytes);
  auto* picked = reinterpret_cast<int32_t*>(host + argBytes + recBytes);
  float* work = nPenalised ? scratch.dev.get<float>(0, static_cast<size_t>(nPenalised) * static_cast<size_t>(vocab)) : nullptr;
  int32_t* result = scratch.dev.get<int32_t>(1, static_cast<size_t>(nSampled));
  char* inDev = static_cast<char*>(scratch.dev.get(2, argBytes + recBytes));
  const int32_t* recentDev = reinterpret_cast<const int32_t*>(inDev + argBytes);

  int k = 0, pen = 0;
  int64_t rec = 0;
  for (int i = 0; i < nRows; ++i) {
    if (!rows[i]) continue;
    const RowSampling& r = *rows[i];
    SampleArgs a{};
    a.logits = logits + static_cast<int64_t>(i) * vocab;
    a.V = vocab;
    a.temperature = r.p.temperature;
    a.invT = r.p.temperature > 0.f ? 1.f / r.p.temperature : 0.f;
    a.topK = r.p.topK;
    a.topP = r.p.topP;
    a.penalty = r.p.repetitionPenalty;
    if (penalised(r)) {
      a.work = work + static_cast<int64_t>(pen++) * vocab;
      std::copy(r.recent, r.recent + r.nRecent, recentHost + rec);
      a.recent = recentDev + rec;
      a.nRecent = r.nRecent;
      rec += r.nRecent;
    }
    // exactly one draw per sampled token, none when greedy (the CPU's RNG protocol), in row order
    a.u = r.p.temperature > 0.f ? rngUniform(r.rng) : 0.0;
    a.result = result + k;
    args[k++] = a;
  }
  copyHostToDevice(inDev, host, argBytes + recBytes, stream);
  sampleKernel<<<nSampled, kSampleThreads, 0, cs(stream)>>>(reinterpret_cast<const SampleArgs*>(inDev));
  QK_CUDA_LAUNCHED();
  copyDeviceToHost(picked, result, sizeof(int32_t) * static_cast<size_t>(nSampled), stream);
  synchronize(stream);
  for (int i = 0, j = 0; i < nRows; ++i)
    if (rows[i]) tokens[i] = picked[j++];
}

}  // namespace qk::cuda
