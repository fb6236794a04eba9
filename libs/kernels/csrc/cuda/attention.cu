// Causal GQA attention: inference over KV caches (prefill and decode), the training forward with its
// log-sum-exp, and the training backward (p recomputed from lse, flash-attention style).
// CPU counterparts: cpu/attention.cpp (attentionForward), cpu/backward.cpp (attentionTrain*).
//
// Layout of the work: one block of 4 warps per (query token, head) — or per (key row, kv head) in the
// dK/dV pass. A head vector of hd <= 256 floats is spread over the 32 lanes (element e = lane + 32·c),
// so a dot product is 8 FMAs per lane and a 5-step shuffle reduction; each warp takes groups of 4
// consecutive keys (4 independent reductions in flight) interleaved with the other warps, keeps an
// online softmax (running max, sum, weighted v), and the 4 warp states are merged in a fixed order:
// deterministic, no atomics. This is the SIMT version: fp32 throughout, any headDim, the decode kernel
// (no workspace); training takes the tensor-core flash kernels of attention_flash.cu where they apply.
#include <algorithm>
#include <cfloat>

#include "cuda/attention_flash.cuh"
#include "cuda/common.cuh"

namespace qk::cuda {

namespace {

constexpr int kAttnWarps = 4;
constexpr int kMaxC = 8;  // hd <= 32·8
constexpr int kGroup = 4;  // keys per warp step

struct AttnArgs {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  float* lse;  // training forward only
  int nh, nkv, hd;
  float scale;
  // cache mode (inference)
  const int64_t* kvOffset;
  const int32_t* pos;
  // training mode
  int64_t T;
  const int32_t* start;
  // cache mode: the tokens this launch takes (block b → token tokens[b / nh]); nullptr = all
  const int32_t* tokens = nullptr;
};

// Keys of query token i: rows base + j·kw, j < n (base in elements, relative to k / v).
template <bool kTrain>
__device__ __forceinline__ void keyRange(const AttnArgs& a, int64_t i, int64_t* base, int64_t* n) {
  const int64_t kw = static_cast<int64_t>(a.nkv) * a.hd;
  if (kTrain) {
    const int64_t b = i / a.T, t = i % a.T, s = a.start[i];
    *base = (b * a.T + s) * kw;
    *n = t - s + 1;
  } else {
    *base = a.kvOffset[i];
    *n = static_cast<int64_t>(a.pos[i]) + 1;
  }
}

template <bool kTrain>
__global__ void __launch_bounds__(kAttnWarps * 32) attentionForwardKernel(AttnArgs a) {
  __shared__ float sm[kAttnWarps], sl[kAttnWarps];
  __shared__ float so[kAttnWarps][32 * kMaxC];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i = (!kTrain && a.tokens) ? static_cast<int64_t>(a.tokens[blockIdx.x / a.nh]) : blockIdx.x / a.nh;
  const int h = static_cast<int>(blockIdx.x % a.nh), g = h / (a.nh / a.nkv);
  const int hd = a.hd, nc = (hd + 31) / 32;
  const int64_t kw = static_cast<int64_t>(a.nkv) * hd, qw = static_cast<int64_t>(a.nh) * hd;
  int64_t base, n;
  keyRange<kTrain>(a, i, &base, &n);
  const float* kb = a.k + base + static_cast<int64_t>(g) * hd;
  const float* vb = a.v + base + static_cast<int64_t>(g) * hd;
  float q[kMaxC], o[kMaxC];
#pragma unroll
  for (int c = 0; c < kMaxC; ++c) {
    const int e = lane + 32 * c;
    q[c] = (c < nc && e < hd) ? a.q[i * qw + static_cast<int64_t>(h) * hd + e] : 0.f;
    o[c] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int64_t j0 = static_cast<int64_t>(warp) * kGroup; j0 < n; j0 += kAttnWarps * kGroup) {
    float s[kGroup];
#pragma unroll
    for (int jj = 0; jj < kGroup; ++jj) {
      float d = 0.f;
      if (j0 + jj < n) {
        const float* kr = kb + (j0 + jj) * kw;
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) {
          const int e = lane + 32 * c;
          if (c < nc && e < hd) d += q[c] * kr[e];
        }
      }
      s[jj] = d;
    }
#pragma unroll
    for (int jj = 0; jj < kGroup; ++jj) s[jj] = j0 + jj < n ? a.scale * warpSum(s[jj]) : -INFINITY;
    float mx = m;
#pragma unroll
    for (int jj = 0; jj < kGroup; ++jj) mx = fmaxf(mx, s[jj]);  // finite: key j0 < n exists
    const float corr = expf(m - mx);
    l *= corr;
#pragma unroll
    for (int c = 0; c < kMaxC; ++c) o[c] *= corr;
#pragma unroll
    for (int jj = 0; jj < kGroup; ++jj) {
      if (j0 + jj >= n) break;
      const float p = expf(s[jj] - mx);
      l += p;
      const float* vr = vb + (j0 + jj) * kw;
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int e = lane + 32 * c;
        if (c < nc && e < hd) o[c] += p * vr[e];
      }
    }
    m = mx;
  }
  if (lane == 0) sm[warp] = m, sl[warp] = l;
#pragma unroll
  for (int c = 0; c < kMaxC; ++c) so[warp][lane + 32 * c] = o[c];
  __syncthreads();
  if (warp == 0) {
    float M = sm[0];
    for (int w = 1; w < kAttnWarps; ++w) M = fmaxf(M, sm[w]);
    float L = 0.f, f[kAttnWarps];
    for (int w = 0; w < kAttnWarps; ++w) {
      f[w] = sl[w] > 0.f ? expf(sm[w] - M) : 0.f;  // a warp without keys has m = -inf, l = 0
      L += sl[w] * f[w];
    }
    const float inv = 1.f / L;
    float* out = a.out + i * qw + static_cast<int64_t>(h) * hd;
    for (int c = 0; c < nc; ++c) {
      const int e = lane + 32 * c;
      if (e >= hd) break;
      float acc = 0.f;
      for (int w = 0; w < kAttnWarps; ++w) acc += so[w][e] * f[w];
      out[e] = acc * inv;
    }
    if (kTrain && lane == 0) a.lse[i * a.nh + h] = M + logf(L);
  }
}

// D[i, h] = dout_i·out_i (one warp per (token, head))
__global__ void attentionDKernel(const float* __restrict__ dout, const float* __restrict__ out, int64_t NH, int hd,
                                 float* __restrict__ D) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= NH) return;
  float s = 0.f;
  for (int e = lane; e < hd; e += 32) s += dout[w * hd + e] * out[w * hd + e];
  s = warpSum(s);
  if (lane == 0) D[w] = s;
}

// dq_i = Σ_j scale·p_j(dp_j − D_i)·k_j over the keys of query i (one block per (token, head)).
__global__ void __launch_bounds__(kAttnWarps * 32)
    attentionDqKernel(AttnArgs a, const float* __restrict__ dout, const float* __restrict__ D, float* __restrict__ dq) {
  __shared__ float sdq[kAttnWarps][32 * kMaxC];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i = blockIdx.x / a.nh;
  const int h = static_cast<int>(blockIdx.x % a.nh), g = h / (a.nh / a.nkv);
  const int hd = a.hd, nc = (hd + 31) / 32;
  const int64_t kw = static_cast<int64_t>(a.nkv) * hd, qw = static_cast<int64_t>(a.nh) * hd;
  int64_t base, n;
  keyRange<true>(a, i, &base, &n);
  const float* kb = a.k + base + static_cast<int64_t>(g) * hd;
  const float* vb = a.v + base + static_cast<int64_t>(g) * hd;
  const int64_t qo = i * qw + static_cast<int64_t>(h) * hd;
  float q[kMaxC], go[kMaxC], acc[kMaxC];
#pragma unroll
  for (int c = 0; c < kMaxC; ++c) {
    const int e = lane + 32 * c;
    const bool in = c < nc && e < hd;
    q[c] = in ? a.q[qo + e] : 0.f;
    go[c] = in ? dout[qo + e] : 0.f;
    acc[c] = 0.f;
  }
  const float lse = a.lse[i * a.nh + h], Di = D[i * a.nh + h];
  for (int64_t j0 = static_cast<int64_t>(warp) * kGroup; j0 < n; j0 += kAttnWarps * kGroup) {
    float sd[kGroup], pd[kGroup];
#pragma unroll
    for (int jj = 0; jj < kGroup; ++jj) {
      float d1 = 0.f, d2 = 0.f;
      if (j0 + jj < n) {
        const float* kr = kb + (j0 + jj) * kw;
        const float* vr = vb + (j0 + jj) * kw;
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) {
          const int e = lane + 32 * c;
          if (c < nc && e < hd) d1 += q[c] * kr[e], d2 += go[c] * vr[e];
        }
      }
      sd[jj] = d1, pd[jj] = d2;
    }
#pragma unroll
    for (int jj = 0; jj < kGroup; ++jj) {
      if (j0 + jj >= n) break;
      const float p = expf(a.scale * warpSum(sd[jj]) - lse);
      const float ds = p * (warpSum(pd[jj]) - Di) * a.scale;
      const float* kr = kb + (j0 + jj) * kw;
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int e = lane + 32 * c;
        if (c < nc && e < hd) acc[c] += ds * kr[e];
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kMaxC; ++c) sdq[warp][lane + 32 * c] = acc[c];
  __syncthreads();
  if (warp == 0)
    for (int c = 0; c < nc; ++c) {
      const int e = lane + 32 * c;
      if (e >= hd) break;
      float s = 0.f;
      for (int w = 0; w < kAttnWarps; ++w) s += sdq[w][e];
      dq[qo + e] = s;
    }
}

// dk_j = Σ_{h in group, i sees j} scale·ds_ij·q_i,  dv_j = Σ p_ij·dout_i (one block per (key row, kv head)).
__global__ void __launch_bounds__(kAttnWarps * 32)
    attentionDkDvKernel(AttnArgs a, const float* __restrict__ dout, const float* __restrict__ D, float* __restrict__ dk,
                        float* __restrict__ dv) {
  __shared__ float sk[kAttnWarps][32 * kMaxC], sv[kAttnWarps][32 * kMaxC];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j = blockIdx.x / a.nkv;  // key row (global token index)
  const int g = static_cast<int>(blockIdx.x % a.nkv), group = a.nh / a.nkv;
  const int hd = a.hd, nc = (hd + 31) / 32;
  const int64_t kw = static_cast<int64_t>(a.nkv) * hd, qw = static_cast<int64_t>(a.nh) * hd;
  const int64_t b = j / a.T, tj = j % a.T;
  const int64_t ko = j * kw + static_cast<int64_t>(g) * hd;
  float kr[kMaxC], vr[kMaxC], gk[kMaxC], gv[kMaxC];
#pragma unroll
  for (int c = 0; c < kMaxC; ++c) {
    const int e = lane + 32 * c;
    const bool in = c < nc && e < hd;
    kr[c] = in ? a.k[ko + e] : 0.f;
    vr[c] = in ? a.v[ko + e] : 0.f;
    gk[c] = 0.f, gv[c] = 0.f;
  }
  for (int h = g * group; h < (g + 1) * group; ++h) {
    const int64_t ho = static_cast<int64_t>(h) * hd;
    // queries t >= tj of the row whose segment starts at or before tj (starts never decrease along a row)
    for (int64_t ti = tj + warp; ti < a.T; ti += kAttnWarps) {
      const int64_t i = b * a.T + ti;
      if (a.start[i] > tj) break;
      const float* qi = a.q + i * qw + ho;
      const float* gi = dout + i * qw + ho;
      float d1 = 0.f, d2 = 0.f, qv[kMaxC], gov[kMaxC];
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int e = lane + 32 * c;
        const bool in = c < nc && e < hd;
        qv[c] = in ? qi[e] : 0.f;
        gov[c] = in ? gi[e] : 0.f;
        d1 += qv[c] * kr[c], d2 += gov[c] * vr[c];
      }
      const float p = expf(a.scale * warpSum(d1) - a.lse[i * a.nh + h]);
      const float ds = p * (warpSum(d2) - D[i * a.nh + h]) * a.scale;
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) gk[c] += ds * qv[c], gv[c] += p * gov[c];
    }
  }
#pragma unroll
  for (int c = 0; c < kMaxC; ++c) sk[warp][lane + 32 * c] = gk[c], sv[warp][lane + 32 * c] = gv[c];
  __syncthreads();
  if (warp == 0)
    for (int c = 0; c < nc; ++c) {
      const int e = lane + 32 * c;
      if (e >= hd) break;
      float s1 = 0.f, s2 = 0.f;
      for (int w = 0; w < kAttnWarps; ++w) s1 += sk[w][e], s2 += sv[w][e];
      dk[ko + e] = s1;
      dv[ko + e] = s2;
    }
}

void checkShape(const AttentionShape& s) {
  checkArg(s.nHeads > 0 && s.nKvHeads > 0 && s.nHeads % s.nKvHeads == 0, "attention heads (nHeads % nKvHeads)");
  checkArg(s.headDim > 0 && s.headDim <= 32 * kMaxC, "attention headDim must be in 1..256");
}

unsigned blocksOf(int64_t n) {
  checkArg(n <= 0x7fffffffLL, "attention: too many (token, head) pairs for one launch");
  return static_cast<unsigned>(n);
}

// Flash for this call? (kernel choice, shape, alignment and the device's shared memory)
bool useFlash(AttentionKernel kernel, const AttentionShape& s, int64_t B, int64_t T, bool backward,
              std::initializer_list<const void*> ptrs) {
  if (kernel == AttentionKernel::Simt) return false;
  const char* why = flash::unsupportedReason(s, B, T, backward, ptrs);
  if (why && kernel == AttentionKernel::Flash) checkArg(false, why);
  return why == nullptr;
}

}  // namespace

void attentionForward(const AttentionShape& s, const float* q, const float* kCache, const float* vCache,
                      const int64_t* kvOffset, const int32_t* pos, int64_t T, float* out, Stream stream,
                      const AttentionTiles* tiles) {
  checkShape(s);
  if (T <= 0) return;
  AttnArgs a{q, kCache, vCache, out, nullptr, s.nHeads, s.nKvHeads, s.headDim, s.scale, kvOffset, pos, 0, nullptr};
  const int64_t nSimt = tiles ? tiles->simtCount : T;
  a.tokens = tiles ? tiles->simtTokens : nullptr;
  if (nSimt > 0) {
    attentionForwardKernel<false><<<blocksOf(nSimt * s.nHeads), kAttnWarps * 32, 0, cs(stream)>>>(a);
    QK_CUDA_LAUNCHED();
  }
  if (tiles && tiles->count > 0) {
    const char* why = flash::unsupportedReason(s, 1, 1, false, {q, kCache, vCache});
    checkArg(why == nullptr, why ? why : "");
    flash::prefill(flash::CacheArgs{q, kCache, vCache, out, *tiles, s.nHeads, s.nKvHeads, s.headDim, s.scale}, stream);
  }
}

bool attentionTilesSupported(const AttentionShape& s) {
  return flash::unsupportedReason(s, 1, 1, false, {}) == nullptr;
}

int64_t planAttentionTiles(const int64_t* kvOffset, const int32_t* pos, int64_t T, int32_t* tok0, int32_t* nq,
                           int32_t* pos0, int64_t* tileKv, int32_t* simtTokens, int64_t* simtCount) {
  int64_t tiles = 0, simt = 0;
  for (int64_t t = 0; t < T;) {
    int64_t e = t + 1;  // the run: same cache, positions + 1
    while (e < T && kvOffset[e] == kvOffset[t] && pos[e] == pos[e - 1] + 1) ++e;
    // the flash kernel reads cache rows as float4: the cache must start on a 16-byte boundary
    if (e - t > kAttentionTileMinRun && kvOffset[t] % 4 == 0) {
      for (int64_t i = t; i < e; i += kAttentionTileRows) {
        tok0[tiles] = static_cast<int32_t>(i);
        nq[tiles] = static_cast<int32_t>(std::min<int64_t>(kAttentionTileRows, e - i));
        pos0[tiles] = pos[i];
        tileKv[tiles] = kvOffset[i];
        ++tiles;
      }
    } else {
      for (int64_t i = t; i < e; ++i) simtTokens[simt++] = static_cast<int32_t>(i);
    }
    t = e;
  }
  *simtCount = simt;
  return tiles;
}

void attentionTrainForward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                           const float* k, const float* v, float* out, float* lse, Stream stream,
                           AttentionKernel kernel) {
  checkShape(s);
  if (B <= 0 || T <= 0) return;
  // Auto: flash only where the backward can be flash too (a training step's forward and backward then
  // use the same kernels: the SIMT backward would recompute p in fp32 against a TF32 lse)
  if (useFlash(kernel, s, B, T, kernel == AttentionKernel::Auto, {q, k, v})) {  // the float4-loaded inputs
    flash::Args f{q, k, v, start, out, lse, nullptr, nullptr, nullptr, nullptr, nullptr,
                  s.nHeads, s.nKvHeads, s.headDim, s.scale, T};
    flash::trainForward(f, B, stream);
    return;
  }
  AttnArgs a{q, k, v, out, lse, s.nHeads, s.nKvHeads, s.headDim, s.scale, nullptr, nullptr, T, start};
  attentionForwardKernel<true><<<blocksOf(B * T * s.nHeads), kAttnWarps * 32, 0, cs(stream)>>>(a);
  QK_CUDA_LAUNCHED();
}

void attentionTrainBackward(const AttentionShape& s, int64_t B, int64_t T, const int32_t* start, const float* q,
                            const float* k, const float* v, const float* out, const float* lse, const float* dout,
                            float* dq, float* dk, float* dv, Workspace& ws, Stream stream, AttentionKernel kernel) {
  checkShape(s);
  if (B <= 0 || T <= 0) return;
  const int64_t N = B * T;
  float* D = ws.get<float>(0, static_cast<size_t>(N * s.nHeads));
  attentionDKernel<<<gridFor(N * s.nHeads * 32, 256), 256, 0, cs(stream)>>>(dout, out, N * s.nHeads, s.headDim, D);
  QK_CUDA_LAUNCHED();
  if (useFlash(kernel, s, B, T, true, {q, k, v, dout})) {
    flash::Args f{q, k, v, start, nullptr, const_cast<float*>(lse), dout, D, dq, dk, dv,
                  s.nHeads, s.nKvHeads, s.headDim, s.scale, T};
    flash::trainBackward(f, B, stream);
    return;
  }
  AttnArgs a{q, k, v, nullptr, const_cast<float*>(lse), s.nHeads, s.nKvHeads, s.headDim, s.scale, nullptr, nullptr,
             T, start};
  attentionDqKernel<<<blocksOf(N * s.nHeads), kAttnWarps * 32, 0, cs(stream)>>>(a, dout, D, dq);
  QK_CUDA_LAUNCHED();
  attentionDkDvKernel<<<blocksOf(N * s.nKvHeads), kAttnWarps * 32, 0, cs(stream)>>>(a, dout, D, dk, dv);
  QK_CUDA_LAUNCHED();
}

}  // namespace qk::cuda
